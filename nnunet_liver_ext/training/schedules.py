"""Short training schedules, in the spirit of nnU-Net's ``nnUNetTrainer_Xepochs`` variants, and the
one mechanism that derives them for every trainer.

One table, used by every method and by the stock-network baselines, so a comparison at a short
schedule is like for like. Values: (epochs, train iterations per epoch, validation iterations per
epoch). Every trainer module of ``trainers/`` ends with ``register_schedule_variants(globals())``,
which adds ``<Trainer>_<schedule>`` for each trainer class the module defines and each row of the
table: ``nnUNetv2_train``, ``nnUNetv2_predict`` and the checkpoint loader find them by name like any
hand-written class, and a new trainer gets its short variants without a line of its own.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import torch
from torch.optim.lr_scheduler import _LRScheduler

SCHEDULES = {
    # nnU-Net's iterations, few epochs: smoke runs on a GPU
    "5epochs": (5, 250, 50),
    # long enough for the CPU-demo plans to find the phantom's tumors on a 2-core CPU (about 80 min;
    # benchmarks/cpu_stdnet_characterization.sh)
    "10epochs": (10, 250, 50),
    # a like-for-like comparison on a GPU in minutes (benchmarks/gpu_stdnet_vs_nnunet.py)
    "short": (20, 50, 5),
    # the README demo on a 2-core CPU: the CPU-demo plans' 2d configuration (batch 12 of 48x48 slices,
    # about 0.13 s per iteration) learns the demo phantom's liver and tumors in 2000 iterations
    "demo": (40, 50, 2),
    # test runs: a real training loop, checkpoints and validation in seconds
    "tiny": (1, 2, 1),
}

#: trainer settings a schedule changes besides its length. In the demo's 2000 CPU iterations the
#: moment the network starts to find tumors varied from run to run (iteration ~1200 to ~1900 with a
#: third of the samples centred on foreground); centring 80 % on foreground (nnU-Net: 33 %), half
#: of them on tumor, shows it more lesions per second.
SCHEDULE_SETTINGS = {
    "demo": {"oversample_foreground_percent": 0.8},
}


def apply_schedule(trainer, name: str) -> None:
    """Sets the schedule's epochs and iterations on a constructed trainer. A warm-up (a trainer's
    ``warmup_epochs``) shrinks in proportion, so a warm-up schedule still runs in a short one."""
    epochs, iterations, val_iterations = SCHEDULES[name]
    warmup = getattr(trainer, "warmup_epochs", None)
    if warmup:
        trainer.warmup_epochs = min(epochs - 1, int(warmup * epochs / trainer.num_epochs))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    settings = SCHEDULE_SETTINGS.get(name, {})
    for attribute, value in settings.items():
        setattr(trainer, attribute, value)
    trainer.print_to_log_file(f"Short schedule '{name}': {epochs} epochs x {iterations} iterations "
                              f"({val_iterations} validation iterations per epoch)"
                              + "".join(f", {k} {v}" for k, v in settings.items()))


def schedule_variant(base: type, schedule: str) -> type:
    """``<base>_<schedule>``: ``base`` with the schedule applied after its whole ``__init__``."""
    if schedule not in SCHEDULES:
        raise KeyError(f"unknown schedule {schedule!r}; known: {sorted(SCHEDULES)}")
    epochs, iterations, _ = SCHEDULES[schedule]

    # nnU-Net records its constructor arguments by these parameter names (my_init_kwargs)
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        apply_schedule(self, schedule)

    name = f"{base.__name__}_{schedule}"
    summary = (base.__doc__ or base.__name__).strip().splitlines()[0]
    return type(name, (base,), {
        "__init__": __init__, "__module__": base.__module__, "__qualname__": name,
        "__doc__": f"{summary} [{schedule} schedule: {epochs} x {iterations} iterations]",
        "schedule_name": schedule, "schedule_base": base,
    })


def register_schedule_variants(namespace: Dict[str, object], bases: Optional[Iterable[type]] = None,
                               skip_names: Iterable[str] = ()) -> list:
    """Adds ``<Trainer>_<schedule>`` to a trainer module's ``namespace`` (its ``globals()``) for every
    schedule and every base: by default each nnUNetTrainer subclass the module itself defines
    (imported trainers are their own module's business). Names already in the namespace, and
    ``skip_names``, are left alone. Returns the classes it added."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if bases is None:
        bases = [v for v in list(namespace.values())
                 if isinstance(v, type) and issubclass(v, nnUNetTrainer) and v.__module__ == namespace["__name__"]
                 and getattr(v, "schedule_name", None) is None]
    added, skip = [], set(skip_names)
    for base in bases:
        for schedule in SCHEDULES:
            name = f"{base.__name__}_{schedule}"
            if name in namespace or name in skip:
                continue
            variant = schedule_variant(base, schedule)
            # the variant belongs to the module that registers it (nnU-Net finds it there)
            variant.__module__ = namespace["__name__"]
            namespace[name] = variant
            added.append(variant)
    return added


class WarmupCosineLRScheduler(_LRScheduler):
    """Linear warm-up then cosine decay, stepped with the epoch like nnU-Net's PolyLRScheduler
    (``scheduler.step(current_epoch)``)."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, current_step: int = None):
        if not 0 <= warmup_steps < max_steps:
            raise ValueError(f"need 0 <= warmup_steps < max_steps, got {warmup_steps}, {max_steps}")
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        return self.initial_lr * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [new_lr] * len(self.optimizer.param_groups)
