"""Shared converter machinery on small hand-made images: phase keywords, label schema,
geometry tolerance, orientation, case tables, the atomic folder (refuse / overwrite /
resume) and registration accuracy against a known rigid motion."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.dataset_conversion import common, lits, registration
from nnunet_liver_ext.dataset_conversion.common import (ConversionError, ConversionFailed, ConversionOptions,
                                                        IncompleteCaseError)
from nnunet_liver_ext.dataset_conversion.tcga_lihc import phase_from_description


def _image(array, spacing=(0.8, 0.7, 2.5), origin=(-10.0, 5.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _label_array(shape=(12, 40, 36)):
    label = np.zeros(shape, np.uint8)
    label[3:9, 8:30, 6:28] = 1
    label[5:7, 14:19, 10:15] = 2
    return label


@pytest.mark.parametrize("description,phase", [
    ("ARTERIAL PHASE", "arterial"), ("AP", "arterial"), ("Art 1.25mm", "arterial"), ("ap_5mm", "arterial"),
    ("PORTAL VENOUS", "portal_venous"), ("PV", "portal_venous"), ("Venous", "portal_venous"),
    ("DELAYED", "delayed"), ("Equilibrium 3 min", "delayed"),
    ("NON-CONTRAST", "pre_contrast"), ("Pre", "pre_contrast"), ("non contrast", "pre_contrast"),
    ("CAPSULE", None), ("TRAP DOOR", None), ("LOCALIZER", None), ("", None),
    ("pre arterial", None),  # names two phases: refuse to guess
])
def test_phase_keywords_are_word_aware_and_case_insensitive(description, phase):
    assert phase_from_description(description) == phase


def test_phase_names_match_the_phantom():
    phantom = pytest.importorskip("nnunet_liver_ext.phantom")
    assert common.CT_PHASES == phantom.CT_PHASES
    assert common.MRI_PHASES == phantom.MRI_PHASES
    assert common.LESION_CLASSES == phantom.LESION_CLASSES
    assert common.REFERENCE_PHASE == phantom.REFERENCE_PHASE


def test_label_schema_accepts_integral_floats_and_names_bad_values():
    label = _label_array().astype(np.float32)
    out = common.check_label_values(_image(label), "c1", "/x/seg.nii")
    assert out.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), label)
    label[0, 0, :3] = 3
    with pytest.raises(ConversionError, match=r"case 'c1', file /x/seg.nii: label values outside.*3 \(3 voxels\)"):
        common.check_label_values(_image(label), "c1", "/x/seg.nii")
    label[0, 0, :3] = 0.5
    with pytest.raises(ConversionError, match="non-integer"):
        common.check_label_values(_image(label), "c1", "/x/seg.nii")


def test_label_within_tolerance_is_resampled_with_warning_and_beyond_is_an_error():
    label_array = _label_array()
    image = _image(np.zeros_like(label_array, dtype=np.int16))
    shifted = _image(label_array, origin=(-10.0 + 0.3 * 0.8, 5.0, 3.0))  # 0.3 voxel in x
    with pytest.warns(UserWarning, match="within tolerance"):
        out, notes = common.match_label_to_image(shifted, image, "c1", "seg.nii", tol_vox=1.0)
    assert out.GetSize() == image.GetSize() and out.GetOrigin() == image.GetOrigin()
    assert "nearest neighbour" in notes[0]
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1, 2}
    far = _image(label_array, origin=(-10.0 + 3 * 0.8, 5.0, 3.0))  # 3 voxels
    with pytest.raises(ConversionError, match=r"case 'c1', file seg.nii: image/label geometry mismatch.*3.00 voxels"):
        common.match_label_to_image(far, image, "c1", "seg.nii", tol_vox=1.0)
    smaller = _image(label_array[:, :, :30])
    with pytest.raises(ConversionError, match="geometry mismatch"):
        common.match_label_to_image(smaller, image, "c1", "seg.nii", tol_vox=1.0)


def test_label_stored_in_another_orientation_is_reoriented_exactly():
    label_array = _label_array()
    image = _image(np.zeros_like(label_array, dtype=np.int16))
    flipped = sitk.Flip(_image(label_array), [True, False, True])  # same box, x and z reversed
    assert common.orientation_code(flipped) != common.orientation_code(image)
    out, notes = common.match_label_to_image(flipped, image, "c1", "seg.nii")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), label_array)
    assert "reoriented" in notes[0]


def test_conversion_error_names_case_and_file_and_survives_pickling():
    error = IncompleteCaseError("missing phase(s) ['delay']", "case_7", "/src/images/case_7/delay.nii.gz")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == "case 'case_7', file /src/images/case_7/delay.nii.gz: missing phase(s) ['delay']"
    assert clone.skippable and isinstance(clone, IncompleteCaseError)


def test_case_table_normalises_classes_and_rejects_duplicates(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("case_id,class,pre,arterial,portal_venous,delay\n"
                     "a,hcc,1,2,3,4\nb,Hemangioma,,,,\nc,,,,,\n")
    rows = common.read_case_table(table, ("case_id",), ("pre", "arterial", "portal_venous", "delay"))
    assert rows == {"a": {"class": "HCC", "curve": [1.0, 2.0, 3.0, 4.0]},
                    "b": {"class": "hemangioma", "curve": None}, "c": {"class": None, "curve": None}}
    table.write_text("case_id,class\na,HCC\na,cyst\n")
    with pytest.raises(ConversionFailed, match=r"case 'a', file .*labels.csv: duplicate case id"):
        common.read_case_table(table, ("case_id",))


def test_options_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset id"):
        ConversionOptions(str(tmp_path), 0, "X")
    with pytest.raises(ValueError, match="dataset name"):
        ConversionOptions(str(tmp_path), 5, "bad name/")
    with pytest.raises(ValueError, match="phases mode"):
        ConversionOptions(str(tmp_path), 5, "X", phases_mode="channels")
    with pytest.raises(ValueError, match="phase subset"):
        lits.convert(tmp_path, ConversionOptions(str(tmp_path), 5, "X", phase_subset=("arterial",)))


def _write_lits_source(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = _label_array()
        volume = (np.random.default_rng(i).normal(0, 30, label.shape) + 100 * label).astype(np.int16)
        sitk.WriteImage(_image(volume), str(folder / f"volume-{i}.nii"))
        sitk.WriteImage(_image(label), str(folder / f"segmentation-{i}.nii"))
    return folder


def test_existing_id_is_refused_whatever_its_name_and_overwrite_replaces_it(tmp_path):
    src = _write_lits_source(tmp_path / "src")
    raw = tmp_path / "raw"
    (raw / "Dataset007_Other").mkdir(parents=True)
    (raw / "Dataset007_Other" / "marker").write_text("keep me unless --overwrite")
    options = ConversionOptions(str(raw), 7, "LiTS", progress=False)
    with pytest.raises(FileExistsError, match="Dataset007_Other"):
        lits.convert(src, options)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset007_Other"]
    out = lits.convert(src, ConversionOptions(str(raw), 7, "LiTS", overwrite=True, progress=False))
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset007_LiTS"] and out == raw / "Dataset007_LiTS"
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["num_converted"] == {"train": 3, "test": 0} and report["num_skipped"] == 0


def _interrupting_worker(task, out_dir, options):
    """Real LiTS worker that simulates Ctrl-C on the third case."""
    if task.case_id == "lits_2":
        raise KeyboardInterrupt
    return common.convert_single_image_case(task, out_dir, options)


def test_interrupted_run_resumes_and_failed_run_leaves_nothing(tmp_path):
    src = _write_lits_source(tmp_path / "src", n=3)
    raw = tmp_path / "raw"
    options = ConversionOptions(str(raw), 8, "LiTS", progress=False)
    tasks = lits.discover(src)
    make_json = common.single_phase_dataset_json("LiTS", "CT", "portal_venous", options, "")
    with pytest.raises(KeyboardInterrupt):
        common.run_conversion("lits", tasks, _interrupting_worker, options, make_json)
    partial = raw / ".Dataset008_LiTS.partial"
    assert sorted(p.name for p in (partial / ".done").iterdir()) == ["lits_0.json", "lits_1.json"]
    assert not (raw / "Dataset008_LiTS").exists()
    first_mtime = (partial / "imagesTr" / "lits_0_0000.nii.gz").stat().st_mtime_ns
    out = lits.convert(src, options)
    assert (out / "imagesTr" / "lits_0_0000.nii.gz").stat().st_mtime_ns == first_mtime  # resumed, not redone
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"lits_{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset008_LiTS"]
    # a changed source invalidates the partial folder of an earlier run
    (src / "segmentation-1.nii").write_bytes(b"not a nifti")
    with pytest.raises(ConversionFailed, match=r"case 'lits_1', file .*segmentation-1.nii: unreadable image"):
        lits.convert(src, ConversionOptions(str(raw), 9, "LiTS", progress=False))
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset008_LiTS"]


def test_parallel_workers_give_the_same_dataset(tmp_path):
    src = _write_lits_source(tmp_path / "src", n=3)
    one = lits.convert(src, ConversionOptions(str(tmp_path / "a"), 10, "LiTS", progress=False))
    two = lits.convert(src, ConversionOptions(str(tmp_path / "b"), 10, "LiTS", num_workers=2, progress=False))
    assert json.loads((one / "dataset.json").read_text()) == json.loads((two / "dataset.json").read_text())
    for name in ("lits_0", "lits_2"):
        a = sitk.ReadImage(str(one / "labelsTr" / f"{name}.nii.gz"))
        b = sitk.ReadImage(str(two / "labelsTr" / f"{name}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_orient_option_reorients_every_case_consistently(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    label = _label_array()
    flipped_direction = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    for i, direction in enumerate([(1, 0, 0, 0, 1, 0, 0, 0, 1), flipped_direction]):
        sitk.WriteImage(_image(label.astype(np.int16) * 100, direction=direction), str(src / f"volume-{i}.nii.gz"))
        sitk.WriteImage(_image(label, direction=direction), str(src / f"segmentation-{i}.nii.gz"))
    out = lits.convert(src, ConversionOptions(str(tmp_path / "raw"), 11, "LiTS", orient="LPS", progress=False))
    images = [sitk.ReadImage(str(out / "imagesTr" / f"lits_{i}_0000.nii.gz")) for i in range(2)]
    labels = [sitk.ReadImage(str(out / "labelsTr" / f"lits_{i}.nii.gz")) for i in range(2)]
    assert all(common.orientation_code(x) == "LPS" for x in images + labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels[0]), label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels[1]), label[:, ::-1, ::-1])


def test_rigid_registration_recovers_known_motion_within_a_voxel():
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:32, :96, :96]
    body = ((y - 48) ** 2 / 40 ** 2 + (x - 48) ** 2 / 44 ** 2) < 1
    liver = body & (((y - 40) ** 2 / 20 ** 2 + (x - 35) ** 2 / 22 ** 2 + (z - 16) ** 2 / 12 ** 2) < 1)
    array = np.where(body, 40.0, -1000.0) + 60.0 * liver + rng.normal(0, 10, body.shape)
    array[((y - 60) ** 2 + (x - 62) ** 2) < 36] = 300  # a vessel-like landmark
    fixed = _image(array.astype(np.float32), spacing=(0.8, 0.8, 3.0))
    center = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
    truth = registration.euler_from_motion((1.5, -1.0, 2.0), (2.5, -3.0, 1.5), center)
    # the phantom's convention: the point p of the reference appears at T(p) in the moved
    # phase, i.e. moving(T(p)) = fixed(p), which Resample with T^-1 produces
    moving = sitk.Resample(fixed, fixed, truth.GetInverse(), sitk.sitkLinear, -1000.0)
    result = registration.register_rigid(fixed, moving)
    points = registration.mask_points(_image(liver.astype(np.uint8), spacing=(0.8, 0.8, 3.0)), (1,))
    before = registration.displacement_vox(sitk.Euler3DTransform(), truth, points, fixed)
    residual = registration.displacement_vox(result.transform, truth, points, fixed)
    assert before.mean() > 2.0
    assert residual.max() <= 1.0 and residual.mean() < 0.5
    assert result.metric_after < result.metric_before


def test_resume_fingerprint_sees_nested_files_named_files_contents_and_classes(tmp_path):
    """An interrupted run resumes only when nothing that shapes a case changed: a DICOM slice two folders down
    in a patient's tree, the contents of --phase-map, a case's class."""
    import os

    patient = tmp_path / "P" / "study" / "series"
    patient.mkdir(parents=True)
    (patient / "1-001.dcm").write_bytes(b"a")
    mapping = tmp_path / "map.json"
    mapping.write_text('{"A": "arterial"}')
    options = ConversionOptions(str(tmp_path / "raw"), 501, "T", phase_map=str(mapping), progress=False)

    def fingerprint(case_class="HCC"):
        task = common.CaseTask("P", "train", {"patient_dir": str(tmp_path / "P")}, case_class=case_class)
        return common.source_fingerprint([task], options, "tcga-lihc")

    before = fingerprint()
    assert fingerprint() == before
    (patient / "1-001.dcm").write_bytes(b"bb")
    os.utime(patient / "1-001.dcm", ns=(1, 1))
    after_slice = fingerprint()
    assert after_slice != before
    mapping.write_text('{"A": "delayed"}')
    assert fingerprint() != after_slice
    assert fingerprint("cyst") != fingerprint("HCC")


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), -0.5])
def test_options_reject_a_tolerance_that_is_not_a_finite_number(tmp_path, tolerance):
    # NaN compares False with everything: a NaN tolerance let a label 30 voxels off its image through
    with pytest.raises(ValueError, match="finite number >= 0"):
        ConversionOptions(str(tmp_path), 5, "X", geometry_tolerance_vox=tolerance)


@pytest.mark.parametrize("code,valid", [("LPS", True), ("RAS", True), ("PLI", True), ("SAR", True),
                                        ("LLP", False), ("RLS", False), ("AAA", False), ("LPX", False),
                                        ("lps", False), ("LP", False), ("LPSI", False)])
def test_options_accept_only_real_orientation_codes(tmp_path, code, valid):
    if valid:
        assert ConversionOptions(str(tmp_path), 5, "X", orient=code).orient == code
        image = _image(_label_array())
        assert common.orientation_code(common.reorient(image, code)) == code  # SimpleITK agrees
    else:
        with pytest.raises(ValueError, match="one of R/L, one of A/P and one of S/I"):
            ConversionOptions(str(tmp_path), 5, "X", orient=code)


def test_case_table_that_is_not_utf8_names_the_file_and_the_fix(tmp_path):
    table = tmp_path / "classes.csv"
    table.write_bytes("case_id,class\na,HCC\nb,h\xe9mangiome\n".encode("latin-1"))
    with pytest.raises(ConversionFailed, match=r"file .*classes.csv: the case table is not UTF-8 text "
                                               r"\(byte 0xe9 on line 3.*save it as UTF-8"):
        common.read_case_table(table, ("case_id",))
    table.write_bytes("\ufeffcase_id,class\nb,h\xe9mangiome\n".encode("utf-8"))  # Excel's 'CSV UTF-8' has a BOM
    assert common.read_case_table(table, ("case_id",)) == {"b": {"class": "h\xe9mangiome", "curve": None}}


def _nnunet_folders(tmp_path, monkeypatch):
    folders = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folders[var] = tmp_path / var
        folders[var].mkdir()
        monkeypatch.setenv(var, str(folders[var]))
    return folders


def test_id_held_by_another_name_in_preprocessed_or_results_is_refused(tmp_path, monkeypatch):
    """nnU-Net allows one name per id over its three folders; a raw folder with a new name next to another name's
    preprocessed data stops every later nnU-Net command with 'More than one dataset name found'."""
    src = _write_lits_source(tmp_path / "src", n=2)
    folders = _nnunet_folders(tmp_path, monkeypatch)
    (folders["nnUNet_preprocessed"] / "Dataset021_Old").mkdir()
    (folders["nnUNet_results"] / "Dataset021_Old" / "nnUNetTrainer__nnUNetPlans__3d_fullres").mkdir(parents=True)
    raw = folders["nnUNet_raw"]
    for overwrite in (False, True):
        with pytest.raises(FileExistsError) as info:
            lits.convert(src, ConversionOptions(str(raw), 21, "New", overwrite=overwrite, progress=False))
        text = str(info.value)
        assert "dataset id 21 is taken" in text and "More than one dataset name" in text
        assert f"nnUNet_preprocessed ({folders['nnUNet_preprocessed'] / 'Dataset021_Old'})" in text
        assert f"nnUNet_results ({folders['nnUNet_results'] / 'Dataset021_Old'})" in text
        assert "fix: choose a free id (-d 22 is free)" in text
        assert list(raw.iterdir()) == []
    # the same name is the same dataset: converting it again (its raw folder was deleted) is fine
    out = lits.convert(src, ConversionOptions(str(raw), 21, "Old", progress=False))
    assert out == raw / "Dataset021_Old"


def test_overwrite_keeps_an_old_name_that_has_preprocessed_data(tmp_path, monkeypatch):
    src = _write_lits_source(tmp_path / "src", n=2)
    folders = _nnunet_folders(tmp_path, monkeypatch)
    raw = folders["nnUNet_raw"]
    lits.convert(src, ConversionOptions(str(raw), 22, "Old", progress=False))
    (folders["nnUNet_preprocessed"] / "Dataset022_Old").mkdir()
    with pytest.raises(FileExistsError, match=r"(?s)nnUNet_preprocessed \(.*Dataset022_Old\).*never deletes "
                                              r"preprocessed data or results"):
        lits.convert(src, ConversionOptions(str(raw), 22, "New", overwrite=True, progress=False))
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset022_Old"]
    assert (raw / "Dataset022_Old" / "dataset.json").is_file()
    assert (folders["nnUNet_preprocessed"] / "Dataset022_Old").is_dir()
    # under its own name --overwrite replaces the raw folder as before (re-preprocessing is the user's next step)
    lits.convert(src, ConversionOptions(str(raw), 22, "Old", overwrite=True, progress=False))
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset022_Old"]


def test_id_taken_between_start_and_commit_is_refused_at_commit(tmp_path, monkeypatch):
    """Preprocessing of another dataset with the same id may start while a long conversion runs."""
    src = _write_lits_source(tmp_path / "src", n=2)
    folders = _nnunet_folders(tmp_path, monkeypatch)
    options = ConversionOptions(str(folders["nnUNet_raw"]), 23, "New", progress=False)
    make_json = common.single_phase_dataset_json("New", "CT", "portal_venous", options, "")

    def make_json_while_another_claims_the_id(results):
        (folders["nnUNet_results"] / "Dataset023_Other").mkdir()
        return make_json(results)
    with pytest.raises(FileExistsError, match="Dataset023_Other"):
        common.run_conversion("lits", lits.discover(src), common.convert_single_image_case, options,
                              make_json_while_another_claims_the_id)
    assert list(folders["nnUNet_raw"].iterdir()) == []


def test_case_table_rows_naming_no_case_are_an_error_unless_every_case_has_its_row(tmp_path):
    """Such a row loses something only when its case is in the source, and then that case has no row (a typo) or
    its id differs in letter case; rows of patients that were not downloaded lose nothing."""
    table = tmp_path / "classes.csv"
    rows = {"TCGA-A": {"class": "HCC", "curve": None}, "TCGA-B": {"class": None, "curve": None},
            "TCGA-Z": {"class": "cyst", "curve": None}}
    with pytest.warns(UserWarning, match=r"classes.csv: 1 row\(s\) name no patient .*not used.*'TCGA-Z'"):
        common.check_case_table_matches(rows, ["TCGA-A", "TCGA-B"], table, "/src", "patient")
    with pytest.raises(ConversionFailed, match=r"'TCGA-Z'; patient\(s\) without a row: TCGA-C\. .*fix: correct"):
        common.check_case_table_matches(rows, ["TCGA-A", "TCGA-B", "TCGA-C"], table, "/src", "patient")
    with pytest.raises(ConversionFailed, match=r"'TCGA-Z' \(differs only in letter case from tcga-z\)"):
        common.check_case_table_matches(dict(rows, **{"tcga-z": rows["TCGA-Z"]}), ["TCGA-A", "TCGA-B", "tcga-z"],
                                        table, "/src", "patient")


def test_registration_geometry_helpers_work_in_physical_xyz_and_grid_voxels():
    """Guards against mask points in index (z, y, x) order instead of physical x, y, z, displacements reported in
    mm instead of voxels of the grid, and a resampled phase filled with 0 (soft tissue in CT) instead of air."""
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1, 2, 3] = 1
    grid = _image(mask, spacing=(0.8, 0.7, 2.5))
    np.testing.assert_allclose(registration.mask_points(grid, (1,)), [[-10.0 + 3 * 0.8, 5.0 + 2 * 0.7, 3.0 + 2.5]])
    points = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    for shift in ((0.8, 0.0, 0.0), (0.0, 0.7, 0.0), (0.0, 0.0, 2.5)):  # one voxel along each axis
        moved = registration.euler_from_motion((0, 0, 0), shift, (0, 0, 0))
        np.testing.assert_allclose(registration.displacement_vox(moved, sitk.Euler3DTransform(), points, grid), 1.0)
    image = _image(np.full((4, 5, 6), 50.0, np.float32))
    image[0, 0, 0] = -1000.0
    moved = registration.euler_from_motion((0, 0, 0), (3 * 0.8, 0, 0), (0, 0, 0))
    resampled = sitk.GetArrayFromImage(registration.resample_onto(image, image, moved))
    assert (resampled[:, :, -3:] == -1000.0).all() and resampled[1, 1, 1] == 50.0
