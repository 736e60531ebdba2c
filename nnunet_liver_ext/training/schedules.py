"""Short training schedules, in the spirit of nnU-Net's ``nnUNetTrainer_Xepochs`` variants.

One table, used by every method's short variants and by the stock-network baselines, so a
comparison at a short schedule is like for like. Values: (epochs, train iterations per epoch,
validation iterations per epoch).
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import _LRScheduler

SCHEDULES = {
    # nnU-Net's iterations, few epochs: smoke runs on a GPU
    "5epochs": (5, 250, 50),
    # long enough for the CPU-demo plans to find the phantom's tumors on a 2-core CPU (about 80 min;
    # benchmarks/cpu_stdnet_characterization.sh)
    "10epochs": (10, 250, 50),
    # a like-for-like comparison on a GPU in minutes (benchmarks/gpu_stdnet_vs_nnunet.py)
    "short": (20, 50, 5),
    # the README demo on a 2-core CPU with the CPU-demo plans
    "demo": (8, 20, 2),
    # test runs: a real training loop, checkpoints and validation in seconds
    "tiny": (1, 2, 1),
}


def apply_schedule(trainer, name: str) -> None:
    epochs, iterations, val_iterations = SCHEDULES[name]
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.print_to_log_file(f"Short schedule '{name}': {epochs} epochs x {iterations} iterations "
                              f"({val_iterations} validation iterations per epoch)")


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
