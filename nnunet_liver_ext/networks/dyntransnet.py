"""DynTransNet: a U-shaped network with a hierarchical transformer encoder using dynamic multi-head
self-attention (D-MSA), and a convolutional decoder with a feature mix module (FM-M) and a residual
module (RM) at every stage (../shared/seeds/dyntransnet.txt; spec in ../shared/METHODS.md).

DynTransNet segments; it has no case-level head. Multiphase inputs are plain input channels.

Layout, for nnU-Net plans with stages ``s = 0 .. S-1`` (``strides[s]``, ``features_per_stage[s]``):

- stage 0 (full resolution): a convolutional stem (the plans' first encoder stage), giving the
  full-resolution skip. Ours: the paper's decoder must end at full resolution, and a token per voxel
  at full resolution is what no attention can afford; UNETR and SwinUNETR also take their
  full-resolution skip from convolutions on the input.
- stage 1: **patch embedding** of the input: non-overlapping patches of ``strides[0] * strides[1]``
  voxels, linearly projected to ``features_per_stage[1]`` channels (algorithm 1, lines 1-3).
- stages 2 .. S-1: **patch merging** (Swin): the ``prod(strides[s])`` neighbouring tokens are
  concatenated, layer-normalised and projected to ``features_per_stage[s]``.
- every transformer stage: a depth-wise convolution as positional encoding (ours: the paper names
  no positional encoding, and attention inside a window is otherwise blind to position), then
  ``depth`` pre-norm transformer blocks (``x + D-MSA(LN(x))``, ``x + MLP(LN(x))``; ours: algorithm 1
  lists the attention alone), then a LayerNorm; its output is the stage's skip.
- decoder, from the bottleneck up: transposed convolution (stride of the stage below), FM-M of the
  upsampled decoder features ``D`` and the skip ``E``, RM, and a 1x1(x1) segmentation layer per stage
  (deep supervision: the outputs at stages ``S-2 .. 0``, returned highest resolution first, as
  nnU-Net's ``UNetDecoder`` returns them, so nnU-Net's deep-supervision scales and weights apply).

Attention that fits in memory: a stage whose token grid has at most ``max_global_tokens`` tokens
attends globally; a larger one attends inside windows of ``window_size`` tokens per axis
(Swin-style, clipped to the grid), every second block with windows shifted by half a window.
Shifted windows are made by zero-padding the grid by the shift in front (and up to a multiple of the
window behind) and giving the padded keys a score of -1e4, instead of Swin's cyclic roll with an
N x N region mask per window: then all that is added to the scores is key-only, like D-MSA's bias,
and goes into ``F.scaled_dot_product_attention`` without any mask (see
:func:`attention_with_key_bias`), so PyTorch may use its flash kernels and nothing of size N x N is
materialised outside the kernel. The price is one more window per axis in shifted blocks (attention
products only; projections and MLP run on the real tokens). A grid that is not a multiple of the
window is padded the same way. The network traces into one graph under ``torch.compile(fullgraph=True)``
(tests/test_dyntransnet.py, aot_eager backend on the CPU).

Tokenisation: the patch size must be divisible, per axis, by the product of all strides (nnU-Net's
plans always are). Anything else is rejected with a ValueError that names the nearest sizes that
work, at construction when ``patch_size`` is given (the trainer passes the plans' patch size) and
otherwise at the first forward.

Ablations (paper Tables 2-3): ``dynamic_bias=False`` (plain MSA), ``fusion="concat"`` /
``fusion="sum"`` (FM-M replaced by concatenation + 1x1 conv / by a learned weighted sum),
``residual_module=False`` (no RM: the fusion output goes straight on).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_liver_ext.networks.blocks import numel, pointwise_conv, spatial_dims
from nnunet_liver_ext.networks.contract import NetworkOutput

FUSIONS = ("fmm", "concat", "sum")
# the arch_kwargs keys nnU-Net's PlainConvUNet / ResidualEncoderUNet plans carry
_PLANS_KEYS = {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
               "n_blocks_per_stage", "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs",
               "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "nonlin_first"}


def _per_axis(value, dims: int, name: str) -> Tuple[int, ...]:
    values = (value,) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != dims or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or {dims} positive ints, got {value!r}")
    return values


def cumulative_strides(strides: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Downsampling factor of every stage relative to the input, per axis."""
    return [tuple(int(v) for v in f) for f in np.cumprod(np.asarray(strides, dtype=np.int64), axis=0)]


