"""Bad-input matrix: each kind of broken source stops the conversion with an error that
names the case and the file, and leaves nothing in nnUNet_raw (no dataset folder, no
temporary folder). Sources are phantom-written layouts, then corrupted the way real
downloads break."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

phantom = pytest.importorskip("nnunet_liver_ext.phantom")
if not hasattr(phantom, "write_tcga_dicom"):
    pytest.skip("phantom writers not available yet", allow_module_level=True)

from nnunet_liver_ext import cli  # noqa: E402
from nnunet_liver_ext.dataset_conversion import atlas, dynamic_mri, lits, msd, tcga_lihc  # noqa: E402
from nnunet_liver_ext.dataset_conversion.common import ConversionFailed, ConversionOptions  # noqa: E402

SHAPE = (12, 48, 48)


@pytest.fixture(scope="module")
def ct_cases():
    config = phantom.PhantomConfig(modality="CT", shape=SHAPE, n_lesions_range=(1, 1), motion_mm=2.0,
                                   lesion_diameter_range_mm=(8, 16))
    return phantom.generate_cases(2, config, 11, prefix="ct", progress=False)


@pytest.fixture(scope="module")
def mri_cases():
    config = phantom.PhantomConfig(modality="MRI", shape=SHAPE, n_lesions_range=(1, 1), motion_mm=2.0,
                                   lesion_diameter_range_mm=(8, 16))
    return phantom.generate_cases(2, config, 12, prefix="mri", progress=False)


@pytest.fixture(scope="module")
def atlas_cases():
    config = phantom.PhantomConfig(modality="MRI", phases=("portal_venous",), shape=SHAPE,
                                   n_lesions_range=(1, 1), lesion_diameter_range_mm=(8, 16))
    return phantom.generate_cases(2, config, 13, prefix="atlas", progress=False)


def _rewrite(path: Path, transform) -> None:
    image = sitk.ReadImage(str(path))
    out = transform(image)
    path.unlink()
    sitk.WriteImage(out, str(path))


def _with_array(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _shift_origin(voxels: float):
    def shift(image):
        out = sitk.Image(image)
        origin = list(image.GetOrigin())
        origin[0] += voxels * image.GetSpacing()[0]
        out.SetOrigin(origin)
        return out
    return shift


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not an image\xff" * 64)


# Each kind: (converter, build(src_root, cases) -> source folder, expected case id,
#             expected file fragment, expected message regex)
def lits_src(tmp, cases):
    return phantom.write_lits(tmp / "LiTS", cases)


def msd_src(tmp, cases):
    return phantom.write_msd_task03(tmp / "msd", cases)


def atlas_src(tmp, cases):
    return phantom.write_atlas(tmp / "ATLAS", cases)


def mri_src(tmp, cases):
    return phantom.write_dynamic_mri(tmp / "mri", cases)


def tcga_src(tmp, cases):
    return phantom.write_tcga_dicom(tmp / "tcga", cases)


def _series_folders(patient: Path) -> list[Path]:
    return sorted({p.parent for p in patient.rglob("*.dcm")})


def k_unreadable(tmp, c):
    src = lits_src(tmp, c); _garbage(src / "volume-1.nii"); return src


def k_empty_file(tmp, c):
    src = lits_src(tmp, c); (src / "segmentation-0.nii").write_bytes(b""); return src


def k_label_outside_schema(tmp, c):
    src = lits_src(tmp, c)
    _rewrite(src / "segmentation-1.nii", lambda im: _with_array(im, np.where(sitk.GetArrayFromImage(im) == 2, 5,
                                                                             sitk.GetArrayFromImage(im)).astype(np.uint8)))
    return src


def k_geometry_beyond_tolerance(tmp, c):
    src = lits_src(tmp, c); _rewrite(src / "segmentation-0.nii", _shift_origin(4.0)); return src


def k_duplicate_case_id(tmp, c):
    src = lits_src(tmp, c); shutil.copy(src / "volume-0.nii", src / "volume-0.nii.gz"); return src


def k_missing_label(tmp, c):
    src = lits_src(tmp, c); (src / "segmentation-1.nii").unlink(); return src


def k_orphan_label(tmp, c):
    src = msd_src(tmp, c)
    shutil.copy(src / "labelsTr" / "liver_0.nii.gz", src / "labelsTr" / "liver_7.nii.gz")
    return src


def k_listed_but_missing(tmp, c):
    src = msd_src(tmp, c); (src / "imagesTr" / "liver_1.nii.gz").unlink(); return src


def k_non_integer_label(tmp, c):
    src = msd_src(tmp, c)
    _rewrite(src / "labelsTr" / "liver_1.nii.gz",
             lambda im: _with_array(im, sitk.GetArrayFromImage(im).astype(np.float32) * 0.75))
    return src


def k_label_shape_mismatch(tmp, c):
    src = atlas_src(tmp, c)
    _rewrite(src / "train" / "labelsTr" / "lb1.nii.gz", lambda im: im[:, :40, :])
    return src


def k_4d_image(tmp, c):
    src = atlas_src(tmp, c)
    _rewrite(src / "train" / "imagesTr" / "im0.nii.gz", lambda im: sitk.JoinSeries([im, im]))
    return src


def k_missing_phase(tmp, c):
    src = mri_src(tmp, c); (src / "images" / "mri_001" / "delay.nii.gz").unlink(); return src


def k_duplicate_phase_file(tmp, c):
    src = mri_src(tmp, c)
    shutil.copy(src / "images" / "mri_000" / "pre.nii.gz", src / "images" / "mri_000" / "pre.nii"); return src


def k_duplicate_csv_row(tmp, c):
    src = mri_src(tmp, c)
    lines = (src / "labels.csv").read_text().splitlines()
    (src / "labels.csv").write_text("\n".join(lines + [lines[1]]) + "\n")
    return src


def k_phase_not_covering_reference(tmp, c):
    src = mri_src(tmp, c)
    _rewrite(src / "images" / "mri_000" / "arterial.nii.gz", lambda im: im[:, :, :4])
    return src


def k_empty_dicom_series(tmp, c):
    src = tcga_src(tmp, c)
    folder = _series_folders(src / "TCGA-PH-0001")[1]
    for f in folder.iterdir():
        f.unlink()
    return src


def k_unreadable_dicom_slice(tmp, c):
    src = tcga_src(tmp, c)
    folder = _series_folders(src / "TCGA-PH-0000")[0]
    _garbage(folder / "1-004.dcm")
    return src


def k_missing_dicom_phase(tmp, c):
    src = tcga_src(tmp, c)
    truth = json.loads((src / "phantom_truth.json").read_text())["TCGA-PH-0001"]["series_description"]
    delayed = next(f for f in _series_folders(src / "TCGA-PH-0001") if truth["delayed"] in f.name)
    shutil.rmtree(delayed)
    return src


def k_mask_without_patient(tmp, c):
    src = tcga_src(tmp, c)
    shutil.copy(src / "masks" / "TCGA-PH-0000.nii.gz", src / "masks" / "TCGA-PH-0099.nii.gz")
    return src


def _truncate(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def k_truncated_nifti(tmp, c):
    src = lits_src(tmp, c); _truncate(src / "volume-1.nii", 2 / 3); return src


def k_truncated_gzip_label(tmp, c):
    src = msd_src(tmp, c); _truncate(src / "labelsTr" / "liver_0.nii.gz", 1 / 2); return src


def k_nan_voxels(tmp, c):
    src = mri_src(tmp, c)

    def with_nan(image):
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array[2, 10:14, 10:14] = np.nan
        return _with_array(image, array)
    _rewrite(src / "images" / "mri_001" / "arterial.nii.gz", with_nan)
    return src


BAD_INPUTS = {
    # kind: (converter, cases fixture, build, case id, file fragment, message)
    "unreadable file": (lits, "ct_cases", k_unreadable, "lits_1", "volume-1.nii", "unreadable image"),
    "empty file": (lits, "ct_cases", k_empty_file, "lits_0", "segmentation-0.nii", "empty"),
    "label values outside schema": (lits, "ct_cases", k_label_outside_schema, "lits_1", "segmentation-1.nii",
                                    r"outside the schema.*5 \("),
    "geometry beyond tolerance": (lits, "ct_cases", k_geometry_beyond_tolerance, "lits_0", "segmentation-0.nii",
                                  "geometry mismatch beyond tolerance"),
    "duplicate case id": (lits, "ct_cases", k_duplicate_case_id, "lits_0", "volume-0.nii", "duplicate case id"),
    "missing label": (lits, "ct_cases", k_missing_label, "lits_1", "volume-1.nii", "without a segmentation"),
    "label without image": (msd, "ct_cases", k_orphan_label, "liver_7", "labelsTr/liver_7.nii.gz",
                            "label without a matching image"),
    "listed case missing": (msd, "ct_cases", k_listed_but_missing, "liver_1", "imagesTr/liver_1.nii.gz",
                            "missing from imagesTr"),
    "non-integer label": (msd, "ct_cases", k_non_integer_label, "liver_1", "labelsTr/liver_1.nii.gz",
                          "non-integer"),
    "label shape mismatch": (atlas, "atlas_cases", k_label_shape_mismatch, "atlas_001", "lb1.nii.gz",
                             "geometry mismatch"),
    "4D image": (atlas, "atlas_cases", k_4d_image, "atlas_000", "im0.nii.gz", "expected a 3D image"),
    "missing phase (NIfTI)": (dynamic_mri, "mri_cases", k_missing_phase, "mri_001", "delay.nii.gz",
                              r"missing phase\(s\) \['delay'\]"),
    "duplicate phase file": (dynamic_mri, "mri_cases", k_duplicate_phase_file, "mri_000", "pre.nii",
                             "duplicate phase"),
    "duplicate id in case table": (dynamic_mri, "mri_cases", k_duplicate_csv_row, "mri_000", "labels.csv",
                                   "duplicate case id"),
    "phase not covering reference": (dynamic_mri, "mri_cases", k_phase_not_covering_reference, "mri_000",
                                     "arterial.nii.gz", "geometry mismatch after registration"),
    "empty DICOM series": (tcga_lihc, "ct_cases", k_empty_dicom_series, "TCGA-PH-0001", "TCGA-PH-0001/",
                           "empty DICOM series folder"),
    "unreadable DICOM slice": (tcga_lihc, "ct_cases", k_unreadable_dicom_slice, "TCGA-PH-0000", "/1-004.dcm",
                               "not a readable DICOM image"),
    "missing phase (DICOM)": (tcga_lihc, "ct_cases", k_missing_dicom_phase, "TCGA-PH-0001", "TCGA-PH-0001",
                              r"missing phase\(s\) \['delayed'\]"),
    "mask without patient": (tcga_lihc, "ct_cases", k_mask_without_patient, "TCGA-PH-0099", "TCGA-PH-0099.nii.gz",
                             "mask without a patient folder"),
    # SimpleITK reads these as zeros without an error (the voxels are checked as stored)
    "truncated NIfTI": (lits, "ct_cases", k_truncated_nifti, "lits_1", "volume-1.nii", "truncated or corrupt"),
    "truncated .nii.gz label": (msd, "ct_cases", k_truncated_gzip_label, "liver_0", "labelsTr/liver_0.nii.gz",
                                "truncated or corrupt"),
    "NaN voxels in a phase": (dynamic_mri, "mri_cases", k_nan_voxels, "mri_001", "arterial.nii.gz",
                              "contains 16 NaN voxels of"),
}


def _leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_names_case_and_file_and_leaves_nothing(kind, tmp_path, request):
    converter, cases_fixture, build, case_id, file_fragment, message = BAD_INPUTS[kind]
    src = build(tmp_path, request.getfixturevalue(cases_fixture))
    raw = tmp_path / "raw"
    with pytest.raises(ConversionFailed) as info:
        converter.convert(src, ConversionOptions(str(raw), 42, "Bad", progress=False))
    errors = [e for e in info.value.errors if e.case_id == case_id]
    assert errors, f"no error names case {case_id!r}: {info.value}"
    text = str(errors[0])
    assert f"case {case_id!r}" in text and file_fragment in text, text
    import re
    assert re.search(message, text), text
    assert str(src) in text or file_fragment in text
    assert _leftovers(raw) == [], _leftovers(raw)


def test_skip_incomplete_skips_and_reports_missing_phase(tmp_path, mri_cases):
    src = k_missing_phase(tmp_path, mri_cases)
    out = dynamic_mri.convert(src, ConversionOptions(str(tmp_path / "raw"), 43, "Skip", skip_incomplete=True,
                                                     progress=False))
    report = json.loads((out / "conversion_report.json").read_text())
    skipped = [c for c in report["cases"] if c["status"] == "skipped"]
    assert [c["case_id"] for c in skipped] == ["mri_001"] and "delay" in skipped[0]["reason"]
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 1 and "mri_001" not in dataset_json["enhancement"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["mri_000.nii.gz"]


def test_skip_incomplete_skips_a_phase_that_covers_too_little(tmp_path, mri_cases):
    """A patient whose arterial scan covers a slab of the portal venous field of view: skipped, not the end of
    the dataset."""
    src = k_phase_not_covering_reference(tmp_path, mri_cases)
    out = dynamic_mri.convert(src, ConversionOptions(str(tmp_path / "raw"), 45, "Cover", skip_incomplete=True,
                                                     progress=False))
    skipped = [c for c in json.loads((out / "conversion_report.json").read_text())["cases"] if c["status"] == "skipped"]
    assert [c["case_id"] for c in skipped] == ["mri_000"] and "covers only" in skipped[0]["reason"]


def test_skip_incomplete_does_not_hide_other_errors(tmp_path, ct_cases):
    src = k_label_outside_schema(tmp_path, ct_cases)
    with pytest.raises(ConversionFailed, match="lits_1"):
        lits.convert(src, ConversionOptions(str(tmp_path / "raw"), 44, "X", skip_incomplete=True, progress=False))
    assert _leftovers(tmp_path / "raw") == []


def test_label_geometry_within_tolerance_is_resampled_with_warning(tmp_path, ct_cases):
    src = lits_src(tmp_path, ct_cases)
    _rewrite(src / "segmentation-0.nii", _shift_origin(0.4))
    with pytest.warns(UserWarning, match="lits_0.*within tolerance"):
        out = lits.convert(src, ConversionOptions(str(tmp_path / "raw"), 45, "Tol", progress=False))
    report = json.loads((out / "conversion_report.json").read_text())
    case = next(c for c in report["cases"] if c["case_id"] == "lits_0")
    assert any("nearest neighbour" in w for w in case["warnings"])
    label = sitk.ReadImage(str(out / "labelsTr" / "lits_0.nii.gz"))
    image = sitk.ReadImage(str(out / "imagesTr" / "lits_0_0000.nii.gz"))
    assert label.GetSize() == image.GetSize() and label.GetOrigin() == image.GetOrigin()


def test_cli_reports_bad_input_and_existing_id(tmp_path, ct_cases, capsys):
    src = k_unreadable(tmp_path, ct_cases)
    raw = tmp_path / "raw"
    assert cli.main(["convert", "lits", str(src), "-d", "46", "--raw", str(raw), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "case 'lits_1'" in err and "volume-1.nii" in err and _leftovers(raw) == []
    (src / "volume-1.nii").unlink()
    (src / "segmentation-1.nii").unlink()
    assert cli.main(["convert", "lits", str(src), "-d", "46", "--raw", str(raw), "--no-progress"]) == 0
    assert "Dataset046_LiTS: converted 1 training" in capsys.readouterr().out
    assert cli.main(["convert", "lits", str(src), "-d", "46", "--name", "Other", "--raw", str(raw),
                     "--no-progress"]) == 1
    assert "dataset id 46 is taken" in capsys.readouterr().err
    assert cli.main(["convert", "lits", str(src), "-d", "46", "--name", "Other", "--raw", str(raw),
                     "--overwrite", "--no-progress"]) == 0
    assert _leftovers(raw) == ["Dataset046_Other"]


def _rewrite_csv(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new))


def test_classes_csv_ids_in_another_letter_case_are_an_error_naming_the_file(tmp_path, ct_cases):
    """TCGA ids typed in lower case matched no patient folder: every class was lost without a word."""
    src = tcga_src(tmp_path, ct_cases)
    _rewrite_csv(src / "classes.csv", "TCGA-PH-", "tcga-ph-")
    raw = tmp_path / "raw"
    with pytest.raises(ConversionFailed) as info:
        tcga_lihc.convert(src, ConversionOptions(str(raw), 47, "Case", progress=False))
    text = str(info.value)
    assert "classes.csv: 2 row(s) name no patient folder" in text, text
    assert "'tcga-ph-0000' (differs only in letter case from TCGA-PH-0000)" in text, text
    assert "patient folder(s) without a row: TCGA-PH-0000, TCGA-PH-0001" in text, text
    assert "fix: correct these ids" in text
    assert _leftovers(raw) == []


def test_labels_csv_row_that_names_no_case_is_an_error(tmp_path, mri_cases):
    """A typo'd id lost that case's class, and its enhancement curve came from the images instead."""
    src = mri_src(tmp_path, mri_cases)
    _rewrite_csv(src / "labels.csv", "mri_001,", "mri_01,")
    raw = tmp_path / "raw"
    with pytest.raises(ConversionFailed, match=r"labels.csv: 1 row\(s\) name no case folder in .*images: "
                                               r"'mri_01'; case folder\(s\) without a row: mri_001\. Ids must match"):
        dynamic_mri.convert(src, ConversionOptions(str(raw), 48, "Typo", progress=False))
    assert _leftovers(raw) == []
    # through the CLI: one error, exit status 1
    assert cli.main(["convert", "dynamic-mri", str(src), "-d", "48", "--raw", str(raw), "--no-progress"]) == 1


def _edit_msd_json(src: Path, edit) -> None:
    path = src / "dataset.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_msd_dataset_json_with_nnunet_v2_labels_converts(tmp_path, ct_cases):
    src = msd_src(tmp_path, ct_cases)

    def v2(data):
        data["labels"] = {"background": 0, "liver": 1, "cancer": 2}
        data["channel_names"] = data.pop("modality")
        data["file_ending"] = ".nii"  # nnU-Net v2 keys of the source must not override what was written
        return data
    _edit_msd_json(src, v2)
    out = msd.convert(src, ConversionOptions(str(tmp_path / "raw"), 49, "Liver", progress=False))
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert dataset_json["channel_names"] == {"0": "CT"} and dataset_json["file_ending"] == ".nii.gz"


def _without_image(data):
    data["training"][1] = {"img": data["training"][1]["image"], "label": data["training"][1]["label"]}
    return data


def _training_not_a_list(data):
    data["training"] = {"a": 1}
    return data


def _region_labels(data):
    data["labels"] = {"background": 0, "liver": [1, 2], "cancer": 2}
    return data


def _no_background(data):
    data["labels"] = {"1": "liver", "2": "cancer"}
    return data


def _two_channels(data):
    data["modality"] = {"0": "CT", "1": "PET"}
    return data


@pytest.mark.parametrize("edit,message", [
    (lambda data: [1, 2], "expected a JSON object with 'labels'.*got a list"),
    (_without_image, r"'training' entry 1 has no \"image\" path: \{\"img\""),
    (_training_not_a_list, "'training' must be a list.*got a dict"),
    (_region_labels, "'labels' must map values to names"),
    (_no_background, r"'labels' has no value 0 \(background\)"),
    (_two_channels, r"needs exactly one 'modality' entry \"0\""),
], ids=["top-level list", "entry without image", "training not a list", "region labels", "no background",
        "two channels"])
def test_unexpected_msd_dataset_json_is_one_error_naming_it(tmp_path, ct_cases, edit, message):
    src = msd_src(tmp_path, ct_cases)
    _edit_msd_json(src, edit)
    raw = tmp_path / "raw"
    with pytest.raises(ConversionFailed) as info:
        msd.convert(src, ConversionOptions(str(raw), 50, "Liver", progress=False))
    (error,) = info.value.errors
    import re
    assert str(error).startswith(f"file {src / 'dataset.json'}: ") and re.search(message, str(error)), str(error)
    assert _leftovers(raw) == []
