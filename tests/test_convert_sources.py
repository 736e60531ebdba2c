"""Each converter on phantom-written sources in the exact public layout.

The output must pass nnU-Net's own `nnUNetv2_plan_and_preprocess --verify_dataset_integrity`
(the real console script, in a subprocess), round-trip images, labels, spacing, origin and
direction, and carry phases, classes and curves in dataset.json where the source has them.
TCGA-style DICOM and dynamic MRI have per-phase motion: the registration residual against
the phantom's known motion must stay <= 1 voxel over the liver.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

phantom = pytest.importorskip("nnunet_liver_ext.phantom")
if not hasattr(phantom, "write_tcga_dicom"):
    pytest.skip("phantom writers not available yet", allow_module_level=True)

from nnunet_liver_ext.dataset_conversion import atlas, dynamic_mri, lits, msd, tcga_lihc  # noqa: E402
from nnunet_liver_ext.dataset_conversion.common import ConversionOptions  # noqa: E402
from nnunet_liver_ext.dataset_conversion.registration import (euler_from_motion, residual_vs_truth,  # noqa: E402
                                                              transform_from_summary)

BIN = Path(sys.executable).parent
SHAPE = (32, 96, 96)
SEED = 2024


def _ct_cases(n, prefix="ct", phases=("arterial", "portal_venous", "delayed")):
    config = phantom.PhantomConfig(modality="CT", phases=phases, shape=SHAPE, n_lesions_range=(1, 2))
    return phantom.generate_cases(n, config, SEED, prefix=prefix, progress=False)


def _mri_cases(n):
    config = phantom.PhantomConfig(modality="MRI", shape=SHAPE, n_lesions_range=(1, 2),
                                   lesion_classes=("HCC", "hemangioma"))
    return phantom.generate_cases(n, config, SEED + 1, prefix="mri", progress=False)


def verify_in_process(dataset_folder: Path, capsys=None) -> None:
    """nnU-Net's own integrity check (the function behind --verify_dataset_integrity); it
    raises or asserts on any problem."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(dataset_folder), num_processes=1)


def verify_with_nnunet(raw: Path, dataset_id: int, work: Path) -> str:
    """The real console script, as a user runs it: plan and preprocess 3d_fullres."""
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"))
    proc = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                           "--verify_dataset_integrity", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                          env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "verify_dataset_integrity Done" in output
    assert "Error" not in output and "mismatch" not in output, output[-4000:]
    assert (work / "preprocessed" / raw.joinpath(next(p.name for p in raw.iterdir()
                                                      if p.name.startswith(f"Dataset{dataset_id:03d}_"))).name
            / "nnUNetPlans_3d_fullres").is_dir()
    return output


def assert_geometry(image: sitk.Image, case) -> None:
    np.testing.assert_allclose(image.GetSpacing()[::-1], case.spacing, rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), case.origin, atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), case.direction, atol=1e-5)


