"""Where nnU-Net must look for this package's trainers, and whether the shell says so."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

TRAINERS_DIR = Path(__file__).resolve().parent / "trainers"
NNUNET_FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def ext_trainer_export_line(environ=None) -> str:
    """The shell line that makes stock `nnUNetv2_train -tr` find our trainers, for ``eval``: quoted (a path
    with a space or a ``$``), and keeping the folders the variable already lists (other trainers)."""
    env = os.environ if environ is None else environ
    value = (env.get("nnUNet_extTrainer") or "").strip()
    if points_at_our_trainers(env):
        folders = value
    else:
        folders = f"{value}{os.pathsep}{TRAINERS_DIR}" if value else str(TRAINERS_DIR)
    return f"export nnUNet_extTrainer={shlex.quote(folders)}"


@dataclass(frozen=True)
class EnvCheck:
    variable: str
    ok: bool
    state: str  # what was found, in words
    profile_line: str | None  # what to put into the shell profile when not ok


def ext_trainer_paths(environ=None) -> list[Path]:
    value = (os.environ if environ is None else environ).get("nnUNet_extTrainer") or ""
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def points_at_our_trainers(environ=None) -> bool:
    def same(p: Path) -> bool:
        try:
            return p.resolve() == TRAINERS_DIR
        except OSError:
            return False
    return any(same(p) for p in ext_trainer_paths(environ))


def check_environment(environ=None) -> list[EnvCheck]:
    """nnU-Net's three folder variables (set, and an existing folder) and ``nnUNet_extTrainer``
    (includes this package's ``trainers/``). Reads the environment only."""
    env = os.environ if environ is None else environ
    checks = []
    for var in NNUNET_FOLDER_VARS:
        value = env.get(var)
        if not value:
            checks.append(EnvCheck(var, False, "not set",
                                   f'export {var}="$HOME/nnUNet_data/{var}"; mkdir -p "${var}"'))
        elif os.path.exists(value) and not os.path.isdir(value):  # mkdir -p would fail on it
            checks.append(EnvCheck(var, False, f"{value} (a file, not a folder)",
                                   f'export {var}="$HOME/nnUNet_data/{var}"; mkdir -p "${var}"'))
        elif not os.path.isdir(value):
            checks.append(EnvCheck(var, False, f"{value} (no such folder)", f'mkdir -p "{value}"'))
        else:
            checks.append(EnvCheck(var, True, value, None))
    if not TRAINERS_DIR.is_dir():
        checks.append(EnvCheck("nnUNet_extTrainer", False,
                               f"this installation has no trainers folder {TRAINERS_DIR} (reinstall with "
                               f"`pip install -e .` from the clone)", None))
    elif points_at_our_trainers(env):
        checks.append(EnvCheck("nnUNet_extTrainer", True, env.get("nnUNet_extTrainer"), None))
    elif env.get("nnUNet_extTrainer"):
        value = env["nnUNet_extTrainer"]
        checks.append(EnvCheck("nnUNet_extTrainer", False, f"{value} (does not include {TRAINERS_DIR})",
                               f'export nnUNet_extTrainer="{value}{os.pathsep}{TRAINERS_DIR}"'))
    else:
        checks.append(EnvCheck("nnUNet_extTrainer", False, "not set (nnUNetv2_train cannot find our trainers)",
                               ext_trainer_export_line()))
    return checks
