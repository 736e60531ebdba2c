"""Inclusion loss of the Mamba-codebook U-Net (eq. 7 of mamba_codebook_unet.txt; ../shared/METHODS.md):
tumors lie inside the liver.

METHODS.md writes it as ``mean(ReLU(p_T - p_L))`` with ``p_T`` the tumor probability and ``p_L`` the
liver-region probability (liver ∪ tumor). Read pointwise on a softmax output that is identically
zero: ``p_L = p_liver + p_tumor >= p_T`` at every voxel, because the classes are exclusive. What
can be violated is the spatial relation: a tumor voxel whose surroundings are not liver. Ours:
``p_L`` is the liver-region probability *eroded* by a small structuring element (``kernel_size``
voxels, default 3: one voxel each way), i.e. the probability that the voxel's whole
neighbourhood lies in the liver region, ``erode(p_L)(v) = min_{u in N(v)} p_L(u) = 1 - max_{u in
N(v)} p_background(u)``. Then

    L_inc = mean_v ReLU(p_T(v) - erode(p_L)(v))

is zero for a tumor enclosed by liver whatever its size (every neighbour of a tumor voxel is tumor
or liver) and positive where tumor probability meets background, i.e. for tumor outside the
liver or bulging through its surface. It runs in fp32 on the full-resolution output (nnU-Net
gives the coarsest deep-supervision output weight 0).

With nnU-Net's region-based training (``regions_class_order``) the outputs are one sigmoid per region;
with a liver region that contains the tumor (``"liver": [1, 2], "tumor": 2``), ``p_L`` is the liver
region's own sigmoid, which is not bounded below by ``p_T``: the pointwise term counts there too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_liver_ext.networks.blocks import LESION_ACTIVATIONS, autocast_off


def eroded_region_probability(probability: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Grey-level erosion (min over a ``kernel_size`` box, borders treated as inside) of a
    probability map ``(B, 1, *S)``; 2d or 3d."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if kernel_size == 1:
        return probability
    pool = F.max_pool3d if probability.ndim == 5 else F.max_pool2d
    # min-pool as -max(-x); padding with -inf-free replicate keeps the image border neutral
    pad = [kernel_size // 2] * (2 * (probability.ndim - 2))
    padded = F.pad(probability, pad, mode="replicate")
    return -pool(-padded, kernel_size, stride=1)


def inclusion_loss(seg_logits: torch.Tensor, liver_channel: int, tumor_channel: int,
                   kernel_size: int = 3, activation: str = "softmax") -> torch.Tensor:
    """``mean(ReLU(p_T - erode(p_L)))`` from segmentation logits ``(B, K, *S)``.

    ``activation="softmax"`` (nnU-Net's labels): ``liver_channel`` / ``tumor_channel`` are the outputs of the
    liver and tumor labels, ``p_L = p_liver + p_T``. ``"sigmoid"`` (regions): they are the outputs of the
    liver region (which contains the tumor) and the tumor region, ``p_L`` the liver region's sigmoid.
    """
    if liver_channel == tumor_channel:
        raise ValueError("liver and tumor must be different output channels")
    if activation not in LESION_ACTIVATIONS:
        raise ValueError(f"activation must be one of {LESION_ACTIVATIONS}, got {activation!r}")
    with autocast_off(seg_logits.device.type):
        logits = seg_logits.float()
        if activation == "sigmoid":
            p_tumor = torch.sigmoid(logits[:, tumor_channel:tumor_channel + 1])
            p_region = torch.sigmoid(logits[:, liver_channel:liver_channel + 1])
        else:
            probabilities = torch.softmax(logits, 1)
            p_tumor = probabilities[:, tumor_channel:tumor_channel + 1]
            p_region = p_tumor + probabilities[:, liver_channel:liver_channel + 1]
        return F.relu(p_tumor - eroded_region_probability(p_region, kernel_size)).mean()
