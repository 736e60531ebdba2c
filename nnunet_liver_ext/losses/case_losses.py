"""Case-level loss terms shared by the multi-task methods.

They run in fp32 whatever autocast does (DESIGN.md: losses with logs compute in fp32), and each
returns a graph-connected zero when no sample of the batch qualifies, so DDP never sees a
parameter without a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples where ``mask`` is True.

    logits (B, K), labels (B,) int64 (any value where masked out), mask (B,) bool.
    """
    if not mask.any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the samples where ``mask`` is True. prediction/target (B, N), mask (B,)."""
    if not mask.any():
        return prediction.float().sum() * 0.0
    return (prediction[mask].float() - target[mask].float()).abs().mean()
