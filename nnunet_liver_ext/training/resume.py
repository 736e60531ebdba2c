"""What ``nnUNetv2_train ... --c`` needs beyond nnU-Net's checkpoint, for ``LiverMultiTaskTrainer``.

nnU-Net's checkpoint already holds everything with a ``state_dict``: the network (so every head,
MTI-Net's discriminator and the Mamba codebook's codes and buffers, which are submodules), the
optimizer (``training.optim.HybridOptimizer`` saves each of its SGD / AdamW / discriminator-Adam
states), the grad scaler, the logger and the epoch. The learning-rate schedulers of this package are
functions of the epoch (nnU-Net steps them with ``scheduler.step(current_epoch)``) and of the
``initial_lr`` entries in the optimizer's param groups, which the optimizer state carries.

What it lacks is the state of the random number generators. Dropout in the Transformers and the
codebook's dead-code restarts draw from torch's generator, nnU-Net's in-process data loading and
augmentation (``nnUNet_n_proc_DA=0``) from numpy's, Python's and torch's; without them a resumed run
draws other masks and other patches than the run it continues. ``capture_random_state`` is stored
under ``RESUME_STATE_KEY`` in the checkpoint and ``restore_random_state`` puts it back.

Not covered, on purpose: augmentation worker processes (nnU-Net seeds them anew every start), and
DDP, where only rank 0 writes the checkpoint: giving every rank rank 0's generator would make the
ranks draw the same patches, so under DDP each rank keeps its own fresh generators.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

#: the checkpoint entry this package adds to nnU-Net's (nnU-Net and its predictor ignore unknown keys)
RESUME_STATE_KEY = "nnunet_liver_ext_resume_state"


def capture_random_state(device: torch.device) -> dict:
    """torch (CPU and, on a CUDA device, that device's), numpy and Python generator states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda" and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(state: dict, device: torch.device) -> None:
    """The inverse of :func:`capture_random_state`. A CUDA state is restored only on a CUDA device
    (a run saved on a GPU and resumed on the CPU keeps the CPU generators only)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def nnunet_checkpoint(trainer) -> dict:
    """The dict ``nnUNetTrainer.save_checkpoint`` (nnunetv2 2.8) writes, built the same way.

    Written out here because nnU-Net builds and saves it in one method with no hook to add an entry;
    ``tests/test_resume.py`` compares it, key by key and value by value, with nnU-Net's own, so a change
    in nnU-Net shows up there rather than as a silently different checkpoint."""
    from nnunet_liver_ext.networks.contract import unwrap_network

    return {
        "network_weights": unwrap_network(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }


def read_checkpoint_lazily(filename: str) -> dict:
    """A checkpoint file's entries, memory-mapped: the network weights are not read a second time after
    nnU-Net's own loading. An empty dict for a file that holds no dict."""
    try:
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # a checkpoint in torch's legacy (non-zip) format cannot be memory-mapped
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    return checkpoint if isinstance(checkpoint, dict) else {}


def best_ema_after_this_epoch(trainer) -> Optional[float]:
    """The best EMA pseudo Dice as it stands once the current epoch has been compared with it.

    nnU-Net's ``on_epoch_end`` writes checkpoint_latest.pth before that comparison, so its ``_best_ema``
    misses the epoch just finished: a run continued from it compares its next epoch with a stale best (None
    after the first epoch) and can replace a better checkpoint_best.pth. Stored instead of nnU-Net's value,
    the continued run compares as the uninterrupted one does. Outside ``on_epoch_end`` (the final
    checkpoint, the current epoch already counted on) the trainer's value is returned as it is."""
    emas = trainer.logger.get_value("ema_fg_dice", step=None)
    if len(emas) != trainer.current_epoch + 1:
        return trainer._best_ema
    current = emas[-1]
    return current if trainer._best_ema is None or current > trainer._best_ema else trainer._best_ema
