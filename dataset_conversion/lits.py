"""LiTS (Liver Tumor Segmentation Challenge) -> nnU-Net raw dataset.

Source layout (the download, batches may sit in sub-folders such as "Training Batch 1", symlinked
folders included):
`volume-N.nii[.gz]` + `segmentation-N.nii[.gz]` (0 background, 1 liver, 2 tumor) and
unlabeled `test-volume-N.nii[.gz]`. Output case ids: `lits_N` (training, imagesTr/labelsTr)
and `lits_test_N` (imagesTs). LiTS is portal-venous CT: one channel "CT".
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_liver_ext.dataset_conversion.common import (
    REFERENCE_PHASE, CaseTask, ConversionError, ConversionFailed, ConversionOptions,
    check_unique_case_ids, convert_single_image_case, duplicate_file_errors, is_junk_file,
    run_conversion, select_phases, single_phase_dataset_json, source_files, strip_nifti_suffix)

_PATTERN = re.compile(r"^(volume|segmentation|test-volume)-(\d+)$")


def discover(src: str | Path) -> list[CaseTask]:
    """Find LiTS cases under `src` (recursively). Raises ConversionFailed on duplicate ids
    and on segmentations without a volume."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionFailed([ConversionError("LiTS source folder does not exist", None, src)])
    found: dict[tuple[str, int], list[Path]] = {}
    try:
        files = source_files(src)
    except ConversionError as e:
        raise ConversionFailed([e], "bad LiTS source layout") from None
    for path in files:
        stem = strip_nifti_suffix(path.name)
        if stem is None or is_junk_file(path.name):
            continue
        match = _PATTERN.match(stem)
        if match:
            found.setdefault((match.group(1), int(match.group(2))), []).append(path)
    errors = duplicate_file_errors(
        (f"{kind}-{number}", f"lits_test_{number}" if kind == "test-volume" else f"lits_{number}", paths)
        for (kind, number), paths in found.items())
    for (kind, number), paths in found.items():
        if kind == "segmentation" and ("volume", number) not in found:
            errors.append(ConversionError("segmentation without a matching volume-N file", f"lits_{number}",
                                          paths[0]))
    if errors:
        raise ConversionFailed(errors, "bad LiTS source layout")
    tasks = []
    for (kind, number), (path,) in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if kind == "volume":
            segmentation = found.get(("segmentation", number), [None])[0]
            tasks.append(CaseTask(f"lits_{number}", "train", {REFERENCE_PHASE: str(path)},
                                  label=None if segmentation is None else str(segmentation)))
        elif kind == "test-volume":
            tasks.append(CaseTask(f"lits_test_{number}", "test", {REFERENCE_PHASE: str(path)}))
    if not tasks:
        raise ConversionFailed([ConversionError("no volume-N.nii[.gz] files found", None, src)],
                               "nothing to convert")
    check_unique_case_ids(tasks, lambda t: next(iter(t.images.values())))
    return tasks


def convert(src: str | Path, options: ConversionOptions) -> Path:
    """Convert a LiTS download into `options.raw_root/Dataset{ID}_{NAME}`; returns its path."""
    select_phases([REFERENCE_PHASE], options.phase_subset, "LiTS")
    tasks = discover(src)
    make_json = single_phase_dataset_json(
        options.name, "CT", REFERENCE_PHASE, options,
        description="LiTS (Bilic et al. 2023), converted by nnunet-liver convert lits")
    return run_conversion("lits", tasks, convert_single_image_case, options, make_json)
