"""Phantom writers: exact public layouts, geometry read back with SimpleITK, DICOM tags."""
import csv
import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.phantom import (
    LESION_CLASSES, MRI_PHASES, PhantomConfig, generate_cases, write_atlas, write_dynamic_mri, write_lits,
    write_msd_task03, write_nnunet_raw, write_tcga_dicom,
)
from nnunet_liver_ext.phantom.writers import SERIES_DESCRIPTIONS

SHAPE = (16, 48, 48)


@pytest.fixture(scope="module")
def ct_cases():
    config = PhantomConfig(shape=SHAPE, phases=("pre_contrast", "arterial", "portal_venous", "delayed"),
                           n_lesions_range=(0, 2), p_no_lesion=0.3)
    cases = generate_cases(4, config, seed=2, progress=False)
    assert any(c.case_class is None for c in cases) and any(c.case_class for c in cases)
    return cases


@pytest.fixture(scope="module")
def mri_cases():
    return generate_cases(2, PhantomConfig(modality="MRI", shape=SHAPE), seed=6, prefix="mri", progress=False)


def _assert_geometry(image, case):
    assert image.GetSpacing() == pytest.approx(case.spacing[::-1], abs=1e-5)
    assert image.GetOrigin() == pytest.approx(case.origin, abs=1e-4)
    assert image.GetDirection() == pytest.approx(case.direction)


def _read(path):
    return sitk.ReadImage(str(path))


# -------------------------------------------------------------------------------- nnU-Net raw

def test_nnunet_raw_layout_and_dataset_json(tmp_path, ct_cases):
    train, test = ct_cases[:3], ct_cases[3:]
    root = write_nnunet_raw(tmp_path, 7, "PhantomCT", train, test)
    assert root == tmp_path / "Dataset007_PhantomCT"
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT", "1": "CT", "2": "CT", "3": "CT"}
    assert dataset["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert dataset["numTraining"] == 3 and dataset["file_ending"] == ".nii.gz"
    assert dataset["phases"] == ["pre_contrast", "arterial", "portal_venous", "delayed"]
    classes = dataset["characterization"]["classes"]
    assert classes == list(LESION_CLASSES)
    expected = {c.case_id: classes.index(c.case_class) for c in train if c.case_class}
    assert dataset["characterization"]["cases"] == expected
    assert set(dataset["enhancement"]) == set(expected)
    for c in train:
        if c.curve:
            assert dataset["enhancement"][c.case_id] == pytest.approx(c.curve, abs=1e-3)
    assert dataset["phantom"]["cases"][train[0].case_id]["seed"] == 2
    assert test[0].case_id not in json.dumps({k: dataset[k] for k in ("characterization", "enhancement")})

    targets = json.loads((root / "test_targets.json").read_text())
    assert set(targets["characterization"]["cases"]) == {c.case_id for c in test if c.case_class}
    # nnunet-liver evaluate takes it as the held-out cases' dataset.json
    assert targets["labels"] == dataset["labels"] and targets["file_ending"] == ".nii.gz"
    for case, folder, lfolder in ((train[1], "imagesTr", "labelsTr"), (test[0], "imagesTs", "labelsTs")):
        for k in range(4):
            image = _read(root / folder / f"{case.case_id}_{k:04d}.nii.gz")
            _assert_geometry(image, case)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.rint(case.aligned_images[k]))
        label = _read(root / lfolder / f"{case.case_id}.nii.gz")
        _assert_geometry(label, case)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), case.label)
    assert len(list((root / "imagesTr").iterdir())) == 12 and len(list((root / "labelsTr").iterdir())) == 3

    with pytest.raises(FileExistsError, match="Dataset007_PhantomCT"):
        write_nnunet_raw(tmp_path, 7, "PhantomCT", train)
    write_nnunet_raw(tmp_path, 7, "PhantomCT", train[:1], overwrite=True)
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1


def test_nnunet_raw_channels_mode_and_mri(tmp_path, ct_cases, mri_cases):
    root = write_nnunet_raw(tmp_path, 8, "Channels", ct_cases[:2], mode="channels")
    assert "phases" not in json.loads((root / "dataset.json").read_text())
    root = write_nnunet_raw(tmp_path, 9, "MRI", mri_cases)
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "T1", "1": "T1", "2": "T1", "3": "T1"}
    assert dataset["phases"] == list(MRI_PHASES)
    image = _read(root / "imagesTr" / "mri_000_0002.nii.gz")
    assert image.GetPixelID() == sitk.sitkFloat32


