"""One optimizer object over two optimizers: nnU-Net's SGD for the convolutional parts and AdamW
for attention / sequence modules and case-level heads.

Why: nnU-Net's SGD (lr 1e-2, momentum 0.99, Nesterov) trains its CNNs well but left STD-Net's
Transformer and characterization head at chance (cross-entropy at ln K for 1500 iterations on
the phantom; a CPU probe learns the same task with AdamW in ~200 steps and not at all with SGD).
Keeping SGD on the convolutions keeps the comparison with stock nnU-Net like for like there.

``HybridOptimizer`` quacks like a ``torch.optim.Optimizer`` for everything nnU-Net and
``torch.amp.GradScaler`` touch: ``param_groups`` (the groups of both, in order), ``zero_grad``,
``step``, ``state_dict`` / ``load_state_dict``. ``PolyLRPerGroup`` is nnU-Net's polynomial decay
applied to each group's own initial learning rate (nnU-Net's PolyLRScheduler would give every
group the SGD rate); ``PolyLRWithLinearWarmup`` adds a linear warm-up per iteration.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn


class HybridOptimizer:
    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("HybridOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> List[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HybridOptimizer.step does not take a closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"hybrid": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("hybrid")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError("checkpoint optimizer state does not match this HybridOptimizer (was it saved by a "
                             "trainer with a different optimizer?)")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)


class PolyLRPerGroup:
    """``lr = initial_lr * (1 - step / max_steps) ** exponent`` per parameter group, stepped with
    the epoch like nnU-Net's PolyLRScheduler (``scheduler.step(current_epoch)``)."""

    def __init__(self, optimizer, max_steps: int, exponent: float = 0.9):
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.exponent = exponent
        self.ctr = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def step(self, current_step: int = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        factor = (1 - current_step / self.max_steps) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor


class PolyLRWithLinearWarmup(PolyLRPerGroup):
    """``PolyLRPerGroup`` per epoch times a linear warm-up per iteration: iteration ``i`` (counted
    from the start of training) trains at ``min(1, (i + 1) / warmup_iterations)`` of the epoch's rate.

    ``step(epoch)`` (nnU-Net's call at the start of every epoch) already sets the rate of the
    epoch's first iteration, so the learning rate nnU-Net logs and plots for an epoch is one the
    network trained with; ``begin_iteration()`` (the trainer's, before each training step) sets the
    current iteration's rate. The position follows from the epoch alone, so ``--c`` needs no state."""

    def __init__(self, optimizer, max_steps: int, iterations_per_epoch: int, warmup_iterations: int,
                 exponent: float = 0.9):
        if iterations_per_epoch < 1 or warmup_iterations < 0:
            raise ValueError(f"need iterations_per_epoch >= 1 and warmup_iterations >= 0, got "
                             f"{iterations_per_epoch}, {warmup_iterations}")
        super().__init__(optimizer, max_steps, exponent)
        self.iterations_per_epoch = iterations_per_epoch
        self.warmup_iterations = warmup_iterations
        self._epoch_lrs = None
        self._epoch_start = 0  # the first iteration of the epoch last stepped
        self._iteration = 0

    def warmup_factor(self, iteration: int) -> float:
        return min(1.0, (iteration + 1) / self.warmup_iterations) if self.warmup_iterations else 1.0

    def rate(self, iteration: int, group: int = 0) -> float:
        """The learning rate of ``group`` at ``iteration`` of the epoch last stepped."""
        return self._epoch_lrs[group] * self.warmup_factor(iteration)

    def epoch_warmup(self) -> tuple[float, float] | None:
        """(first, last) rate of group 0 over the epoch last stepped when the warm-up covers its start, else None."""
        first = self._epoch_start
        if self._epoch_lrs is None or first >= self.warmup_iterations:
            return None
        return self.rate(first), self.rate(first + self.iterations_per_epoch - 1)

    def step(self, current_step: int = None) -> None:
        epoch = self.ctr if current_step is None or current_step == -1 else current_step
        super().step(current_step)
        self._epoch_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._epoch_start = self._iteration = epoch * self.iterations_per_epoch
        self._set(self._iteration)

    def begin_iteration(self) -> None:
        if self._epoch_lrs is None:  # a step before the first epoch's step(): nothing to warm up from
            return
        self._set(self._iteration)
        self._iteration += 1

    def _set(self, iteration: int) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.rate(iteration, index)


def split_parameters(network: nn.Module, adaptive_prefixes: Iterable[str]) -> Tuple[list, list]:
    """(parameters for SGD, parameters for AdamW): a parameter goes to AdamW when its name starts
    with one of ``adaptive_prefixes``. A module registered twice (dynamic-network-architectures'
    decoder keeps a reference to the encoder) counts once, under the name it was registered first:
    ``named_parameters`` drops duplicates."""
    prefixes = tuple(adaptive_prefixes)
    sgd, adaptive = [], []
    for name, parameter in network.named_parameters():
        if parameter.requires_grad:
            (adaptive if name.startswith(prefixes) else sgd).append(parameter)
    return sgd, adaptive
