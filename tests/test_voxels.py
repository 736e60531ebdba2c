"""nnunet_liver_ext.voxels: the voxels of an image file as stored, for the checks SimpleITK cannot make (it reads a
truncated NIfTI file and NaN voxels as zeros); shared by predict's input check, the converters and evaluate."""
import gzip

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.dataset_conversion.common import ConversionError, read_image
from nnunet_liver_ext.voxels import non_finite_description, stored_voxels


def _volume():
    return np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)


def test_an_uncompressed_file_named_nii_gz_is_read_as_simpleitk_and_nnunet_read_it(tmp_path):
    """Misnamed, not damaged: nibabel.load took it for a broken gzip file and the converters refused a valid case."""
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(_volume()), str(plain))
    misnamed = tmp_path / "case.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    assert np.array_equal(stored_voxels(str(misnamed)).T, _volume())  # NIfTI's x-fastest order
    assert read_image(misnamed, "c").GetSize() == (6, 5, 4)
    # a real .nii.gz cut short is still damaged
    packed = tmp_path / "cut.nii.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes())[:-40])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        read_image(packed, "c")


def test_scaled_integer_voxels_are_checked_without_a_float64_copy(tmp_path):
    """dcm2niix writes int16 CT with scl_inter -1024; applying the scaling made a float64 copy of the whole volume
    in every converter worker, which holds SimpleITK's copy as well."""
    image = nibabel.Nifti1Image(_volume().T, np.eye(4))
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nibabel.save(image, str(path))
    voxels = stored_voxels(str(path))
    assert voxels.dtype == np.int16 and non_finite_description(voxels) is None
    float_image = nibabel.Nifti1Image(np.where(_volume() == 7, np.nan, _volume()).astype(np.float32).T, np.eye(4))
    nibabel.save(float_image, str(tmp_path / "nan.nii.gz"))
    assert non_finite_description(stored_voxels(str(tmp_path / "nan.nii.gz"))) == "1 NaN voxel of 120"
