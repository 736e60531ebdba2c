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
# keys that build_dataset_json writes itself (a v2-style file's channel_names/file_ending must not override ours)
_DROPPED_KEYS = ("modality", "channel_names", "training", "test", "labels", "numTraining", "name", "description",
                 "file_ending", "phases", "characterization", "enhancement")


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
    """The task's dataset.json, checked: a JSON object whose 'labels' are MSD's {"0": "background", ...} or nnU-Net
    v2's {"background": 0, ...}, one 'modality' (or v2 'channel_names') entry "0", and a 'training' list of
    {"image": ..., "label": ...}. Anything else is a ConversionFailed naming the file and the entry."""
    path = task / "dataset.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionFailed([ConversionError(f"unreadable MSD dataset.json ({e})", None, path)]) from None

    def bad(message: str):
        return ConversionFailed([ConversionError(message, None, path)], "bad MSD dataset.json")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object with 'labels', 'modality' and 'training', got a {type(data).__name__}")
    data = dict(data)
    data["labels"] = _label_values(data.get("labels"), bad)
    channels = data.get("modality", data.get("channel_names", {"0": "CT"}))
    if not isinstance(channels, dict) or list(channels) != ["0"] or not isinstance(channels["0"], str):
        raise bad(f"needs exactly one 'modality' entry \"0\" naming the channel (Task03_Liver is single-channel "
                  f"CT), found {channels!r}")
    data["modality"] = channels
    training = data.get("training", [])
    if not isinstance(training, list):
        raise bad(f"'training' must be a list of {{\"image\": ..., \"label\": ...}} entries, got a "
                  f"{type(training).__name__}")
    for number, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise bad(f"'training' entry {number} has no \"image\" path: {json.dumps(entry)[:120]}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise bad(f"{key!r} must be a string, got {data[key]!r}")
    return data


def _label_values(labels, bad) -> dict[int, str]:
    """{value: name} from MSD's {"0": "background"} or nnU-Net v2's {"background": 0} form."""
    if not isinstance(labels, dict) or not labels:
        raise bad(f"needs 'labels', e.g. {{\"0\": \"background\", \"1\": \"liver\", \"2\": \"cancer\"}}, "
                  f"found {labels!r}")
    if all(isinstance(k, str) and k.strip().isdigit() and isinstance(v, str) for k, v in labels.items()):
        values = {int(k): v for k, v in labels.items()}
        if len(set(values.values())) != len(values):
            raise bad(f"'labels' gives one name to several values: {labels}")
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        values = {v: k for k, v in labels.items()}
        if len(values) != len(labels):
            raise bad(f"'labels' gives one value to several names: {labels}")
    else:
        # nnU-Net v2 regions (lists of values) have no single value per voxel to check label files against
        raise bad(f"'labels' must map values to names ({{\"0\": \"background\", ...}}) or names to integer "
                  f"values ({{\"background\": 0, ...}}); found {labels}")
    if values.get(0) is None:
        raise bad(f"'labels' has no value 0 (background): {labels}")
    return dict(sorted(values.items()))


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
    listed = [Path(entry["image"]).name for entry in msd_json.get("training", [])]
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
    modality = msd_json["modality"]
    labels = {MSD_LABEL_NAMES.get(name, name): value for value, name in msd_json["labels"].items()}
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
