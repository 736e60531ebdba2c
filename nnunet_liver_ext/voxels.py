"""An image file's voxels as stored, for the checks SimpleITK cannot make: shared by ``nnunet-liver predict``'s
input check, the converters and the evaluation's reader.

SimpleITK 2.5 (ITK 5.4) reads NaN and infinite NIfTI voxels as 0 and fills the missing part of a truncated
NIfTI file with zeros, without an error: through it a damaged image or segmentation looks like a valid one
(nnU-Net's ``SimpleITKIO`` reads the same way). NIfTI voxels are therefore read with nibabel, which raises on a
truncated file and keeps NaN; other formats come from SimpleITK, which keeps NaN there.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

NIFTI_ENDINGS = (".nii", ".nii.gz")


def stored_voxels(path: str, read_with_sitk=None) -> np.ndarray:
    """The voxel values of ``path`` as stored, for the checks: every voxel is read (a truncated file raises), and NaN
    stays NaN. NIfTI: nibabel, without the header's scaling (scl_slope/scl_inter cannot make an integer voxel NaN,
    and applying it to an int16 CT volume makes a float64 copy: 4x the memory a converter worker already holds);
    any other format: ``read_with_sitk()`` (a SimpleITK image or ``ImageFileReader.Execute``), or SimpleITK's
    reader. Raises what the reader raises on a damaged file (zlib, nibabel and ITK each their own kind)."""
    path = str(path)
    if path.endswith(NIFTI_ENDINGS):
        import nibabel

        if path.endswith(".gz"):
            with open(path, "rb") as f:
                if f.read(2) != b"\x1f\x8b":
                    # named .nii.gz but stored uncompressed: SimpleITK (and nnU-Net) read it, nibabel.load would take
                    # it for a broken gzip file
                    f.seek(0)
                    try:
                        image = nibabel.Nifti1Image.from_stream(f)
                    except Exception:  # noqa: BLE001 - not NIfTI-1: NIfTI-2, or really damaged (raises again below)
                        f.seek(0)
                        image = nibabel.Nifti2Image.from_stream(f)
                    return np.asanyarray(image.dataobj.get_unscaled())
        return np.asanyarray(nibabel.load(path).dataobj.get_unscaled())
    import SimpleITK as sitk

    image = read_with_sitk() if read_with_sitk is not None else sitk.ReadImage(path)
    return sitk.GetArrayViewFromImage(image)


def non_finite_description(array: np.ndarray) -> Optional[str]:
    """``"3 NaN and 1 infinite voxels of 4096"`` (after the cast to float32 that nnU-Net's reader applies, so a
    float64 value beyond float32's range counts as infinite), or None when every voxel is finite."""
    if np.issubdtype(array.dtype, np.integer):
        return None
    with np.errstate(over="ignore"):
        finite = np.isfinite(array.astype(np.float32, copy=False))
    bad = int(finite.size - np.count_nonzero(finite))
    if not bad:
        return None
    nan = int(np.count_nonzero(np.isnan(array)))
    what = f"{nan} NaN" + (f" and {bad - nan} infinite" if bad > nan else "") if nan else f"{bad} infinite"
    return f"{what} voxel{'s' if bad > 1 else ''} of {finite.size}"


def short_error(error: BaseException) -> str:
    """SimpleITK's exceptions carry a C++ trace; the last non-empty line says what happened (the type's
    name for an empty message)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
