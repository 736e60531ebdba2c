"""Activation-memory estimates of this package's networks, in the units of nnU-Net's planner.

nnU-Net's ``ExperimentPlanner`` sizes patch and batch from ``compute_conv_feature_map_size`` of its
U-Net: the feature-map elements of one sample, one per convolution output. It compares that count
with reference values tuned on real GPUs (``UNet_reference_val_3d`` = 560e6 elements fill 8 GB at
batch 2; ``UNet_reference_val_2d`` = 85e6 at batch 12), scaled by the VRAM target. Every network of
this package reports the same kind of count for a patch (``compute_conv_feature_map_size``: the N
phases through a shared encoder, attention tokens and windows, scan states, codebook distances), but
one element of it does not cost what one U-Net element costs: a convolution block keeps about two
tensors for backward per counted output, an attention block or a scan keeps others.

Calibration (what the planners do): the estimate is ``network count x factor``, with

    factor = (bytes saved for backward per counted element, the network)
             / (bytes saved for backward per counted element, nnU-Net's PlainConvUNet)

both measured in one training-mode forward (deep supervision on, batch 1) on the CPU under bf16
autocast, the CPU's counterpart of nnU-Net's fp16 AMP (2-byte activations, the same kind of ops kept
in fp32), built from the same plans, at the planned patch or, for a large one, a part of it that
keeps a bottleneck of 2 or more voxels per axis (:func:`calibration_patch`). Tensors that
autograd saves are counted once per storage; parameters and autocast's low-precision copies of them
are not activations and are left out. The factor makes a calibrated estimate comparable with the
U-Net's count, so nnU-Net's reference values and VRAM scaling apply unchanged. On this project's CPU
the bytes per counted element at nnU-Net's widths vary by less than 15 % between a 16x48x48 and a
32x64x64 patch, and from 1 to 4 phases (tests/test_planners.py re-measures it); how the estimate meets
real GPU memory is what ``benchmarks/performance.py`` measures.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

#: nnU-Net's reference: this many GB correspond to its reference values (ExperimentPlanner)
REFERENCE_GB = 8
REFERENCE_VALUES = {2: (85_000_000, 12), 3: (560_000_000, 2)}  # dims -> (elements of one sample, batch size)


def skeleton_plans(dataset_json: dict, configuration_name: str, configuration: dict) -> dict:
    """The smallest plans nnU-Net's PlansManager and the trainers' ``build_network_architecture`` read:
    one configuration with its patch size and architecture."""
    return {"dataset_name": dataset_json.get("name", "planning"), "plans_name": "planning",
            "label_manager": "LabelManager", "configurations": {configuration_name: configuration}}


def build_network(trainer_class: type, dataset_json: dict, configuration: dict, num_input_channels: int,
                  num_output_channels: int, device: str = "meta", deep_supervision: bool = True) -> nn.Module:
    """The network ``trainer_class`` builds for ``configuration`` (a plans configuration dict: ``patch_size``
    and ``architecture``) and this dataset: the trainer's own ``build_network_architecture``, after the
    package's plans block (phases, classes, lesion channel) is written into the plans as the trainer does.
    On ``meta`` nothing is allocated."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

    plans = skeleton_plans(dataset_json, "planning", copy.deepcopy(configuration))
    if issubclass(trainer_class, LiverMultiTaskTrainer):
        plans = trainer_class.plans_with_liver_block(plans, dataset_json)
    plans_manager = PlansManager(plans)
    with torch.device(device):
        return trainer_class.build_network_architecture(plans_manager, plans_manager.get_configuration("planning"),
                                                        num_input_channels, num_output_channels, deep_supervision)


def training_forward(network: nn.Module, x: torch.Tensor, heads: bool):
    """One training-mode forward as the trainers run it: ``net(x, heads=True, lesion_mask=...)`` for this
    package's networks (the network contract; the mask marks 10 % of the voxels as lesion), ``net(x)``
    for nnU-Net's (``heads=False``)."""
    network.train()
    if heads:
        generator = torch.Generator().manual_seed(0)
        mask = (torch.rand((x.shape[0], 1, *x.shape[2:]), generator=generator) > 0.9).float().to(x.device)
        return network(x, heads=True, lesion_mask=mask)
    return network(x)