def test_nnunet_raw_rejects_bad_input(tmp_path, ct_cases, mri_cases):
    with pytest.raises(ValueError, match="mri_000"):
        write_nnunet_raw(tmp_path, 10, "Mixed", [ct_cases[0], mri_cases[0]])
    with pytest.raises(ValueError, match="duplicate case id"):
        write_nnunet_raw(tmp_path, 10, "Dup", [ct_cases[0], ct_cases[0]])
    with pytest.raises(ValueError, match="mode"):
        write_nnunet_raw(tmp_path, 10, "Mode", ct_cases[:1], mode="stacked")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- LiTS, MSD, ATLAS

def test_lits_layout(tmp_path, ct_cases):
    write_lits(tmp_path, ct_cases[:2], ct_cases[2:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "segmentation-0.nii", "segmentation-1.nii", "test-volume-0.nii", "volume-0.nii", "volume-1.nii"]
    assert (tmp_path / "volume-1.nii").read_bytes()[:2] != b"\x1f\x8b"  # uncompressed like LiTS
    case = ct_cases[1]
    volume, seg = _read(tmp_path / "volume-1.nii"), _read(tmp_path / "segmentation-1.nii")
    _assert_geometry(volume, case)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), np.rint(case.image("portal_venous")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), case.label)


def test_msd_layout_with_apple_double(tmp_path, ct_cases):
    root = write_msd_task03(tmp_path, ct_cases[:2], ct_cases[2:], apple_double=True)
    assert root == tmp_path / "Task03_Liver"
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "CT"}
    assert dataset["labels"] == {"0": "background", "1": "liver", "2": "cancer"}
    assert dataset["numTraining"] == 2 and dataset["numTest"] == 2
    assert dataset["training"][0] == {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
    assert dataset["test"] == ["./imagesTs/liver_2.nii.gz", "./imagesTs/liver_3.nii.gz"]
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        "._liver_0.nii.gz", "._liver_1.nii.gz", "liver_0.nii.gz", "liver_1.nii.gz"]
    junk = (root / "labelsTr" / "._liver_1.nii.gz").read_bytes()
    assert junk[:4] == b"\x00\x05\x16\x07"  # AppleDouble magic, not a NIfTI
    _assert_geometry(_read(root / "labelsTr" / "liver_1.nii.gz"), ct_cases[1])
    _assert_geometry(_read(root / "imagesTs" / "liver_3.nii.gz"), ct_cases[3])


def test_atlas_layout(tmp_path, mri_cases, ct_cases):
    write_atlas(tmp_path, mri_cases)
    image = _read(tmp_path / "train" / "imagesTr" / "im1.nii.gz")
    _assert_geometry(image, mri_cases[1])
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), mri_cases[1].image("portal_venous"))
    label = sitk.GetArrayFromImage(_read(tmp_path / "train" / "labelsTr" / "lb0.nii.gz"))
    np.testing.assert_array_equal(label, mri_cases[0].label)
    with pytest.raises(ValueError, match=ct_cases[0].case_id):
        write_atlas(tmp_path / "bad", ct_cases[:1])


# -------------------------------------------------------------------------------- dynamic MRI

