"""Write phantom cases in the public layouts our converters read, or straight into nnU-Net raw.

Every writer takes lists of `PhantomCase` and returns the Path it wrote. CT intensities are
stored as int16 HU (what scanners and the public datasets store), MRI as float32, labels as
uint8. Geometry (spacing, origin, direction) comes from the case (`PhantomCase.to_sitk`).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_liver_ext.errors import UserError, free_dataset_id, other_names_of_id
from nnunet_liver_ext.phantom.case import PhantomCase
from nnunet_liver_ext.phantom.config import LESION_CLASSES, MRI_PHASES, REFERENCE_PHASE

LABELS = {"background": 0, "liver": 1, "tumor": 2}
# Real-world spellings of the phase in SeriesDescription (TCGA-LIHC is not consistent).
SERIES_DESCRIPTIONS = {
    "pre_contrast": ("NON-CONTRAST", "Pre"),
    "arterial": ("ARTERIAL PHASE", "AP", "Art"),
    "portal_venous": ("PORTAL VENOUS", "PV", "Venous"),
    "delayed": ("DELAYED", "Equilibrium 3 min"),
}
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root


# ----------------------------------------------------------------------------------------------
# helpers


def _check_case(case: PhantomCase, what: str, seen: set, modality: str | None = None,
                phases: Iterable[str] = ()) -> None:
    """One case of a writer's input: a PhantomCase whose id is not among ``seen`` (then added), of the
    layout's modality and with its phases."""
    if not isinstance(case, PhantomCase):
        raise TypeError(f"{what}: expected PhantomCase objects, got {type(case).__name__}")
    if case.case_id in seen:
        raise ValueError(f"{what}: duplicate case id {case.case_id!r}")
    seen.add(case.case_id)
    if modality is not None and case.modality != modality:
        raise ValueError(f"{what}: case {case.case_id} is {case.modality}, this layout holds {modality} only")
    missing = [p for p in phases if p not in case.phases]
    if missing:
        raise ValueError(f"{what}: case {case.case_id} lacks phase(s) {missing} (has {case.phases})")


def _check_cases(cases: Sequence[PhantomCase], what: str, modality: str | None = None,
                 phases: Iterable[str] = ()) -> list[PhantomCase]:
    cases = list(cases)
    seen: set = set()
    for case in cases:
        _check_case(case, what, seen, modality, phases)
    return cases


def _as_stored(case: PhantomCase, array: np.ndarray) -> np.ndarray:
    if case.modality == "CT":
        return np.clip(np.rint(array), -1024, 3071).astype(np.int16)
    return np.asarray(array, dtype=np.float32)


def _write_image(case: PhantomCase, array: np.ndarray, path: Path, label: bool = False) -> None:
    import SimpleITK as sitk

    data = np.asarray(array, dtype=np.uint8) if label else _as_stored(case, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(case.to_sitk(data), str(path), useCompression=str(path).endswith(".gz"))


def _class_list(cases: Sequence[PhantomCase]) -> list[str]:
    """Characterization classes: LESION_CLASSES restricted to the configs' subsets, fixed order."""
    allowed = set()
    for case in cases:
        allowed.update(case.config.lesion_classes if case.config is not None else LESION_CLASSES)
        if case.case_class is not None:
            allowed.add(case.case_class)
    return [c for c in LESION_CLASSES if c in allowed] or list(LESION_CLASSES)


def _targets(cases: Sequence[PhantomCase], classes: list[str]) -> dict:
    return {
        "characterization": {"classes": classes,
                              "cases": {c.case_id: classes.index(c.case_class) for c in cases
                                        if c.case_class is not None}},
        "enhancement": {c.case_id: [round(v, 3) for v in c.curve] for c in cases if c.curve is not None},
    }


def _provenance(cases: Sequence[PhantomCase]) -> dict:
    from nnunet_liver_ext import __version__

    configs, per_case = [], {}
    for case in cases:
        entry = {"seed": case.seed, "index": case.index,
                 "spacing_zyx": [round(s, 5) for s in case.spacing],
                 "acquisition_times_s": case.acquisition_times_s}
        if case.config is not None:
            cfg = case.config.to_dict()
            if cfg not in configs:
                configs.append(cfg)
            entry["config"] = configs.index(cfg)
        per_case[case.case_id] = entry
    return {"generator": "nnunet_liver_ext.phantom", "version": __version__, "configs": configs,
            "cases": per_case}


def _replace_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
        # the old dataset leaves only once the new one is in place: a kill in between leaves one of them
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, target)