def check_patch_size(patch_size: Sequence[int], factor: Sequence[int]) -> None:
    """ValueError unless every axis of ``patch_size`` is a multiple of ``factor`` (the network's total
    downsampling); the message names the nearest sizes that work."""
    patch_size = [int(p) for p in patch_size]
    if len(patch_size) != len(factor):
        raise ValueError(f"patch size {patch_size} has {len(patch_size)} axes, the network {len(factor)}")
    if all(p % f == 0 and p > 0 for p, f in zip(patch_size, factor)):
        return
    up = [math.ceil(p / f) * f for p, f in zip(patch_size, factor)]
    down = [max(f, (p // f) * f) for p, f in zip(patch_size, factor)]
    raise ValueError(f"DynTransNet cannot tokenise a patch of {patch_size}: patch embedding and patch merging "
                     f"downsample by {list(factor)} in total, so every axis must be a multiple of that; "
                     f"a patch size of {up} would work (or {down})")


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, *G, C)`` with every ``G_i`` a multiple of ``window_i`` -> ``(B * windows, prod(window), C)``."""
    b, *grid, c = x.shape
    dims = len(grid)
    counts = [g // w for g, w in zip(grid, window)]
    shape = [b]
    for n, w in zip(counts, window):
        shape += [n, w]
    x = x.reshape(*shape, c)
    order = [0] + [1 + 2 * i for i in range(dims)] + [2 + 2 * i for i in range(dims)] + [1 + 2 * dims]
    return x.permute(order).reshape(-1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], grid: Sequence[int], batch: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * windows, prod(window), C)`` -> ``(B, *G, C)``."""
    dims = len(grid)
    counts = [g // w for g, w in zip(grid, window)]
    c = windows.shape[-1]
    x = windows.reshape(batch, *counts, *window, c)
    order = [0]
    for i in range(dims):
        order += [1 + i, 1 + dims + i]
    order.append(1 + 2 * dims)
    return x.permute(order).reshape(batch, *grid, c)


def _pad_grid(x: torch.Tensor, before: Sequence[int], after: Sequence[int]) -> torch.Tensor:
    """Zero-pads the grid axes of a channel-last ``(B, *G, C)`` tensor."""
    pad = [0, 0]  # channels (F.pad lists the last axis first)
    for lo, hi in zip(reversed(before), reversed(after)):
        pad += [lo, hi]
    return F.pad(x, pad)


#: additive score of a padded key: finite, so no 0 * inf appears in any backward pass, and far enough
#: below any real score that its softmax weight is exactly 0 in fp16 and fp32
MASKED_KEY_BIAS = -1e4
BIAS_MODES = ("qk", "mask")


def attention_with_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor],
                            mode: str = "qk") -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + key_bias[..., None, :]) v`` through ``F.scaled_dot_product_attention``.

    q, k, v ``(..., heads, N, d)``; key_bias ``(..., heads or 1, N)`` (one additive score per key,
    broadcast along the query axis) or None.

    ``mode="mask"`` passes the bias as the additive float ``attn_mask`` ``(..., heads, 1, N)``.
    ``mode="qk"`` (default) appends one channel to queries (the constant ``sqrt(d)``) and keys (the
    bias) and a zero channel to values, with the scale kept at ``1 / sqrt(d)``: the score of query i
    and key j becomes ``q_i k_j / sqrt(d) + bias_j``, the same sum, with no mask. A key-only bias is
    exactly representable this way; it lets PyTorch pick its flash kernels (which take no float
    mask) and never materialises a mask. Both keep the bias in the scores before the softmax, and on
    CUDA the fused kernels hold the softmax statistics in fp32 under fp16 autocast.
    """
    if key_bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "mask":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias.unsqueeze(-2).to(q.dtype))
    d = q.shape[-1]
    bias = key_bias.to(k.dtype).unsqueeze(-1).expand(*k.shape[:-1], 1)
    q = torch.cat((q, q.new_full((*q.shape[:-1], 1), math.sqrt(d))), -1)
    k = torch.cat((k, bias), -1)
    v = torch.cat((v, v.new_zeros((*v.shape[:-1], 1))), -1)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))[..., :d]


class DynamicMSA(nn.Module):
    """Dynamic multi-head self-attention (D-MSA, algorithm 1) on channel-last tokens.

    Per head h: ``A_h = softmax(Q_h K_h^T / sqrt(d_h) + Delta_h) V_h``, then ``Concat_h(A_h) W_o``,
    with the input-dependent bias ``Delta_h = ReLU(X W_d^h + b_d^h)``.

    How Delta broadcasts (the paper leaves it open): ``W_d`` maps every token j to one scalar per
    head, ``Delta_h[j]``, which is added to the score of every query with key j, i.e. Delta_h is a
    key-dependent bias of shape ``(heads, 1, N)`` broadcast along the query axis of the ``N x N``
    score matrix. A token that the input makes salient is attended to more by every query.

    The attention runs through ``F.scaled_dot_product_attention`` (:func:`attention_with_key_bias`;
    ``bias_mode`` "qk" or "mask"); padded keys of a window get :data:`MASKED_KEY_BIAS`.
    ``dynamic_bias=False`` is plain multi-head self-attention (the ablation): no ``W_d``, no bias.

    forward(x ``(B, *G, C)``, window ``None`` (global) or per-axis window, shift per axis) -> ``(B, *G, C)``.
    """

    def __init__(self, dim: int, num_heads: int, dynamic_bias: bool = True, qkv_bias: bool = True,
                 bias_mode: str = "qk"):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}")
        self.dim, self.num_heads, self.bias_mode = dim, num_heads, bias_mode
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.delta = nn.Linear(dim, num_heads) if dynamic_bias else None
        self.proj = nn.Linear(dim, dim)

    def dynamic_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``Delta`` per token and head, ``(B, *G, heads)``; None for plain MSA."""
        return F.relu(self.delta(x)) if self.delta is not None else None

    def forward(self, x: torch.Tensor, window: Optional[Sequence[int]] = None,
                shift: Optional[Sequence[int]] = None) -> torch.Tensor:
        b, *grid, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        qkv = self.qkv(x)
        bias = self.dynamic_bias(x)
        if window is None:
            tokens = math.prod(grid)
            q, k, v = qkv.reshape(b, tokens, 3, h, d).permute(2, 0, 3, 1, 4)
            key_bias = None if bias is None else bias.reshape(b, tokens, h).transpose(1, 2)
            out = attention_with_key_bias(q, k, v, key_bias, self.bias_mode)
            return self.proj(out.transpose(1, 2).reshape(b, *grid, c))

        shift = tuple(shift) if shift is not None else (0,) * len(grid)
        after = [(-(g + s)) % w for g, s, w in zip(grid, shift, window)]
        padded_grid = [g + s + a for g, s, a in zip(grid, shift, after)]
        key_bias = bias
        if any(shift) or any(after):
            qkv = _pad_grid(qkv, shift, after)
            valid = _pad_grid(x.new_ones(1, *grid, 1, dtype=torch.bool), shift, after)
            key_bias = bias if bias is not None else qkv.new_zeros(1, *grid, 1)
            key_bias = _pad_grid(key_bias, shift, after).masked_fill(~valid, MASKED_KEY_BIAS)
            key_bias = key_bias.expand(b, *key_bias.shape[1:])
        windows = window_partition(qkv, window)  # (B * nW, N, 3C)
        n = windows.shape[1]
        q, k, v = windows.reshape(-1, n, 3, h, d).permute(2, 0, 3, 1, 4)
        if key_bias is not None:
            key_bias = window_partition(key_bias, window).transpose(1, 2)  # (B * nW, heads or 1, N)
        out = attention_with_key_bias(q, k, v, key_bias, self.bias_mode)
        out = window_reverse(out.transpose(1, 2).reshape(-1, n, c), window, padded_grid, b)
        out = out[(slice(None), *(slice(s, s + g) for s, g in zip(shift, grid)))]
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + D-MSA(LN(x))``, then ``x + MLP(LN(x))`` (GELU, ``mlp_ratio``).
    Tokens ``(B, *G, C)`` in and out."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dynamic_bias: bool = True,
                 bias_mode: str = "qk"):
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DynamicMSA(dim, num_heads, dynamic_bias, bias_mode=bias_mode)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, window: Optional[Sequence[int]] = None,
                shift: Optional[Sequence[int]] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), window, shift)
        return x + self.mlp(self.norm2(x))


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, linearly projected (a convolution with kernel = stride = patch), then
    LayerNorm. ``(B, C_in, *S)`` -> tokens ``(B, *S / patch, C)``."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, patch: Sequence[int]):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = conv_op(in_channels, out_channels, kernel_size=self.patch, stride=self.patch)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).movedim(1, -1))


