"""TCGA-LIHC multiphase CT (DICOM, as downloaded from TCIA) -> nnU-Net raw dataset.

Source layout: `SRC/{patient}/{study}/{series}/*.dcm` (one folder per patient, any depth,
one or more series per folder), masks `SRC/masks/{patient}.nii[.gz]` (0/1/2 in the portal-
venous frame; else a DICOM-SEG series in the patient folder on the portal-venous grid; patients
without either go to imagesTs) and `SRC/classes.csv`
(`patient_id,class`; ids match the patient folders exactly, and a row that names none is an error when some patient
has no row: `common.check_case_table_matches`). Series are split by SeriesInstanceUID (GDCM), their phase read from
SeriesDescription keywords (case-insensitive, whole words: "AP" matches "AP 5mm" but not
"CAPSULE"), overridable with a JSON mapping {"description or SeriesInstanceUID": "phase"}
(global) or {"patient": {...}} (per patient); a value "ignore" drops a series. Phases are
checked against acquisition-time order, registered to the portal-venous series and
resampled onto its grid. Channels are named "CT".

A patient with several studies (scans of different dates) gives one case from one study: never
phases of different dates. Scouts, localizers and dose reports name no phase, and objects without
pixel data (structured reports, presentation states) are ignored. A series whose slices do not
form one evenly spaced stack (a missing slice, two acquisitions in one series, a gantry tilt) is
an error naming it.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_liver_ext.dataset_conversion.common import (
    CT_PHASES, REFERENCE_PHASE, CaseTask, ConversionError, ConversionFailed, ConversionOptions, IncompleteCaseError,
    check_case_table_matches, is_junk_file, read_case_table, read_image, run_conversion, select_phases,
    strip_nifti_suffix, walk_folders)
from nnunet_liver_ext.dataset_conversion.multiphase import multiphase_dataset_json, register_and_write
from nnunet_liver_ext.dataset_conversion.registration import (euler_from_motion, resample_onto, residual_vs_truth,
                                                              transform_from_summary)

_L = r"(?<![a-z])"  # letter boundaries: "AP5mm" is arterial, "CAPSULE" is not
_R = r"(?![a-z])"
PHASE_KEYWORDS = {
    "pre_contrast": [r"pre", r"pre[- ]?contrast", r"non[- ]?contrast", r"nc", r"unenhanced", r"native",
                     r"plain", r"w/?o contrast", r"without contrast"],
    "arterial": [r"arterial", r"art", r"ap", r"hap", r"lap", r"eap"],
    "portal_venous": [r"portal", r"venous", r"pv", r"pvp", r"portovenous", r"port ven"],
    "delayed": [r"delayed", r"delay", r"equilibrium", r"equil", r"eq", r"\d+ ?min"],
}
_PHASE_REGEX = {phase: re.compile("|".join(f"{_L}{k}{_R}" for k in words), re.IGNORECASE)
                for phase, words in PHASE_KEYWORDS.items()}
IMAGE_MODALITIES = ("CT",)


#: series that are no phase volume whatever else their description says ("AP/LAT SCOUT" is no arterial phase)
NOT_A_PHASE = re.compile(f"{_L}(scout|localizer|locator|topogram|surview|scanogram|dose|report|screen ?save)",
                         re.IGNORECASE)


def phase_from_description(description: str) -> str | None:
    """The one CT phase whose keywords occur in `description`, else None (none or several, or a scout,
    localizer or dose report). "portal venous" names one phase although two keywords of it match."""
    if NOT_A_PHASE.search(description or ""):
        return None
    hits = [phase for phase, regex in _PHASE_REGEX.items() if regex.search(description or "")]
    # "Non-contrast arterial" style descriptions name two phases: refuse to guess
    return hits[0] if len(hits) == 1 else None


@dataclass
class SeriesInfo:
    uid: str
    folder: str
    files: list
    description: str
    modality: str
    time_s: float | None
    phase: str | None = None
    how: str = ""
    study: str = ""  # StudyInstanceUID
    study_date: str = ""
    mapping_entry: tuple | None = None  # (section: the patient or None for global, key) that decided the phase


def _time_seconds(value) -> float | None:
    text = str(value or "").strip()
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", text)
    if not match:
        return None
    h, m, s, frac = match.groups()
    return int(h) * 3600 + int(m or 0) * 60 + int(s or 0) + float(frac or 0)


def scan_patient(patient_dir: Path, case_id: str) -> list[SeriesInfo]:
    """All DICOM series under `patient_dir`, split by SeriesInstanceUID. Folders that hold
    files but no readable series, and empty leaf folders, are errors."""
    import pydicom

    series = []

    def unreadable(error: OSError):
        raise ConversionError(f"cannot read this folder ({error.strerror or error})", case_id, error.filename)

    # top-down, pruning junk folders (__MACOSX, hidden) before they are entered; symlinked series folders followed
    for folder, subdirs, files in walk_folders(patient_dir, onerror=unreadable):
        subdirs[:] = [d for d in subdirs if not is_junk_file(d)]
        files = [f for f in files if not is_junk_file(f)]
        if not files:
            if not subdirs:
                raise ConversionError("empty DICOM series folder (no files)", case_id, folder)
            continue
        empty = [f for f in files if os.path.getsize(os.path.join(folder, f)) == 0]
        if empty:
            raise ConversionError(f"empty DICOM file(s) ({len(empty)} of {len(files)}), e.g. {empty[0]}",
                                  case_id, os.path.join(folder, empty[0]))
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        if not uids:
            without_pixels = _objects_without_pixels(folder, files)
            if without_pixels is None:
                raise ConversionError(f"no readable DICOM series among {len(files)} file(s)", case_id, folder)
            series += without_pixels  # structured reports, presentation states: assign_phases notes and ignores them
            continue
        listed = set()
        for uid in uids:
            names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
            listed.update(os.path.basename(n) for n in names)
            try:
                header = pydicom.dcmread(names[0], stop_before_pixels=True)
            except Exception as e:  # noqa: BLE001 - pydicom raises several types for broken files
                raise ConversionError(f"unreadable DICOM header ({e})", case_id, names[0]) from None
            time_s = None
            for tag in ("AcquisitionTime", "SeriesTime", "ContentTime"):
                time_s = _time_seconds(header.get(tag))
                if time_s is not None:
                    break
            series.append(SeriesInfo(uid, folder, names, str(header.get("SeriesDescription", "")),
                                     str(header.get("Modality", "")), time_s,
                                     study=str(header.get("StudyInstanceUID", "")),
                                     study_date=str(header.get("StudyDate", ""))))
        unlisted = sorted(set(files) - listed)
        if unlisted:
            # GDCM silently drops files it cannot parse; a truncated slice must not vanish
            raise ConversionError(f"not a readable DICOM image of any series ({len(unlisted)} of {len(files)} "
                                  f"file(s) in this folder: {', '.join(unlisted[:3])})", case_id,
                                  os.path.join(folder, unlisted[0]))
    if not series:
        raise ConversionError("no DICOM series found", case_id, patient_dir)
    return series


def _objects_without_pixels(folder: str, files: list) -> list[SeriesInfo] | None:
    """The DICOM objects of a folder where GDCM finds no image series, one SeriesInfo per series, when every
    file is a DICOM object without pixel data (a structured report, a presentation state); else None."""
    import pydicom

    found: dict[str, SeriesInfo] = {}
    for name in files:
        path = os.path.join(folder, name)
        try:
            header = pydicom.dcmread(path)  # whole: stop_before_pixels would hide the pixel data looked for
        except Exception:  # noqa: BLE001 - not DICOM at all: the caller's error names the folder
            return None
        if any(tag in header for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            return None
        uid = str(header.get("SeriesInstanceUID", path))
        info = found.setdefault(uid, SeriesInfo(uid, folder, [], str(header.get("SeriesDescription", "")),
                                                str(header.get("Modality", "")) or "non-image", None,
                                                study=str(header.get("StudyInstanceUID", ""))))
        info.files.append(path)
    return list(found.values())


def split_by_study(series: list[SeriesInfo], case_id: str, mapping: dict, needed: list[str]
                   ) -> tuple[list[SeriesInfo], list[str]]:
    """The series of the one study a case is made of, and notes. A patient scanned on several dates has
    several studies; phases of different dates must not be mixed. The study holding the DICOM-SEG (when
    there is one) wins; else the studies with every needed phase, the earliest of them (StudyDate, then
    UID); else the error names each study's phases."""
    studies: dict[str, list[SeriesInfo]] = {}
    for s in series:
        studies.setdefault(s.study, []).append(s)
    # a study without image series (a DICOM-SEG stored in a study of its own) goes along with any choice
    with_images = {s.study for s in series if s.modality in IMAGE_MODALITIES}
    companions = [s for s in series if s.study not in with_images]
    studies = {uid: members for uid, members in studies.items() if uid in with_images}
    if len(studies) <= 1:
        return series, []
    dates = {uid: next((s.study_date for s in members if s.study_date), None) for uid, members in studies.items()}

    def describe(uid):
        found = assign_phases([SeriesInfo(**vars(s)) for s in studies[uid]], case_id, mapping, needed)[0]
        return f"study {uid} ({dates[uid] or 'no date'}): {sorted(found, key=CT_PHASES.index) or 'no phase'}", found

    summaries = {uid: describe(uid) for uid in studies}
    segs = {s.study for s in series if s.modality == "SEG"} & with_images
    if len(segs) == 1:
        chosen, why = next(iter(segs)), "the study of the DICOM-SEG"
    else:
        complete = [uid for uid, (_, found) in summaries.items() if all(p in found for p in needed)]
        if not complete:
            raise IncompleteCaseError(f"no single study has every needed phase {needed} (phases of different dates "
                                      f"are never mixed): " + "; ".join(t for t, _ in summaries.values()),
                                      case_id, series[0].folder)
        chosen = min(complete, key=lambda uid: (dates[uid] or "~", uid))  # undated studies after dated ones
        why = f"the {'earliest' if len(complete) > 1 else 'only'} study with every needed phase"
    others = "; ".join(text for uid, (text, _) in summaries.items() if uid != chosen)
    return studies[chosen] + companions, [f"{len(studies)} studies: used {summaries[chosen][0]} ({why}); ignored "
                                          f"{others} (a --phase-map entry 'SeriesInstanceUID': 'ignore' drops a series)"]