def saved_for_backward_bytes(network: nn.Module, input_shape: Sequence[int], heads: bool, amp: bool = True) -> int:
    """Bytes of the tensors autograd keeps for backward in one :func:`training_forward` of a random input
    ``input_shape`` (B, C, *S) on the CPU; with ``amp`` under bf16 autocast. Each storage counts once;
    parameters and autocast's casts of them (tensors shaped like a parameter) are left out."""
    params = {p.data_ptr() for p in network.parameters()}
    param_shapes = {tuple(p.shape) for p in network.parameters()}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in params and tuple(tensor.shape) not in param_shapes:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        training_forward(network, x, heads)
    return int(sum(storages.values()))


def total_strides(arch_kwargs: dict) -> Tuple[int, ...]:
    strides = np.asarray(arch_kwargs["strides"], dtype=np.int64)
    if strides.ndim == 1:  # one int per stage
        strides = np.repeat(strides[:, None], len(arch_kwargs["kernel_sizes"][0]), 1)
    return tuple(int(s) for s in np.prod(strides, axis=0))


#: voxels of the calibration patch, at most, where the bottleneck allows it: a few seconds of CPU per network at
#: nnU-Net's widths. Deep plans keep a larger patch (no axis below a bottleneck of 2 voxels): at LiTS-like
#: spacing 96x128x128, about a minute and 5-7 GB of RAM for STD-Net or MTI-Net on a 2-core CPU
CALIBRATION_VOXELS = {2: 256 * 256, 3: 32 * 64 * 64}


def calibration_patch(patch_size: Sequence[int], arch_kwargs: dict) -> Tuple[int, ...]:
    """The patch the calibration runs at: the planned patch, its axis with the most bottleneck voxels
    halved (down to a multiple of the total stride) while it has more than ``CALIBRATION_VOXELS`` voxels,
    but no axis below a bottleneck of 2 voxels. Why not smaller: at a bottleneck of 1 voxel the
    per-sample parts (case heads, pooling, a Transformer over few tokens) weigh more than at the planned
    patch and the factor drifts (2d STD-Net, 4 stages: 13.4 saved bytes per counted element at 16x16,
    5.8 at 96x96; 3d at nnU-Net's widths: within 15 % from a 16x48x48 patch up)."""
    strides = total_strides(arch_kwargs)
    patch = [int(p) for p in patch_size]
    while np.prod(patch, dtype=np.int64) > CALIBRATION_VOXELS[len(patch)]:
        axis = int(np.argmax([p / s for p, s in zip(patch, strides)]))
        half = patch[axis] // 2 // strides[axis] * strides[axis]
        if half < 2 * strides[axis]:
            break
        patch[axis] = half
    return tuple(patch)


def bytes_per_element(network: nn.Module, patch: Sequence[int], input_channels: int, heads: bool) -> float:
    """Saved-for-backward bytes (bf16 autocast) per element of the network's feature-map count, batch 1."""
    return saved_for_backward_bytes(network, (1, input_channels, *patch), heads) / \
        float(network.compute_conv_feature_map_size(list(patch)))


def calibration_factor(trainer_class: type, dataset_json: dict, configuration: dict, num_input_channels: int,
                       num_output_channels: int, unet_class: Optional[type] = None) -> dict:
    """The calibration of ``trainer_class``'s network against nnU-Net's U-Net on the same configuration
    (module docstring): ``{"factor", "patch", "bytes_per_element", "unet_bytes_per_element"}``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

    torch.manual_seed(0)
    patch = calibration_patch(configuration["patch_size"], configuration["architecture"]["arch_kwargs"])
    small = dict(copy.deepcopy(configuration), patch_size=list(patch))
    network = build_network(trainer_class, dataset_json, small, num_input_channels, num_output_channels, "cpu")
    unet = build_network(unet_class or nnUNetTrainer, dataset_json, small, num_input_channels, num_output_channels,
                         "cpu")
    ours = bytes_per_element(network, patch, num_input_channels, issubclass(trainer_class, LiverMultiTaskTrainer))
    reference = bytes_per_element(unet, patch, num_input_channels, False)
    return {"factor": ours / reference, "patch": list(patch), "bytes_per_element": ours,
            "unet_bytes_per_element": reference}


def predicted_gb(estimate: float, batch_size: int, dims: int,
                 reference: Optional[Tuple[float, int, float]] = None) -> float:
    """GB that nnU-Net's reference scaling assigns to ``estimate`` elements per sample at ``batch_size``.
    ``reference``: ``(elements per sample, batch size, GB)`` of the planner (nnU-Net's ResEnc planners have
    their own); by default the default planner's, ``REFERENCE_VALUES[dims]`` at ``REFERENCE_GB``."""
    elements, reference_batch, gb = reference or (*REFERENCE_VALUES[dims], REFERENCE_GB)
    return gb * float(estimate) * batch_size / (elements * reference_batch)
