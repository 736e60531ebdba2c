"""Medical Segmentation Decathlon Task03_Liver -> nnU-Net raw dataset.

Output matches what `nnUNetv2_convert_MSD_dataset` writes (case ids `liver_N`, channel
"CT", label values from MSD's dataset.json, the MSD keys name/description/reference/licence/
release/tensorImageSize/numTest kept) with one deliberate difference: label 2 is named "tumor",
not MSD's "cancer", because this package's label schema (../shared/DESIGN.md: 0 background,
1 liver, 2 tumor) is what the trainers and the benchmark's LiTS liver region {1, 2} key on.
It goes through our atomic writer, checks and report. nnU-Net's converter is not reused because it
writes straight into nnUNet_raw and copies labels unchecked.
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunet_liver_ext.dataset_conversion.common import (
    REFERENCE_PHASE, CaseResult, CaseTask, ConversionError, ConversionFailed, ConversionOptions,
    build_dataset_json, case_targets, check_unique_case_ids, convert_single_image_case, is_junk_file,
    run_conversion, select_phases, strip_nifti_suffix)

MSD_LABEL_NAMES = {"cancer": "tumor"}  # MSD's name -> the package's label schema
_DROPPED_KEYS = ("modality", "training", "test", "labels", "numTraining", "name", "description")


def find_task_folder(src: str | Path) -> Path:
    src = Path(src)
    if (src / "dataset.json").is_file() and (src / "imagesTr").is_dir():
        return src
    candidates = sorted(p for p in src.glob("Task03_Liver*") if p.is_dir()) if src.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    raise ConversionFailed([ConversionError("not an MSD task folder (needs dataset.json and imagesTr/, "
                                            "or a Task03_Liver sub-folder)", None, src)])


def _cases(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            stem = strip_nifti_suffix(path.name)
            # the MSD tarball ships AppleDouble `._liver_N.nii.gz` junk: ignored like nnU-Net does
            if stem is not None and not is_junk_file(path.name) and path.is_file():
                found.setdefault(stem, []).append(path)
    return found


def load_msd_json(task: Path) -> dict:
    path = task / "dataset.json"
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionFailed([ConversionError(f"unreadable MSD dataset.json ({e})", None, path)]) from None


def discover(task: Path, msd_json: dict) -> list[CaseTask]:
    images, labels, test_images = _cases(task / "imagesTr"), _cases(task / "labelsTr"), _cases(task / "imagesTs")
    errors = []
    for table in (images, labels, test_images):
        for case_id, paths in table.items():
            if len(paths) > 1:
                errors.append(ConversionError(f"duplicate case id: {', '.join(map(str, paths))}", case_id, paths[1]))
    duplicated_across = set(images) & set(test_images)
    for case_id in sorted(duplicated_across):
        errors.append(ConversionError("duplicate case id: present in imagesTr and imagesTs", case_id,
                                      test_images[case_id][0]))
    listed = [Path(entry["image"]).name for entry in msd_json.get("training", []) if isinstance(entry, dict)]
    for name in listed:
        stem = strip_nifti_suffix(name)
        if stem not in images:
            errors.append(ConversionError("listed in the MSD dataset.json 'training' but missing from imagesTr",
                                          stem, task / "imagesTr" / name))
    for case_id, paths in labels.items():
        if case_id not in images:
            errors.append(ConversionError("label without a matching image in imagesTr", case_id, paths[0]))
    if errors:
        raise ConversionFailed(errors, "bad MSD source layout")
    label_values = tuple(int(v) for v in msd_json["labels"])
    tasks = [CaseTask(c, "train", {REFERENCE_PHASE: str(p[0])}, label=str(labels[c][0]) if c in labels else None,
                      extra={"labels": label_values}) for c, p in sorted(images.items())]
    tasks += [CaseTask(c, "test", {REFERENCE_PHASE: str(p[0])}) for c, p in sorted(test_images.items())]
    if not tasks:
        raise ConversionFailed([ConversionError("no images found", None, task / "imagesTr")], "nothing to convert")
    check_unique_case_ids(tasks, lambda t: next(iter(t.images.values())))
    return tasks


def convert(src: str | Path, options: ConversionOptions) -> Path:
    select_phases([REFERENCE_PHASE], options.phase_subset, "MSD Task03_Liver")
    task = find_task_folder(src)
    msd_json = load_msd_json(task)
    modality = msd_json.get("modality", {"0": "CT"})
    if "labels" not in msd_json or len(modality) != 1:
        raise ConversionFailed([ConversionError("MSD dataset.json needs 'labels' and exactly one 'modality' "
                                                f"(Task03_Liver is single-channel CT); found modality {modality}",
                                                None, task / "dataset.json")])
    labels = {MSD_LABEL_NAMES.get(name, name): int(value) for value, name in msd_json["labels"].items()}
    tasks = discover(task, msd_json)

    def make_json(results: list[CaseResult]) -> dict:
        n_train = sum(r.status == "converted" and r.split == "train" for r in results)
        characterization, enhancement = case_targets(results)
        kept = {k: v for k, v in msd_json.items() if k not in _DROPPED_KEYS}
        return build_dataset_json(
            msd_json.get("name", options.name), [modality["0"]], n_train, labels=labels,
            phases=[REFERENCE_PHASE] if options.phases_mode == "sequence" else None,
            characterization=characterization, enhancement=enhancement,
            description=msd_json.get("description", ""), extra=kept)

    return run_conversion("msd", tasks, convert_single_image_case, options, make_json)
