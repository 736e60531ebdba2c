"""The network contract every method in this package follows (../shared/DESIGN.md).

- ``net(x)`` returns exactly what nnU-Net expects: the segmentation logits ``(B, K_seg, *spatial)``,
  or, with deep supervision on, the list of logits at decreasing resolution (highest first).
  Stock ``nnUNetv2_predict``, sliding-window validation and ``torch.compile`` need nothing else.
- ``net(x, heads=True)`` returns a :class:`NetworkOutput` carrying the same ``seg`` plus the case
  level heads the method has. ``heads`` is a keyword so DDP's wrapper passes it through.
- ``net(x, heads=True, lesion_mask=m)``: ``m`` ``(B, 1, *spatial)`` in [0, 1] says where the lesion
  is when that is known (in training: the reference segmentation). A network whose case heads look
  at the lesion uses it instead of its own prediction; one whose heads do not ignores it. Every
  network accepts the keyword, so the trainer passes it without knowing the method.

Every head lives inside the network module, so nnU-Net's checkpoints (which store
``self.network``'s state dict) and ``--c`` resume keep them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

SegOutput = Union[torch.Tensor, List[torch.Tensor]]


@dataclass
class NetworkOutput:
    """What ``net(x, heads=True)`` returns.

    seg: segmentation logits or the deep-supervision list (highest resolution first).
    cls_logits: ``(B, K)`` characterization logits, or None when the network has no class head
        (e.g. a dataset without case labels).
    curve: ``(B, N)`` predicted enhancement curve (one value per phase), or None.
    aux_losses: scalar tensors the network computed itself (e.g. a VQ commitment loss); the trainer
        adds them with its own weights.
    """

    seg: SegOutput
    cls_logits: Optional[torch.Tensor] = None
    curve: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def seg_highres(self) -> torch.Tensor:
        return self.seg[0] if isinstance(self.seg, (list, tuple)) else self.seg


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and ``torch.compile`` wrappers (in either nesting order)."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):  # torch._dynamo OptimizedModule
            network = network._orig_mod
        else:
            return network