class PatchMerging(nn.Module):
    """Swin's patch merging with a per-axis factor: the ``prod(factor)`` neighbouring tokens are
    concatenated, layer-normalised and projected. Tokens ``(B, *G, C_in)`` -> ``(B, *G / factor, C_out)``."""

    def __init__(self, in_channels: int, out_channels: int, factor: Sequence[int]):
        super().__init__()
        self.factor = tuple(factor)
        gathered = in_channels * int(np.prod(self.factor))
        self.norm = nn.LayerNorm(gathered)
        self.reduction = nn.Linear(gathered, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *grid, c = x.shape
        dims = len(grid)
        shape = [b]
        for g, f in zip(grid, self.factor):
            shape += [g // f, f]
        x = x.reshape(*shape, c)
        order = [0] + [1 + 2 * i for i in range(dims)] + [2 + 2 * i for i in range(dims)] + [1 + 2 * dims]
        x = x.permute(order).reshape(b, *[g // f for g, f in zip(grid, self.factor)], -1)
        return self.reduction(self.norm(x))


class EncoderStage(nn.Module):
    """Patch embedding (first transformer stage) or patch merging, depth-wise convolutional positional
    encoding, ``depth`` transformer blocks (windowed or global, see :meth:`attention_layout`), LayerNorm.

    forward: the input image ``(B, C_in, *S)`` (embedding stage) or the previous stage's skip
    ``(B, C_in, *S)``; returns this stage's skip ``(B, C, *S / factor)`` (channels first)."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, channels: int, factor: Sequence[int],
                 embed: bool, depth: int, num_heads: int, mlp_ratio: float, dynamic_bias: bool,
                 window_size: Sequence[int], max_global_tokens: int, kernel_size: Sequence[int],
                 positional_encoding: bool, bias_mode: str = "qk"):
        super().__init__()
        self.embed = embed
        self.down = PatchEmbedding(conv_op, in_channels, channels, factor) if embed \
            else PatchMerging(in_channels, channels, factor)
        self.pos = conv_op(channels, channels, kernel_size, padding=[k // 2 for k in kernel_size], groups=channels) \
            if positional_encoding else None
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, mlp_ratio, dynamic_bias, bias_mode)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(channels)
        self.window_size = tuple(window_size)
        self.max_global_tokens = max_global_tokens
        self.channels, self.num_heads = channels, num_heads

    def attention_layout(self, grid: Sequence[int]) -> List[Tuple[Optional[Tuple[int, ...]], Tuple[int, ...]]]:
        """(window, shift) of every block for a token grid: global attention (window None) when the grid
        has at most ``max_global_tokens`` tokens, else windows clipped to the grid, every second block
        shifted by half a window along the axes longer than the window."""
        if math.prod(grid) <= self.max_global_tokens:
            return [(None, (0,) * len(grid))] * len(self.blocks)
        window = tuple(min(w, g) for w, g in zip(self.window_size, grid))
        shifted = tuple(w // 2 if g > w else 0 for w, g in zip(window, grid))
        return [(window, shifted if i % 2 and any(shifted) else (0,) * len(grid)) for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.down(x if self.embed else x.movedim(1, -1))
        if self.pos is not None:
            tokens = tokens + self.pos(tokens.movedim(-1, 1)).movedim(1, -1)
        for block, (window, shift) in zip(self.blocks, self.attention_layout(tokens.shape[1:-1])):
            tokens = block(tokens, window, shift)
        return self.norm(tokens).movedim(-1, 1)

    def compute_conv_feature_map_size(self, grid: Sequence[int], in_channels: int) -> np.int64:
        """Elements of this stage's feature maps for a token grid: the down-sampling, the positional
        encoding, per block the projections, D-MSA bias, MLP and residuals on the real tokens plus q, k,
        v, the key mask and the attention output on the padded window layout (fused attention kernels
        keep O(tokens) softmax statistics, counted as one per head and token), and the skip."""
        c, h = self.channels, self.num_heads
        tokens = numel(*grid)
        hidden = self.blocks[0].mlp[0].out_features if len(self.blocks) else 0
        total = tokens * c * 2  # down-sampling output (+ its LayerNorm)
        if not self.embed:
            total += tokens * in_channels * int(np.prod(self.down.factor)) * 2  # gathered neighbours (+ LN)
        if self.pos is not None:
            total += tokens * c
        for window, shift in self.attention_layout(grid):
            padded = tokens
            if window is not None:
                padded = numel(*[math.ceil((g + s) / w) * w for g, s, w in zip(grid, shift, window)])
            total += tokens * (c + 3 * c + h + c + c + c + hidden + c + c)
            total += padded * (3 * c + c + 2 * h)
        return total + tokens * c  # skip


class FeatureMix(nn.Module):
    """FM-M (algorithm 2): ``g = W_g D``, ``x = W_x E`` (1x1 convs to ``inter_channels``),
    ``psi = sigmoid(W_psi ReLU(g + x))`` (one channel, in [0, 1]), ``E' = psi * E``,
    ``F = W_f Concat(D, E')``.

    forward(D ``(B, C_d, *S)``, E ``(B, C_e, *S)``, return_gate=False) -> F ``(B, C_out, *S)``
    (and psi ``(B, 1, *S)`` with ``return_gate``)."""

    def __init__(self, conv_op: Type[_ConvNd], decoder_channels: int, encoder_channels: int, out_channels: int,
                 inter_channels: Optional[int] = None):
        super().__init__()
        inter = inter_channels or max(1, encoder_channels // 2)  # ours: Attention U-Net's F_int = F_l / 2
        self.w_g = conv_op(decoder_channels, inter, 1)
        self.w_x = conv_op(encoder_channels, inter, 1)
        self.w_psi = conv_op(inter, 1, 1)
        self.w_f = conv_op(decoder_channels + encoder_channels, out_channels, 1)

    def forward(self, decoder: torch.Tensor, encoder: torch.Tensor, return_gate: bool = False):
        psi = torch.sigmoid(pointwise_conv(self.w_psi, F.relu(self.w_g(decoder) + self.w_x(encoder))))
        fused = self.w_f(torch.cat((decoder, psi * encoder), 1))
        return (fused, psi) if return_gate else fused


class ConcatFusion(nn.Module):
    """Ablation (Table 2): ``F = W_f Concat(D, E)`` (1x1 conv), no gating."""

    def __init__(self, conv_op: Type[_ConvNd], decoder_channels: int, encoder_channels: int, out_channels: int):
        super().__init__()
        self.w_f = conv_op(decoder_channels + encoder_channels, out_channels, 1)

    def forward(self, decoder: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        return self.w_f(torch.cat((decoder, encoder), 1))


class WeightedSumFusion(nn.Module):
    """Ablation (Table 2): ``F = a * D + b * E`` with two learned scalars (both start at 0.5). D and E
    have the same width here (the transposed convolution upsamples to the skip's width)."""

    def __init__(self, decoder_channels: int, encoder_channels: int, out_channels: int):
        super().__init__()
        if not decoder_channels == encoder_channels == out_channels:
            raise ValueError(f"weighted-sum fusion needs equal widths, got {decoder_channels}, {encoder_channels}, "
                             f"{out_channels}")
        self.weights = nn.Parameter(torch.full((2,), 0.5))

    def forward(self, decoder: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        return self.weights[0] * decoder + self.weights[1] * encoder


class ResidualModule(nn.Module):
    """RM (algorithm 3): two [conv -> norm -> nonlin] blocks (the plans' kernel size, norm and nonlin:
    3x3x3, InstanceNorm, LeakyReLU in nnU-Net's default plans) plus the identity, ``F = X + Y6``.
    ``(B, C, *S)`` in and out."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size, conv_bias: bool, norm_op,
                 norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        self.convs = StackedConvBlocks(2, conv_op, channels, channels, kernel_size, 1, conv_bias, norm_op,
                                       norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convs(x)


class DynTransDecoder(nn.Module):
    """The convolutional decoder: per stage from the bottleneck up, transposed convolution, fusion
    (FM-M or an ablation's), RM (unless ablated) and a 1x1(x1) segmentation layer. ``deep_supervision``
    is an attribute, as on nnU-Net's ``UNetDecoder`` (nnU-Net's trainer sets ``network.decoder.deep_supervision``).

    forward(skips, highest resolution first) -> logits, or the list highest resolution first."""

    def __init__(self, conv_op: Type[_ConvNd], features: Sequence[int], strides: Sequence[Sequence[int]],
                 kernels: Sequence[Sequence[int]], num_classes: int, deep_supervision: bool, fusion: str,
                 residual_module: bool, conv_bias: bool, norm_args: tuple):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        transpconv = get_matching_convtransp(conv_op=conv_op)
        self.upsamples, self.fusions, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.refinements = nn.ModuleList() if residual_module else None
        for s in range(len(features) - 1, 0, -1):  # computation order: from the bottleneck up
            below, skip = features[s], features[s - 1]
            self.upsamples.append(transpconv(below, skip, strides[s], strides[s], bias=conv_bias))
            if fusion == "fmm":
                self.fusions.append(FeatureMix(conv_op, skip, skip, skip))
            elif fusion == "concat":
                self.fusions.append(ConcatFusion(conv_op, skip, skip, skip))
            else:
                self.fusions.append(WeightedSumFusion(skip, skip, skip))
            if residual_module:
                self.refinements.append(ResidualModule(conv_op, skip, kernels[s - 1], conv_bias, *norm_args))
            # built for every stage whether or not deep supervision is on, so checkpoints load either way
            self.seg_layers.append(conv_op(skip, num_classes, 1, 1, 0, bias=True))

    def forward(self, skips: List[torch.Tensor]):
        x = skips[-1]
        outputs = []
        last = len(self.upsamples) - 1
        for s, (up, fuse) in enumerate(zip(self.upsamples, self.fusions)):
            x = fuse(up(x), skips[-(s + 2)])
            if self.refinements is not None:
                x = self.refinements[s](x)
            if self.deep_supervision or s == last:
                outputs.append(self.seg_layers[s](x))
        return outputs[::-1] if self.deep_supervision else outputs[0]

    def compute_conv_feature_map_size(self, sizes: Sequence[Sequence[int]], features: Sequence[int]) -> np.int64:
        """``sizes``/``features``: spatial size and width of every encoder stage."""
        total = np.int64(0)
        for s, fuse in enumerate(self.fusions):
            stage = len(features) - 2 - s
            c, voxels = features[stage], numel(*sizes[stage])
            total += voxels * c  # upsampled
            if isinstance(fuse, FeatureMix):
                inter = fuse.w_g.out_channels
                total += voxels * (2 * inter + inter + 1 + c + 2 * c + c)  # g, x, relu(g+x), psi, E', concat, F
            elif isinstance(fuse, ConcatFusion):
                total += voxels * (2 * c + c)
            else:
                total += voxels * c
            if self.refinements is not None:
                total += self.refinements[s].convs.compute_conv_feature_map_size(sizes[stage]) + voxels * c
            if self.deep_supervision or s == len(self.fusions) - 1:
                total += voxels * self.num_classes
        return total


class DynTransNet(nn.Module):
    """DynTransNet built from nnU-Net plans (2d or 3d, from ``conv_op``).

    Args (plans): ``input_channels`` (the phases, as channels), ``num_classes`` (segmentation outputs),
        ``deep_supervision``, and the plans' ``arch_kwargs``: ``n_stages`` (>= 2), ``features_per_stage``
        (stage widths; stage 0 is the convolutional stem, stages >= 1 the transformer stages),
        ``strides`` (``strides[0] * strides[1]`` is the patch embedding's patch, ``strides[s]`` the
        merging factor of stage s), ``kernel_sizes`` (stem, positional encoding, RM), ``conv_op``,
        ``conv_bias``, norm / dropout / nonlin ops and kwargs, ``n_conv_per_stage`` (only its first
        entry is used: the stem's convolutions). ``n_conv_per_stage_decoder``, ``n_blocks_per_stage``
        and ``nonlin_first`` are accepted and unused (RM fixes the decoder's convolutions at two).
    Args (method):
        num_case_classes: accepted for the package's network contract; DynTransNet builds no case head.
        patch_size: the plans' patch size; checked against the tokenisation at construction.
        window_size: attention window in tokens, an int or one per axis [8].
        max_global_tokens: a stage with at most this many tokens attends globally [1024].
        depth: transformer blocks per stage [2: a window block and a shifted-window block].
        head_dim: channels per attention head; a stage has ``max(1, width // head_dim)`` heads [32].
        mlp_ratio: MLP width relative to the stage width [4].
        dynamic_bias: D-MSA (True) or plain multi-head self-attention (False, ablation).
        fusion: ``fmm`` (FM-M), ``concat`` or ``sum`` (ablations).
        residual_module: RM after every fusion (False: ablation).
        positional_encoding: depth-wise convolution after embedding / merging (ours).
        attention_bias_mode: how Delta reaches ``F.scaled_dot_product_attention``: ``qk`` (an extra
            query/key channel, no mask) or ``mask`` (additive float mask); the same scores
            (:func:`attention_with_key_bias`).

    forward(x ``(B, input_channels, *S)``, heads=False, lesion_mask=None) -> seg logits
    ``(B, num_classes, *S)``, or with deep supervision the list of ``n_stages - 1`` logits at stages
    ``0 .. n_stages - 2`` (highest resolution first). ``heads=True`` returns ``NetworkOutput(seg=...)``
    with no case-level outputs; ``lesion_mask`` is accepted and ignored.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 num_case_classes: int = 0, patch_size: Optional[Sequence[int]] = None,
                 window_size: Union[int, Sequence[int]] = 8, max_global_tokens: int = 1024, depth: int = 2,
                 head_dim: int = 32, mlp_ratio: float = 4.0, dynamic_bias: bool = True, fusion: str = "fmm",
                 residual_module: bool = True, positional_encoding: bool = True, attention_bias_mode: str = "qk",
                 **arch_kwargs):
        super().__init__()
        unknown = sorted(set(arch_kwargs) - _PLANS_KEYS)
        if unknown:
            raise ValueError(f"DynTransNet got unknown arguments {unknown}")
        missing = [k for k in ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides")
                   if k not in arch_kwargs]
        if missing:
            raise ValueError(f"plans arch_kwargs lack {missing}; got keys {sorted(arch_kwargs)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if num_case_classes < 0:
            raise ValueError(f"num_case_classes must be >= 0, got {num_case_classes}")
        if depth < 1 or head_dim < 1 or mlp_ratio <= 0 or max_global_tokens < 0:
            raise ValueError(f"need depth >= 1, head_dim >= 1, mlp_ratio > 0, max_global_tokens >= 0; got {depth}, "
                             f"{head_dim}, {mlp_ratio}, {max_global_tokens}")
        self.conv_op: Type[_ConvNd] = arch_kwargs["conv_op"]
        dims = spatial_dims(self.conv_op)
        n_stages = int(arch_kwargs["n_stages"])
        features = [int(f) for f in arch_kwargs["features_per_stage"]]
        strides = [_per_axis(s, dims, "strides") for s in arch_kwargs["strides"]]
        kernels = [_per_axis(k, dims, "kernel_sizes") for k in arch_kwargs["kernel_sizes"]]
        if n_stages < 2:
            raise ValueError(f"DynTransNet needs n_stages >= 2 (a stem and a transformer stage), got {n_stages}")
        if not len(features) == len(strides) == len(kernels) == n_stages:
            raise ValueError(f"features_per_stage, strides and kernel_sizes need {n_stages} entries each")
        self.window_size = _per_axis(window_size, dims, "window_size")
        self.num_classes = num_classes
        self.strides = strides
        self.features = features
        self.total_stride = cumulative_strides(strides)[-1]
        if patch_size is not None:
            check_patch_size(patch_size, self.total_stride)
        self.patch_size = None if patch_size is None else tuple(int(p) for p in patch_size)

        conv_bias = arch_kwargs.get("conv_bias", True)
        norm = (arch_kwargs.get("norm_op"), arch_kwargs.get("norm_op_kwargs"), arch_kwargs.get("dropout_op"),
                arch_kwargs.get("dropout_op_kwargs"), arch_kwargs.get("nonlin"), arch_kwargs.get("nonlin_kwargs"))
        stem_convs = list(arch_kwargs.get("n_conv_per_stage") or [2])[0]
        self.stem = StackedConvBlocks(stem_convs, self.conv_op, input_channels, features[0], kernels[0], strides[0],
                                      conv_bias, *norm)
        patch = tuple(a * b for a, b in zip(strides[0], strides[1]))
        self.stages = nn.ModuleList()
        for s in range(1, n_stages):
            heads = max(1, features[s] // head_dim)
            if features[s] % heads:
                raise ValueError(f"stage {s} width {features[s]} is not divisible into {heads} heads of about "
                                 f"{head_dim} channels; choose another head_dim")
            self.stages.append(EncoderStage(
                self.conv_op, input_channels if s == 1 else features[s - 1], features[s],
                patch if s == 1 else strides[s], s == 1, depth, heads, mlp_ratio, dynamic_bias, self.window_size,
                max_global_tokens, kernels[s], positional_encoding, attention_bias_mode))

        self.decoder = DynTransDecoder(self.conv_op, features, strides, kernels, num_classes, deep_supervision, fusion,
                                       residual_module, conv_bias, norm)

        self.apply(InitWeights_He(1e-2))  # nnU-Net's conv init; Linear layers get the ViT init below
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check_input(self, spatial: Sequence[int]) -> None:
        if self.patch_size is None or tuple(spatial) != self.patch_size:
            check_patch_size(spatial, self.total_stride)

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Skips ``(B, features_per_stage[s], *S_s)`` of every stage, highest resolution first."""
        skips = [self.stem(x)]
        for i, stage in enumerate(self.stages):
            skips.append(stage(x if i == 0 else skips[-1]))
        return skips

    def forward(self, x: torch.Tensor, heads: bool = False, lesion_mask: Optional[torch.Tensor] = None):
        self._check_input(x.shape[2:])
        seg = self.decoder(self.encode(x))
        return NetworkOutput(seg=seg) if heads else seg

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of one sample for nnU-Net-style VRAM planning: stem, every transformer
        stage (tokens, projections, MLP, and q/k/v/masks on the padded window layout; see
        :meth:`EncoderStage.compute_conv_feature_map_size`), and per decoder stage the upsampling, the
        fusion's intermediate maps, RM and the segmentation output; plus the input, which the stem and the
        patch embedding keep for their weight gradients (the phases are input channels, so this is where
        their number shows)."""
        check_patch_size(input_size, self.total_stride)
        in_channels = self.stem.convs[0].conv.in_channels
        total = np.int64(self.stem.compute_conv_feature_map_size(input_size)) + numel(in_channels, *input_size)
        sizes = []
        size = list(input_size)
        for stride in self.strides:
            size = [i // j for i, j in zip(size, stride)]
            sizes.append(size)
        for s, stage in enumerate(self.stages, start=1):
            total += stage.compute_conv_feature_map_size(sizes[s], in_channels if s == 1 else self.features[s - 1])
        total += self.decoder.compute_conv_feature_map_size(sizes, self.features)
        return int(total)