def load_phase_map(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionFailed([ConversionError(f"unreadable phase mapping ({e})", None, path)]) from None
    if not isinstance(mapping, dict):
        raise ConversionFailed([ConversionError("phase mapping must be a JSON object", None, path)])
    allowed = set(CT_PHASES) | {"ignore"}
    for key, value in mapping.items():
        entries = value.items() if isinstance(value, dict) else [(key, value)]
        for description, phase in entries:
            if phase not in allowed:
                raise ConversionFailed([ConversionError(f"phase mapping entry {description!r}: {phase!r} is not one "
                                                        f"of {sorted(allowed)}", None, path)])
    return mapping


def _override(mapping: dict, case_id: str, series: SeriesInfo) -> tuple[str, tuple] | None:
    """(phase, (section, key as the file spells it)) that --phase-map gives ``series``, or None: the patient's
    own section (``case_id``) first, then the global entries (section None); keys match a SeriesInstanceUID or
    description ignoring letter case and surrounding spaces."""
    for section, table in ((case_id, _patient_section(mapping, case_id)), (None, global_phase_map_entries(mapping))):
        if not table:
            continue
        lowered = {k.strip().lower(): k for k in table}
        for key in (series.uid, series.description):
            if key and key.strip().lower() in lowered:
                entry = lowered[key.strip().lower()]
                return table[entry], (section, entry)
    return None


def global_phase_map_entries(mapping: dict) -> dict:
    """The --phase-map entries for every patient (the per-patient sections are the JSON objects)."""
    return {k: v for k, v in mapping.items() if not isinstance(v, dict)}


def _patient_section(mapping: dict, case_id: str) -> dict:
    section = mapping.get(case_id)
    return section if isinstance(section, dict) else {}


def assign_phases(series: list[SeriesInfo], case_id: str, mapping: dict, needed: list[str]
                  ) -> tuple[dict[str, SeriesInfo], list[str]]:
    """phase -> series for one patient, plus notes. Order of evidence: mapping file,
    SeriesDescription keywords, then acquisition-time order for a single leftover series."""
    notes = []
    images = [s for s in series if s.modality in IMAGE_MODALITIES]
    for s in series:
        if s.modality not in IMAGE_MODALITIES + ("SEG",):
            notes.append(f"ignored {s.modality or 'unknown-modality'} series {s.description!r} in {s.folder}")
    for s in images:
        override = _override(mapping, case_id, s)
        if override is not None:
            phase, s.mapping_entry = override
            s.phase, s.how = (None if phase == "ignore" else phase), "mapping file"
        else:
            s.phase, s.how = phase_from_description(s.description), "description"
    used = {s.mapping_entry for s in images}
    for entry in _patient_section(mapping, case_id):
        if (case_id, entry) not in used:
            notes.append(f"--phase-map entry {entry!r} of this patient's section matches no series used "
                         f"(descriptions: {sorted({s.description for s in images})}); not used")
    by_phase: dict[str, list[SeriesInfo]] = {}
    for s in images:
        if s.phase:
            by_phase.setdefault(s.phase, []).append(s)
    chosen = {}
    for phase, candidates in by_phase.items():
        # Several reconstructions of one phase (thin and thick slices) are common on TCIA:
        # keep the one with most slices, say so.
        candidates.sort(key=lambda s: (-len(s.files), s.uid))
        chosen[phase] = candidates[0]
        if len(candidates) > 1:
            notes.append(f"{len(candidates)} series for {phase}: kept {candidates[0].description!r} "
                         f"({len(candidates[0].files)} slices, {candidates[0].folder}), ignored "
                         + ", ".join(f"{c.description!r} ({len(c.files)} slices)" for c in candidates[1:]))
    # a series of one image (a scout, a dose screen) is no volume, whatever its acquisition time
    leftovers = [s for s in images if s.phase is None and s.how != "mapping file" and len(s.files) > 1
                 and not NOT_A_PHASE.search(s.description)]
    missing = [p for p in needed if p not in chosen]
    timed = {p: s.time_s for p, s in chosen.items() if s.time_s is not None}
    if len(missing) == 1 and len(leftovers) == 1 and leftovers[0].time_s is not None:
        # a single unnamed series fills a single gap when its time fits between the neighbours
        phase, candidate = missing[0], leftovers[0]
        rank = CT_PHASES.index(phase)
        before = [t for p, t in timed.items() if CT_PHASES.index(p) < rank]
        after = [t for p, t in timed.items() if CT_PHASES.index(p) > rank]
        if all(t < candidate.time_s for t in before) and all(t > candidate.time_s for t in after):
            candidate.phase, candidate.how = phase, "acquisition time"
            chosen[phase] = candidate
            notes.append(f"series {candidate.description!r} ({candidate.folder}) names no phase; assigned to "
                         f"{phase} from its acquisition time")
    for s in leftovers:
        if s.phase is None:
            notes.append(f"series {s.description!r} ({s.folder}) names no known phase; ignored")
    ordered = sorted((s.time_s, p) for p, s in chosen.items() if s.time_s is not None)
    time_order = [p for _, p in ordered]
    if time_order != sorted(time_order, key=CT_PHASES.index):
        notes.append(f"acquisition-time order {time_order} contradicts the phase order; check the descriptions "
                     f"or pass --phase-map")
    return chosen, notes


def check_slice_stack(info: SeriesInfo, case_id: str, reader: sitk.ImageSeriesReader) -> None:
    """The series' slices form one evenly spaced stack along their normal: one orientation, no two slices at
    one position (two acquisitions in one series), no gap (a missing slice), no in-plane drift from slice to
    slice (a gantry tilt). ITK stacks any of these at a mean spacing, with every slice after the defect in
    the wrong place, and only warns. ``reader``: the series' reader after ``Execute`` with its per-slice
    metadata (``MetaDataDictionaryArrayUpdateOn``), so the headers are not read a second time."""
    orientations, positions = [], []
    for k, name in enumerate(info.files):
        if not (reader.HasMetaDataKey(k, "0020|0032") and reader.HasMetaDataKey(k, "0020|0037")):
            raise ConversionError(f"DICOM series {info.description!r}: a slice without ImagePositionPatient or "
                                  f"ImageOrientationPatient", case_id, name)
        positions.append([float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")])
        orientations.append([float(v) for v in reader.GetMetaData(k, "0020|0037").split("\\")])
    orientations, positions = np.array(orientations), np.array(positions)
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise ConversionError(f"DICOM series {info.description!r}: slices of different orientations", case_id,
                              info.folder)
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    order = np.argsort(positions @ normal)
    depth = positions[order] @ normal
    steps = np.diff(depth)
    where = info.folder
    if len(steps) and steps.min() < 1e-3:
        raise ConversionError(f"DICOM series {info.description!r}: two slices at one position ("
                              f"{int((steps < 1e-3).sum())} such pairs): two acquisitions in one series; keep one "
                              f"(or map the series to 'ignore' with --phase-map)", case_id, where)
    spacing = float(np.median(steps)) if len(steps) else 0.0
    if len(steps) and np.abs(steps - spacing).max() > max(0.01 * spacing, 1e-3):
        k = int(np.argmax(np.abs(steps - spacing)))
        raise ConversionError(f"DICOM series {info.description!r}: uneven slice spacing ({steps[k]:.3g} mm between "
                              f"slices {k} and {k + 1} along the stack, {spacing:.3g} mm elsewhere): a missing slice; "
                              f"fix the series or map it to 'ignore' with --phase-map", case_id, where)
    drift = positions[order] - positions[order][:1] - np.outer(depth - depth[0], normal)
    if np.abs(drift).max() > max(0.01 * spacing, 1e-2):
        raise ConversionError(f"DICOM series {info.description!r}: the slices move in-plane along the stack "
                              f"({np.abs(drift).max():.3g} mm over {len(depth)} slices): a gantry tilt, which this "
                              f"converter does not resample; map the series to 'ignore' with --phase-map",
                              case_id, where)


def read_series(info: SeriesInfo, case_id: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(info.files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions for check_slice_stack
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise ConversionError(f"unreadable DICOM series {info.description!r} ({str(e).strip().splitlines()[-1]})",
                              case_id, info.folder) from None
    check_slice_stack(info, case_id, reader)
    if image.GetDimension() != 3 or image.GetSize()[2] < 2:
        raise ConversionError(f"DICOM series {info.description!r} is not a 3D volume (size {image.GetSize()})",
                              case_id, info.folder)
    return image


_TUMOR_WORDS = re.compile(r"tumou?r|lesion|cancer|carcinoma|hcc|mass|metasta|neoplasm|nodule", re.IGNORECASE)


def read_dicom_seg(path: str, reference: sitk.Image, case_id: str) -> sitk.Image:
    """A DICOM-SEG (binary, one frame per segment and slice) rasterised onto the grid of the
    reference (portal-venous) series it annotates: segments whose label names the liver
    become 1, tumor-like names 2 (tumor wins where segments overlap). The SEG frames must
    lie on the reference grid (same orientation, pixel spacing and slice positions)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        frames = np.asarray(ds.pixel_array)
    except Exception as e:  # noqa: BLE001 - pydicom raises several types for broken files
        raise ConversionError(f"unreadable DICOM-SEG ({e})", case_id, path) from None
    frames = frames[None] if frames.ndim == 2 else frames
    values = {}
    for segment in ds.SegmentSequence:
        name = str(getattr(segment, "SegmentLabel", ""))
        if _TUMOR_WORDS.search(name):
            values[int(segment.SegmentNumber)] = 2
        elif "liver" in name.lower():
            values[int(segment.SegmentNumber)] = 1
        else:
            raise ConversionError(f"DICOM-SEG segment {segment.SegmentNumber} {name!r} names neither the liver nor "
                                  f"a tumor", case_id, path)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    size_x, size_y, size_z = reference.GetSize()
    if (int(ds.Rows), int(ds.Columns)) != (size_y, size_x):
        raise ConversionError(f"DICOM-SEG frames are {ds.Rows}x{ds.Columns}, the portal-venous series "
                              f"{size_y}x{size_x}", case_id, path)
    label = np.zeros((size_z, size_y, size_x), np.uint8)
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def item(name):
            return getattr(group, name, None) or getattr(shared, name, None)
        orientation = np.array(item("PlaneOrientationSequence")[0].ImageOrientationPatient, float)
        spacing = np.array(item("PixelMeasuresSequence")[0].PixelSpacing, float)
        if not (np.allclose(orientation[:3], direction[:, 0], atol=1e-3)
                and np.allclose(orientation[3:], direction[:, 1], atol=1e-3)
                and np.allclose(spacing, reference.GetSpacing()[1::-1], rtol=1e-3)):
            raise ConversionError("DICOM-SEG orientation/pixel spacing differ from the portal-venous series; "
                                  "export the mask as NIfTI in that frame", case_id, path)
        position = [float(v) for v in item("PlanePositionSequence")[0].ImagePositionPatient]
        index = reference.TransformPhysicalPointToContinuousIndex(position)
        k = int(round(index[2]))
        if max(abs(index[0]), abs(index[1]), abs(index[2] - k)) > 0.05 or not 0 <= k < size_z:
            raise ConversionError(f"DICOM-SEG frame {i + 1} at {position} is not a slice of the portal-venous "
                                  f"series", case_id, path)
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in values:
            raise ConversionError(f"DICOM-SEG frame {i + 1} belongs to segment {number}, which SegmentSequence does "
                                  f"not define (segments {sorted(values)})", case_id, path)
        label[k] = np.maximum(label[k], (frames[i] > 0).astype(np.uint8) * values[number])
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference)
    return image


def convert_case(task: CaseTask, out_dir: str, options: ConversionOptions):
    patient_dir = Path(task.images["patient_dir"])
    selected = task.extra["phases"]
    needed = list(dict.fromkeys(list(selected) + [REFERENCE_PHASE]))
    series, study_notes = split_by_study(scan_patient(patient_dir, task.case_id), task.case_id,
                                         task.extra["phase_map"], needed)
    chosen, notes = assign_phases(series, task.case_id, task.extra["phase_map"], needed)
    notes = study_notes + notes
    missing = [p for p in needed if p not in chosen]
    if missing:
        found = ", ".join(f"{s.description!r}->{s.phase}" for s in series) or "none"
        raise IncompleteCaseError(f"missing phase(s) {missing}; series found: {found}", task.case_id, patient_dir)
    phase_images = {p: (read_series(chosen[p], task.case_id), chosen[p].folder) for p in needed}
    segs = [s for s in series if s.modality == "SEG"]
    split, label = task.split, None
    if task.label is not None:
        label = (read_image(task.label, task.case_id), task.label)
        if segs:
            notes.append(f"NIfTI mask {task.label} used; DICOM-SEG in {segs[0].folder} ignored")
    elif segs:
        if len(segs) > 1:
            raise ConversionError(f"{len(segs)} DICOM-SEG series; keep one or give masks/{task.case_id}.nii.gz",
                                  task.case_id, segs[1].files[0])
        seg_path = segs[0].files[0]
        label = (read_dicom_seg(seg_path, phase_images[REFERENCE_PHASE][0], task.case_id), seg_path)
        split = "train"
    result = register_and_write(task.case_id, split, out_dir, options, phase_images, selected, label,
                                CT_PHASES, None, compute_curve=False, case_class=task.case_class,
                                notes=notes, source=str(patient_dir))
    truth = task.extra.get("truth_motion")
    if truth and label is not None and (sitk.GetArrayViewFromImage(label[0]) > 0).any():
        # a source with known motion (the phantom's phantom_truth.json): report the true residual
        label_on_grid = resample_onto(label[0], phase_images[REFERENCE_PHASE][0], is_label=True)
        for phase, summary in result.registration.items():
            if phase in truth:
                summary["residual_vs_truth_vox"] = {k: round(v, 4) for k, v in residual_vs_truth(
                    transform_from_summary(summary), euler_from_motion(**truth[phase]), label_on_grid).items()}
    result.registration["series"] = {p: {"description": chosen[p].description, "uid": chosen[p].uid,
                                         "identified_by": chosen[p].how, "acquisition_time_s": chosen[p].time_s}
                                     for p in needed}
    # read across cases after the conversion: a global entry no case used is reported once
    result.registration["phase_map_entries_used"] = sorted({s.mapping_entry[1] for s in series
                                                            if s.mapping_entry and s.mapping_entry[0] is None})
    return result


def discover(src: str | Path, options: ConversionOptions) -> list[CaseTask]:
    src = Path(src)
    if not src.is_dir():
        raise ConversionFailed([ConversionError("TCGA-LIHC source folder does not exist", None, src)])
    phase_map = load_phase_map(options.phase_map)
    csv_path = Path(options.classes_csv) if options.classes_csv else src / "classes.csv"
    table = read_case_table(csv_path, ("patient_id", "case_id", "PatientID")) if (
        options.classes_csv or csv_path.is_file()) else {}
    masks: dict[str, list[Path]] = {}
    if (src / "masks").is_dir():
        for path in sorted((src / "masks").iterdir()):
            stem = strip_nifti_suffix(path.name)
            if stem is not None and not is_junk_file(path.name):
                masks.setdefault(stem, []).append(path)
    errors = [ConversionError(f"duplicate case id: mask exists as {', '.join(map(str, p))}", c, p[1])
              for c, p in masks.items() if len(p) > 1]
    patients = sorted(p for p in src.iterdir() if p.is_dir() and p.name != "masks" and not is_junk_file(p.name))
    lowered: dict[str, Path] = {}
    for p in patients:
        if p.name.lower() in lowered:
            errors.append(ConversionError(f"duplicate case id: {lowered[p.name.lower()]} and {p} differ only in case",
                                          p.name, p))
        lowered[p.name.lower()] = p
    for case_id, paths in masks.items():
        if not (src / case_id).is_dir():
            errors.append(ConversionError("mask without a patient folder", case_id, paths[0]))
    if errors:
        raise ConversionFailed(errors, "bad TCGA-LIHC source layout")
    if not patients:
        raise ConversionFailed([ConversionError("no patient folders found", None, src)], "nothing to convert")
    selected = _selected_phases(options)
    truth = _known_motion(src / "phantom_truth.json")
    tasks = []
    for patient in patients:
        mask = masks.get(patient.name, [None])[0]
        row = table.get(patient.name, {})
        tasks.append(CaseTask(patient.name, "train" if mask is not None else "test",
                              {"patient_dir": str(patient)}, label=None if mask is None else str(mask),
                              case_class=row.get("class"),
                              extra={"phases": selected, "phase_map": phase_map,
                                     "truth_motion": truth.get(patient.name)}))
    check_case_table_matches(table, (p.name for p in patients), csv_path, str(src), "patient folder")
    _check_phase_map_patients(phase_map, [p.name for p in patients], options.phase_map, src)
    return tasks


def _check_phase_map_patients(phase_map: dict, patients: list[str], path, src: Path) -> None:
    """Per-patient sections of --phase-map ({"patient": {...}}) are looked up by the exact folder name: one whose
    name differs from a folder only in letter case would be ignored without a word (an error), one that names no
    folder is a patient not downloaded (a warning)."""
    names = set(patients)
    by_lower = {p.lower(): p for p in patients}
    unmatched = sorted(k for k, v in phase_map.items() if isinstance(v, dict) and k not in names)
    case_only = [f"{k!r} (the folder is {by_lower[k.lower()]!r})" for k in unmatched if k.lower() in by_lower]
    if case_only:
        raise ConversionFailed([ConversionError(
            f"per-patient section(s) {', '.join(case_only)} differ from the patient folder only in letter case and "
            f"would not apply; write the names exactly as the folders", None, path)], "bad phase mapping")
    if unmatched:
        warnings.warn(f"file {path}: per-patient section(s) {', '.join(map(repr, unmatched))} name no patient folder "
                      f"in {src} and are not used", stacklevel=2)


def _known_motion(path: Path) -> dict:
    """{patient: {phase: Euler parameters}} from a `phantom_truth.json` next to the patients
    (written by nnunet_liver_ext.phantom.write_tcga_dicom), else {}. The motion maps
    reference points to the phase's frame, the same direction as the registration result."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {pid: {phase: {"rotation_deg": m["rotation_deg"], "translation_mm": m["translation_mm"],
                              "center": m.get("center_mm", (0.0, 0.0, 0.0))}
                      for phase, m in entry["motion"].items()}
                for pid, entry in data.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionFailed([ConversionError(f"unreadable motion truth file ({e!r})", None, path)]) from None


def _selected_phases(options: ConversionOptions) -> list[str]:
    # Default: the three contrast phases (the CT set most multiphase liver work uses);
    # pre-contrast only on request, so cases without a native scan are not incomplete.
    if options.phase_subset is None:
        return ["arterial", "portal_venous", "delayed"]
    return select_phases(CT_PHASES, options.phase_subset, "TCGA-LIHC")


def convert(src: str | Path, options: ConversionOptions) -> Path:
    tasks = discover(src, options)
    make_json = multiphase_dataset_json(options.name, "CT", tasks[0].extra["phases"], options,
                                        "TCGA-LIHC multiphase CT, converted by nnunet-liver convert tcga-lihc")
    entries = global_phase_map_entries(tasks[0].extra["phase_map"])

    def check_entries_then_make_json(results):
        used = {e for r in results for e in (r.registration or {}).get("phase_map_entries_used", [])}
        unused = [e for e in entries if e not in used]
        if unused:
            warnings.warn(f"file {options.phase_map}: global entr{'y' if len(unused) == 1 else 'ies'} "
                          f"{', '.join(map(repr, unused))} matched no series of the converted cases "
                          f"(compared with each SeriesDescription and SeriesInstanceUID, ignoring letter case and "
                          f"surrounding spaces) and decided nothing", stacklevel=2)
        return make_json(results)

    return run_conversion("tcga-lihc", tasks, convert_case, options, check_entries_then_make_json)
