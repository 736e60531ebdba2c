"""Small blocks shared by the methods, parameterised by ``conv_op`` like
dynamic-network-architectures, so the same code serves 2d and 3d plans.

Shapes use ``*S`` for the spatial axes (``(H, W)`` for 2d, ``(D, H, W)`` for 3d) and ``N`` for the
phase (time) axis of multiphase inputs laid out as ``(B, N, C, *S)``.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from torch import nn
from torch.nn.modules.conv import _ConvNd

# Keys of nnU-Net's PlainConvUNet / ResidualEncoderUNet arch_kwargs that describe the encoder.
_ENCODER_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "conv_bias",
                 "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs")


def build_encoder(input_channels: int, arch_kwargs: dict) -> Union[PlainConvEncoder, ResidualEncoder]:
    """The encoder nnU-Net's plans describe, returning skips (highest resolution first).

    ``arch_kwargs`` are the plans' ``arch_kwargs`` with the import strings already resolved. Plans of
    the ResEnc presets carry ``n_blocks_per_stage`` and get dynamic-network-architectures'
    ResidualEncoder; the default plans carry ``n_conv_per_stage`` and get PlainConvEncoder.
    """
    common = {k: arch_kwargs[k] for k in _ENCODER_KEYS if k in arch_kwargs}
    missing = [k for k in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides") if k not in common]
    if missing:
        raise ValueError(f"plans arch_kwargs lack {missing}; got keys {sorted(arch_kwargs)}")
    if "n_blocks_per_stage" in arch_kwargs:
        return ResidualEncoder(input_channels=input_channels, n_blocks_per_stage=arch_kwargs["n_blocks_per_stage"],
                               return_skips=True, disable_default_stem=False, **common)
    if "n_conv_per_stage" not in arch_kwargs:
        raise ValueError("plans arch_kwargs need n_conv_per_stage (PlainConvUNet) or n_blocks_per_stage (ResEnc)")
    return PlainConvEncoder(input_channels=input_channels, n_conv_per_stage=arch_kwargs["n_conv_per_stage"],
                            return_skips=True, **common)


def build_phase_encoders(num_phases: int, channels_per_phase: int, arch_kwargs: dict, share: bool,
                         previous_stage_channels: int = 0) -> Tuple[nn.Module, Optional[nn.ModuleList]]:
    """``(encoder, encoders)`` for ``num_phases`` phase images of ``channels_per_phase`` channels each, every
    one seen together with the ``previous_stage_channels`` of a cascade (:func:`encode_phases`): one encoder
    the phases share (``encoders`` None), or one per phase (``encoder`` is the first of them: a decoder
    reads the stage shapes from it). A network assigns ``encoders`` before ``encoder``, which keeps the
    parameter order, and so the optimizer state of a checkpoint, where it was."""
    in_channels = channels_per_phase + previous_stage_channels
    if share:
        return build_encoder(in_channels, arch_kwargs), None
    encoders = nn.ModuleList(build_encoder(in_channels, arch_kwargs) for _ in range(num_phases))
    return encoders[0], encoders


def split_phase_channels(input_channels: int, channels_per_phase: int, previous_stage_channels: int = 0) -> int:
    """The number of phases N of an input of ``input_channels`` = N x ``channels_per_phase`` +
    ``previous_stage_channels``; a ValueError names the numbers when they do not add up."""
    if channels_per_phase < 1 or previous_stage_channels < 0:
        raise ValueError(f"channels_per_phase must be >= 1 and previous_stage_channels >= 0, got "
                         f"{channels_per_phase} and {previous_stage_channels}")
    image_channels = input_channels - previous_stage_channels
    if image_channels < channels_per_phase or image_channels % channels_per_phase:
        raise ValueError(f"input_channels ({input_channels}) minus previous_stage_channels ({previous_stage_channels}) "
                         f"must be a positive multiple of channels_per_phase ({channels_per_phase})")
    return image_channels // channels_per_phase


def encode_phases(x: torch.Tensor, encoder: nn.Module, encoders: Optional[nn.ModuleList], num_phases: int,
                  channels_per_phase: int, previous_stage_channels: int = 0) -> List[torch.Tensor]:
    """Skips per stage, each ``(B * N, C_s, *S_s)`` (sample-major, phase-minor), of ``x`` ``(B, N *
    channels_per_phase + P, *S)``: the shared encoder in one batched call over the B x N phase images (the
    weight sharing of STD-Net and MTI-Net), or every phase through its own encoder.

    The last ``P = previous_stage_channels`` channels are nnU-Net's cascade input (the one-hot segmentation
    of the previous stage, which nnU-Net appends after the image channels). They belong to no phase: every
    phase image is encoded together with them, as nnU-Net's cascade feeds its U-Net image plus segmentation."""
    b, n, cpp, p = x.shape[0], num_phases, channels_per_phase, previous_stage_channels
    if x.shape[1] != n * cpp + p:
        cascade = f" + {p} of the previous stage" if p else ""
        raise ValueError(f"expected {n * cpp + p} input channels ({n} phases x {cpp}{cascade}), got {x.shape[1]}")
    phases = x[:, :n * cpp].unflatten(1, (n, cpp))
    if p:
        previous = x[:, n * cpp:].unsqueeze(1).expand(b, n, p, *x.shape[2:])
        phases = torch.cat((phases, previous), 2)
    if encoders is None:
        return encoder(phases.flatten(0, 1))
    per_phase = [enc(phases[:, i]) for i, enc in enumerate(encoders)]
    return [torch.stack(stage, 1).flatten(0, 1) for stage in zip(*per_phase)]


