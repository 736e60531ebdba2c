"""Dynamic contrast-enhanced liver MRI (MTI-Net style) -> nnU-Net raw dataset.

Source layout: `images/{case}/{phase}.nii[.gz]` for the four phases pre, arterial,
portal_venous, delay (as acquired: phases may have moved); `masks/{case}.nii[.gz]`
(0/1/2 in the portal-venous frame; cases without a mask go to imagesTs);
`labels.csv` with `case_id,class` and optionally one column per phase holding the tumor
enhancement curve. Cases without a curve in the CSV get it computed as the mean of each
registered phase over the tumor voxels. Ids match the case folders exactly (letter case included); a row
that names no case folder is an error when some case has no row (`common.check_case_table_matches`).
Channels are named "T1" (z-score normalisation).
"""
from __future__ import annotations

from pathlib import Path

from nnunet_liver_ext.dataset_conversion.common import (
    MRI_PHASES, REFERENCE_PHASE, CaseTask, ConversionError, ConversionFailed, ConversionOptions,
    IncompleteCaseError, check_case_table_matches, duplicate_file_errors, is_junk_file, read_case_table, read_image,
    run_conversion, select_phases, strip_nifti_suffix)
from nnunet_liver_ext.dataset_conversion.multiphase import multiphase_dataset_json, register_and_write

MRI_CHANNEL_NAME = "T1"


def _nifti_files(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            stem = strip_nifti_suffix(path.name)
            if stem is not None and path.is_file() and not is_junk_file(path.name):
                found.setdefault(stem, []).append(path)
    return found


def discover(src: str | Path, options: ConversionOptions) -> list[CaseTask]:
    src = Path(src)
    images_root = src / "images"
    if not images_root.is_dir():
        raise ConversionFailed([ConversionError("dynamic MRI layout needs images/{case}/{phase}.nii.gz",
                                                None, images_root)])
    selected = select_phases(MRI_PHASES, options.phase_subset, "dynamic MRI")
    csv_path = Path(options.classes_csv) if options.classes_csv else src / "labels.csv"
    table = read_case_table(csv_path, ("case_id", "case", "id"), MRI_PHASES) if (
        options.classes_csv or csv_path.is_file()) else {}
    masks = _nifti_files(src / "masks")
    errors = duplicate_file_errors(("mask", case_id, paths) for case_id, paths in masks.items())
    tasks = []
    case_dirs = sorted(p for p in images_root.iterdir() if p.is_dir() and not is_junk_file(p.name))
    for case_dir in case_dirs:
        case_id = case_dir.name
        phase_files = {}
        for stem, paths in _nifti_files(case_dir).items():
            if len(paths) > 1:
                errors.append(ConversionError(f"duplicate phase {stem!r}: {', '.join(map(str, paths))}",
                                              case_id, paths[1]))
            phase_files[stem] = str(paths[0])
        mask = masks.get(case_id, [None])[0]
        row = table.get(case_id, {})
        tasks.append(CaseTask(case_id, "train" if mask is not None else "test", phase_files,
                              label=None if mask is None else str(mask), case_class=row.get("class"),
                              curve=row.get("curve"), extra={"phases": selected, "folder": str(case_dir)}))
    known = {t.case_id for t in tasks}
    for case_id, paths in masks.items():
        if case_id not in known:
            errors.append(ConversionError("mask without an images/{case}/ folder", case_id, paths[0]))
    if errors:
        raise ConversionFailed(errors, "bad dynamic MRI source layout")
    if not tasks:
        raise ConversionFailed([ConversionError("no case folders found", None, images_root)], "nothing to convert")
    check_case_table_matches(table, known, csv_path, str(images_root), "case folder")
    return tasks


def convert_case(task: CaseTask, out_dir: str, options: ConversionOptions):
    selected = task.extra["phases"]
    needed = list(dict.fromkeys(list(selected) + [REFERENCE_PHASE]))
    missing = [p for p in needed if p not in task.images]
    if missing:
        raise IncompleteCaseError(f"missing phase(s) {missing}; found {sorted(task.images)}", task.case_id,
                                  Path(task.extra["folder"]) / f"{missing[0]}.nii.gz")
    phase_images = {p: (read_image(task.images[p], task.case_id), task.images[p]) for p in needed}
    label = None if task.label is None else (read_image(task.label, task.case_id), task.label)
    ignored = sorted(set(task.images) - set(MRI_PHASES))
    notes = [f"ignored files that name no phase: {ignored}"] if ignored else []
    return register_and_write(task.case_id, task.split, out_dir, options, phase_images, selected, label,
                              MRI_PHASES, task.curve, compute_curve=True, case_class=task.case_class,
                              notes=notes, source=task.extra["folder"])


def convert(src: str | Path, options: ConversionOptions) -> Path:
    tasks = discover(src, options)
    selected = tasks[0].extra["phases"]
    make_json = multiphase_dataset_json(options.name, MRI_CHANNEL_NAME, selected, options,
                                        "dynamic contrast-enhanced liver MRI, converted by nnunet-liver convert "
                                        "dynamic-mri")
    return run_conversion("dynamic-mri", tasks, convert_case, options, make_json)