def test_dynamic_mri_layout(tmp_path, mri_cases):
    write_dynamic_mri(tmp_path, mri_cases)
    case = mri_cases[0]
    for phase in MRI_PHASES:
        image = _read(tmp_path / "images" / case.case_id / f"{phase}.nii.gz")
        _assert_geometry(image, case)
        np.testing.assert_allclose(sitk.GetArrayFromImage(image), case.image(phase))  # as acquired
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_read(tmp_path / "masks" / f"{case.case_id}.nii.gz")),
                                  case.label)
    with open(tmp_path / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case_id", "class", "pre", "arterial", "portal_venous", "delay"]
    for row, c in zip(rows, mri_cases):
        assert row["case_id"] == c.case_id and row["class"] == (c.case_class or "")
        if c.curve:
            assert [float(row[p]) for p in MRI_PHASES] == pytest.approx(c.curve, rel=1e-4)
    write_dynamic_mri(tmp_path / "nocurves", mri_cases, with_curves=False)
    assert (tmp_path / "nocurves" / "labels.csv").read_text().splitlines()[0] == "case_id,class"


# ------------------------------------------------------------------------------------ TCGA DICOM

def test_tcga_dicom_series_read_back_in_slice_order(tmp_path, ct_cases):
    root = write_tcga_dicom(tmp_path, ct_cases)
    truth = json.loads((root / "phantom_truth.json").read_text())
    with open(root / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"patient_id": f"TCGA-PH-{i:04d}", "class": c.case_class or ""} for i, c in enumerate(ct_cases)]
    numbered_from_top = []
    reader = sitk.ImageSeriesReader()
    for i, case in enumerate(ct_cases):
        pid = f"TCGA-PH-{i:04d}"
        (study,) = (root / pid).iterdir()
        series = sorted(study.iterdir(), key=lambda p: float(p.name.split("-")[0]))
        assert len(series) == len(case.phases)
        study_uids, series_uids, sop_uids, times = set(), set(), set(), []
        for k, (phase, folder) in enumerate(zip(case.phases, series)):
            files = sorted(folder.glob("1-*.dcm"))
            assert len(files) == case.label.shape[0]
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            first = headers[0]
            assert first.Modality == "CT" and first.PatientID == pid
            assert first.SeriesDescription in SERIES_DESCRIPTIONS[phase]
            assert truth[pid]["series_description"][phase] == first.SeriesDescription
            assert first.RescaleSlope == 1 and first.RescaleIntercept == -1024
            assert first.PixelRepresentation == 1 and first.BitsAllocated == 16
            assert [float(v) for v in first.PixelSpacing] == pytest.approx(case.spacing[1:], abs=1e-5)
            assert float(first.SliceThickness) == pytest.approx(case.spacing[0], abs=1e-5)
            assert sorted(h.InstanceNumber for h in headers) == list(range(1, len(files) + 1))
            study_uids |= {h.StudyInstanceUID for h in headers}
            series_uids |= {h.SeriesInstanceUID for h in headers}
            sop_uids |= {h.SOPInstanceUID for h in headers}
            times.append(first.AcquisitionTime)
            z_by_name = [float(h.ImagePositionPatient[2]) for h in headers]
            numbered_from_top.append(z_by_name != sorted(z_by_name))

            names = reader.GetGDCMSeriesFileNames(str(folder))
            reader.SetFileNames(names)
            image = reader.Execute()
            _assert_geometry(image, case)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                          np.clip(np.rint(case.images[k]), -1024, 3071))  # as acquired
        assert len(study_uids) == 1 and len(series_uids) == len(case.phases)
        assert len(sop_uids) == len(case.phases) * case.label.shape[0]
        assert times == sorted(times)
        mask = _read(root / "masks" / f"{pid}.nii.gz")
        _assert_geometry(mask, case)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), case.label)
        for phase, motion in zip(case.phases, case.motion):
            assert truth[pid]["motion"][phase]["translation_mm"] == pytest.approx(motion["translation_mm"])
    assert any(numbered_from_top), "file-name order should differ from slice order in some series"
    with pytest.raises(ValueError, match="MRI"):
        write_tcga_dicom(tmp_path / "mri", generate_cases(1, PhantomConfig(modality="MRI", shape=SHAPE), 0,
                                                            progress=False))


def test_nnunet_raw_writes_each_case_before_the_next_is_generated(tmp_path):
    """Cases from ``iter_cases`` are written one at a time (all of them in memory before: 63 MiB a case at the
    default 64x192x192, so `-n 200` took ~12 GB); the dataset is the one the lists give."""
    from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw
    from nnunet_liver_ext.phantom.generator import iter_cases

    config = PhantomConfig(shape=(8, 32, 32), n_lesions_range=(1, 1), p_no_lesion=0.0)
    images_written = []

    def watched(cases):
        for case in cases:
            images_written.append(len(list(tmp_path.glob("lazy/.*tmp*/images*/*_0000.nii.gz"))))
            yield case
    lazy = write_nnunet_raw(tmp_path / "lazy", 7, "Lazy", watched(iter_cases(3, config, 2, progress=False)),
                            watched(iter_cases(1, config, 2, progress=False, start=3)))
    assert images_written == [0, 1, 2, 3]
    eager = write_nnunet_raw(tmp_path / "eager", 7, "Lazy", generate_cases(3, config, 2, progress=False),
                             generate_cases(1, config, 2, progress=False, start=3))
    assert (lazy / "dataset.json").read_text() == (eager / "dataset.json").read_text()
    assert (lazy / "test_targets.json").read_text() == (eager / "test_targets.json").read_text()
    assert [p.read_bytes() for p in sorted(lazy.rglob("*.nii.gz"))] == \
        [p.read_bytes() for p in sorted(eager.rglob("*.nii.gz"))]
