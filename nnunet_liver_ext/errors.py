"""User errors: what went wrong and the command that fixes it, without a traceback.

A command raises ``UserError`` when the input, not the code, is at fault (a dataset id that does
not exist, a fold that was never trained, a trainer name with a typo); ``nnunet_liver_ext.cli.main``
prints it in one or two lines and exits 1. Anything else still ends in a traceback, so real bugs stay
visible. The checks here only read folders and environment variables: they run before torch is
imported, so a mistake is reported in well under a second.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from nnunet_liver_ext.paths import NNUNET_FOLDER_VARS as NNUNET_FOLDERS

ENV_CHECK = "nnunet-liver env --check"
_DATASET_DIR = re.compile(r"^Dataset(\d{3})_.+")


class UserError(Exception):
    """A mistake in the command line or the environment. ``fix`` is the command (or change) that
    repairs it; the CLI prints it on a second line."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


def env_folder(name: str, purpose: str = "") -> Path:
    """The folder in environment variable ``name``; a UserError naming the variable if it is unset or
    not a folder."""
    value = os.environ.get(name)
    why = f" ({purpose})" if purpose else ""
    if not value:
        raise UserError(f"environment variable {name} is not set{why}",
                        f"export {name}=/path/to/{name}   (`{ENV_CHECK}` checks all of nnU-Net's variables)")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name}={value} is a file, not a folder{why}", f"point {name} at a folder (`{ENV_CHECK}`)")
    if not path.is_dir():
        raise UserError(f"{name}={value} is not a folder{why}", f"mkdir -p {value}, or point {name} at the right "
                                                                f"folder (`{ENV_CHECK}`)")
    return path


def known_datasets() -> dict[str, list[str]]:
    """``{DatasetXXX_Name: [variables whose folder holds it]}`` over nnU-Net's three folders."""
    found: dict[str, list[str]] = {}
    for var in NNUNET_FOLDERS:
        value = os.environ.get(var)
        if not value or not os.path.isdir(value):
            continue
        for entry in sorted(os.listdir(value)):
            if _DATASET_DIR.match(entry) and os.path.isdir(os.path.join(value, entry)):
                found.setdefault(entry, []).append(var)
    return dict(sorted(found.items()))


def _is_nnunet_raw(raw_root: Path) -> bool:
    """Whether ``raw_root`` is the raw folder nnU-Net reads ($nnUNet_raw), or that variable is unset."""
    env_raw = os.environ.get("nnUNet_raw")
    if not env_raw:
        return True
    try:
        return os.path.samefile(env_raw, raw_root)
    except OSError:
        return False


def other_names_of_id(dataset_id: int, name: str, raw_root,
                      include_raw: bool = True) -> dict[str, list[tuple[str | None, Path]]]:
    """``{DatasetXXX_Other: [(variable, folder)]}``: datasets of another name than ``name`` with id ``dataset_id``, and
    the folders holding them (variable None for ``raw_root``). nnU-Net allows one name per id across its three
    folders ("More than one dataset name found for dataset id" otherwise): ``raw_root`` is searched (unless
    ``include_raw`` is False) and, when it is nnU-Net's raw folder ($nnUNet_raw, or that variable is unset),
    nnUNet_preprocessed and nnUNet_results. A raw folder elsewhere goes with other folder settings (tests,
    benchmarks), so the variables set here say nothing about it."""
    raw_root = Path(raw_root)
    prefix, mine = f"Dataset{int(dataset_id):03d}_", f"Dataset{int(dataset_id):03d}_{name}"
    found: dict[str, list[tuple[str | None, Path]]] = {}
    if include_raw and raw_root.is_dir():
        for p in sorted(raw_root.glob(prefix + "*")):
            if p.is_dir() and p.name != mine:
                found.setdefault(p.name, []).append((None, raw_root))
    if _is_nnunet_raw(raw_root):
        for other, variables in known_datasets().items():
            if other.startswith(prefix) and other != mine:
                for var in variables:
                    if var != "nnUNet_raw":  # raw_root, above
                        found.setdefault(other, []).append((var, Path(os.environ[var])))
    return found


def free_dataset_id(dataset_id: int, raw_root) -> int | None:
    """The next id after ``dataset_id`` (wrapping around) that no dataset holds in ``raw_root`` or, as for
    :func:`other_names_of_id`, nnU-Net's other folders: what a "this id is taken" message suggests instead."""
    raw_root = Path(raw_root)
    names = list(known_datasets()) if _is_nnunet_raw(raw_root) else []
    if raw_root.is_dir():
        names += [p.name for p in raw_root.iterdir() if p.is_dir() and _DATASET_DIR.match(p.name)]
    used = {int(n[7:10]) for n in names if _DATASET_DIR.match(n)}
    return next((i for i in [*range(int(dataset_id) + 1, 1000), *range(1, int(dataset_id))] if i not in used), None)


def describe_datasets(datasets: dict[str, list[str]] | None = None) -> str:
    datasets = known_datasets() if datasets is None else datasets
    if not datasets:
        def state(var: str) -> str:
            value = os.environ.get(var)
            return "(unset)" if not value else value if os.path.isdir(value) else f"{value} (no such folder)"
        folders = ", ".join(f"{v}={state(v)}" for v in NNUNET_FOLDERS)
        return f"no DatasetXXX_Name folder in {folders} (`{ENV_CHECK}` checks these variables)"
    return "datasets here: " + ", ".join(f"{name[7:10].lstrip('0') or '0'} ({name})" for name in datasets)


def resolve_dataset(dataset: str | int) -> str:
    """nnU-Net's ``maybe_convert_to_dataset_name``, with its failures turned into UserErrors that list
    the datasets that do exist."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not any(os.environ.get(v) for v in NNUNET_FOLDERS):
        raise UserError("none of nnU-Net's folder variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) "
                        "is set, so no dataset can be found", ENV_CHECK)
    text = str(dataset).strip()
    if text.startswith("Dataset"):
        if not _DATASET_DIR.match(text):
            raise UserError(f"dataset name {text!r} is not of nnU-Net's form DatasetXXX_Name", describe_datasets())
        known = known_datasets()
        if text not in known:
            raise UserError(f"no dataset {text} in nnUNet_raw, nnUNet_preprocessed or nnUNet_results",
                            describe_datasets(known))
        # nnU-Net looks datasets up by id further on, and fails on an id two names share
        same_id = sorted(n for n in known if n[7:10] == text[7:10] and n != text)
        if same_id:
            raise UserError(f"dataset id {int(text[7:10])} of {text} is also {', '.join(same_id)}: nnU-Net finds "
                            f"neither by id", "rename or remove one of them (one name per id)")
        return text
    try:
        number = int(text)
    except ValueError:
        raise UserError(f"dataset {text!r} is neither an id (e.g. 501) nor a name (Dataset501_Name)",
                        describe_datasets()) from None
    if not 0 <= number <= 999:
        raise UserError(f"dataset id {number} is outside nnU-Net's range 0-999", describe_datasets())
    try:
        return maybe_convert_to_dataset_name(number)
    except RuntimeError as e:
        matches = sorted(n for n in known_datasets() if n[7:10] == f"{number:03d}")
        if len(matches) > 1:
            raise UserError(f"dataset id {number} is ambiguous: {', '.join(matches)}",
                            "give the full name with -d, or rename one of them") from None
        raise UserError(f"no dataset with id {number} in nnUNet_raw, nnUNet_preprocessed or nnUNet_results",
                        describe_datasets()) from None


def dataset_id(dataset_name: str) -> int:
    return int(dataset_name[7:10])
