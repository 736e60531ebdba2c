"""Mamba-enhanced codebook U-Net for liver and tumor segmentation (../shared/seeds/mamba_codebook_unet.txt;
spec in ../shared/METHODS.md, which restores the equations lost in the text extraction).

The plans' U-Net (dynamic-network-architectures' PlainConvEncoder / ResidualEncoder and UNetDecoder)
plus three modules:

- **MCE** (multi-scale context encoder, Fig. 3): after every encoder stage, in the encoder's path
  (the next stage sees the refined features), three parallel branches on the stage's features
  ``(B, C, *S)``: 1x1 -> k; 1x1 -> dilated k (a larger receptive field at the cost of k); global
  average pooling -> 1x1, broadcast back. Concatenated and fused by a 1x1 conv, added to the
  input (ours: residual, so an untrained MCE does not block the plain U-Net's path). ``k`` is the
  stage's kernel size from the plans, and the dilation applies only along axes where ``k > 1``
  (anisotropic plans keep their in-plane-only kernels).
- **Codebook** (VQ, eqs. 1-5) on the bottleneck: each location's feature vector ``z`` snaps to its
  nearest of K learnable codes (squared Euclidean distance, fp32), straight-through estimator
  ``z + sg(z_q - z)``, loss ``L_vq = ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2`` (means over
  elements) returned as ``aux_losses["vq"]``. The codes train by gradient (no EMA), so DDP sees
  an ordinary parameter. Ours: codes start from the bottleneck features of the first training
  batch (random codes far from the features collapse onto one code); optional dead-code
  restart; usage counters (perplexity, dead codes) the trainer logs every epoch.
- **GFR** (global feature representation, eq. 6): a Mamba block over the (quantized) bottleneck
  flattened to a sequence ordered along z (``gfr_scan="volume"``: z slowest, so the scan moves
  slice after slice; ``"columns"``: one sequence along z per in-plane location), pre-norm
  residual, optionally bidirectional (a second block on the reversed sequence, summed, Vim
  style). The block is ``networks.ssd.Mamba2SSD`` (mamba_ssm.Mamba2's parameters; mamba-ssm's
  kernel on CUDA when it imports). ``gfr="mhsa"`` puts multi-head self-attention at the same place
  (the paper's Table 3 comparison).

Shapes: ``*S`` is ``(D, H, W)`` for 3d plans and ``(H, W)`` for 2d plans (z is then the first
axis, H).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_liver_ext.networks.blocks import autocast_off, build_encoder, encoder_skip_sizes, numel, spatial_dims
from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.ssd import Mamba2SSD
from nnunet_liver_ext.networks.transfer import load_pretrained_state

GFR_KINDS = ("mamba", "mhsa", None)
GFR_SCANS = ("volume", "columns")


def _as_list(value, dims: int) -> List[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * dims


def _conv_norm_act(conv_op, in_ch: int, out_ch: int, kernel, dilation, norm_op, norm_op_kwargs, nonlin,
                   nonlin_kwargs, bias: bool, act: bool = True) -> nn.Sequential:
    padding = [(k - 1) // 2 * d for k, d in zip(kernel, dilation)]
    layers = [conv_op(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=bias)]
    if norm_op is not None:
        layers.append(norm_op(out_ch, **(norm_op_kwargs or {})))
    if act and nonlin is not None:
        layers.append(nonlin(**(nonlin_kwargs or {})))
    return nn.Sequential(*layers)


class MultiScaleContext(nn.Module):
    """MCE block: ``x + fuse([1x1->k, 1x1->dilated k, GAP->1x1])``, ``(B, C, *S) -> (B, C, *S)``.

    ``branch_channels`` (default ``C // 2``, at least 1) is each branch's width; ``kernel_size`` the
    stage's kernel from the plans; ``dilation`` applies along the axes where the kernel is > 1.
    Norm and nonlinearity are the plans' (the pooled branch has no norm: one value per channel).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_size, dilation: int = 2,
                 branch_channels: Optional[int] = None, conv_bias: bool = False, norm_op=None,
                 norm_op_kwargs=None, nonlin=None, nonlin_kwargs=None):
        super().__init__()
        dims = spatial_dims(conv_op)
        if dilation < 1:
            raise ValueError(f"MCE dilation must be >= 1, got {dilation}")
        kernel = _as_list(kernel_size, dims)
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"MCE kernel sizes must be odd, got {kernel}")
        bc = branch_channels or max(1, channels // 2)
        one, no_dil = [1] * dims, [1] * dims
        dilated = [dilation if k > 1 else 1 for k in kernel]
        norm = dict(norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                    bias=conv_bias)
        self.local = nn.Sequential(_conv_norm_act(conv_op, channels, bc, one, no_dil, **norm),
                                   _conv_norm_act(conv_op, bc, bc, kernel, no_dil, **norm))
        self.dilated = nn.Sequential(_conv_norm_act(conv_op, channels, bc, one, no_dil, **norm),
                                     _conv_norm_act(conv_op, bc, bc, kernel, dilated, **norm))
        self.pooled = _conv_norm_act(conv_op, channels, bc, one, no_dil, None, None, nonlin, nonlin_kwargs, True)
        self.fuse = _conv_norm_act(conv_op, 3 * bc, channels, one, no_dil, act=False, **norm)
        self.branch_channels = bc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return x + self.fuse(torch.cat((self.local(x), self.dilated(x), pooled), 1))

    def feature_map_size(self, channels: int, size: Sequence[int]) -> int:
        """Elements of its intermediate maps for one sample (VRAM planning)."""
        bc = self.branch_channels
        # two convs (+ norm) per conv branch, the broadcast pooled branch, the concatenation, fuse, sum
        return int(numel(bc * 4 + bc + 3 * bc + 2 * channels, *size))


class VectorQuantizer(nn.Module):
    """Codebook (VQ) of ``num_codes`` learnable ``channels``-dim codes, straight-through.

    ``forward(z (B, C, *S)) -> (z_st (B, C, *S), loss (), indices (B, *S))`` with
    ``loss = ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2`` (means). Distances, the nearest-code
    search and the loss run in fp32 whatever autocast does.

    Training-mode extras (no effect in eval): the codes are set from the first batch's features
    (``initialized`` buffer, saved with the checkpoint); usage counters for :meth:`usage_stats`;
    with ``dead_code_restart``, a code whose running share of assignments (EMA with
    ``usage_decay``) fell below ``restart_threshold / num_codes`` is moved onto a random feature
    vector of the current batch. Under DDP the initialisation and restarts come from rank 0, so
    the replicas' codebooks stay equal. All of it is branch-free tensor code (no host sync, no graph
    break under ``torch.compile``): every training step draws ``num_codes`` candidate vectors and
    keeps those of the codes to replace.
    """

    def __init__(self, channels: int, num_codes: int = 64, beta: float = 0.25, dead_code_restart: bool = False,
                 restart_threshold: float = 0.01, usage_decay: float = 0.99):
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"codebook size must be >= 2, got {num_codes}")
        if beta < 0:
            raise ValueError(f"commitment weight beta must be >= 0, got {beta}")
        if not 0 <= usage_decay < 1:
            raise ValueError(f"usage_decay must be in [0, 1), got {usage_decay}")
        if not 0 < restart_threshold < 1:
            raise ValueError(f"restart_threshold must be in (0, 1), got {restart_threshold}")
        self.num_codes, self.channels, self.beta = num_codes, channels, beta
        self.dead_code_restart = dead_code_restart
        self.restart_threshold, self.usage_decay = restart_threshold, usage_decay
        self.codes = nn.Parameter(torch.randn(num_codes, channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("usage_ema", torch.full((num_codes,), 1.0 / num_codes))
        # per-epoch counters: plain int64 attributes, not buffers (not part of the model, and DDP's buffer
        # broadcast from rank 0 would overwrite the other ranks' counts every step); ``_apply`` moves them
        # with the module, and they are updated in place so a compiled forward keeps no stale copy
        self.counts = torch.zeros(num_codes, dtype=torch.int64)
        self.restarted = torch.zeros((), dtype=torch.int64)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, channels={self.channels}, beta={self.beta}, " \
               f"dead_code_restart={self.dead_code_restart}"

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # integer tensors: .half() / .float() leave them alone, .to(device) / .cuda() move them
        self.counts, self.restarted = fn(self.counts), fn(self.restarted)
        return self

    @staticmethod
    def _from_rank0(tensor: torch.Tensor) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(tensor, 0)

    @torch.no_grad()
    def _maintain(self, flat: torch.Tensor) -> None:
        """Codes not yet initialised, or dead (with ``dead_code_restart``), move onto random feature
        vectors of ``flat`` ``(N, C)``; chosen with ``torch.where``, not ``if``, so it never syncs."""
        k = self.num_codes
        replace = ~self.initialized.expand(k)
        if self.dead_code_restart:
            replace = replace | (self.usage_ema < self.restart_threshold / k)
        # distinct vectors while the batch has k of them: drawn with replacement, ~k/e codes would start as twins
        # whose nearest-code choice a 1e-3 noise decides
        n = flat.shape[0]
        index = torch.randperm(n, device=flat.device).repeat(-(-k // n))[:k]
        picked = flat[index].float()
        # a little noise, so codes drawn from one vector (fewer tokens than codes) still differ
        new = picked + 1e-3 * picked.std().clamp_min(1e-6) * torch.randn_like(picked)
        # one broadcast carries rank 0's candidates and its choice of codes to replace
        packed = torch.cat((new, replace.float()[:, None]), 1)
        self._from_rank0(packed)
        new, replace = packed[:, :-1], packed[:, -1] > 0.5
        self.restarted.add_((replace & self.initialized).sum())  # a restart, not the first initialisation
        self.codes.copy_(torch.where(replace[:, None], new.to(self.codes.dtype), self.codes))
        self.usage_ema.copy_(torch.where(replace, torch.full_like(self.usage_ema, 1.0 / k), self.usage_ema))
        self.initialized.fill_(True)

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared distances ``(N, K)`` of feature vectors ``(N, C)`` to the codes, fp32 (eq. 1)."""
        codes = self.codes.float()
        flat = flat.float()
        return flat.square().sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.square().sum(1)[None]

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if z.shape[1] != self.channels:
            raise ValueError(f"codebook expects {self.channels} channels, got {z.shape[1]}")
        with autocast_off(z.device.type):
            flat = z.movedim(1, -1).reshape(-1, self.channels).float()
            if self.training:
                self._maintain(flat.detach())
            indices = self.distances(flat.detach()).argmin(1)
            z_q = self.codes.float()[indices]
            loss = F.mse_loss(z_q, flat.detach()) + self.beta * F.mse_loss(flat, z_q.detach())
            z_st = flat + (z_q - flat).detach()
            if self.training:
                with torch.no_grad():
                    # index_add_, not bincount: its output size does not depend on the data
                    counts = torch.zeros_like(self.counts).index_add_(0, indices, torch.ones_like(indices))
                    self.counts.add_(counts)
                    share = counts.float() / max(1, indices.numel())
                    self.usage_ema.mul_(self.usage_decay).add_((1 - self.usage_decay) * share)
        z_st = z_st.view(z.shape[0], *z.shape[2:], self.channels).movedim(-1, 1).to(z.dtype)
        return z_st, loss, indices.view(z.shape[0], *z.shape[2:])

    @torch.no_grad()
    def usage_stats(self, reset: bool = True) -> Dict[str, float]:
        """Codebook usage since the last reset: ``perplexity`` (exp of the entropy of the code
        frequencies; K = all codes used equally, 1 = collapse), ``used_codes``, ``dead_codes``
        (never assigned), ``assignments`` and ``restarted`` codes. Summed over DDP ranks."""
        counts = self.counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # on the module's device, which NCCL needs
        counts = counts.double().cpu()
        total = float(counts.sum())
        p = counts / max(total, 1.0)
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum()) if total > 0 else 0.0
        stats = {"perplexity": math.exp(entropy) if total > 0 else 0.0, "used_codes": int((counts > 0).sum()),
                 "dead_codes": int((counts == 0).sum()), "assignments": int(total), "restarted": int(self.restarted)}
        if reset:
            self.counts.zero_()
            self.restarted.zero_()
        return stats


class SelfAttention(nn.Module):
    """Multi-head self-attention ``(B, L, C) -> (B, L, C)``; the softmax runs in fp32."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        with autocast_off(x.device.type):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return self.proj(y.transpose(1, 2).reshape(b, length, c).to(self.proj.weight.dtype))


def default_headdim(d_inner: int) -> int:
    """The largest of 64, 32, 16, 8 dividing ``d_inner`` (Mamba2 needs ``d_inner % headdim == 0``)."""
    for headdim in (64, 32, 16, 8):
        if d_inner % headdim == 0:
            return headdim
    return d_inner


def default_num_heads(channels: int) -> int:
    for heads in (8, 4, 2):
        if channels % heads == 0:
            return heads
    return 1


class GlobalFeatureRepresentation(nn.Module):
    """GFR: ``x + mixer(LayerNorm(tokens))`` over the bottleneck, ``(B, C, *S) -> (B, C, *S)``.

    ``kind``: ``mamba`` (Mamba2 block, ``d_state`` [16], ``expand`` [2], ``headdim`` [auto]) or
    ``mhsa`` (``num_heads`` [auto: 8, 4, 2 or 1]). ``scan``: ``volume`` (one sequence, z slowest)
    or ``columns`` (one sequence along the first spatial axis per location of the others).
    ``bidirectional``: adds a second mixer run on the reversed sequence.
    """

    def __init__(self, channels: int, kind: str = "mamba", scan: str = "volume", bidirectional: bool = False,
                 d_state: int = 16, expand: int = 2, headdim: Optional[int] = None, num_heads: Optional[int] = None,
                 chunk_size: int = 64, backend: str = "auto"):
        super().__init__()
        if kind not in ("mamba", "mhsa"):
            raise ValueError(f"GFR kind must be 'mamba' or 'mhsa', got {kind!r}")
        if scan not in GFR_SCANS:
            raise ValueError(f"gfr_scan must be one of {GFR_SCANS}, got {scan!r}")
        self.kind, self.scan, self.bidirectional = kind, scan, bidirectional
        self.norm = nn.LayerNorm(channels)

        def mixer() -> nn.Module:
            if kind == "mamba":
                return Mamba2SSD(channels, d_state=d_state, expand=expand,
                                 headdim=headdim or default_headdim(expand * channels), chunk_size=chunk_size,
                                 backend=backend)
            return SelfAttention(channels, num_heads or default_num_heads(channels))

        self.mixer = mixer()
        self.mixer_reverse = mixer() if bidirectional else None

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.scan == "volume":
            return x.flatten(2).transpose(1, 2)  # (B, prod(S), C), first spatial axis slowest
        c, first = x.shape[1], x.shape[2]
        # (B, C, Z, *rest) -> (B * prod(rest), Z, C)
        return x.movedim(1, -1).movedim(1, -2).reshape(-1, first, c)

    def from_tokens(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, c, spatial = like.shape[0], like.shape[1], like.shape[2:]
        if self.scan == "volume":
            return tokens.transpose(1, 2).reshape(b, c, *spatial)
        rest = spatial[1:]
        return tokens.view(b, *rest, spatial[0], c).movedim(-2, 1).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.to_tokens(x)
        normed = self.norm(tokens)
        mixed = self.mixer(normed)
        if self.mixer_reverse is not None:
            mixed = mixed + self.mixer_reverse(normed.flip(1)).flip(1)
        return self.from_tokens(tokens + mixed.to(tokens.dtype), x)

    def feature_map_size(self, channels: int, size: Sequence[int]) -> int:
        """Elements of its intermediate tensors for one sample: norm, projections, scan states (Mamba)
        or the softmax statistics (MHSA), per direction."""
        tokens = int(numel(*size))
        length = size[0] if self.scan == "columns" else tokens
        sequences = tokens // length
        m = self.mixer
        if isinstance(m, Mamba2SSD):
            conv_dim = m.d_inner + 2 * m.ngroups * m.d_state
            per_token = (m.in_proj.out_features + 2 * conv_dim + 3 * m.d_inner + channels)
            cs = min(m.chunk_size, length)
            chunks = -(-length // cs)
            # decay and score matrices within chunks, chunk states (plus the carried ones)
            scan = sequences * m.nheads * chunks * (2 * cs * cs + 2 * m.headdim * m.d_state)
            mix = tokens * per_token + scan
        else:
            # scaled_dot_product_attention's fused kernels (fp32: CPU flash, CUDA memory-efficient) never build
            # the length x length matrix; they keep one softmax statistic per head and token
            mix = tokens * 5 * channels + sequences * m.num_heads * length
        directions = 2 if self.bidirectional else 1
        return int(tokens * channels * 2 + directions * mix)


class MambaCodebookUNet(nn.Module):
    """The Mamba-codebook U-Net built from nnU-Net plans.

    Args (plans): ``input_channels``, ``num_classes`` (segmentation outputs), ``deep_supervision`` and
        the PlainConvUNet / ResidualEncoderUNet ``arch_kwargs`` (``n_stages``, ``features_per_stage``,
        ``conv_op``, ``kernel_sizes``, ``strides``, ``n_conv_per_stage`` or ``n_blocks_per_stage``,
        ``n_conv_per_stage_decoder``, norm/dropout/nonlin ops and kwargs).
    Args (method):
        num_case_classes: must be 0; the method segments only (the trainer writes no classes into
            the plans), and a class head it cannot train is refused rather than silently absent.
        previous_stage_channels: the last input channels that are nnU-Net's cascade input (the previous
            stage's one-hot segmentation; 0 outside a cascade). The network reads them as more input channels,
            as stock nnU-Net does; ``-pretrained_weights`` from a model without them starts their first-layer
            weights at zero (``networks.transfer``).
        stage_features: widths of the U-Net's stages instead of the plans'; fewer entries than the
            plans' stages use the plans' first stages (the paper: 4 levels, about 1.26 M parameters).
        use_mce / mce_dilation / mce_branch_channels: the multi-scale context encoder.
        use_codebook / codebook_size [64] / commitment_beta [0.25] / dead_code_restart /
            restart_threshold / usage_decay: the VQ codebook.
        gfr: ``"mamba"``, ``"mhsa"`` or None (no GFR); gfr_scan, bidirectional, d_state [16],
            expand [2], headdim, num_heads, chunk_size, mamba_backend: see
            :class:`GlobalFeatureRepresentation` and ``networks.ssd``. ``chunk_size`` [64, ours; Mamba2's
            default is 256] changes speed and memory, not results: the PyTorch scan's in-chunk work is
            quadratic in it (benchmarks/results/mamba_codebook/: 64 is ~3x faster than 256 on the CPU at
            the ``_paper`` bottleneck).

    forward(x (B, C_in, *S), heads=False, lesion_mask=None) -> seg logits ``(B, num_classes, *S)`` (the
    list, highest resolution first, with deep supervision) or, with ``heads=True``, a NetworkOutput
    whose ``aux_losses`` holds ``"vq"`` when the codebook is on. ``lesion_mask`` is accepted (the
    network contract) and unused: this method has no case-level head.
    """

    #: ``-pretrained_weights`` (networks.transfer): encoder and decoder from a stock nnU-Net model of the same
    #: plans; MCE, codebook and GFR keep their initialisation (the method has no case-level head)
    transfer_skip_prefixes = ()
    load_pretrained_state = load_pretrained_state

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 num_case_classes: int = 0, previous_stage_channels: int = 0,
                 stage_features: Optional[Sequence[int]] = None, use_mce: bool = True,
                 mce_dilation: int = 2, mce_branch_channels: Optional[int] = None, use_codebook: bool = True,
                 codebook_size: int = 64, commitment_beta: float = 0.25, dead_code_restart: bool = False,
                 restart_threshold: float = 0.01, usage_decay: float = 0.99, gfr: Optional[str] = "mamba",
                 gfr_scan: str = "volume", bidirectional: bool = False, d_state: int = 16, expand: int = 2,
                 headdim: Optional[int] = None, num_heads: Optional[int] = None, chunk_size: int = 64,
                 mamba_backend: str = "auto", **arch_kwargs):
        super().__init__()
        if num_case_classes:
            raise ValueError(f"the Mamba-codebook U-Net has no characterization head; got num_case_classes="
                             f"{num_case_classes} (its trainer builds it with 0)")
        if gfr not in GFR_KINDS:
            raise ValueError(f"gfr must be one of {GFR_KINDS}, got {gfr!r}")
        if not 0 <= previous_stage_channels < input_channels:
            raise ValueError(f"previous_stage_channels must be in [0, input_channels={input_channels}), got "
                             f"{previous_stage_channels}")
        self.previous_stage_channels = previous_stage_channels
        if "n_conv_per_stage_decoder" not in arch_kwargs:
            raise ValueError("arch_kwargs need n_conv_per_stage_decoder (from the nnU-Net plans)")
        arch_kwargs = self._with_stage_features(arch_kwargs, stage_features)
        self.conv_op: Type[_ConvNd] = arch_kwargs["conv_op"]
        dims = spatial_dims(self.conv_op)
        self.encoder = build_encoder(input_channels, arch_kwargs)
        channels: List[int] = list(self.encoder.output_channels)
        bottleneck = channels[-1]
        kernels = arch_kwargs["kernel_sizes"]
        norm = {k: arch_kwargs.get(k) for k in ("norm_op", "norm_op_kwargs", "nonlin", "nonlin_kwargs")}
        self.mce = nn.ModuleList(
            MultiScaleContext(self.conv_op, ch, _as_list(kernels[s], dims), mce_dilation, mce_branch_channels,
                              arch_kwargs.get("conv_bias", False), **norm)
            for s, ch in enumerate(channels)) if use_mce else None
        self.codebook = VectorQuantizer(bottleneck, codebook_size, commitment_beta, dead_code_restart,
                                        restart_threshold, usage_decay) if use_codebook else None
        self.gfr = GlobalFeatureRepresentation(bottleneck, gfr, gfr_scan, bidirectional, d_state, expand, headdim,
                                               num_heads, chunk_size, mamba_backend) if gfr else None
        self.decoder = UNetDecoder(self.encoder, num_classes, arch_kwargs["n_conv_per_stage_decoder"],
                                   deep_supervision, nonlin_first=arch_kwargs.get("nonlin_first", False))
        self.apply(InitWeights_He(1e-2))  # nnU-Net's conv init; Linear layers and the codebook keep theirs

    @staticmethod
    def _with_stage_features(arch_kwargs: dict, stage_features: Optional[Sequence[int]]) -> dict:
        if stage_features is None:
            return dict(arch_kwargs)
        stage_features = [int(f) for f in stage_features]
        if len(stage_features) < 2 or min(stage_features) < 1:
            raise ValueError(f"stage_features needs >= 2 positive widths, got {stage_features}")
        n = min(len(stage_features), int(arch_kwargs["n_stages"]))
        out = dict(arch_kwargs, n_stages=n, features_per_stage=stage_features[:n])
        for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
            if isinstance(out.get(key), (list, tuple)):
                out[key] = list(out[key])[:n]
        if isinstance(out.get("n_conv_per_stage_decoder"), (list, tuple)):
            out["n_conv_per_stage_decoder"] = list(out["n_conv_per_stage_decoder"])[:n - 1]
        return out

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The encoder's skips ``[(B, C_s, *S_s)]``, each stage's output refined by its MCE block before
        the next stage reads it."""
        if getattr(self.encoder, "stem", None) is not None:
            x = self.encoder.stem(x)
        skips = []
        for s, stage in enumerate(self.encoder.stages):
            x = stage(x)
            if self.mce is not None:
                x = self.mce[s](x)
            skips.append(x)
        return skips

    def forward(self, x: torch.Tensor, heads: bool = False, lesion_mask: Optional[torch.Tensor] = None):
        skips = self.encode(x)
        aux: Dict[str, torch.Tensor] = {}
        bottleneck = skips[-1]
        if self.codebook is not None:
            bottleneck, aux["vq"], _ = self.codebook(bottleneck)
        if self.gfr is not None:
            bottleneck = self.gfr(bottleneck)
        skips[-1] = bottleneck
        seg = self.decoder(skips)
        if not heads:
            return seg
        return NetworkOutput(seg=seg, aux_losses=aux)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of one sample for nnU-Net-style VRAM planning: encoder, MCE branches,
        codebook distances and quantized features, GFR projections and scan states (or the attention
        matrix), decoder; plus the input, which the first convolution keeps for its weight gradient (the
        phases are input channels, so this is where their number shows)."""
        first_conv = next(m for m in self.encoder.modules() if isinstance(m, _ConvNd))
        total = int(self.encoder.compute_conv_feature_map_size(input_size)) + int(numel(first_conv.in_channels,
                                                                                         *input_size))
        sizes = encoder_skip_sizes(self.encoder, input_size)
        channels = list(self.encoder.output_channels)
        if self.mce is not None:
            total += sum(m.feature_map_size(c, s) for m, c, s in zip(self.mce, channels, sizes))
        if self.codebook is not None:
            tokens = int(numel(*sizes[-1]))
            total += tokens * (self.codebook.num_codes + 2 * channels[-1])  # distances, z_q, straight-through
        if self.gfr is not None:
            total += self.gfr.feature_map_size(channels[-1], sizes[-1])
        total += int(self.decoder.compute_conv_feature_map_size(input_size))
        return int(total)