class TargetTaken(UserError, FileExistsError):
    """Where a phantom would go is taken (a dataset id, a folder that is not empty). A FileExistsError for callers of
    the writers, a UserError (message and fix) for the command line."""


def check_raw_target(raw_root, dataset_id: int, name: str, overwrite: bool = False) -> Path:
    """``raw_root/Dataset{id:03d}_{name}``, once id and name are valid, it does not exist (or ``overwrite``), and
    no dataset of another name has the id, in the raw folder or in nnUNet_preprocessed / nnUNet_results (nnU-Net
    then finds neither: "More than one dataset name found for dataset id"). ``overwrite`` replaces only this raw
    folder, so it cannot clear such a clash: it is refused too, and another dataset's data is never touched."""
    if not (0 < int(dataset_id) < 1000):
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    if not name or any(ch in name for ch in "/\\ ") or name.startswith("."):
        raise ValueError(f"dataset name must be a non-empty word without spaces or slashes, got {name!r}")
    dataset_id = int(dataset_id)
    raw_root = Path(raw_root)
    target = raw_root / f"Dataset{dataset_id:03d}_{name}"
    others = other_names_of_id(dataset_id, name, raw_root)
    if others:
        free = free_dataset_id(dataset_id, raw_root)
        places = {other: ", ".join(str(root) if var is None else f"{var}={root}" for var, root in where)
                  for other, where in others.items()}
        taken = "; ".join(f"{other} (in {where})" for other, where in places.items())
        raise TargetTaken(f"dataset id {dataset_id} is taken by {taken}; nnU-Net needs one name per id (with two it "
                          f"finds neither: \"More than one dataset name found\")",
                          (f"choose another id (-d {free} is free)" if free else "choose another id")
                          + f", or rename or remove {', '.join(others)}")
    if target.exists() and not overwrite:
        raise TargetTaken(f"{target} exists", "--overwrite (overwrite=True) replaces it; or choose another name or id")
    return target


# ----------------------------------------------------------------------------------------------
# nnU-Net raw


def _without_volumes(case: PhantomCase) -> PhantomCase:
    """What dataset.json needs of a written case (ids, class, curve, provenance), its volumes dropped."""
    return dataclasses.replace(case, images=[], aligned_images=[], label=np.zeros((0, 0, 0), np.uint8),
                               lesion_map=np.zeros((0, 0, 0), np.uint8), tissue_map=None)