def _autocast_device_types() -> frozenset:
    found = set()
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "privateuseone"):
        try:
            if torch.amp.is_autocast_available(device_type):
                found.add(device_type)
        except RuntimeError:  # a device type this torch build does not know
            pass
    return frozenset(found)


# Asked once, at import: torch.compile up to torch 2.11 (the GPU machine's) cannot trace the C function
# behind torch.amp.is_autocast_available and breaks the graph there; a set lookup it folds into a constant.
AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def autocast_off(device_type: str):
    """A region that runs in the tensors' own dtype whatever autocast does (fp32 scans, norms, distances);
    a no-op on devices without autocast (e.g. ``meta``, used for FLOP counting)."""
    if device_type in AUTOCAST_DEVICE_TYPES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def spatial_dims(conv_op: Type[_ConvNd]) -> int:
    if conv_op is nn.Conv2d:
        return 2
    if conv_op is nn.Conv3d:
        return 3
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")


def pointwise_conv(conv: _ConvNd, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1(x1) ``conv`` (stride 1, no padding, no groups), as one matrix product over the
    channels. The same parameters and result; a convolution with a single output channel (a voxel-wise score)
    runs an order of magnitude below a batched matrix product's speed on the CPU, forward and backward
    (PhaseFusion's score at STD-Net's highest resolution).

    x ``(B, C_in, *S)`` -> ``(B, C_out, *S)``."""
    if any(k != 1 for k in conv.kernel_size) or any(s != 1 for s in conv.stride) or conv.groups != 1 \
            or any(p != 0 for p in conv.padding if isinstance(conv.padding, tuple)):
        raise ValueError(f"pointwise_conv needs a 1x1 convolution with stride 1, no padding and one group, got {conv}")
    # bmm over the expanded weight: torch.matmul of (C_out, C_in) @ (B, C_in, V) copies its operands first and
    # is as slow as the convolution
    weight = conv.weight.flatten(1).unsqueeze(0).expand(x.shape[0], -1, -1)
    out = torch.bmm(weight, x.flatten(2))  # (B, C_out, V)
    if conv.bias is not None:
        out = out + conv.bias.to(out.dtype).view(1, -1, 1)  # autocast's dtype, as the convolution's output
    return out.unflatten(2, x.shape[2:])


class PhaseFusion(nn.Module):
    """Fuses per-phase feature maps into one map for the decoder.

    ``mode="attention"``: voxel-wise softmax over phases of a shared 1x1 score plus a learned
    per-phase bias, so each location can take the phase in which it has the best contrast.
    ``mode="mean"``: the plain average (order-invariant). ``mode="reference"``: the single phase
    ``reference_phase`` (the STD-Net paper decodes from the portal venous phase).

    Input ``(B, N, C, *S)``, output ``(B, C, *S)``.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, num_phases: int, mode: str = "attention",
                 reference_phase: Optional[int] = None):
        super().__init__()
        if mode not in ("attention", "mean", "reference"):
            raise ValueError(f"PhaseFusion mode must be attention, mean or reference, got {mode!r}")
        if mode == "reference" and (reference_phase is None or not 0 <= reference_phase < num_phases):
            raise ValueError(f"reference_phase must be in [0, {num_phases}) for mode='reference', got {reference_phase}")
        self.mode = mode
        self.reference_phase = reference_phase
        if mode == "attention":
            self.score = conv_op(channels, 1, kernel_size=1)
            self.phase_bias = nn.Parameter(torch.zeros(num_phases))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return features.mean(1)
        if self.mode == "reference":
            return features[:, self.reference_phase]
        b, n = features.shape[:2]
        scores = pointwise_conv(self.score, features.flatten(0, 1)).unflatten(0, (b, n))
        scores = scores + self.phase_bias[:n].view(1, n, *([1] * (features.ndim - 2)))
        weights = torch.softmax(scores.float(), dim=1).to(features.dtype)
        return (weights * features).sum(1)


