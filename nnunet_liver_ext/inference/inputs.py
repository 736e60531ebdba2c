"""The input check of ``nnunet-liver predict``: every case of a folder, before nnU-Net sees it.

nnU-Net groups a folder's files into cases by name alone (``CASE_XXXX`` + file ending) and hands
each case's list to its reader. What it does with a bad case (checked with nnunetv2 2.8.1):

* a missing or extra channel file: the case gets the wrong number of channels and the run fails
  on it, in the middle;
* an unreadable file: the preprocessing worker raises and the whole run stops ("Background
  workers died"), taking the remaining cases with it;
* channels of different size or spacing: ``SimpleITKIO`` raises (whole run stops); a different
  origin or direction is only a printed WARNING and the phases are stacked as if aligned;
* NaN or infinite voxels: predicted without a word. SimpleITK 2.5 reads them in a NIfTI file
  as 0 (and a truncated ``.nii.gz`` as zeros from the cut on), so nnU-Net predicts from an image
  that is not the file's.

This module finds all of these first. A case with a defect is reported by name with the file at
fault and left out; the others are predicted. Headers and geometry are read with SimpleITK (what
nnU-Net's default ``SimpleITKIO`` uses); the voxels of NIfTI files with nibabel (see ``nnunet_liver_ext.voxels``:
SimpleITK hides NaN and truncation there), of other formats with SimpleITK. Spacing is compared
with nnU-Net's own tolerance (``np.allclose`` defaults, as in its reader); origin and direction
too, with an absolute floor of 1e-4. Voxels are checked after the cast to float32 that nnU-Net's
reader applies, so a float64 value that overflows float32 counts as infinite.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_liver_ext.dataset_json import channels_per_phase
from nnunet_liver_ext.voxels import non_finite_description, short_error, stored_voxels

CHANNEL_DIGITS = 4  # nnU-Net's channel suffix: CASE_0000, CASE_0001, ...
REGISTRATION_FIX = ("resample every phase onto the reference phase's grid (rigid registration, as the training "
                    "data were; `nnunet-liver convert` does it for the public datasets)")


@dataclass(frozen=True)
class InputProblem:
    """One defect of one case. ``path`` is the file at fault (or, for a missing file, the path it
    should have)."""
    case: str
    path: str
    message: str
    fix: Optional[str] = None

    def __str__(self) -> str:
        text = f"case {self.case}: {self.path}: {self.message}"
        return text if not self.fix else f"{text}\n    fix: {self.fix}"


@dataclass
class CaseInput:
    """A case's channel files in channel order (``files[k]`` is ``CASE_000k``) and its defects."""
    case: str
    files: List[str]
    problems: List[InputProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class InputCheck:
    """Every case found in an input folder, in name order, and the files nnU-Net's naming does not
    account for (they are not read)."""
    folder: str
    cases: List[CaseInput]
    stray_files: List[str]

    @property
    def good(self) -> List[CaseInput]:
        return [c for c in self.cases if c.ok]

    @property
    def bad(self) -> List[CaseInput]:
        return [c for c in self.cases if not c.ok]


def channel_count(dataset_json: dict) -> int:
    """Number of input channels of a model: ``channel_names`` (nnU-Net v2) or ``modality`` (v1 style)."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not names:
        raise ValueError("dataset.json has no 'channel_names': cannot tell how many channels a case has")
    return len(names)


def channel_label(dataset_json: dict, k: int) -> str:
    """How the model calls channel k: the phase name when dataset.json has ``phases``, else the channel name."""
    phases = dataset_json.get("phases")
    if phases:
        try:
            per_phase = channels_per_phase(phases, channel_count(dataset_json))
        except ValueError:
            per_phase = None  # the model's own check reports this
        if per_phase is not None and k < len(phases) * per_phase:
            return f"channel {k}, phase '{phases[k // per_phase]}'"
    names = dataset_json.get("channel_names", dataset_json.get("modality")) or {}
    name = names.get(str(k)) if isinstance(names, dict) else None
    return f"channel {k}, '{name}'" if name else f"channel {k}"


def group_channel_files(folder: str, file_ending: str) -> tuple[Dict[str, Dict[int, str]], List[str]]:
    """``({case: {channel: path}}, stray)`` for the files of ``folder`` ending in ``file_ending``,
    grouped as nnU-Net groups them (the name minus ``_XXXX`` + ending is the case). ``stray``: files
    with the ending whose name has no ``_XXXX`` channel suffix."""
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{{CHANNEL_DIGITS}}}){re.escape(file_ending)}$")
    cases: Dict[str, Dict[int, str]] = {}
    stray = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(file_ending) or not os.path.isfile(path):
            continue
        match = pattern.match(name)
        if match is None:
            stray.append(path)
            continue
        cases.setdefault(match["case"], {})[int(match["channel"])] = path
    return cases, stray


@dataclass
class _Image:
    """What the check needs of one file (SimpleITK order: x, y, z)."""
    dimension: int
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple


def _read_checked(case: str, path: str, label: str, problems: List[InputProblem]) -> Optional[_Image]:
    """Reads one channel file; appends what is wrong with it to ``problems`` and returns its
    geometry (as SimpleITK, hence nnU-Net's SimpleITKIO, sees it), or None when it cannot be used."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    unreadable = "re-export or re-convert this file; it is truncated or not an image"
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        problems.append(InputProblem(case, path, f"cannot be read ({label}): {short_error(e)}", unreadable))
        return None
    info = _Image(reader.GetDimension(), reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(),
                  reader.GetDirection())
    if reader.GetNumberOfComponents() != 1:
        problems.append(InputProblem(case, path, f"has {reader.GetNumberOfComponents()} components per voxel "
                                                 f"({label}); nnU-Net wants one scalar image per channel"))
        return None
    if info.dimension not in (2, 3):
        problems.append(InputProblem(case, path, f"is a {info.dimension}-D image ({label}); nnU-Net wants one 3-D "
                                                 f"(or 2-D) image per channel file",
                                     "split it into one file per phase: CASE_0000, CASE_0001, ..."))
        return None
    try:
        array = stored_voxels(path, reader.Execute)
    except Exception as e:  # noqa: BLE001 - zlib, nibabel and ITK each raise their own kind
        problems.append(InputProblem(case, path, f"cannot be read ({label}): the voxel data are damaged "
                                                 f"({type(e).__name__}: {short_error(e)})", unreadable))
        return None
    non_finite = non_finite_description(array)
    if non_finite:
        problems.append(InputProblem(case, path, f"has {non_finite} ({label}); the network would predict garbage "
                                                 f"from them",
                                     "fix the image (e.g. replace NaN by the air value) and predict again"))
    return info


def _geometry_difference(a: _Image, b: _Image) -> Optional[str]:
    """How image b's grid differs from image a's (sizes, spacings, origins in x, y, z), or None."""
    if a.dimension != b.dimension:
        return f"{b.dimension}-D instead of {a.dimension}-D"
    if tuple(a.size) != tuple(b.size):
        return f"size {tuple(b.size)} instead of {tuple(a.size)} (x, y, z)"
    # spacing: nnU-Net's own test (its reader raises beyond it); origin and direction, where nnU-Net
    # only warns: the same relative tolerance with a 1e-4 floor (mm; cosines), so that float32
    # rounding of a coordinate near zero is not taken for a different grid
    for name, va, vb, atol in (("spacing", a.spacing, b.spacing, 1e-8), ("origin", a.origin, b.origin, 1e-4),
                               ("direction", a.direction, b.direction, 1e-4)):
        if not np.allclose(va, vb, rtol=1e-5, atol=atol):
            fmt = lambda v: "(" + ", ".join(f"{x:.6g}" for x in v) + ")"  # noqa: E731
            return f"{name} {fmt(vb)} instead of {fmt(va)}"
    return None


def check_case(case: str, channel_files: Dict[int, str], dataset_json: dict, folder: str,
               prev_stage_folder: Optional[str] = None) -> CaseInput:
    """All defects of one case. ``channel_files``: ``{channel index: path}`` as found in the folder."""
    ending = dataset_json["file_ending"]
    n = channel_count(dataset_json)
    problems: List[InputProblem] = []
    expected = [os.path.join(folder, f"{case}_{k:0{CHANNEL_DIGITS}d}{ending}") for k in range(n)]
    for k in range(n):
        if k not in channel_files:
            present = ", ".join(os.path.basename(p) for _, p in sorted(channel_files.items()))
            problems.append(InputProblem(case, expected[k], f"is missing ({channel_label(dataset_json, k)}); the model "
                                                            f"takes {n} channels, this case has {present}",
                                         f"add {os.path.basename(expected[k])} (every case needs _0000 to "
                                         f"_{n - 1:0{CHANNEL_DIGITS}d})"))
    for k, path in sorted(channel_files.items()):
        if k >= n:
            problems.append(InputProblem(case, path, f"is channel {k}, but the model takes {n} channel(s) "
                                                     f"(_0000 to _{n - 1:0{CHANNEL_DIGITS}d}): a case with "
                                                     f"{len(channel_files)} phases does not fit this model",
                                         "give each case exactly the phases the model was trained on, in its "
                                         "channel order (dataset.json 'channel_names'/'phases')"))
    images: Dict[int, _Image] = {}
    for k in range(n):
        if k in channel_files:
            info = _read_checked(case, channel_files[k], channel_label(dataset_json, k), problems)
            if info is not None:
                images[k] = info
    if images:
        first = min(images)
        for k in sorted(images):
            difference = _geometry_difference(images[first], images[k])
            if k != first and difference:
                problems.append(InputProblem(
                    case, channel_files[k], f"is not on the grid of {os.path.basename(channel_files[first])} "
                                            f"({channel_label(dataset_json, k)}: {difference}); nnU-Net would stack "
                                            f"the phases as if they were aligned", REGISTRATION_FIX))
    if prev_stage_folder is not None:
        seg = os.path.join(prev_stage_folder, case + ending)
        if not os.path.isfile(seg):
            problems.append(InputProblem(case, seg, "is missing: this cascade stage needs the previous stage's "
                                                    "segmentation of every case", "predict the previous stage first"))
    files = [channel_files.get(k, expected[k]) for k in range(n)]
    return CaseInput(case, files, problems)


def check_input_folder(folder: str, dataset_json: dict, cases: Optional[Sequence[str]] = None,
                       prev_stage_folder: Optional[str] = None) -> InputCheck:
    """Checks every case of ``folder`` (or only ``cases``) for the model described by ``dataset_json``
    (its ``file_ending`` and ``channel_names``)."""
    grouped, stray = group_channel_files(folder, dataset_json["file_ending"])
    names = sorted(grouped) if cases is None else list(cases)
    return InputCheck(folder, [check_case(c, grouped.get(c, {}), dataset_json, folder, prev_stage_folder)
                               for c in names], stray)