def write_nnunet_raw(raw_root, dataset_id: int, name: str, train_cases: Iterable[PhantomCase],
                     test_cases: Iterable[PhantomCase] = (), mode: str = "sequence",
                     overwrite: bool = False) -> Path:
    """`raw_root/Dataset{id:03d}_{name}/` following DESIGN.md: phases as channels (motion-free
    `aligned_images`, channel k = phase k), labels 0/1/2, case targets in dataset.json.

    The dataset is built in a temporary sibling folder and moved into place at the end, so a
    failure leaves no half dataset. Test-case truth goes to labelsTs/ and test_targets.json.
    The cases may come one at a time (``generator.iter_cases``): each is written, then only what
    dataset.json needs of it is kept, so memory holds one case's volumes, not the dataset's.
    """
    if mode not in ("sequence", "channels"):
        raise ValueError(f"mode must be 'sequence' or 'channels', got {mode!r}")
    target = check_raw_target(raw_root, dataset_id, name, overwrite)
    raw_root = Path(raw_root)
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = raw_root / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    written = {"train": [], "test": []}
    seen = {"train": set(), "test": set()}
    try:
        for split, folder_images, folder_labels, cases in (("train", "imagesTr", "labelsTr", train_cases),
                                                           ("test", "imagesTs", "labelsTs", test_cases)):
            other = seen["test" if split == "train" else "train"]
            for case in cases:  # checked one at a time: they may come from a generator
                _check_case(case, f"write_nnunet_raw({split}_cases)", seen[split])
                if case.case_id in other:
                    raise ValueError(f"case ids in both train and test cases: [{case.case_id!r}]")
                first = written["train"][0] if written["train"] else None
                if first is not None and (case.modality, tuple(case.phases)) != (first.modality, tuple(first.phases)):
                    raise ValueError(f"case {case.case_id} has {case.modality} {case.phases}; the dataset is "
                                     f"{first.modality} {first.phases} (every case needs the same channels)")
                for k, array in enumerate(case.aligned_images):
                    _write_image(case, array, tmp / folder_images / f"{case.case_id}_{k:04d}.nii.gz")
                _write_image(case, case.label, tmp / folder_labels / f"{case.case_id}.nii.gz", label=True)
                written[split].append(_without_volumes(case))
            if split == "train" and not written["train"]:
                raise ValueError("write_nnunet_raw needs at least one training case")
        train_cases, test_cases = written["train"], written["test"]
        reference = train_cases[0]
        channel = "CT" if reference.modality == "CT" else "T1"
        classes = _class_list(train_cases + test_cases)
        dataset = {
            "name": name,
            "description": "Synthetic multiphase liver phantom (nnunet_liver_ext.phantom)",
            "channel_names": {str(k): channel for k in range(len(reference.phases))},
            "labels": dict(LABELS),
            "numTraining": len(train_cases),
            "file_ending": ".nii.gz",
        }
        if mode == "sequence":
            dataset["phases"] = list(reference.phases)
        dataset.update(_targets(train_cases, classes))
        dataset["phantom"] = _provenance(train_cases)
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))
        if test_cases:
            # everything `nnunet-liver evaluate --dataset-json` needs for the held-out cases
            targets = {"labels": dict(LABELS), "file_ending": ".nii.gz", **_targets(test_cases, classes)}
            targets["phases"] = list(reference.phases)
            targets["phantom"] = _provenance(test_cases)
            (tmp / "test_targets.json").write_text(json.dumps(targets, indent=2))
        _replace_dir(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------------------------
# LiTS, MSD Task03, ATLAS


def write_lits(out_dir, cases: Sequence[PhantomCase], test_cases: Sequence[PhantomCase] = ()) -> Path:
    """LiTS download layout: `volume-{i}.nii` + `segmentation-{i}.nii` (portal venous phase,
    uncompressed), `test-volume-{j}.nii` for test cases; i and j count from 0."""
    cases = _check_cases(cases, "write_lits(cases)", "CT", (REFERENCE_PHASE,))
    test_cases = _check_cases(test_cases, "write_lits(test_cases)", "CT", (REFERENCE_PHASE,))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        _write_image(case, case.image(REFERENCE_PHASE), out_dir / f"volume-{i}.nii")
        _write_image(case, case.label, out_dir / f"segmentation-{i}.nii", label=True)
    for j, case in enumerate(test_cases):
        _write_image(case, case.image(REFERENCE_PHASE), out_dir / f"test-volume-{j}.nii")
    return out_dir


def _apple_double() -> bytes:
    """A macOS AppleDouble (`._name`) stub like those shipped inside the MSD tarballs."""
    header = struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X        ", 2)
    entries = struct.pack(">III", 9, 50, 32) + struct.pack(">III", 2, 82, 4096 - 82)
    body = header + entries + b"\x00" * 32
    return body + b"\x00" * (4096 - len(body))


def write_msd_task03(out_dir, cases: Sequence[PhantomCase], test_cases: Sequence[PhantomCase] = (),
                     apple_double: bool = False) -> Path:
    """`out_dir/Task03_Liver/` as in the Medical Segmentation Decathlon download."""
    cases = _check_cases(cases, "write_msd_task03(cases)", "CT", (REFERENCE_PHASE,))
    test_cases = _check_cases(test_cases, "write_msd_task03(test_cases)", "CT", (REFERENCE_PHASE,))
    root = Path(out_dir) / "Task03_Liver"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for i, case in enumerate(cases):
        fname = f"liver_{i}.nii.gz"
        _write_image(case, case.image(REFERENCE_PHASE), root / "imagesTr" / fname)
        _write_image(case, case.label, root / "labelsTr" / fname, label=True)
        training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
    for j, case in enumerate(test_cases):
        fname = f"liver_{len(cases) + j}.nii.gz"
        _write_image(case, case.image(REFERENCE_PHASE), root / "imagesTs" / fname)
        test.append(f"./imagesTs/{fname}")
    if apple_double:
        junk = _apple_double()
        for entry in training:
            (root / entry["image"][2:]).with_name("._" + Path(entry["image"]).name).write_bytes(junk)
            (root / entry["label"][2:]).with_name("._" + Path(entry["label"]).name).write_bytes(junk)
        for entry in test:
            (root / entry[2:]).with_name("._" + Path(entry).name).write_bytes(junk)
    dataset = {
        "name": "Liver",
        "description": "Liver and liver tumor segmentation (synthetic phantom in MSD layout)",
        "reference": "nnunet_liver_ext.phantom",
        "licence": "CC-BY-SA 4.0",
        "relase": "1.0 04/05/2018",  # sic: the key is misspelt in the real MSD files
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return root


def write_atlas(out_dir, cases: Sequence[PhantomCase]) -> Path:
    """ATLAS (MICCAI 2023, contrast-enhanced MRI) layout: `train/imagesTr/im{i}.nii.gz` and
    `train/labelsTr/lb{i}.nii.gz`, portal venous phase only."""
    cases = _check_cases(cases, "write_atlas(cases)", "MRI", (REFERENCE_PHASE,))
    root = Path(out_dir)
    for i, case in enumerate(cases):
        _write_image(case, case.image(REFERENCE_PHASE), root / "train" / "imagesTr" / f"im{i}.nii.gz")
        _write_image(case, case.label, root / "train" / "labelsTr" / f"lb{i}.nii.gz", label=True)
    return root


# ----------------------------------------------------------------------------------------------
# Dynamic MRI


def write_dynamic_mri(out_dir, cases: Sequence[PhantomCase], with_curves: bool = True) -> Path:
    """`images/{case}/{phase}.nii.gz` (as acquired, with motion) for the 4 MRI phases,
    `masks/{case}.nii.gz` (0/1/2, reference frame) and `labels.csv` (case_id, class and, when
    `with_curves`, the enhancement curve per phase; empty fields for cases without lesion)."""
    cases = _check_cases(cases, "write_dynamic_mri(cases)", "MRI", MRI_PHASES)
    root = Path(out_dir)
    rows = []
    for case in cases:
        for phase in MRI_PHASES:
            _write_image(case, case.image(phase), root / "images" / case.case_id / f"{phase}.nii.gz")
        _write_image(case, case.label, root / "masks" / f"{case.case_id}.nii.gz", label=True)
        row = {"case_id": case.case_id, "class": case.case_class or ""}
        if with_curves:
            for phase in MRI_PHASES:
                row[phase] = "" if case.curve is None else f"{case.curve[case.phase_index(phase)]:.4f}"
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    columns = ["case_id", "class"] + (list(MRI_PHASES) if with_curves else [])
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return root


# ----------------------------------------------------------------------------------------------
# TCGA-LIHC style DICOM


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=_UID_ROOT, entropy_srcs=[str(p) for p in parts]))


