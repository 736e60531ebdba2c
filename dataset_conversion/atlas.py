"""ATLAS (contrast-enhanced liver MRI with liver and tumor labels) -> nnU-Net raw dataset.

Source layout: `train/imagesTr/im{N}.nii[.gz]` with `train/labelsTr/lb{N}.nii[.gz]`
(0 background, 1 liver, 2 tumor); `src` may also be the `train` folder itself. Unlabeled
images under `test/imagesTs/im{N}.nii[.gz]`, where present, go to imagesTs. Case ids:
`atlas_{N:03d}`. The channel is named "T1" (contrast-enhanced T1-weighted), so nnU-Net
normalises it with a per-case z-score, not CT windowing.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_liver_ext.dataset_conversion.common import (
    REFERENCE_PHASE, CaseTask, ConversionError, ConversionFailed, ConversionOptions,
    check_unique_case_ids, convert_single_image_case, duplicate_file_errors, is_junk_file,
    run_conversion, select_phases, single_phase_dataset_json, strip_nifti_suffix)

MRI_CHANNEL_NAME = "T1"


def _numbered(folder: Path, prefix: str) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        stem = strip_nifti_suffix(path.name)
        if stem is None or is_junk_file(path.name) or not path.is_file():
            continue
        match = re.fullmatch(rf"{prefix}(\d+)", stem)
        if match:
            found.setdefault(int(match.group(1)), []).append(path)
    return found


def discover(src: str | Path) -> list[CaseTask]:
    src = Path(src)
    train = src / "train" if (src / "train").is_dir() else src
    images_dir, labels_dir = train / "imagesTr", train / "labelsTr"
    if not images_dir.is_dir():
        raise ConversionFailed([ConversionError("ATLAS layout needs train/imagesTr (and train/labelsTr)",
                                                None, images_dir)])
    images, labels = _numbered(images_dir, "im"), _numbered(labels_dir, "lb")
    test_images = _numbered(src / "test" / "imagesTs", "im")
    errors = duplicate_file_errors((f"{kind}{number}", f"atlas_{number:03d}", paths)
                                   for kind, table in (("im", images), ("lb", labels), ("im (test)", test_images))
                                   for number, paths in table.items())
    for number, paths in labels.items():
        if number not in images:
            errors.append(ConversionError("label without a matching image im{N}", f"atlas_{number:03d}", paths[0]))
    if errors:
        raise ConversionFailed(errors, "bad ATLAS source layout")
    tasks = [CaseTask(f"atlas_{n:03d}", "train", {REFERENCE_PHASE: str(images[n][0])},
                      label=str(labels[n][0]) if n in labels else None) for n in sorted(images)]
    tasks += [CaseTask(f"atlas_test_{n:03d}", "test", {REFERENCE_PHASE: str(p[0])})
              for n, p in sorted(test_images.items())]
    if not tasks:
        raise ConversionFailed([ConversionError("no im{N}.nii[.gz] files found", None, images_dir)],
                               "nothing to convert")
    check_unique_case_ids(tasks, lambda t: next(iter(t.images.values())))
    return tasks


def convert(src: str | Path, options: ConversionOptions) -> Path:
    select_phases([REFERENCE_PHASE], options.phase_subset, "ATLAS")
    tasks = discover(src)
    make_json = single_phase_dataset_json(
        options.name, MRI_CHANNEL_NAME, REFERENCE_PHASE, options,
        description="ATLAS contrast-enhanced liver MRI, converted by nnunet-liver convert atlas")
    return run_conversion("atlas", tasks, convert_single_image_case, options, make_json)
