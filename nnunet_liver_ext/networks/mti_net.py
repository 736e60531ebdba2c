"""MTI-Net: adversarial multi-task learning for liver tumor segmentation, dynamic enhancement
regression and classification on dynamic MRI (../shared/seeds/mti_net.txt; spec in
../shared/METHODS.md).

A per-phase CNN encoder (one batched call over the phases, weights shared by default), MdIEF on
every encoder stage of every phase, a U-Net decoder on the phases' concatenated features (nnU-Net's
deep supervision), and a shallow Transformer over phase tokens with a linear curve head (one value
per phase) and a linear class head. The task-driven discriminator (TDD) is a submodule so that
checkpoints, ``--c`` and DDP see it; ``forward`` never runs it. TIM (:func:`masked_phase_means`) is
a loss computed by the trainer from the segmentation output and the input images.

Where the paper is silent or leaves a choice (ours):
- MdIEF's spectral branch works on the encoder's feature maps of each stage (FFT over the spatial
  axes, Gaussian high-pass, inverse FFT, then a 1x1 conv-norm-nonlin), not on a second encoder of
  the filtered image: every stage, i.e. every skip, gets a fused feature at the cost of one FFT pair.
  The 1x1 conv-norm-nonlin matters: the GAP of a high-passed map is zero (no DC), so without a
  nonlinearity the domain weights could not depend on the input.
- Ablation "no spectral" keeps the two-branch fusion but the second branch sees the features without
  the high-pass (same parameters, no spectral information); "no spatial" keeps the spectral branch
  alone; "no MdIEF" uses the encoder features as they are.
- The segmentation decoder is nnU-Net's UNetDecoder; each stage's concatenated phase features
  (N x C channels) are mixed back to C channels by a 1x1 conv-norm-nonlin first, so the decoder
  keeps the plans' widths.
- The Transformer's tokens are the N phases (not the paper's N x C flattened feature maps, whose
  length would depend on the patch size): each phase's fused features of every stage, pooled over
  space by attention pooling steered towards the lesion (the same locations in every phase,
  ``blocks.AttentionPool`` with ``blocks.lesion_log_prior``), projected to ``embed_dim`` plus a
  learned phase positional encoding. A case head that does not look at the lesion stays at chance
  in this project (benchmarks/characterization_probe.py). The class head reads the mean token.
- TDD: tokens are the phases, token n = [curve_n, class probabilities], learned phase positional
  encoding, a small pre-norm Transformer, mean token -> one logit (real vs predicted).

Input layout: ``x`` is ``(B, N * channels_per_phase, *S)``, phase n at channels
``[n * channels_per_phase, (n + 1) * channels_per_phase)`` (nnU-Net's channel order when the
dataset's channels are its phases). In nnU-Net's cascade the previous stage's one-hot segmentation
follows as ``previous_stage_channels`` more channels, encoded with every phase (``blocks.encode_phases``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_liver_ext.networks.blocks import (LESION_ACTIVATIONS, AttentionPool, autocast_off, build_phase_encoders,
                                              encode_phases, encoder_skip_sizes, lesion_log_prior, lesion_probability,
                                              numel, spatial_dims, split_phase_channels)
from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.transfer import load_pretrained_state

MDIEF_MODES = ("full", "none", "no_spectral", "no_spatial")


def fourier_filter(x: torch.Tensor, transfer: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    """``irfftn(rfftn(x) * transfer)`` over ``dims``: a circular convolution of real ``x``."""
    return torch.fft.irfftn(torch.fft.rfftn(x, dim=dims) * transfer, s=[x.shape[d] for d in dims], dim=dims)


class SymmetricFourierFilter(torch.autograd.Function):
    """:func:`fourier_filter` with a real ``transfer``: a circular convolution with a real kernel that is
    symmetric about the origin, i.e. a self-adjoint operator, so its gradient is the same filter applied
    to the incoming gradient (a complex transfer, a shift say, would need its conjugate). Autograd's own
    backward of ``rfftn`` runs a complex-to-complex FFT over the full grid after zero-filling it; this one
    is another real FFT pair (MdIEF's filters at the CPU benchmark's sizes, forward and backward: 235 ms instead of 278,
    median of 8 on the CPU; the same memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, transfer: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(transfer)
        ctx.dims = dims
        return fourier_filter(x, transfer, dims)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (transfer,) = ctx.saved_tensors
        return fourier_filter(grad, transfer, ctx.dims), None, None


class HighPassFilter(nn.Module):
    """Gaussian high-pass over the spatial axes in the Fourier domain: ``H(f) = 1 - exp(-|f|^2 /
    (2 cutoff^2))`` with ``f`` in cycles per voxel, so ``H(0) = 0`` (the DC component is removed
    exactly) and ``H`` -> 1 towards Nyquist (0.5). Parameter-free; computes in fp32 whatever autocast
    does and returns the input's dtype. ``H`` is real, so the filter is self-adjoint
    (:class:`SymmetricFourierFilter`).

    Input ``(M, C, *S)`` with ``len(S) == spatial_dims``; output the same shape.
    """

    def __init__(self, spatial_dims: int, cutoff: float = 0.1):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 0 < cutoff <= 0.5:
            raise ValueError(f"cutoff (cycles per voxel) must be in (0, 0.5], got {cutoff}")
        self.spatial_dims = spatial_dims
        self.cutoff = cutoff

    def transfer_function(self, size: Sequence[int], device) -> torch.Tensor:
        """``H`` on the rfft grid of ``size``: shape ``(*size[:-1], size[-1] // 2 + 1)``."""
        freqs = [torch.fft.fftfreq(s, device=device) for s in size[:-1]] + [torch.fft.rfftfreq(size[-1], device=device)]
        radius2 = sum(f.view(*[-1 if i == k else 1 for i in range(len(size))]) ** 2 for k, f in enumerate(freqs))
        return 1.0 - torch.exp(-radius2 / (2.0 * self.cutoff ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-self.spatial_dims, 0))
        size = x.shape[-self.spatial_dims:]
        with autocast_off(x.device.type):
            filtered = SymmetricFourierFilter.apply(x.float(), self.transfer_function(size, x.device), dims)
        return filtered.to(x.dtype)


class MdIEF(nn.Module):
    """Multi-domain information entropy fusion (eq. 1) for one phase's feature map.

    ``X_spe = conv1x1-norm-nonlin(HPF(X_spa))``; ``P = GAP(X)`` per channel; ``(gamma_spa, gamma_spe)
    = softmax over the two domains of (P_spa, P_spe)``; output ``X_spa (1 + gamma_spa) + X_spe (1 +
    gamma_spe)``. ``mode``: ``full``; ``no_spectral`` (the second branch without the high-pass);
    ``no_spatial`` (``X_spe`` alone).

    Input ``(M, C, *S)`` (M = batch x phases), output the same shape.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, arch_kwargs: dict, mode: str = "full",
                 cutoff: float = 0.1):
        super().__init__()
        if mode not in ("full", "no_spectral", "no_spatial"):
            raise ValueError(f"MdIEF mode must be full, no_spectral or no_spatial, got {mode!r}")
        self.mode = mode
        self.high_pass = HighPassFilter(spatial_dims(conv_op), cutoff) if mode != "no_spectral" else None
        self.spectral = ConvDropoutNormReLU(conv_op, channels, channels, 1, 1, arch_kwargs.get("conv_bias", True),
                                            arch_kwargs.get("norm_op"), arch_kwargs.get("norm_op_kwargs"), None, None,
                                            arch_kwargs.get("nonlin"), arch_kwargs.get("nonlin_kwargs"))

    def spectral_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.spectral(self.high_pass(x) if self.high_pass is not None else x)

    @staticmethod
    def domain_weights(x_spa: torch.Tensor, x_spe: torch.Tensor) -> torch.Tensor:
        """``(M, 2, C)`` softmax over the domains (spatial, spectral) of the channels' GAP; fp32."""
        with autocast_off(x_spa.device.type):
            pooled = torch.stack((x_spa.float().flatten(2).mean(-1), x_spe.float().flatten(2).mean(-1)), 1)
            return torch.softmax(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_spe = self.spectral_features(x)
        if self.mode == "no_spatial":
            return x_spe
        gamma = self.domain_weights(x, x_spe).to(x.dtype)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return x * (1 + gamma[:, 0].view(shape)) + x_spe * (1 + gamma[:, 1].view(shape))


class PhaseTransformer(nn.Module):
    """Shallow pre-norm Transformer over phase tokens with a learned phase positional encoding.
    Input ``(B, N, D_in)``, output ``(B, N, E)``."""

    def __init__(self, in_features: int, num_phases: int, embed_dim: int, num_layers: int, num_heads: int,
                 dropout: float = 0.1, mlp_ratio: float = 4.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_phases = num_phases
        self.proj_in = nn.Linear(in_features, embed_dim)
        self.phase_embed = nn.Parameter(torch.zeros(1, num_phases, embed_dim))
        nn.init.trunc_normal_(self.phase_embed, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout, activation="relu",
                                       batch_first=True, norm_first=True) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.num_phases:
            raise ValueError(f"got {tokens.shape[1]} phase tokens, built for {self.num_phases}")
        h = self.proj_in(tokens) + self.phase_embed
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class TaskDrivenDiscriminator(nn.Module):
    """TDD: tells reference (curve, class) pairs from predicted ones. Token n = ``[curve_n,
    p_1..p_K]``, learned phase positional encoding, ``num_layers`` Transformer blocks, mean token ->
    one logit. Runs in fp32 (it is tiny, and its logits feed a BCE).

    forward(curve ``(B, N)``, class_probabilities ``(B, K)``) -> logits ``(B,)``.
    """

    def __init__(self, num_phases: int, num_case_classes: int, embed_dim: int = 64, num_layers: int = 2,
                 num_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if num_case_classes < 1:
            raise ValueError(f"the discriminator needs class probabilities, got num_case_classes={num_case_classes}")
        self.num_case_classes = num_case_classes
        self.encoder = PhaseTransformer(1 + num_case_classes, num_phases, embed_dim, num_layers, num_heads, dropout)
        self.out = nn.Linear(embed_dim, 1)

    def forward(self, curve: torch.Tensor, class_probabilities: torch.Tensor) -> torch.Tensor:
        with autocast_off(curve.device.type):
            curve, probs = curve.float(), class_probabilities.float()
            tokens = torch.cat((curve.unsqueeze(-1), probs.unsqueeze(1).expand(-1, curve.shape[1], -1)), -1)
            return self.out(self.encoder(tokens).mean(1)).squeeze(-1)


def masked_phase_means(image: torch.Tensor, weight: torch.Tensor, channels_per_phase: int = 1,
                       eps: float = 1e-6) -> torch.Tensor:
    """TIM's curve: the ``weight``-weighted mean of every phase image, ``(B, N)`` in fp32.

    image ``(B, N * channels_per_phase, *S)``; weight ``(B, 1, *S)`` in [0, 1] (a tumor probability or
    a reference mask). The channels of one phase are averaged. ``sum(w x) / (sum(w) + eps)``: the
    masked mean for a binary mask, differentiable in ``w`` for a probability.
    """
    if image.shape[1] % channels_per_phase:
        raise ValueError(f"{image.shape[1]} channels are not a multiple of channels_per_phase={channels_per_phase}")
    with autocast_off(image.device.type):
        w = weight.float().flatten(2)  # (B, 1, V)
        sums = (image.float().flatten(2) * w).sum(-1)  # (B, C)
        means = sums / (w.sum(-1) + eps)
        return means.view(image.shape[0], -1, channels_per_phase).mean(-1)


class MTINet(nn.Module):
    """MTI-Net built from nnU-Net plans.

    Args (plans): ``input_channels``, ``num_classes`` (segmentation outputs) and the PlainConvUNet /
        ResidualEncoderUNet ``arch_kwargs`` of the plans, ``deep_supervision``.
    Args (method):
        num_case_classes: K of the class head; 0 builds no class head (and no discriminator).
        curve_head: build the enhancement-curve head (one value per phase). The trainer sets it when the
            dataset has ``enhancement`` curves and the curve loss is on.
        discriminator: build the TDD (needs the curve head and K >= 1). Training only.
        channels_per_phase: input channels per phase.
        previous_stage_channels: the last input channels that are nnU-Net's cascade input (the previous
            stage's one-hot segmentation); every phase image is encoded together with them. 0 outside a cascade.
        share_encoder: one encoder for all phases (batched call) or one per phase.
        mdief: ``full``, ``none``, ``no_spectral``, ``no_spatial`` (the paper's Table 3 ablations).
        hpf_cutoff: the high-pass filter's Gaussian cutoff in cycles per voxel.
        embed_dim / num_layers / num_heads / transformer_dropout: the phase Transformer (paper: 3 blocks;
            the paper's d_k = 64 is embed_dim / num_heads with the defaults).
        disc_embed_dim / disc_layers / disc_heads: the discriminator's Transformer.
        lesion_channel: segmentation output of the lesion (tumor); the token pooling adds the log of its
            (detached) probability to its attention scores. ``None``: learned attention alone.
        lesion_activation: ``softmax`` (nnU-Net's labels) or ``sigmoid`` (region-based training).

    forward(x ``(B, N * channels_per_phase + previous_stage_channels, *S)``, heads=False, lesion_mask=None)
    -> seg logits (list with deep supervision), or with ``heads=True`` a NetworkOutput with ``curve`` ``(B, N)``
    (standardised units) and ``cls_logits`` ``(B, K)`` where built. ``lesion_mask`` ``(B, 1, *S)``
    replaces the network's own lesion probability in the token pooling (training: the reference).
    """

    #: ``-pretrained_weights`` (networks.transfer): heads and discriminator never take another model's weights
    transfer_skip_prefixes = ("cls_head.", "curve_head.", "discriminator.")
    load_pretrained_state = load_pretrained_state

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 num_case_classes: int = 0, curve_head: bool = True, discriminator: bool = True,
                 channels_per_phase: int = 1, previous_stage_channels: int = 0, share_encoder: bool = True,
                 mdief: str = "full",
                 hpf_cutoff: float = 0.1, embed_dim: int = 256, num_layers: int = 3, num_heads: int = 4,
                 transformer_dropout: float = 0.1, disc_embed_dim: int = 64, disc_layers: int = 2,
                 disc_heads: int = 4, lesion_channel: Optional[int] = -1,
                 lesion_activation: str = "softmax", **arch_kwargs):
        super().__init__()
        if mdief not in MDIEF_MODES:
            raise ValueError(f"mdief must be one of {MDIEF_MODES}, got {mdief!r}")
        self.num_phases = split_phase_channels(input_channels, channels_per_phase, previous_stage_channels)
        if num_case_classes < 0:
            raise ValueError(f"num_case_classes must be >= 0, got {num_case_classes}")
        if discriminator and not (curve_head and num_case_classes > 0):
            raise ValueError("the discriminator (TDD) judges (curve, class) pairs: it needs curve_head=True and "
                             f"num_case_classes >= 1 (got curve_head={curve_head}, num_case_classes={num_case_classes})")
        if lesion_channel is not None and not -num_classes <= lesion_channel < num_classes:
            raise ValueError(f"lesion_channel {lesion_channel} is not a channel of {num_classes} segmentation outputs")
        if lesion_activation not in LESION_ACTIVATIONS:
            raise ValueError(f"lesion_activation must be one of {LESION_ACTIVATIONS}, got {lesion_activation!r}")
        if "n_conv_per_stage_decoder" not in arch_kwargs:
            raise ValueError("arch_kwargs need n_conv_per_stage_decoder (from the nnU-Net plans)")
        self.conv_op: Type[_ConvNd] = arch_kwargs["conv_op"]
        spatial_dims(self.conv_op)
        self.channels_per_phase = channels_per_phase
        self.previous_stage_channels = previous_stage_channels
        self.share_encoder = share_encoder
        self.lesion_channel = lesion_channel
        self.lesion_activation = lesion_activation
        self.mdief_mode = mdief

        encoder, self.encoders = build_phase_encoders(self.num_phases, channels_per_phase, arch_kwargs,
                                                      share_encoder, previous_stage_channels)
        self.encoder = encoder
        stage_channels: List[int] = list(self.encoder.output_channels)
        # one MdIEF per stage, shared by the phases like the encoder (batched over B x N)
        self.mdief = nn.ModuleList(MdIEF(self.conv_op, ch, arch_kwargs, mdief, hpf_cutoff) for ch in stage_channels) \
            if mdief != "none" else None
        self.phase_concat = nn.ModuleList(
            ConvDropoutNormReLU(self.conv_op, self.num_phases * ch, ch, 1, 1, arch_kwargs.get("conv_bias", True),
                                arch_kwargs.get("norm_op"), arch_kwargs.get("norm_op_kwargs"), None, None,
                                arch_kwargs.get("nonlin"), arch_kwargs.get("nonlin_kwargs"))
            for ch in stage_channels)
        self.decoder = UNetDecoder(self.encoder, num_classes, arch_kwargs["n_conv_per_stage_decoder"],
                                   deep_supervision, nonlin_first=arch_kwargs.get("nonlin_first", False))

        has_heads = curve_head or num_case_classes > 0
        self.token_pools = nn.ModuleList(AttentionPool(ch) for ch in stage_channels) if has_heads else None
        self.transformer = PhaseTransformer(sum(stage_channels), self.num_phases, embed_dim, num_layers, num_heads,
                                            transformer_dropout) if has_heads else None
        self.curve_head = nn.Linear(embed_dim, 1) if curve_head else None
        self.cls_head = nn.Linear(embed_dim, num_case_classes) if num_case_classes > 0 else None
        self.discriminator = TaskDrivenDiscriminator(self.num_phases, num_case_classes, disc_embed_dim, disc_layers,
                                                     disc_heads, transformer_dropout) if discriminator else None
        self.apply(InitWeights_He(1e-2))  # nnU-Net's conv init; it leaves the Linear layers alone

    # ------------------------------------------------------------------ features
    def phase_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Per stage ``(B, N, C_s, *S_s)``: encoder features of every phase after MdIEF."""
        skips = encode_phases(x, self.encoder, self.encoders, self.num_phases, self.channels_per_phase,
                              self.previous_stage_channels)
        if self.mdief is not None:
            skips = [fuse(s) for fuse, s in zip(self.mdief, skips)]
        return [s.unflatten(0, (x.shape[0], self.num_phases)) for s in skips]

    def phase_tokens(self, features: List[torch.Tensor], lesion_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, N, sum C_s)``: every stage's phase features pooled over space (the same locations in
        every phase), steered by ``lesion_mask`` ``(B, 1, *S)`` where given."""
        pooled = []
        for pool, f in zip(self.token_pools, features):
            log_prior = lesion_log_prior(lesion_mask, f.shape[3:]) if lesion_mask is not None else None
            pooled.append(pool(f.flatten(3).transpose(2, 3), log_prior))  # (B, N, L, C) -> (B, N, C)
        return torch.cat(pooled, -1)

    def forward(self, x: torch.Tensor, heads: bool = False, lesion_mask: Optional[torch.Tensor] = None):
        features = self.phase_features(x)
        seg = self.decoder([cat(f.flatten(1, 2)) for cat, f in zip(self.phase_concat, features)])
        if not heads:
            return seg
        curve = cls_logits = None
        if self.transformer is not None:
            if lesion_mask is None and self.lesion_channel is not None:
                # the full-resolution output: nnU-Net trains the coarsest deep-supervision output with weight 0
                full_resolution = seg[0] if isinstance(seg, (list, tuple)) else seg
                lesion_mask = lesion_probability(full_resolution, self.lesion_channel, self.lesion_activation)
            hidden = self.transformer(self.phase_tokens(features, lesion_mask))
            if self.curve_head is not None:
                curve = self.curve_head(hidden).squeeze(-1)
            if self.cls_head is not None:
                cls_logits = self.cls_head(hidden.mean(1))
        return NetworkOutput(seg=seg, cls_logits=cls_logits, curve=curve)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of one sample, for nnU-Net-style VRAM planning: the encoder once per
        phase, MdIEF's spectral and fused maps per phase, the token pooling's copies, the concatenated
        and mixed skips and the decoder."""
        n = self.num_phases
        total = self.encoder.compute_conv_feature_map_size(input_size) * n
        for ch, size in zip(self.encoder.output_channels, encoder_skip_sizes(self.encoder, input_size)):
            per_phase = numel(ch, *size)
            if self.mdief is not None:
                total += 3 * per_phase * n  # filtered, spectral branch, fused
            if self.token_pools is not None:
                total += per_phase * n  # transposed token copy
            total += per_phase * n + per_phase  # concatenation and its 1x1 mix
        total += self.decoder.compute_conv_feature_map_size(input_size)
        return int(total)
