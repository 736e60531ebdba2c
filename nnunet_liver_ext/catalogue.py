"""Every trainer this package provides, read from the trainer classes themselves.

The catalogue imports each module of ``trainers/`` (the folder ``nnUNet_extTrainer`` points at) as
``nnunet_liver_ext.trainers.<module>`` and lists the ``nnUNetTrainer`` subclasses the module defines:
methods, their ablations and variants, and the schedule variants ``register_schedule_variants``
derives (``schedule_name`` / ``schedule_base`` on the class). Each entry carries the first line of the
class docstring and the dataset.json keys the trainer needs (``dataset_keys_required``) and reads when
present (``dataset_keys_used``); stock nnU-Net trainers need none. A module that fails to import is
reported in ``Catalogue.errors``, never hidden and never fatal to the others.

``nnunet-liver trainers`` prints it; ``closest_trainers`` suggests names for a typo.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nnunet_liver_ext.paths import TRAINERS_DIR

TRAINERS_PACKAGE = "nnunet_liver_ext.trainers"
STOCK_BASE = "nnUNetTrainer"


@dataclass(frozen=True)
class TrainerEntry:
    name: str
    module: str  # file stem in trainers/
    summary: str  # first line of the docstring
    kind: str  # "method", "variant" (ablation or other variant of a method) or "schedule"
    parent: str | None  # variant: the trainer it varies; schedule: the trainer it shortens
    schedule: str | None  # schedule name for schedule variants
    keys_required: tuple[str, ...]
    keys_used: tuple[str, ...]
    stock_based: bool  # a schedule variant of one of nnU-Net's own trainers (e.g. nnUNetTrainer_tiny)


@dataclass
class Catalogue:
    entries: dict[str, TrainerEntry] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # module -> one-line import error
    error_details: dict[str, str] = field(default_factory=dict)  # module -> traceback

    def bases(self) -> list[TrainerEntry]:
        return [e for e in self.entries.values() if e.kind != "schedule"]

    def schedules_of(self, base: str) -> list[TrainerEntry]:
        return [e for e in self.entries.values() if e.kind == "schedule" and e.parent == base]

    def schedule_parents(self) -> list[str]:
        """Trainers with schedule variants, in catalogue order (stock nnU-Net's ``nnUNetTrainer`` included)."""
        out: list[str] = []
        for e in self.entries.values():
            if e.kind == "schedule" and e.parent not in out:
                out.append(e.parent)
        return out


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else "(no docstring)"


def _entries_of(module, module_stem: str, package: str) -> list[tuple[type, TrainerEntry]]:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, nnUNetTrainer) and v.__module__ == module.__name__]
    own = set(classes)
    out = []
    for cls in classes:
        schedule = getattr(cls, "schedule_name", None)
        stock = False
        if schedule is not None:
            base = cls.schedule_base
            kind, parent = "schedule", base.__name__
            stock = base.__module__.startswith("nnunetv2.")
        else:
            # the nearest ancestor this module (or another trainer module) defines: an ablation or variant
            ancestor = next((c for c in cls.__mro__[1:] if c.__module__.startswith(package + ".") or c in own), None)
            kind, parent = ("variant", ancestor.__name__) if ancestor is not None else ("method", None)
        ours = issubclass(cls, LiverMultiTaskTrainer)
        summary = _summary(cls)
        if stock:
            from nnunet_liver_ext.training.schedules import SCHEDULES

            epochs, iterations, _ = SCHEDULES[schedule]
            summary = f"stock nnU-Net {parent} on the {schedule} schedule ({epochs} x {iterations} iterations)"
        required = tuple(cls.dataset_keys_required) if ours else ()
        used = tuple(cls.dataset_keys_used) if ours else ()
        out.append((cls, TrainerEntry(cls.__name__, module_stem, summary, kind, parent, schedule,
                                      required, used, stock_based=stock)))
    return out


def trainer_modules(folder: Path = TRAINERS_DIR) -> list[str]:
    """File stems of the Python modules in ``trainers/`` (what nnU-Net's search imports)."""
    return [m.name for m in pkgutil.iter_modules([str(folder)]) if not m.ispkg]


@lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    """The package's catalogue. Imports every trainer module (torch and nnU-Net's trainer come with
    it: a few seconds), once per process."""
    return build_catalogue(TRAINERS_DIR, TRAINERS_PACKAGE)


def build_catalogue(folder: Path, package: str) -> Catalogue:
    """The catalogue of the trainer modules in ``folder``, imported as ``package.<module>``."""
    cat = Catalogue()
    for stem in trainer_modules(folder):
        try:
            module = importlib.import_module(f"{package}.{stem}")
            found = _entries_of(module, stem, package)
        except Exception as e:  # a broken trainer file must not hide the others
            cat.errors[stem] = f"{type(e).__name__}: {e}".splitlines()[0]
            cat.error_details[stem] = traceback.format_exc()
            continue
        # methods and variants first, then their schedule variants, each group in definition order
        for _, entry in sorted(found, key=lambda ce: ce[1].kind == "schedule"):
            if entry.name in cat.entries:
                cat.errors[stem] = f"defines {entry.name}, which {cat.entries[entry.name].module} defines too"
                continue
            cat.entries[entry.name] = entry
    return cat


def trainer_names() -> list[str]:
    """Every trainer name this package provides (``-tr`` values), schedule variants included."""
    return list(load_catalogue().entries)


@lru_cache(maxsize=1)
def nnunet_trainer_names() -> frozenset[str]:
    """Class names of nnU-Net's own trainers (``nnunetv2.training.nnUNetTrainer``), read from the source
    files rather than imported: importing them all takes a while and needs every optional dependency."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    root = Path(list(spec.submodule_search_locations)[0]) / "training" / "nnUNetTrainer"
    names = set()
    for path in root.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        names.update(node.name for node in ast.walk(tree)
                     if isinstance(node, ast.ClassDef) and node.name.startswith("nnUNetTrainer"))
    return frozenset(names)


def is_nnunet_trainer(name: str) -> bool:
    return name in nnunet_trainer_names()


def known_trainer_names() -> list[str]:
    return sorted(set(trainer_names()) | nnunet_trainer_names())


def closest_trainers(name: str, n: int = 3, extra: tuple[str, ...] = ()) -> list[str]:
    """The trainer names most like ``name`` (difflib), ours, nnU-Net's and ``extra`` together."""
    pool = sorted(set(known_trainer_names()) | set(extra))
    # compared in lower case: a case slip ("nnunettrainerstdnet") is the commonest typo
    lowered = {p.lower(): p for p in pool}
    return [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)]


def schedule_of(name: str) -> str | None:
    """The short schedule a trainer runs (``tiny`` for ``nnUNetTrainerSTDNet_tiny``): the class's
    ``schedule_name`` when the catalogue has it, else the name's suffix when it is a schedule's name."""
    entry = load_catalogue().entries.get(name)
    if entry is not None:
        return entry.schedule
    from nnunet_liver_ext.training.schedules import SCHEDULES

    suffix = name.rsplit("_", 1)[-1] if "_" in name else None
    return suffix if suffix in SCHEDULES else None


def stock_trainer_for(name: str) -> str:
    """Stock nnU-Net on the same schedule as ``name``: the like-for-like baseline."""
    schedule = schedule_of(name)
    return STOCK_BASE if schedule is None else f"{STOCK_BASE}_{schedule}"


def is_stock(name: str) -> bool:
    """Stock nnU-Net (``nnUNetTrainer`` or it on one of our schedules): a baseline, not a method."""
    return name == stock_trainer_for(name)
