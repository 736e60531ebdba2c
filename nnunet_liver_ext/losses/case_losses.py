"""Case-level loss terms shared by the multi-task methods.

They run in fp32 whatever autocast does (DESIGN.md: losses with logs compute in fp32), and each
returns a graph-connected zero when no sample of the batch qualifies, so DDP never sees a
parameter without a gradient.

Under DDP each term is a mean over the qualifying samples of *every* rank, not of this rank's
batch: only some samples qualify (a case label, tumor in the patch), and they are spread unevenly
over the ranks' batches. DDP averages the ranks' gradients, so each rank divides its sum by
:func:`samples_over_ranks` (the global count over the world size); the averaged gradient is then
the one a single process computes on the union of the ranks' batches. A per-rank mean would weigh
a rank's one qualifying sample as much as another rank's three together.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def samples_over_ranks(mask: torch.Tensor) -> torch.Tensor:
    """What this rank divides its sum of per-sample losses by: the number of True in ``mask`` (B,)
    summed over the DDP ranks and divided by the world size; without a process group, the local count.

    Every rank must call it for the same terms in the same order (it is a collective under DDP):
    the terms a trainer computes depend on its configuration, never on the data of the batch.
    """
    count = mask.detach().sum().float()
    world = _world_size()
    if world > 1:
        dist.all_reduce(count)
        count = count / world
    return count


def connected_zero(x: torch.Tensor) -> torch.Tensor:
    """0 connected to ``x``'s graph (DDP wants every parameter in it) with a zero gradient, also where an
    excluded sample holds inf or NaN (``x.sum() * 0`` is NaN there)."""
    return x.float().nan_to_num(0.0, 0.0, 0.0).sum() * 0.0


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples where ``mask`` is True (over every rank's, under DDP).

    logits (B, K), labels (B,) int64 (any value where masked out), mask (B,) bool.
    """
    count = samples_over_ranks(mask)
    if not mask.any() or count.item() == 0:
        return connected_zero(logits)
    return F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum") / count


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the samples where ``mask`` is True (over every rank's, under DDP) and
    their values. prediction/target (B, N), mask (B,)."""
    count = samples_over_ranks(mask)
    if not mask.any() or count.item() == 0:
        return connected_zero(prediction)
    per_sample = (prediction[mask].float() - target[mask].float()).abs().mean(1)
    return per_sample.sum() / count


def masked_bce_with_logits(logits: torch.Tensor, real: bool, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits of ``logits`` (B,) against all-real or all-fake over the samples where
    ``mask`` (B,) is True (over every rank's, under DDP)."""
    count = samples_over_ranks(mask)
    if not mask.any() or count.item() == 0:
        return connected_zero(logits)
    kept = logits[mask].float()
    return F.binary_cross_entropy_with_logits(kept, torch.full_like(kept, 1.0 if real else 0.0),
                                              reduction="sum") / count