def read(path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def ref_image(case, aligned=False):
    return case.image(phantom.REFERENCE_PHASE, aligned=aligned)


def as_stored_ct(array):
    """CT as the public layouts store it: whole HU in the scanner's range [-1024, 3071]."""
    return np.clip(np.rint(array), -1024, 3071)


# ---------------------------------------------------------------------------- LiTS
@pytest.fixture(scope="module")
def lits_dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("lits")
    train, test = _ct_cases(3), _ct_cases(1, prefix="ct_test")
    src = phantom.write_lits(work / "LiTS", train, test_cases=test)
    out = lits.convert(src, ConversionOptions(str(work / "raw"), 501, "LiTS", progress=False))
    return work, train, test, out


def test_lits_round_trip_and_nnunet_verification(lits_dataset):
    work, train, test, out = lits_dataset
    assert any(p.suffix == ".nii" for p in (work / "LiTS").iterdir())  # the download's uncompressed files
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert dataset_json["numTraining"] == 3 and "phases" not in dataset_json
    for i, case in enumerate(train):
        image, array = read(out / "imagesTr" / f"lits_{i}_0000.nii.gz")
        label, label_array = read(out / "labelsTr" / f"lits_{i}.nii.gz")
        np.testing.assert_array_equal(array, as_stored_ct(ref_image(case)))
        np.testing.assert_array_equal(label_array, case.label)
        assert_geometry(image, case)
        assert_geometry(label, case)
    _, test_array = read(out / "imagesTs" / "lits_test_0_0000.nii.gz")
    np.testing.assert_array_equal(test_array, as_stored_ct(ref_image(test[0])))
    verify_in_process(out)


# ---------------------------------------------------------------------------- MSD
@pytest.fixture(scope="module")
def msd_dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("msd")
    train, test = _ct_cases(2), _ct_cases(1, prefix="ct_test")
    src = phantom.write_msd_task03(work / "msd", train, test_cases=test, apple_double=True)
    out = msd.convert(src, ConversionOptions(str(work / "raw"), 3, "Liver", progress=False))
    return work, train, test, src, out


def test_msd_matches_nnunet_converter_and_verifies(msd_dataset):
    work, train, test, src, out = msd_dataset
    task = msd.find_task_folder(src)
    env = dict(os.environ, nnUNet_raw=str(work / "reference_raw"), nnUNet_preprocessed=str(work / "p"),
               nnUNet_results=str(work / "r"))
    proc = subprocess.run([str(BIN / "nnUNetv2_convert_MSD_dataset"), "-i", str(task), "-overwrite_id", "3",
                           "-np", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = work / "reference_raw" / "Dataset003_Liver"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(p.name for p in (reference / sub).iterdir())
        for path in (reference / sub).iterdir():
            ours, theirs = read(out / sub / path.name), read(path)
            np.testing.assert_array_equal(ours[1], theirs[1])
            assert ours[0].GetSpacing() == theirs[0].GetSpacing()
            np.testing.assert_allclose(ours[0].GetDirection(), theirs[0].GetDirection(), atol=1e-6)
    ours_json = json.loads((out / "dataset.json").read_text())
    theirs_json = json.loads((reference / "dataset.json").read_text())
    assert {k: ours_json[k] for k in theirs_json if k not in ("numTraining", "labels")} == \
           {k: v for k, v in theirs_json.items() if k not in ("numTraining", "labels")}
    # the one deliberate difference: MSD's "cancer" is the package schema's "tumor", same value
    assert theirs_json["labels"] == {"background": 0, "liver": 1, "cancer": 2}
    assert ours_json["numTraining"] == 2 and ours_json["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["liver_2_0000.nii.gz"]
    for i, case in enumerate(train):
        _, label_array = read(out / "labelsTr" / f"liver_{i}.nii.gz")
        np.testing.assert_array_equal(label_array, case.label)
        assert_geometry(read(out / "imagesTr" / f"liver_{i}_0000.nii.gz")[0], case)
    verify_in_process(out)


# ---------------------------------------------------------------------------- ATLAS
@pytest.fixture(scope="module")
def atlas_dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("atlas")
    config = phantom.PhantomConfig(modality="MRI", phases=("portal_venous",), shape=SHAPE, n_lesions_range=(1, 2))
    cases = phantom.generate_cases(2, config, SEED, prefix="atlas", progress=False)
    src = phantom.write_atlas(work / "ATLAS", cases)
    out = atlas.convert(src, ConversionOptions(str(work / "raw"), 502, "ATLAS", phases_mode="sequence",
                                               progress=False))
    return work, cases, out


def test_atlas_round_trip_mri_channel_and_verification(atlas_dataset):
    work, cases, out = atlas_dataset
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1"}  # not "CT": nnU-Net uses z-score
    assert dataset_json["phases"] == ["portal_venous"]
    source_numbers = sorted(int(p.name[2:].split(".")[0]) for p in (work / "ATLAS" / "train" / "imagesTr").iterdir())
    for number, case in zip(source_numbers, cases):
        image, array = read(out / "imagesTr" / f"atlas_{number:03d}_0000.nii.gz")
        np.testing.assert_allclose(array, ref_image(case), rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(read(out / "labelsTr" / f"atlas_{number:03d}.nii.gz")[1], case.label)
        assert_geometry(image, case)
    verify_in_process(out)


# ---------------------------------------------------------------------------- TCGA-LIHC
def _truth_transforms(truth_entry, phases) -> dict:
    """Phase -> Euler transform from one patient's entry of phantom_truth.json."""
    motion = truth_entry.get("motion", truth_entry) if isinstance(truth_entry, dict) else truth_entry
    if isinstance(motion, list):
        motion = dict(zip(phases, motion))
    return {p: euler_from_motion(m["rotation_deg"], m["translation_mm"], m.get("center_mm", (0, 0, 0)))
            for p, m in motion.items()}


@pytest.fixture(scope="module")
def tcga_dataset(tmp_path_factory):
    work = tmp_path_factory.mktemp("tcga")
    cases = _ct_cases(3, prefix="tcga")
    src = phantom.write_tcga_dicom(work / "TCGA-LIHC", cases)
    out = tcga_lihc.convert(src, ConversionOptions(str(work / "raw"), 504, "TCGA", phases_mode="sequence",
                                                   progress=False))
    return work, cases, src, out


def test_tcga_dicom_phases_registered_within_one_voxel(tcga_dataset):
    work, cases, src, out = tcga_dataset
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["phases"] == ["arterial", "portal_venous", "delayed"]
    assert dataset_json["channel_names"] == {"0": "CT", "1": "CT", "2": "CT"}
    truth = json.loads((src / "phantom_truth.json").read_text())
    report = {c["case_id"]: c for c in json.loads((out / "conversion_report.json").read_text())["cases"]}
    worst = 0.0
    for i, case in enumerate(cases):
        pid = f"TCGA-PH-{i:04d}"
        label_image, label_array = read(out / "labelsTr" / f"{pid}.nii.gz")
        np.testing.assert_array_equal(label_array, case.label)
        assert_geometry(label_image, case)
        transforms = _truth_transforms(truth[pid], case.phases)
        liver = case.label > 0
        for k, phase in enumerate(dataset_json["phases"]):
            image, array = read(out / "imagesTr" / f"{pid}_{k:04d}.nii.gz")
            assert_geometry(image, case)
            aligned = case.image(phase, aligned=True)
            if phase == phantom.REFERENCE_PHASE:
                np.testing.assert_array_equal(array, as_stored_ct(case.image(phase)))  # int16 DICOM
                continue
            residual = residual_vs_truth(transform_from_summary(report[pid]["registration"][phase]),
                                         transforms[phase], label_image)
            worst = max(worst, residual["max_vox"])
            assert residual["max_vox"] <= 1.0, (pid, phase, residual)
            # the converter found phantom_truth.json and reports the same residual itself
            reported = report[pid]["registration"][phase]["residual_vs_truth_vox"]
            assert reported["max_vox"] == pytest.approx(residual["max_vox"], abs=0.05)
            # registered intensities inside the liver follow the motion-free phase; smoothed
            # first, since both resamplings also average the phantom's voxel noise
            smooth = lambda a: gaussian_filter(np.asarray(a, np.float32), (0.5, 2.0, 2.0))
            error_after = np.abs(smooth(array)[liver] - smooth(aligned)[liver]).mean()
            error_before = np.abs(smooth(case.image(phase))[liver] - smooth(aligned)[liver]).mean()
            assert error_after < 0.6 * error_before, (pid, phase, error_after, error_before)
    print(f"worst TCGA residual over liver voxels: {worst:.3f} voxel")
    classes = dataset_json["characterization"]["classes"]
    for i, case in enumerate(cases):
        pid = f"TCGA-PH-{i:04d}"
        if case.case_class is None:
            assert pid not in dataset_json["characterization"]["cases"]
        else:
            assert classes[dataset_json["characterization"]["cases"][pid]] == case.case_class
    verify_in_process(out)


def test_tcga_phase_subset_mixed_series_folder_and_phase_map(tcga_dataset, tmp_path):
    work, cases, src, _ = tcga_dataset
    mixed = tmp_path / "mixed"  # one patient is enough here
    shutil.copytree(src / "TCGA-PH-0000", mixed / "TCGA-PH-0000")
    shutil.copytree(src / "masks", mixed / "masks", ignore=lambda d, names: [n for n in names if "0000" not in n])
    shutil.copy(src / "classes.csv", mixed / "classes.csv")
    patient = mixed / "TCGA-PH-0000"
    series_dirs = sorted({p.parent for p in patient.rglob("*.dcm")})
    assert len(series_dirs) == 3
    # two series mixed in one folder: GDCM splits them by SeriesInstanceUID
    for f in series_dirs[0].iterdir():
        f.rename(series_dirs[1] / ("moved_" + f.name))
    series_dirs[0].rmdir()
    out = tcga_lihc.convert(mixed, ConversionOptions(str(tmp_path / "raw"), 505, "TCGA", progress=False))
    reference = json.loads((work / "raw" / "Dataset504_TCGA" / "conversion_report.json").read_text())
    mixed_report = json.loads((out / "conversion_report.json").read_text())
    series_ref = next(c for c in reference["cases"] if c["case_id"] == "TCGA-PH-0000")["registration"]["series"]
    series_mixed = next(c for c in mixed_report["cases"] if c["case_id"] == "TCGA-PH-0000")["registration"]["series"]
    assert {p: s["uid"] for p, s in series_mixed.items()} == {p: s["uid"] for p, s in series_ref.items()}
    # single-phase baseline from the same source, with a mapping file forcing the descriptions
    mapping = tmp_path / "phases.json"
    mapping.write_text(json.dumps({s["description"]: p for p, s in series_ref.items()}))
    single = tcga_lihc.convert(mixed, ConversionOptions(str(tmp_path / "raw"), 506, "TCGAPV",
                                                        phase_subset=("portal_venous",), phase_map=str(mapping),
                                                        progress=False))
    dataset_json = json.loads((single / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"} and "phases" not in dataset_json
    np.testing.assert_array_equal(read(single / "imagesTr" / "TCGA-PH-0000_0000.nii.gz")[1],
                                  as_stored_ct(cases[0].image("portal_venous")))


# ---------------------------------------------------------------------------- dynamic MRI
@pytest.fixture(scope="module")
def mri_cases():
    return _mri_cases(2)


@pytest.mark.parametrize("with_curves", [True, False])
def test_dynamic_mri_classes_curves_and_verification(mri_cases, with_curves, tmp_path):
    src = phantom.write_dynamic_mri(tmp_path / "mri", mri_cases, with_curves=with_curves)
    out = dynamic_mri.convert(src, ConversionOptions(str(tmp_path / "raw"), 507, "DynMRI",
                                                     phases_mode="sequence", progress=False))
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["phases"] == list(phantom.MRI_PHASES)
    assert dataset_json["channel_names"] == {str(k): "T1" for k in range(4)}
    classes = dataset_json["characterization"]["classes"]
    for case in mri_cases:
        assert classes[dataset_json["characterization"]["cases"][case.case_id]] == case.case_class
        curve = dataset_json["enhancement"][case.case_id]
        if with_curves:
            np.testing.assert_allclose(curve, case.curve, rtol=1e-5)
        else:  # computed from registered images and the mask
            np.testing.assert_allclose(curve, case.curve, rtol=0.06)
        label_image, label_array = read(out / "labelsTr" / f"{case.case_id}.nii.gz")
        np.testing.assert_array_equal(label_array, case.label)
        assert_geometry(label_image, case)
    report = {c["case_id"]: c for c in json.loads((out / "conversion_report.json").read_text())["cases"]}
    for case in mri_cases:
        label_image = case.to_sitk(case.label)
        for phase in ("pre", "arterial", "delay"):
            truth = case.motion[case.phase_index(phase)]
            residual = residual_vs_truth(transform_from_summary(report[case.case_id]["registration"][phase]),
                                         euler_from_motion(truth["rotation_deg"], truth["translation_mm"],
                                                           truth.get("center_mm", (0, 0, 0))), label_image)
            assert residual["max_vox"] <= 1.0, (case.case_id, phase, residual)
    verify_in_process(out)


# ---------------------------------------------------------------------------- console script
@pytest.fixture(scope="module")
def mri_dataset(tmp_path_factory, mri_cases):
    work = tmp_path_factory.mktemp("mri")
    src = phantom.write_dynamic_mri(work / "mri", mri_cases, with_curves=False)
    out = dynamic_mri.convert(src, ConversionOptions(str(work / "raw"), 507, "DynMRI", phases_mode="sequence",
                                                     progress=False))
    return work, out


@pytest.mark.slow
@pytest.mark.parametrize("source", ["lits", "msd", "atlas", "tcga", "mri"])
def test_nnunet_plan_and_preprocess_accepts_converted_dataset(source, request):
    """The real `nnUNetv2_plan_and_preprocess --verify_dataset_integrity` console script on
    every converter's output (slow: nnU-Net spawns worker processes that import torch)."""
    fixture = request.getfixturevalue(f"{source}_dataset")
    work, out = fixture[0], fixture[-1]
    dataset_id = int(out.name[len("Dataset"):len("Dataset") + 3])
    verify_with_nnunet(out.parent, dataset_id, work)


def write_dicom_seg(path: Path, label: np.ndarray, reference: sitk.Image, patient_id: str) -> None:
    """A minimal binary DICOM-SEG (segments "Liver" = label >= 1 and "Tumor" = label 2, one
    frame per segment and non-empty slice) on the grid of `reference`, built with pydicom."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    masks = {1: ("Liver", label >= 1), 2: ("Tumor", label == 2)}
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesDescription = "SEG", patient_id, "Liver and tumor segmentation"
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SegmentSequence = Sequence()
    for number, (name, _) in masks.items():
        segment = Dataset()
        segment.SegmentNumber, segment.SegmentLabel = number, name
        ds.SegmentSequence.append(segment)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in list(direction[:, 0]) + list(direction[:, 1])]
    measures.PixelSpacing = [float(reference.GetSpacing()[1]), float(reference.GetSpacing()[0])]
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    frames = []
    for number, (_, mask) in masks.items():
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            group, position, identification = Dataset(), Dataset(), Dataset()
            position.ImagePositionPatient = list(reference.TransformIndexToPhysicalPoint((0, 0, int(k))))
            identification.ReferencedSegmentNumber = number
            group.PlanePositionSequence = Sequence([position])
            group.SegmentIdentificationSequence = Sequence([identification])
            ds.PerFrameFunctionalGroupsSequence.append(group)
            frames.append(mask[k])
    ds.Rows, ds.Columns = label.shape[1], label.shape[2]
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SegmentationType = "BINARY"
    ds.PixelData = pack_bits(np.stack(frames).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_tcga_mask_from_dicom_seg(tcga_dataset, tmp_path):
    _, cases, src, _ = tcga_dataset
    one = tmp_path / "seg_src"
    shutil.copytree(src / "TCGA-PH-0001", one / "TCGA-PH-0001")
    reference = cases[1].to_sitk(cases[1].label)
    write_dicom_seg(one / "TCGA-PH-0001" / "study" / "300.000000-Segmentation" / "1-1.dcm", cases[1].label,
                    reference, "TCGA-PH-0001")
    out = tcga_lihc.convert(one, ConversionOptions(str(tmp_path / "raw"), 508, "SEG", phase_subset=("portal_venous",),
                                                   progress=False))
    label_image, label_array = read(out / "labelsTr" / "TCGA-PH-0001.nii.gz")
    np.testing.assert_array_equal(label_array, cases[1].label)
    assert_geometry(label_image, cases[1])
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def _set_description(series_folder: Path, description: str) -> None:
    import pydicom
    for f in series_folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = description
        ds.save_as(f)


def test_tcga_unnamed_series_assigned_by_acquisition_time_or_mapping(tcga_dataset, tmp_path):
    _, cases, src, _ = tcga_dataset
    one = tmp_path / "src"
    shutil.copytree(src / "TCGA-PH-0002", one / "TCGA-PH-0002")
    (one / "masks").mkdir()
    shutil.copy(src / "masks" / "TCGA-PH-0002.nii.gz", one / "masks")
    truth = json.loads((src / "phantom_truth.json").read_text())["TCGA-PH-0002"]["series_description"]
    arterial = next(f for f in sorted({p.parent for p in one.rglob("*.dcm")}) if truth["arterial"] in f.name)
    _set_description(arterial, "SERIES 5 CAPSULE")  # names no phase ("AP" inside a word does not count)
    options = dict(phase_subset=("arterial", "portal_venous"), progress=False)
    out = tcga_lihc.convert(one, ConversionOptions(str(tmp_path / "raw"), 509, "Time", **options))
    case = json.loads((out / "conversion_report.json").read_text())["cases"][0]
    assert case["registration"]["series"]["arterial"]["identified_by"] == "acquisition time"
    assert any("assigned to arterial from its acquisition time" in w for w in case["warnings"])
    # a per-patient mapping that drops the series leaves the case without arterial phase
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"TCGA-PH-0002": {"series 5 capsule": "ignore"}}))
    with pytest.raises(tcga_lihc.ConversionFailed, match=r"case 'TCGA-PH-0002'.*missing phase\(s\) \['arterial'\]"):
        tcga_lihc.convert(one, ConversionOptions(str(tmp_path / "raw"), 510, "Map", phase_map=str(mapping), **options))
    assert not (tmp_path / "raw" / "Dataset510_Map").exists()