def _dicom_time(base: _dt.datetime, seconds: float) -> str:
    return (base + _dt.timedelta(seconds=float(seconds))).strftime("%H%M%S.%f")


def _write_dicom_patient(root: Path, pid: str, index: int, case: PhantomCase) -> tuple[dict, bool]:
    """One patient's CT series (one per phase, as acquired); returns the SeriesDescription per phase
    and whether slices are numbered from the top."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    rng = np.random.default_rng([zlib.crc32(case.case_id.encode()), index])
    study_date = _dt.datetime(2000, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 4500)),
                                                         seconds=int(rng.integers(8 * 3600, 17 * 3600)))
    # UIDs from the case's content too: phantoms of other seeds or settings must not share them (a converter or
    # PACS that sees both would merge their series)
    content = (case.seed, case.index, zlib.crc32(np.ascontiguousarray(case.images[0]).tobytes()))
    study_uid = _uid(pid, case.case_id, *content, "study")
    frame_uid = _uid(pid, case.case_id, *content, "frame")
    study_folder = f"{study_date:%m-%d-%Y}-NA-CT ABDOMEN LIVER-{int(rng.integers(10000, 99999))}"
    descending = bool(rng.random() < 0.5)
    nz, ny, nx = case.label.shape
    sz, sy, sx = case.spacing
    descriptions = {}
    for k, phase in enumerate(case.phases):
        variants = SERIES_DESCRIPTIONS[phase]
        desc = variants[int(rng.integers(len(variants)))]
        descriptions[phase] = desc
        series_number = k + 2
        series_uid = _uid(pid, case.case_id, *content, "series", phase)
        folder = root / pid / study_folder / f"{series_number}.000000-{desc}-{int(rng.integers(10000, 99999))}"
        folder.mkdir(parents=True, exist_ok=True)
        acq_s = 60.0 + float(case.acquisition_times_s[k])  # scan starts a minute after study start
        hu = np.clip(np.rint(case.images[k]), -1024, 3071)
        stored = (hu + 1024).astype(np.int16)
        for z in range(nz):
            instance = nz - z if descending else z + 1
            sop_uid = _uid(pid, case.case_id, *content, phase, z)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = f"{study_date:%Y%m%d}"
            ds.StudyTime = study_date.strftime("%H%M%S")
            ds.SeriesTime = ds.AcquisitionTime = _dicom_time(study_date, acq_s)
            ds.ContentTime = _dicom_time(study_date, acq_s + 0.05 * z)
            ds.Modality = "CT"
            ds.Manufacturer = "nnunet_liver_ext phantom"
            ds.InstitutionName = "Phantom"
            ds.StudyDescription = "CT ABDOMEN LIVER"
            ds.SeriesDescription = desc
            ds.BodyPartExamined = "ABDOMEN"
            ds.PatientName = pid
            ds.PatientID = pid
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.StudyID = "1"
            ds.SeriesNumber = series_number
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = instance
            if phase != "pre_contrast":
                ds.ContrastBolusAgent = "IV CONTRAST"
            ds.KVP = 120
            ds.SliceThickness = f"{sz:.6g}"
            ds.SpacingBetweenSlices = f"{sz:.6g}"
            position = (case.origin[0], case.origin[1], case.origin[2] + z * sz)
            ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.6g}" for v in case.direction[0:7:3] + case.direction[1:8:3]]
            ds.SliceLocation = f"{position[2]:.6f}"
            ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
            ds.Rows, ds.Columns = ny, nx
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = "40", "400"
            ds.PixelData = np.ascontiguousarray(stored[z]).tobytes()
            pydicom.dcmwrite(folder / f"1-{instance:03d}.dcm", ds, enforce_file_format=True)
    return descriptions, descending


def _patient_truth(case: PhantomCase, descriptions: dict, descending: bool) -> dict:
    return {
        "case_id": case.case_id,
        "class": case.case_class,
        "phases": list(case.phases),
        "series_description": descriptions,
        "motion": {p: {key: list(v) for key, v in m.items()} for p, m in zip(case.phases, case.motion)},
        "motion_convention": "SimpleITK Euler3DTransform (degrees) mapping reference (portal venous) "
                             "points to the phase's frame, i.e. what registering phase (moving) "
                             "to portal venous (fixed) recovers",
        "acquisition_times_s": dict(zip(case.phases, case.acquisition_times_s)),
        "spacing_zyx": list(case.spacing),
        "origin_xyz": list(case.origin),
        "curve": case.curve,
        "slices_numbered_from_top": descending,
    }


def write_tcga_dicom(out_dir, cases: Sequence[PhantomCase], test_cases: Sequence[PhantomCase] = (),
                     truth_dir=None) -> Path:
    """TCIA TCGA-LIHC style: `{pid}/{study}/{series}/1-{k:03d}.dcm`, one CT series per phase
    (as acquired, with motion), plus `masks/{pid}.nii.gz`, `classes.csv` and
    `phantom_truth.json` (motion per phase, so registration can be checked).

    `test_cases` become held-out patients (numbered after the training ones): their DICOM series
    only, no mask, no class. Their truth goes to `truth_dir` (default: `{out_dir}_test_truth`,
    outside the source folder, where the converter never looks): `labelsTs/{pid}.nii.gz` on the
    portal venous grid the converter writes, `test_targets.json` (labels and characterization in
    dataset.json form, for `nnunet-liver evaluate --dataset-json`) and `phantom_truth.json`.

    Slices are numbered from the top (superior) in some patients and from the bottom in others,
    so file-name order is not slice order; readers must sort by ImagePositionPatient.
    """
    cases = _check_cases(cases, "write_tcga_dicom(cases)", "CT", (REFERENCE_PHASE,))
    test_cases = _check_cases(test_cases, "write_tcga_dicom(test_cases)", "CT", (REFERENCE_PHASE,))
    duplicated = {c.case_id for c in cases} & {c.case_id for c in test_cases}
    if duplicated:
        raise ValueError(f"case ids in both train and test cases: {sorted(duplicated)}")
    root = Path(out_dir)
    absolute = Path(os.path.abspath(root))  # '.' has no name to append to
    truth_root = Path(truth_dir) if truth_dir is not None else absolute.with_name(absolute.name + "_test_truth")
    if test_cases and truth_root.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"the test truth folder {truth_root} is inside the source folder {root}, where the "
                         f"converter would read it as a patient")
    root.mkdir(parents=True, exist_ok=True)
    truth, class_rows = {}, []
    for i, case in enumerate(cases):
        pid = f"TCGA-PH-{i:04d}"
        descriptions, descending = _write_dicom_patient(root, pid, i, case)
        _write_image(case, case.label, root / "masks" / f"{pid}.nii.gz", label=True)
        class_rows.append((pid, case.case_class or ""))
        truth[pid] = _patient_truth(case, descriptions, descending)
    with open(root / "classes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "class"])
        writer.writerows(class_rows)
    (root / "phantom_truth.json").write_text(json.dumps(truth, indent=2))
    if test_cases:
        test_truth, test_ids = {}, {}
        for j, case in enumerate(test_cases):
            i = len(cases) + j
            pid = f"TCGA-PH-{i:04d}"
            descriptions, descending = _write_dicom_patient(root, pid, i, case)
            _write_image(case, case.label, truth_root / "labelsTs" / f"{pid}.nii.gz", label=True)
            test_truth[pid] = _patient_truth(case, descriptions, descending)
            test_ids[pid] = case
        # the converter's class list: the training patients' classes, in the fixed lesion order
        train_classes = {c.case_class for c in cases if c.case_class is not None}
        classes = [c for c in LESION_CLASSES if c in train_classes] + sorted(train_classes - set(LESION_CLASSES))
        targets = {
            "labels": dict(LABELS), "file_ending": ".nii.gz", "phases": list(test_cases[0].phases),
            "characterization": {"classes": classes,
                                  "cases": {pid: classes.index(c.case_class) for pid, c in test_ids.items()
                                            if c.case_class in classes}},
            "not_scored": {pid: f"class {c.case_class!r} has no training patient" for pid, c in test_ids.items()
                           if c.case_class is not None and c.case_class not in classes},
        }
        (truth_root / "test_targets.json").write_text(json.dumps(targets, indent=2))
        (truth_root / "phantom_truth.json").write_text(json.dumps(test_truth, indent=2))
    return root
