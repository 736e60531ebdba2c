"""Shared machinery of the dataset converters.

Every converter follows the same path: discover the cases of a source (`CaseTask`), convert
each case in a worker process into a temporary dataset folder, then write dataset.json and
`conversion_report.json` and move the folder into place in one `os.replace`. A run that
fails on bad input removes its temporary folder; an interrupted run (Ctrl-C, kill, a worker process killed
by the out-of-memory killer) leaves a hidden `.Dataset{ID}_{NAME}.partial` folder that the same command resumes
from. A dataset id held in the raw folder is refused unless ``--overwrite`` (which replaces that folder only); one
that another name holds in nnUNet_preprocessed or nnUNet_results is refused always.

Conventions: arrays are (z, y, x); spacing in this package is (z, y, x) mm, while
SimpleITK's `GetSpacing()`/`GetOrigin()` are (x, y, z). Labels follow LiTS: 0 background,
1 liver, 2 tumor.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_liver_ext.voxels import non_finite_description, short_error, stored_voxels

LABELS = {"background": 0, "liver": 1, "tumor": 2}
# Same names and order as nnunet_liver_ext.phantom (checked by a test); duplicated so the
# converters do not depend on the phantom package.
CT_PHASES = ("pre_contrast", "arterial", "portal_venous", "delayed")
MRI_PHASES = ("pre", "arterial", "portal_venous", "delay")
REFERENCE_PHASE = "portal_venous"
LESION_CLASSES = ("HCC", "hemangioma", "metastasis", "cyst")
PHASE_MODES = ("as-channels", "sequence")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
class ConversionError(Exception):
    """Bad input in one case. Always names the case and the offending file or folder.

    `skippable` marks errors that `--skip-incomplete` turns into a skipped case (a missing
    phase); every other error stops the conversion.
    """

    def __init__(self, message: str, case_id: str | None = None, path: str | os.PathLike | None = None,
                 skippable: bool = False):
        self.message = message
        self.case_id = case_id
        self.path = None if path is None else str(path)
        self.skippable = skippable
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.case_id is not None:
            where.append(f"case {self.case_id!r}")
        if self.path is not None:
            where.append(f"file {self.path}")
        return (", ".join(where) + ": " if where else "") + self.message

    def __reduce__(self):
        # Exceptions with keyword state must pickle explicitly to cross the worker boundary.
        return (self.__class__, (self.message, self.case_id, self.path, self.skippable))


class IncompleteCaseError(ConversionError):
    """A case lacks a required phase; `--skip-incomplete` skips it instead of failing."""

    def __init__(self, message: str, case_id: str | None = None, path=None, skippable: bool = True):
        super().__init__(message, case_id, path, skippable=True)


class ConversionFailed(RuntimeError):
    """The conversion stopped; `errors` holds every case error that caused it."""

    def __init__(self, errors: Sequence[ConversionError], header: str = "conversion failed"):
        self.errors = list(errors)
        lines = [f"{header} ({len(self.errors)} case error(s)); no dataset folder was written:"]
        lines += [f"  - {e}" for e in self.errors]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------
# cases and results
# --------------------------------------------------------------------------------------
@dataclass
class CaseTask:
    """One source case. `images` maps a phase name to its source (a file path, or for DICOM
    a list of slice files); `label` is the source mask or None for unlabeled cases."""
    case_id: str
    split: str  # "train" | "test"
    images: dict
    label: str | None = None
    case_class: str | None = None
    curve: list | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CaseResult:
    case_id: str
    split: str
    status: str  # "converted" | "skipped"
    reason: str = ""
    source: str = ""
    phases: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    case_class: str | None = None
    curve: list | None = None
    registration: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)


@dataclass
class ConversionOptions:
    """What every converter accepts. `phases_mode` is "as-channels" or "sequence";
    `phase_subset` restricts (and orders by the source's canonical order) the phases that
    become channels; `orient` is "keep" or a three-letter DICOM orientation code (e.g. "LPS")
    that every output case is reoriented to."""
    raw_root: str
    dataset_id: int
    name: str
    overwrite: bool = False
    skip_incomplete: bool = False
    num_workers: int = 1
    phases_mode: str = "as-channels"
    phase_subset: tuple | None = None
    phase_map: str | None = None
    classes_csv: str | None = None
    orient: str = "keep"
    geometry_tolerance_vox: float = 1.0
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.dataset_id, int) or not 0 < self.dataset_id < 1000:
            raise ValueError(f"dataset id must be an integer in 1..999, got {self.dataset_id!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", self.name or ""):
            raise ValueError(f"dataset name {self.name!r} must be letters, digits, '_' or '-' "
                             f"(it becomes the folder name Dataset{self.dataset_id:03d}_NAME)")
        if self.phases_mode not in PHASE_MODES:
            raise ValueError(f"phases mode must be one of {PHASE_MODES}, got {self.phases_mode!r}")
        if self.num_workers < 1:
            raise ValueError(f"number of workers must be >= 1, got {self.num_workers}")
        if self.orient != "keep" and not is_orientation_code(self.orient):
            # checked here, not by SimpleITK in every case: "LLP" would otherwise fail each case, blamed on its file
            raise ValueError(f"orient must be 'keep' or an orientation code of three letters, one of R/L, one of "
                             f"A/P and one of S/I in any order (e.g. LPS, RAS), got {self.orient!r}")
        if not isinstance(self.geometry_tolerance_vox, (int, float)) or not math.isfinite(self.geometry_tolerance_vox) \
                or self.geometry_tolerance_vox < 0:
            # NaN compares False with everything, so a NaN tolerance would let any misplaced label through
            raise ValueError(f"geometry tolerance must be a finite number >= 0 voxels, got "
                             f"{self.geometry_tolerance_vox!r}")
        if self.phase_subset is not None:
            self.phase_subset = tuple(self.phase_subset)
            if len(self.phase_subset) == 0 or len(set(self.phase_subset)) != len(self.phase_subset):
                raise ValueError(f"phase subset must be non-empty without repeats, got {self.phase_subset}")


def is_orientation_code(code: str) -> bool:
    """Three letters naming each patient axis once: one of R/L, one of A/P, one of S/I, in any order."""
    return (isinstance(code, str) and len(code) == 3
            and sorted(sum(letter in pair for letter in code) for pair in ("RL", "AP", "SI")) == [1, 1, 1])


def select_phases(available: Sequence[str], subset: Sequence[str] | None, source: str) -> list[str]:
    """Channel order: the source's canonical phase order restricted to `subset`."""
    if subset is None:
        return list(available)
    unknown = [p for p in subset if p not in available]
    if unknown:
        raise ValueError(f"{source}: unknown phase(s) {unknown} in the phase subset; "
                         f"this source has {list(available)}")
    return [p for p in available if p in subset]


# --------------------------------------------------------------------------------------
# image I/O, geometry, labels
# --------------------------------------------------------------------------------------
def walk_folders(root: str | os.PathLike, onerror: Callable[[OSError], None] | None = None):
    """``os.walk(root)`` top-down, following folder symlinks: a batch folder linked in from another disk is part of
    the download (``Path.rglob`` skips it without a word before Python 3.13). A folder reached a second time (a link
    to a folder of the tree, a link loop) yields nothing and is not entered again. The caller may prune
    ``subdirs`` in place."""
    seen: set[tuple[int, int]] = set()
    for folder, subdirs, files in os.walk(root, onerror=onerror, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError as e:
            if onerror is not None:
                onerror(e)
            subdirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs.sort()
        yield folder, subdirs, sorted(files)


def _unreadable_folder(error: OSError) -> None:
    # os.walk skips a folder it cannot list unless told otherwise: its cases would vanish
    raise ConversionError(f"cannot read this folder ({error.strerror or error})", None, error.filename)


def _walk_files(root: str | os.PathLike, onerror: Callable[[OSError], None] | None = None):
    """Every non-folder entry under ``root`` as a path string, in ``walk_folders`` order."""
    for folder, _, files in walk_folders(root, onerror=onerror):
        for name in files:
            yield os.path.join(folder, name)


def source_files(root: str | os.PathLike) -> list[Path]:
    """Every non-folder entry under ``root`` (symlinked folders followed, see ``walk_folders``), sorted. Dangling
    links are included, so a case file pointing nowhere fails as a missing file instead of vanishing. A folder
    that cannot be read is a ConversionError naming it."""
    return sorted(Path(f) for f in _walk_files(root, onerror=_unreadable_folder))


def strip_nifti_suffix(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def is_junk_file(name: str) -> bool:
    """macOS AppleDouble files (`._x.nii.gz`) and hidden files ship inside real tarballs."""
    return name.startswith(".") or name.startswith("_")


def read_image(path: str | os.PathLike, case_id: str) -> sitk.Image:
    """Read a 3D image; any failure becomes a ConversionError naming the case and file. A truncated file and NaN or
    infinite voxels count as failures: SimpleITK reads both in a NIfTI file as zeros without a word, so the voxels
    are checked as stored (``nnunet_liver_ext.voxels``)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConversionError("file does not exist", case_id, path)
    if os.path.getsize(path) == 0:
        raise ConversionError("file is empty (0 bytes)", case_id, path)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise ConversionError(f"unreadable image ({first_line})", case_id, path) from None
    if image.GetDimension() != 3:
        raise ConversionError(f"expected a 3D image, got {image.GetDimension()}D "
                              f"(size {image.GetSize()})", case_id, path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} "
                              f"components per voxel", case_id, path)
    try:
        voxels = stored_voxels(path, lambda: image)
    except Exception as e:  # noqa: BLE001 - zlib, nibabel and ITK each raise their own kind
        raise ConversionError(f"the voxel data are damaged, the file is truncated or corrupt "
                              f"({type(e).__name__}: {short_error(e)})", case_id, path) from None
    non_finite = non_finite_description(voxels)
    if non_finite:
        raise ConversionError(f"the file contains {non_finite}", case_id, path)
    return image


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)


def orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def reorient(image: sitk.Image, code: str) -> sitk.Image:
    """Permute/flip axes so the image has orientation `code`; voxel values are untouched."""
    if orientation_code(image) == code:
        return image
    return sitk.DICOMOrient(image, code)


def _grid_corners(image: sitk.Image) -> np.ndarray:
    size = np.array(image.GetSize())
    corners = []
    for ix in (0, size[0] - 1):
        for iy in (0, size[1] - 1):
            for iz in (0, size[2] - 1):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((float(ix), float(iy), float(iz))))
    return np.array(corners)


def geometry_offset_vox(reference: sitk.Image, other: sitk.Image) -> float:
    """Largest distance, in voxels of `reference` (per axis), between the grid corners of the
    two images. Corners are matched by orientation-independent sorting so that two grids
    covering the same box in different storage orders compare as equal."""
    ref_corners = _grid_corners(reference)
    other_corners = _grid_corners(other)
    # Sort corners lexicographically by physical position: the set of corners of a box is
    # the same whatever the axis order/flips of the storage.
    key = lambda c: np.lexsort(np.round(c, 3).T[::-1])
    ref_sorted = ref_corners[key(ref_corners)]
    other_sorted = other_corners[key(other_corners)]
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    spacing = np.array(reference.GetSpacing())
    diff_index = (direction.T @ (other_sorted - ref_sorted).T).T / spacing
    return float(np.abs(diff_index).max())


def resample_to(image: sitk.Image, reference: sitk.Image, interpolator=sitk.sitkNearestNeighbor,
                transform: sitk.Transform | None = None, default_value: float = 0.0,
                pixel_type=None) -> sitk.Image:
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, default_value,
                         image.GetPixelID() if pixel_type is None else pixel_type)


def match_label_to_image(label: sitk.Image, image: sitk.Image, case_id: str, label_path: str,
                         tol_vox: float = 1.0) -> tuple[sitk.Image, list[str]]:
    """Bring `label` onto `image`'s voxel grid.

    - Same grid (up to 1e-3 voxel of header rounding): the image's geometry is copied.
    - Same box stored in another orientation: reoriented exactly (no interpolation).
    - Grids whose corners differ by <= `tol_vox` voxels: nearest-neighbour resampling, with a
      warning. Beyond: ConversionError naming both geometries.
    Returns (label on the image grid, warnings).
    """
    notes = []
    label_code, image_code = orientation_code(label), orientation_code(image)
    if label_code != image_code:
        label = reorient(label, image_code)
        notes.append(f"label orientation {label_code} differs from the image's {image_code}; "
                     f"reoriented without interpolation")
    if label.GetSize() == image.GetSize() and geometry_offset_vox(image, label) <= 1e-3 \
            and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-4):
        label = sitk.Image(label)
        label.CopyInformation(image)
        return label, notes
    offset = geometry_offset_vox(image, label)
    direction_diff = float(np.abs(np.array(label.GetDirection()) - np.array(image.GetDirection())).max())
    description = (f"label grid size {label.GetSize()} spacing {_fmt(label.GetSpacing())} origin "
                   f"{_fmt(label.GetOrigin())} vs image size {image.GetSize()} spacing "
                   f"{_fmt(image.GetSpacing())} origin {_fmt(image.GetOrigin())} (x, y, z)")
    if offset > tol_vox or direction_diff > 1e-2:
        raise ConversionError(f"image/label geometry mismatch beyond tolerance: grids differ by "
                              f"{offset:.2f} voxels (tolerance {tol_vox}); {description}", case_id, label_path)
    notes.append(f"label geometry differs from the image by {offset:.2f} voxels (within tolerance "
                 f"{tol_vox}); resampled with nearest neighbour. {description}")
    warnings.warn(f"case {case_id!r}, file {label_path}: {notes[-1]}", stacklevel=2)
    return resample_to(label, image, sitk.sitkNearestNeighbor), notes


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_label_values(label: sitk.Image, case_id: str, path: str,
                       allowed: Iterable[int] = tuple(LABELS.values())) -> sitk.Image:
    """Labels must be integers from the schema; returns the label as uint8.

    Float labels are accepted when every value is an integer (some tools save masks as
    float); anything else names the unexpected values and their voxel counts."""
    array = sitk.GetArrayViewFromImage(label)
    allowed = sorted(int(a) for a in allowed)
    values, counts = np.unique(array, return_counts=True)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise ConversionError("label contains NaN or infinite values", case_id, path)
        non_integer = values[np.abs(values - np.round(values)) > 1e-3]
        if non_integer.size:
            raise ConversionError(f"label has non-integer values {non_integer[:5].tolist()}; "
                                  f"expected {allowed}", case_id, path)
    bad = [(v, c) for v, c in zip(values, counts) if int(round(float(v))) not in allowed]
    if bad:
        listed = ", ".join(f"{float(v):g} ({c} voxels)" for v, c in bad[:8])
        raise ConversionError(f"label values outside the schema {allowed} "
                              f"{{background: 0, liver: 1, tumor: 2}}: {listed}", case_id, path)
    out = sitk.GetImageFromArray(np.round(array).astype(np.uint8))
    out.CopyInformation(label)
    return out


# --------------------------------------------------------------------------------------
# dataset.json, classes, curves
# --------------------------------------------------------------------------------------
def normalise_class_name(name: str | None) -> str | None:
    """Case-insensitive match against the known lesion classes; other names are kept."""
    name = (name or "").strip()
    if not name or name.lower() in ("none", "nan", "na", "n/a"):
        return None
    for known in LESION_CLASSES:
        if known.lower() == name.lower():
            return known
    return name


def read_case_table(csv_path: str | os.PathLike, id_columns: Sequence[str], curve_columns: Sequence[str] = ()
                    ) -> dict[str, dict]:
    """`_read_case_table`, with its errors raised as ConversionFailed (it runs before any case)."""
    try:
        return _read_case_table(csv_path, id_columns, curve_columns)
    except ConversionError as e:
        raise ConversionFailed([e], "bad case table") from None


def _read_case_table(csv_path: str | os.PathLike, id_columns: Sequence[str], curve_columns: Sequence[str] = ()
                     ) -> dict[str, dict]:
    """Read a per-case CSV: {case_id: {"class": name or None, "curve": [floats] or None}}.

    `id_columns` are accepted names of the id column (first match wins); the class column is
    `class`. The curve is read only when every column of `curve_columns` exists; an empty
    cell in a row means that case has no curve."""
    csv_path = str(csv_path)
    if not os.path.isfile(csv_path):
        raise ConversionError("case table (CSV) does not exist", None, csv_path)
    with open(csv_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # no guessing at another encoding: a wrong guess changes class names without a word
        line = raw[:e.start].count(b"\n") + 1
        raise ConversionError(f"the case table is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}; "
                              f"Excel's plain CSV is Windows-1252/Latin-1): save it as UTF-8 (Excel: "
                              f"'CSV UTF-8'; LibreOffice: character set 'Unicode (UTF-8)')", None, csv_path) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        id_column = next((c for c in id_columns if c in columns), None)
        if id_column is None:
            raise ConversionError(f"CSV needs an id column named one of {list(id_columns)}; "
                                  f"found columns {columns}", None, csv_path)
        if "class" not in columns:
            raise ConversionError(f"CSV needs a 'class' column; found columns {columns}", None, csv_path)
        has_curves = bool(curve_columns) and all(c in columns for c in curve_columns)
        table = {}
        for row_number, row in enumerate(reader, start=2):
            case_id = (row.get(id_column) or "").strip()
            if not case_id:
                continue
            if case_id in table:
                raise ConversionError(f"duplicate case id in the case table (row {row_number})", case_id, csv_path)
            curve = None
            if has_curves:
                cells = [(row.get(c) or "").strip() for c in curve_columns]
                if all(cells):
                    try:
                        curve = [float(c) for c in cells]
                    except ValueError:
                        raise ConversionError(f"non-numeric enhancement value in row {row_number}: {cells}",
                                              case_id, csv_path) from None
            table[case_id] = {"class": normalise_class_name(row.get("class")),
                              "curve": curve}
    return table


def check_case_table_matches(table: dict, case_ids: Iterable[str], csv_path: str | os.PathLike, folder: str,
                             what: str = "case") -> None:
    """Rows of a case table that name no case of the source are an error when they can have lost something: when
    some case of the source has no row (the row meant for it carries a typo), or when a row differs from a case
    only in letter case (ids are matched exactly, like the folders and masks they name). Otherwise they are rows of
    patients that were not downloaded (a table covering the whole collection): a warning lists them. Raises
    ConversionFailed naming the file and listing the rows."""
    case_ids = set(case_ids)
    unmatched = sorted(set(table) - case_ids)
    if not unmatched:
        return
    by_lower: dict[str, list[str]] = {}
    for case_id in case_ids:
        by_lower.setdefault(case_id.lower(), []).append(case_id)
    described, case_only = [], False
    for row_id in unmatched:
        same_letters = sorted(by_lower.get(row_id.lower(), []))
        case_only |= bool(same_letters)
        described.append(f"{row_id!r} (differs only in letter case from {', '.join(same_letters)})"
                         if same_letters else repr(row_id))
    shown = ", ".join(described[:10]) + (f" and {len(described) - 10} more" if len(described) > 10 else "")
    without_row = sorted(case_ids - set(table))
    if not case_only and not without_row:
        warnings.warn(f"file {csv_path}: {len(unmatched)} row(s) name no {what} in {folder} and are not used "
                      f"(every {what} has its own row): {shown}", stacklevel=2)
        return
    lacking = ", ".join(without_row[:10]) + (f" and {len(without_row) - 10} more" if len(without_row) > 10 else "")
    raise ConversionFailed([ConversionError(
        f"{len(unmatched)} row(s) name no {what} in {folder}: {shown}"
        + (f"; {what}(s) without a row: {lacking}" if without_row else "")
        + f". Ids must match the {what} names exactly, letter case included. fix: correct these ids; rows of "
          f"patients that are not in the source are allowed once every {what} of the source has a row (an empty "
          f"class is allowed; a {what} that --skip-incomplete skips counts as present)", None, csv_path)],
        "case table does not match the source")


def ordered_classes(names: Iterable[str]) -> list[str]:
    """Known lesion classes in their fixed order, then any other names alphabetically."""
    names = set(n for n in names if n)
    return [c for c in LESION_CLASSES if c in names] + sorted(names - set(LESION_CLASSES))


def build_dataset_json(name: str, channel_names: Sequence[str], num_training: int, *,
                       phases: Sequence[str] | None = None, labels: dict | None = None,
                       characterization: dict | None = None, enhancement: dict | None = None,
                       description: str = "", extra: dict | None = None) -> dict:
    """nnU-Net v2 dataset.json plus our optional keys (DESIGN.md, "Multiphase data")."""
    dataset_json = {
        "name": name,
        "description": description,
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": dict(labels or LABELS),
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
    }
    if phases is not None:
        dataset_json["phases"] = list(phases)
    if characterization is not None:
        dataset_json["characterization"] = characterization
    if enhancement:
        dataset_json["enhancement"] = enhancement
    if extra:
        dataset_json.update(extra)
    return dataset_json


def case_targets(results: Sequence[CaseResult]) -> tuple[dict | None, dict | None]:
    """characterization and enhancement entries from the converted training cases."""
    train = [r for r in results if r.status == "converted" and r.split == "train"]
    classes = ordered_classes(r.case_class for r in train)
    characterization = None
    if classes:
        characterization = {"classes": classes,
                            "cases": {r.case_id: classes.index(r.case_class) for r in sorted(train, key=lambda r: r.case_id)
                                      if r.case_class is not None}}
    enhancement = {r.case_id: [float(v) for v in r.curve] for r in sorted(train, key=lambda r: r.case_id)
                   if r.curve is not None}
    return characterization, (enhancement or None)


def tumor_curve(phase_images: Sequence[sitk.Image], label: sitk.Image) -> list[float] | None:
    """Mean intensity of each (registered) phase over the tumor voxels (label 2); None
    without tumor."""
    tumor = sitk.GetArrayViewFromImage(label) == LABELS["tumor"]
    if not tumor.any():
        return None
    return [float(sitk.GetArrayViewFromImage(img)[tumor].mean()) for img in phase_images]


# --------------------------------------------------------------------------------------
# atomic dataset folder
# --------------------------------------------------------------------------------------
def default_raw_root() -> str:
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError("no output root: pass --raw DIR or set the nnUNet_raw environment variable")
    return raw


def existing_datasets(raw_root: str | os.PathLike, dataset_id: int) -> list[Path]:
    prefix = f"Dataset{dataset_id:03d}_"
    root = Path(raw_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


class AtomicDataset:
    """A dataset folder that appears in nnUNet_raw only once it is complete.

    Cases are written into `nnUNet_raw/.Dataset{ID}_{NAME}.partial/` (hidden, so nnU-Net's
    dataset-id lookup never sees it; on the same file system so the final move is a single
    `os.replace`). Each finished case leaves a marker in `.done/` with a fingerprint of its
    sources and the options, which lets the same command resume after an interruption.
    """

    def __init__(self, options: ConversionOptions, fingerprint: dict):
        self.options = options
        self.root = Path(options.raw_root)
        self.final = self.root / f"Dataset{options.dataset_id:03d}_{options.name}"
        self.tmp = self.root / f".Dataset{options.dataset_id:03d}_{options.name}.partial"
        self.fingerprint = fingerprint
        self.resumed_cases: dict[str, CaseResult] = {}

    def check_target(self) -> list[Path]:
        """Refuses an id that another name holds in nnUNet_preprocessed or nnUNet_results (whatever --overwrite
        says: those hold the user's preprocessed data and trained models, which a converter never deletes), and an
        id present in the raw folder unless --overwrite. Returns the raw folders that --overwrite replaces."""
        from nnunet_liver_ext.errors import free_dataset_id, other_names_of_id

        dataset_id = self.options.dataset_id
        # the raw folder's own datasets with this id are --overwrite's to replace (existing_datasets, below)
        elsewhere = [f"{var} ({root / other})" for other, places in
                     other_names_of_id(dataset_id, self.options.name, self.root, include_raw=False).items()
                     for var, root in places]
        if elsewhere:
            free = free_dataset_id(dataset_id, self.root)
            raise FileExistsError(
                f"dataset id {dataset_id} is taken by another name in {', '.join(elsewhere)}; nnU-Net allows one "
                f"name per id and would stop with 'More than one dataset name found for dataset id {dataset_id}'"
                f"\n  fix: choose a free id{f' (-d {free} is free)' if free else ''}, or remove those folders "
                f"yourself if they are no longer needed (--overwrite replaces only the nnUNet_raw folder and never "
                f"deletes preprocessed data or results)")
        taken = existing_datasets(self.root, dataset_id)
        if taken and not self.options.overwrite:
            raise FileExistsError(f"dataset id {dataset_id} is taken by "
                                  f"{', '.join(str(t) for t in taken)}; pass --overwrite to replace it "
                                  f"or choose another id")
        return taken

    def open(self) -> None:
        self.check_target()
        self.root.mkdir(parents=True, exist_ok=True)
        state_file = self.tmp / ".conversion_state.json"
        if self.tmp.exists():
            state = _load_json_or_none(state_file)
            if state is not None and state.get("fingerprint") == self.fingerprint:
                for marker in (self.tmp / ".done").glob("*.json"):
                    data = _load_json_or_none(marker)
                    if data is not None:
                        self.resumed_cases[data["case_id"]] = CaseResult(**data)
            else:
                shutil.rmtree(self.tmp)
        for sub in ("imagesTr", "labelsTr", "imagesTs", ".done"):
            (self.tmp / sub).mkdir(parents=True, exist_ok=True)
        _write_json(state_file, {"fingerprint": self.fingerprint})

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, dataset_json: dict, report: dict) -> Path:
        if not any((self.tmp / "imagesTs").iterdir()):
            (self.tmp / "imagesTs").rmdir()
        _write_json(self.tmp / "dataset.json", dataset_json)
        _write_json(self.tmp / "conversion_report.json", report)
        shutil.rmtree(self.tmp / ".done")
        (self.tmp / ".conversion_state.json").unlink()
        # Re-check right before the move: another run (or an nnU-Net command) may have claimed the id meanwhile.
        taken = self.check_target()
        trash = []
        for old in taken:
            moved = old.with_name(f".{old.name}.replaced-{os.getpid()}")
            os.replace(old, moved)
            trash.append(moved)
        os.replace(self.tmp, self.final)
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
        return self.final

    def mark_done(self, result: CaseResult) -> None:
        _write_json(self.tmp / ".done" / f"{result.case_id}.json", asdict(result))


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
    os.replace(tmp, path)


def _load_json_or_none(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _source_files(path: str) -> list[str]:
    """``path``, or every file under it when it is a folder (a TCGA patient's DICOM tree)."""
    if not os.path.isdir(path):
        return [path]
    return list(_walk_files(path))


def source_fingerprint(tasks: Sequence[CaseTask], options: ConversionOptions, converter: str) -> dict:
    """Identifies a run for resuming: converter, options that shape the output (the contents of the files
    they name, such as --phase-map and --classes), each case's class, and each source file's size and mtime
    (every file of a source folder)."""
    digest = hashlib.sha256()
    for task in sorted(tasks, key=lambda t: t.case_id):
        digest.update(f"{task.case_id}|class {task.case_class!r}\n".encode())
        files = []
        for value in list(task.images.values()) + [task.label]:
            files += value if isinstance(value, list) else [value]
        for f in (name for x in sorted(str(x) for x in files if x) for name in _source_files(x)):
            try:
                st = os.stat(f)
                digest.update(f"{task.case_id}|{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{task.case_id}|{f}|missing\n".encode())
    shaping = {k: v for k, v in asdict(options).items() if k not in ("num_workers", "progress", "overwrite")}
    for key in ("phase_map", "classes_csv"):
        if isinstance(shaping.get(key), str) and os.path.isfile(shaping[key]):
            with open(shaping[key], "rb") as f:
                shaping[f"{key}_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return {"converter": converter, "options": json.loads(json.dumps(shaping, default=str)),
            "sources": digest.hexdigest()}


# --------------------------------------------------------------------------------------
# running the cases
# --------------------------------------------------------------------------------------
def _run_one(args) -> CaseResult | ConversionError:
    worker, task, out_dir, options = args
    try:
        return worker(task, out_dir, options)
    except ConversionError as e:
        return e
    except Exception as e:  # noqa: BLE001 - any crash in a case must still name that case
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return ConversionError(f"unexpected error while converting: {tb}", task.case_id,
                               _first_source(task))


def _first_source(task: CaseTask) -> str | None:
    for value in task.images.values():
        if isinstance(value, list):
            return os.path.dirname(value[0]) if value else None
        return value
    return task.label


def duplicate_file_errors(entries: Iterable[tuple[str, str, Sequence[Path]]]) -> list[ConversionError]:
    """One error per source name that matched more than one file. ``entries`` are (the name as the
    user sees it, e.g. ``volume-3``; its case id; the files it matched, sorted); the error points at
    the second file."""
    return [ConversionError(f"duplicate case id: {name} exists as {', '.join(map(str, paths))}", case_id, paths[1])
            for name, case_id, paths in entries if len(paths) > 1]


def check_unique_case_ids(tasks: Sequence[CaseTask], source_of: Callable[[CaseTask], str]) -> None:
    seen: dict[str, CaseTask] = {}
    errors = []
    for task in tasks:
        if task.case_id in seen:
            errors.append(ConversionError(f"duplicate case id: found in {source_of(seen[task.case_id])} "
                                          f"and in {source_of(task)}", task.case_id, source_of(task)))
        else:
            seen[task.case_id] = task
    if errors:
        raise ConversionFailed(errors, "duplicate case ids in the source")


def run_conversion(converter: str, tasks: Sequence[CaseTask], worker: Callable, options: ConversionOptions,
                   make_dataset_json: Callable[[list[CaseResult]], dict],
                   discovery_skips: Sequence[CaseResult] = (), print_table: bool = True) -> Path:
    """Convert `tasks` with `worker(task, out_dir, options) -> CaseResult` into the atomic
    dataset folder, then write dataset.json (from `make_dataset_json(results)`) and the report.

    Raises ConversionFailed (listing every failing case) without leaving a dataset folder.
    """
    dataset = AtomicDataset(options, source_fingerprint(tasks, options, converter))
    dataset.open()
    started = time.time()
    results: list[CaseResult] = []
    errors: list[ConversionError] = []
    todo = []
    for task in tasks:
        if task.case_id in dataset.resumed_cases:
            results.append(dataset.resumed_cases[task.case_id])
        else:
            todo.append(task)
    try:
        jobs = [(worker, task, str(dataset.tmp), options) for task in todo]
        for outcome in _imap(_run_one, jobs, options.num_workers, options.progress, f"convert {converter}"):
            if isinstance(outcome, ConversionError):
                if outcome.skippable and options.skip_incomplete:
                    results.append(CaseResult(outcome.case_id, _split_of(todo, outcome.case_id), "skipped",
                                              reason=str(outcome), source=outcome.path or ""))
                else:
                    errors.append(outcome)
            else:
                results.append(outcome)
                dataset.mark_done(outcome)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished cases are kept in {dataset.tmp}. Re-run the same command to resume.",
              file=sys.stderr)
        raise
    except WorkerDied as died:
        # Not bad input: the cases converted so far are sound, so the partial folder stays for a resume, as after
        # an interruption.
        lost_ids = [job[1].case_id for job in died.jobs]

        def culprits(case_id: str) -> str:
            others = [i for i in lost_ids if i != case_id]
            return "this case" + (f" or {others[0]}" if len(others) == 1 else
                                  f" or one of {', '.join(others)}" if others else "") \
                + (" (in flight at the same time)" if others else "")
        lost = [ConversionError(f"not converted: the worker process converting {culprits(job[1].case_id)} died "
                                f"without an error (killed by the system, as the out-of-memory killer does on a large "
                                f"volume, or crashed)", job[1].case_id, _first_source(job[1]))
                for job in died.jobs]
        raise ConversionFailed(
            sorted(errors, key=lambda e: str(e.case_id)) + lost,
            f"a worker process died; the cases finished so far are kept in {dataset.tmp}: re-run the same "
            f"command to resume (with fewer workers, e.g. -np 1, if memory ran out)") from None
    except BaseException:
        dataset.discard()
        raise
    results += list(discovery_skips)
    if errors:
        dataset.discard()
        raise ConversionFailed(sorted(errors, key=lambda e: str(e.case_id)))
    converted_train = [r for r in results if r.status == "converted" and r.split == "train"]
    if not converted_train:
        dataset.discard()
        raise ConversionFailed([ConversionError("no training case was converted", None, None)],
                               "nothing to write")
    results.sort(key=lambda r: (r.split != "train", r.case_id))
    try:
        dataset_json = make_dataset_json(results)
        report = build_report(converter, options, results, time.time() - started)
        final = dataset.commit(dataset_json, report)
    except BaseException:
        dataset.discard()
        raise
    if print_table:
        print(format_report_table(report))
        print(f"wrote {final}")
    return final


def _split_of(tasks: Sequence[CaseTask], case_id: str) -> str:
    return next((t.split for t in tasks if t.case_id == case_id), "train")


class WorkerDied(Exception):
    """A worker process ended without returning (killed by the out-of-memory killer, a crash in a library).
    ``jobs`` are the jobs it may have been converting: every job in flight when the pool broke."""

    def __init__(self, jobs: list):
        self.jobs = jobs
        super().__init__(f"a worker process died while {len(jobs)} job(s) were in flight")


def _imap(fn, jobs: list, num_workers: int, progress: bool, desc: str):
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress, file=sys.stderr)
    try:
        if num_workers == 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
        else:
            for outcome in _pooled(fn, jobs, min(num_workers, len(jobs))):
                yield outcome
                bar.update()
    finally:
        bar.close()


def _pooled(fn, jobs: list, num_workers: int):
    """Outcomes of ``fn(job)`` in worker processes, in completion order; WorkerDied when a worker dies.

    concurrent.futures, not multiprocessing.Pool: a Pool replaces a killed worker and waits forever for the task it
    held, while ProcessPoolExecutor fails every pending future with BrokenProcessPool. At most one job per worker is
    submitted, so the jobs pending at that moment are the cases that were being converted."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn like nnU-Net: forking a process that holds SimpleITK/ITK thread pools is unsafe
    executor = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    waiting = list(reversed(jobs))
    pending: dict = {}
    finished = False
    try:
        while waiting or pending:
            while waiting and len(pending) < num_workers:
                job = waiting.pop()
                pending[executor.submit(fn, job)] = job
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                # the executor fails every pending future at once; cases that finished before still count
                wait(pending)
                lost = []
                for future, job in pending.items():
                    if future.exception() is None:
                        yield future.result()
                    elif isinstance(future.exception(), BrokenProcessPool):
                        lost.append(job)
                    else:
                        raise future.exception()
                raise WorkerDied(lost)
            for future in done:
                del pending[future]
                yield future.result()
        finished = True
    finally:
        # After a failure, do not wait for the cases still running: the pool's processes are stopped like
        # Pool.terminate() did (the executor offers no public way to stop a running job, and shutdown() drops its
        # list of processes, so that list is taken first).
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=finished, cancel_futures=True)
        if not finished:
            for process in processes:
                if process.is_alive():
                    process.terminate()


def build_report(converter: str, options: ConversionOptions, results: Sequence[CaseResult], seconds: float) -> dict:
    converted = [r for r in results if r.status == "converted"]
    skipped = [r for r in results if r.status == "skipped"]
    return {
        "converter": converter,
        "dataset": f"Dataset{options.dataset_id:03d}_{options.name}",
        "options": json.loads(json.dumps(asdict(options), default=str)),
        "num_converted": {"train": sum(r.split == "train" for r in converted),
                          "test": sum(r.split == "test" for r in converted)},
        "num_skipped": len(skipped),
        "seconds": round(seconds, 2),
        "cases": [asdict(r) for r in results],
    }


def format_report_table(report: dict) -> str:
    """Plain-text table: one row per case with status, phases, worst registration residual
    (where measured) and the reason for skips / first warning."""
    rows = [("case", "split", "status", "phases", "registration", "note")]
    for case in report["cases"]:
        reg = case.get("registration") or {}
        reg_text = ""
        if reg:
            per_phase = {p: v for p, v in reg.items() if isinstance(v, dict) and "metric_after" in v}
            reg_text = " ".join(
                f"{p[:3]} MI {v['metric_before']:.2f}->{v['metric_after']:.2f}"
                + (f" res {v['residual_vs_truth_vox']['max_vox']:.2f}vx" if "residual_vs_truth_vox" in v else "")
                for p, v in per_phase.items())
        note = case.get("reason") or (case.get("warnings") or [""])[0]
        rows.append((case["case_id"], case["split"], case["status"], ",".join(case.get("phases") or []),
                     reg_text, note[:90]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n = report["num_converted"]
    lines.append(f"{report['dataset']}: converted {n['train']} training and {n['test']} test case(s), "
                 f"skipped {report['num_skipped']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# per-case writing shared by the converters
# --------------------------------------------------------------------------------------
def output_paths(out_dir: str, case_id: str, split: str, num_channels: int) -> tuple[list[str], str | None]:
    images_folder = "imagesTr" if split == "train" else "imagesTs"
    images = [os.path.join(out_dir, images_folder, f"{case_id}_{k:04d}.nii.gz") for k in range(num_channels)]
    label = os.path.join(out_dir, "labelsTr", f"{case_id}.nii.gz") if split == "train" else None
    return images, label


def write_case(out_dir: str, case_id: str, split: str, channels: Sequence[sitk.Image],
               label: sitk.Image | None, orient: str) -> list[str]:
    """Write the channels (all on one grid) and the label; reorients first unless `orient`
    is "keep". Returns the written paths relative to the dataset folder."""
    if orient != "keep":
        channels = [reorient(c, orient) for c in channels]
        label = None if label is None else reorient(label, orient)
    image_paths, label_path = output_paths(out_dir, case_id, split, len(channels))
    for channel, path in zip(channels, image_paths):
        write_image(channel, path)
    written = image_paths
    if split == "train":
        if label is None:
            raise ConversionError("training case has no label", case_id, None)
        write_image(label, label_path)
        written = written + [label_path]
    return [os.path.relpath(p, out_dir) for p in written]


def convert_single_image_case(task: CaseTask, out_dir: str, options: ConversionOptions) -> CaseResult:
    """Worker for single-phase sources (LiTS, MSD, ATLAS): `task.images` holds one phase,
    `task.extra["labels"]` optionally the allowed label values (default 0/1/2)."""
    (phase, image_path), = task.images.items()
    image = read_image(image_path, task.case_id)
    notes = []
    label = None
    if task.split == "train":
        if task.label is None:
            raise IncompleteCaseError("training image without a segmentation", task.case_id, image_path)
        label = read_image(task.label, task.case_id)
        label = check_label_values(label, task.case_id, task.label,
                                   task.extra.get("labels", tuple(LABELS.values())))
        label, notes = match_label_to_image(label, image, task.case_id, task.label, options.geometry_tolerance_vox)
    outputs = write_case(out_dir, task.case_id, task.split, [image], label, options.orient)
    return CaseResult(task.case_id, task.split, "converted", source=str(image_path), phases=[phase],
                      warnings=notes, case_class=task.case_class, curve=task.curve, outputs=outputs)


def single_phase_dataset_json(name: str, channel_name: str, phase: str, options: ConversionOptions,
                              description: str, labels: dict | None = None, extra: dict | None = None):
    """dataset.json factory for single-phase sources (used as `make_dataset_json`)."""
    def make(results: list[CaseResult]) -> dict:
        n_train = sum(r.status == "converted" and r.split == "train" for r in results)
        characterization, enhancement = case_targets(results)
        return build_dataset_json(name, [channel_name], n_train,
                                  phases=[phase] if options.phases_mode == "sequence" else None,
                                  labels=labels, characterization=characterization, enhancement=enhancement,
                                  description=description, extra=extra)
    return make