class AttentionPool(nn.Module):
    """Attention pooling over the spatial axes (attention-MIL style): a learned score per location,
    softmax over locations, weighted mean. Lets a case-level head look at the lesion rather than
    averaging it away with the surrounding parenchyma.

    ``log_prior`` ``(B, L)``, optional, is added to the scores: a location's prior weight (e.g. the
    network's own lesion probability there) in log space.

    Input ``(B, L, C)`` tokens (L locations), output ``(B, C)``. Input ``(B, N, L, C)`` (N co-registered
    phases of the same L locations) gives ``(B, N, C)``, every phase pooled with the same spatial
    weights (its scores averaged over phases): a lesion that is iso-intense in one phase is still
    looked at in that phase, so the phase tokens compare the same tissue.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Linear(channels, 1)

    def forward(self, tokens: torch.Tensor, log_prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        scores = self.score(tokens).float().squeeze(-1)  # (B, L) or (B, N, L)
        if tokens.ndim == 4:
            scores = scores.mean(1)
        if log_prior is not None:
            scores = scores + log_prior.float()
        weights = torch.softmax(scores, dim=-1).to(tokens.dtype)  # (B, L)
        if tokens.ndim == 4:
            return torch.einsum("bl,bnlc->bnc", weights, tokens)
        return torch.einsum("bl,blc->bc", weights, tokens)


#: how segmentation logits become probabilities: nnU-Net's labels (softmax over the outputs) or regions
#: (``regions_class_order`` in dataset.json: one sigmoid per output, the regions may overlap)
LESION_ACTIVATIONS = ("softmax", "sigmoid")


def output_probability(seg: torch.Tensor, channel: int, activation: str = "softmax") -> torch.Tensor:
    """``(B, 1, *S)`` fp32 probability of output ``channel`` of segmentation logits ``(B, K, *S)``:
    the softmax over the K outputs (labels) or the channel's sigmoid (regions). Differentiable."""
    if activation not in LESION_ACTIVATIONS:
        raise ValueError(f"activation must be one of {LESION_ACTIVATIONS}, got {activation!r}")
    channel = channel % seg.shape[1]
    if activation == "sigmoid":
        return torch.sigmoid(seg[:, channel:channel + 1].float())
    return torch.softmax(seg.float(), 1)[:, channel:channel + 1]


def lesion_probability(seg: torch.Tensor, lesion_channel: int, activation: str = "softmax") -> torch.Tensor:
    """:func:`output_probability` of the lesion channel, detached: the case-level loss must not reshape
    the segmentation, only use it to look at the lesion."""
    return output_probability(seg.detach(), lesion_channel, activation)


def lesion_log_prior(probability: torch.Tensor, spatial_size, eps: float = 1e-3) -> torch.Tensor:
    """log of a lesion probability map ``(B, 1, *S)``, averaged onto ``spatial_size`` and flattened
    to ``(B, L)``: the ``log_prior`` of :class:`AttentionPool`."""
    probability = probability.detach().float()
    pooled = nn.functional.adaptive_avg_pool3d(probability, spatial_size) if probability.ndim == 5 \
        else nn.functional.adaptive_avg_pool2d(probability, spatial_size)
    return torch.log(pooled.flatten(1) + eps)


class ConvGRU(nn.Module):
    """A convolutional GRU run along the phase axis (STD-Net ablation (d)).

    Input ``(B, N, C, *S)``; returns the hidden state after every phase ``(B, N, C, *S)``.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size: int = 3):
        super().__init__()
        padding = kernel_size // 2
        self.gates = conv_op(2 * channels, 2 * channels, kernel_size, padding=padding)
        self.candidate = conv_op(2 * channels, channels, kernel_size, padding=padding)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros_like(features[:, 0])
        states = []
        for n in range(features.shape[1]):  # a recurrence: one step per phase by definition
            x = features[:, n]
            update, reset = torch.sigmoid(self.gates(torch.cat((x, hidden), 1))).chunk(2, 1)
            candidate = torch.tanh(self.candidate(torch.cat((x, reset * hidden), 1)))
            hidden = (1 - update) * hidden + update * candidate
            states.append(hidden)
        return torch.stack(states, 1)


def mlp_head(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


def encoder_skip_sizes(encoder: nn.Module, input_size: Sequence[int]) -> List[List[int]]:
    """Spatial size of every encoder stage's output for an input of ``input_size``."""
    sizes = []
    size = list(input_size)
    for stride in encoder.strides:
        size = [i // j for i, j in zip(size, stride)]
        sizes.append(size)
    return sizes


def numel(*dims) -> np.int64:
    return np.prod(dims, dtype=np.int64)
