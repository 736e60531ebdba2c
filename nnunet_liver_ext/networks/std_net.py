"""STD-Net: spatio-temporal decoupling for multiphase liver lesion segmentation and
characterization (../shared/seeds/std_net.txt; spec in ../shared/METHODS.md).

A shared-weight spatial encoder E runs on every phase in one batched call, a Transformer T models
the phase (time) axis, a U-Net decoder segments from phase-fused skips and an MLP on T's [CLS]
output characterizes the case.

Where the paper is silent (ours, see METHODS.md):
- T runs across phases at every bottleneck location (tokens = phases, one sequence per voxel,
  as in divided space-time attention). The [CLS] sequence runs over the N phase tokens pooled
  over space by attention pooling; both sequences share T's weights and the phase positional
  encodings ``E_pos`` (N + 1 rows, row 0 for [CLS]). The pooling weights are shared by the
  phases (the same locations in every phase) and steered by the network's own (detached) lesion
  probability: given where the lesion is, T learns the classes within a few hundred steps;
  without that, it has to find the lesion from the classification loss alone and stayed at
  chance (benchmarks/characterization_probe.py, benchmarks/results/).
- Decoder input and skips are fused over phases by learned voxel-wise attention weights;
  ``reference_phase`` reproduces the paper's single-phase decoding.
- Hybrid ablation (Table 4 e): after T's third layer, a low-rank bilinear fusion adds each
  phase's spatial context (its mean token) to every voxel token of that phase.

Input layout: ``x`` is ``(B, N * channels_per_phase, *S)`` with the channels of phase n at
``[n * channels_per_phase, (n + 1) * channels_per_phase)``, i.e. nnU-Net's channel order when the
dataset's channels are its phases. In nnU-Net's cascade (``3d_cascade_fullres``) the previous stage's
one-hot segmentation follows as ``previous_stage_channels`` more channels; every phase is encoded
together with them (``blocks.encode_phases``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_liver_ext.networks.blocks import (LESION_ACTIVATIONS, AttentionPool, ConvGRU, PhaseFusion,
                                              build_encoder, build_phase_encoders, encode_phases, encoder_skip_sizes,
                                              lesion_log_prior, lesion_probability, mlp_head, numel, spatial_dims,
                                              split_phase_channels)
from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.transfer import load_pretrained_state

TEMPORAL_MODELERS = ("transformer", "hybrid", "convgru", "mean")
FUSIONS = ("decoupled", "early")


class LowRankSpatioTemporalFusion(nn.Module):
    """``t_vn += U((A t_vn) * (B s_n))`` with ``s_n`` the spatial mean token of phase n and
    ``A, B: E -> r``, ``U: r -> E`` (a rank-r bilinear interaction). Tokens ``(B, V, N, E)``;
    ``context`` ``(B, 1, N, E)`` gives ``s_n`` from elsewhere (the [CLS] path fuses its pooled phase
    tokens with the voxel path's spatial context), else it is the tokens' own spatial mean."""

    def __init__(self, embed_dim: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"hybrid rank must be >= 1, got {rank}")
        self.token_proj = nn.Linear(embed_dim, rank, bias=False)
        self.context_proj = nn.Linear(embed_dim, rank, bias=False)
        self.up = nn.Linear(rank, embed_dim)
        nn.init.zeros_(self.up.weight)  # starts as the identity, like a residual branch
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if context is None:
            context = tokens.mean(1, keepdim=True)
        return tokens + self.up(self.token_proj(tokens) * self.context_proj(context))


class TemporalTransformer(nn.Module):
    """STD-Net's temporal dynamics modeler T (eqs. 4-8): pre-norm Transformer encoder with ReLU FFN,
    learnable [CLS] token and learnable phase positional encodings.

    ``forward`` runs the voxel sequences (tokens = phases at one location); ``case_token`` runs
    the [CLS] sequence. Both use the same layers, positional encodings and (ablation e) hybrid
    fusion. ``case_token=False`` builds no [CLS] token and no pooling: a network without a class
    head must not own parameters its training step never updates (DDP fails on them).
    """

    def __init__(self, in_channels: int, max_phases: int, embed_dim: int, num_layers: int, num_heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, hybrid_rank: Optional[int] = None,
                 hybrid_after_layer: int = 3, case_token: bool = True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.max_phases = max_phases
        self.proj_in = nn.Linear(in_channels, embed_dim)
        self.proj_out = nn.Linear(embed_dim, in_channels)
        # row 0 of the positional encodings belongs to [CLS] (eq. 4), rows 1..N to the phases
        self.pos_embed = nn.Parameter(torch.zeros(1, max_phases + 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.cls_token = None
        self.pool = None
        if case_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.pool = AttentionPool(embed_dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(embed_dim, num_heads, int(embed_dim * mlp_ratio), dropout, activation="relu",
                                       batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)
        # After layer index hybrid_after_layer - 1; clamped so shallow configurations still fuse.
        self.hybrid_after = min(hybrid_after_layer, num_layers) - 1
        self.hybrid = LowRankSpatioTemporalFusion(embed_dim, hybrid_rank) if hybrid_rank else None
        # The residual output starts at zero so an untrained T leaves the encoder features intact.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, features: torch.Tensor, return_context: bool = False):
        """Attention across phases at every location: (B, N, C, *S) -> (B, N, C, *S).

        ``return_context=True`` also returns the hybrid fusion's spatial context ``(B, 1, N, E)``
        (None without hybrid fusion), which ``case_token`` needs to fuse the [CLS] path the same way."""
        b, n, c = features.shape[:3]
        if n > self.max_phases:
            raise ValueError(f"got {n} phases but the temporal modeler was built for at most {self.max_phases}")
        spatial = features.shape[3:]
        tokens = self.proj_in(features.flatten(3).permute(0, 3, 1, 2))  # (B, V, N, E)
        v, e = tokens.shape[1], tokens.shape[3]
        voxel_seq = (tokens + self.pos_embed[:, 1:n + 1].unsqueeze(1)).reshape(b * v, n, e)
        context = None
        for i, layer in enumerate(self.layers):
            voxel_seq = layer(voxel_seq)
            if self.hybrid is not None and i == self.hybrid_after:
                voxel_tokens = voxel_seq.view(b, v, n, e)
                context = voxel_tokens.mean(1, keepdim=True)
                voxel_seq = self.hybrid(voxel_tokens, context).reshape(b * v, n, e)
        delta = self.proj_out(self.norm(voxel_seq)).view(b, v, n, c).permute(0, 2, 3, 1).reshape(b, n, c, *spatial)
        return (features + delta, context) if return_context else features + delta

    def case_token(self, features: torch.Tensor, log_prior: Optional[torch.Tensor] = None,
                   hybrid_context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The [CLS] output (B, E): T over [CLS] + the N phase tokens pooled over space (eq. 4).

        features (B, N, C, *S) are the encoder's bottleneck features; log_prior (B, V) optionally
        steers the spatial pooling towards the lesion; hybrid_context (B, 1, N, E), the voxel path's
        spatial context from ``forward(..., return_context=True)``, is fused into the sequence after
        the same layer as in the voxel path (ablation e), so the class head trains the hybrid model
        it is an ablation of."""
        if self.cls_token is None:
            raise RuntimeError("this temporal modeler was built without a [CLS] token (case_token=False)")
        if self.hybrid is not None and hybrid_context is None:
            raise ValueError("the hybrid temporal modeler needs the voxel path's hybrid_context")
        b, n = features.shape[:2]
        tokens = self.proj_in(features.flatten(3).transpose(2, 3))  # (B, N, V, E)
        pooled = self.pool(tokens, log_prior)  # (B, N, E), the same locations in every phase
        cls_seq = torch.cat((self.cls_token.expand(b, -1, -1) + self.pos_embed[:, :1],
                             pooled + self.pos_embed[:, 1:n + 1]), 1)
        for i, layer in enumerate(self.layers):
            cls_seq = layer(cls_seq)
            if self.hybrid is not None and i == self.hybrid_after:
                # each phase token takes its phase's spatial context, [CLS] the mean over phases, so
                # the fusion reaches the class head even when it follows T's last layer
                context = torch.cat((hybrid_context.mean(2, keepdim=True), hybrid_context), 2)
                cls_seq = self.hybrid(cls_seq.unsqueeze(1), context).squeeze(1)
        return self.norm(cls_seq[:, 0])


class STDNet(nn.Module):
    """STD-Net built from nnU-Net plans.

    Args (plans): ``input_channels``, ``num_classes`` (segmentation outputs) and the PlainConvUNet /
        ResidualEncoderUNet ``arch_kwargs`` of the plans (``n_stages``, ``features_per_stage``,
        ``conv_op``, ``kernel_sizes``, ``strides``, ``n_conv_per_stage`` or ``n_blocks_per_stage``,
        ``n_conv_per_stage_decoder``, norm/dropout/nonlin ops and kwargs), ``deep_supervision``.
    Args (method):
        num_case_classes: K of the characterization head; 0 builds no head (segmentation only).
        channels_per_phase: input channels per phase (1 for CT).
        previous_stage_channels: the last input channels that are nnU-Net's cascade input (the previous
            stage's one-hot segmentation, one channel per foreground label; 0 outside a cascade). Every
            phase image is encoded together with them; early fusion reads them as more channels.
        temporal: ``transformer`` (STD-Net), ``hybrid`` (ablation e), ``convgru`` (ablation d),
            ``mean`` (ablation a: no temporal modeler, phases fused by their mean).
        fusion: ``decoupled`` (STD-Net) or ``early`` (ablation b: phases as channels of one encoder).
        share_encoder: False gives one encoder per phase (ablation c).
        embed_dim / num_layers / num_heads: T's width, depth, heads. The paper uses 768 / 6 / 8;
            ``embed_dim=None`` sizes T to the plans' bottleneck width.
        mlp_hidden / mlp_dropout: characterization MLP (paper: 512 / 0.3).
        reference_phase: decode from this phase alone (the paper's choice) instead of fusing.
        hybrid_rank: rank of the hybrid fusion.
        lesion_channel: segmentation output holding the lesion (tumor) class; the spatial pooling of
            the characterization path adds the log of its (detached) probability to its attention
            scores, so the head looks where the segmentation sees the lesion instead of having to
            find it from the classification loss alone (ours). ``None`` pools by learned attention
            alone. Default: the last output (label 2 = tumor in this package's label convention).
        lesion_activation: ``softmax`` (nnU-Net's labels) or ``sigmoid`` (region-based training, where
            ``lesion_channel`` is the tumor region's output).

    forward(x (B, N * channels_per_phase + previous_stage_channels, *S), heads=False, lesion_mask=None)
    -> seg logits (list with deep supervision) or, with ``heads=True``, a NetworkOutput with ``cls_logits`` (B, K).
    ``lesion_mask`` (B, 1, *S), when given, replaces the network's own lesion probability in the
    pooling of the characterization path (the trainer passes the reference lesion mask).
    """

    #: ``-pretrained_weights`` (networks.transfer): the class head never takes another model's weights
    transfer_skip_prefixes = ("cls_head.",)
    load_pretrained_state = load_pretrained_state

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, *,
                 num_case_classes: int = 0, channels_per_phase: int = 1, previous_stage_channels: int = 0,
                 temporal: str = "transformer",
                 fusion: str = "decoupled", share_encoder: bool = True, embed_dim: Optional[int] = None,
                 num_layers: int = 6, num_heads: int = 8, transformer_dropout: float = 0.1,
                 mlp_hidden: int = 512, mlp_dropout: float = 0.3, reference_phase: Optional[int] = None,
                 hybrid_rank: int = 16, lesion_channel: Optional[int] = -1,
                 lesion_activation: str = "softmax", **arch_kwargs):
        super().__init__()
        if temporal not in TEMPORAL_MODELERS:
            raise ValueError(f"temporal must be one of {TEMPORAL_MODELERS}, got {temporal!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.num_phases = split_phase_channels(input_channels, channels_per_phase, previous_stage_channels)
        if num_case_classes < 0:
            raise ValueError(f"num_case_classes must be >= 0, got {num_case_classes}")
        if lesion_channel is not None and not -num_classes <= lesion_channel < num_classes:
            raise ValueError(f"lesion_channel {lesion_channel} is not a channel of {num_classes} segmentation outputs")
        if lesion_activation not in LESION_ACTIVATIONS:
            raise ValueError(f"lesion_activation must be one of {LESION_ACTIVATIONS}, got {lesion_activation!r}")
        if "n_conv_per_stage_decoder" not in arch_kwargs:
            raise ValueError("arch_kwargs need n_conv_per_stage_decoder (from the nnU-Net plans)")
        self.lesion_channel = lesion_channel
        self.lesion_activation = lesion_activation
        self.channels_per_phase = channels_per_phase
        self.previous_stage_channels = previous_stage_channels
        self.fusion = fusion
        self.temporal_kind = temporal if fusion == "decoupled" else "none"
        self.share_encoder = share_encoder
        self.conv_op: Type[_ConvNd] = arch_kwargs["conv_op"]
        spatial_dims(self.conv_op)

        if fusion == "early":
            self.encoders = None
            self.encoder = build_encoder(input_channels, arch_kwargs)
        else:
            encoder, self.encoders = build_phase_encoders(self.num_phases, channels_per_phase, arch_kwargs,
                                                          share_encoder, previous_stage_channels)
            self.encoder = encoder
        stage_channels: List[int] = list(self.encoder.output_channels)
        bottleneck = stage_channels[-1]

        phases_at_fusion = 1 if fusion == "early" else self.num_phases
        fusion_mode = "mean" if temporal == "mean" else "attention"
        if reference_phase is not None:
            if fusion == "early":
                raise ValueError("reference_phase needs fusion='decoupled' (early fusion has no per-phase features)")
            fusion_mode = "reference"
        self.phase_fusions = nn.ModuleList(
            PhaseFusion(self.conv_op, ch, phases_at_fusion, fusion_mode, reference_phase) for ch in stage_channels)

        self.temporal = None
        case_feature_dim = bottleneck
        if self.temporal_kind in ("transformer", "hybrid"):
            width = embed_dim or bottleneck
            self.temporal = TemporalTransformer(bottleneck, self.num_phases, width, num_layers, num_heads,
                                                dropout=transformer_dropout,
                                                hybrid_rank=hybrid_rank if temporal == "hybrid" else None,
                                                case_token=num_case_classes > 0)
            case_feature_dim = width
        elif self.temporal_kind == "convgru":
            self.temporal = ConvGRU(self.conv_op, bottleneck)
        # only a class head reads the pooled case feature (DDP fails on parameters without gradients)
        self.case_pool = None
        if self.temporal_kind not in ("transformer", "hybrid") and num_case_classes > 0:
            self.case_pool = AttentionPool(bottleneck)

        self.decoder = UNetDecoder(self.encoder, num_classes, arch_kwargs["n_conv_per_stage_decoder"],
                                   deep_supervision, nonlin_first=arch_kwargs.get("nonlin_first", False))
        self.cls_head = mlp_head(case_feature_dim, mlp_hidden, num_case_classes, mlp_dropout) \
            if num_case_classes > 0 else None
        self.apply(InitWeights_He(1e-2))  # nnU-Net's conv init; it leaves the Linear layers of T alone

    def _phase_skips(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Encoder skips per stage, each ``(B, N, C_s, *S_s)`` (N = 1 for early fusion)."""
        if self.fusion == "early":
            return [s.unsqueeze(1) for s in self.encoder(x)]
        skips = encode_phases(x, self.encoder, self.encoders, self.num_phases, self.channels_per_phase,
                              self.previous_stage_channels)
        return [s.unflatten(0, (x.shape[0], self.num_phases)) for s in skips]

    def _case_feature(self, encoder_bottleneck: torch.Tensor, temporal_bottleneck: torch.Tensor,
                      log_prior: Optional[torch.Tensor], hybrid_context: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, E) input of the characterization head."""
        if isinstance(self.temporal, TemporalTransformer):
            return self.temporal.case_token(encoder_bottleneck, log_prior, hybrid_context)
        if isinstance(self.temporal, ConvGRU):
            summary = temporal_bottleneck[:, -1]  # the state after the last phase has seen the sequence
        else:  # mean over phases (ablation a), or the single early-fusion map
            summary = temporal_bottleneck.mean(1)
        return self.case_pool(summary.flatten(2).transpose(1, 2), log_prior)

    def forward(self, x: torch.Tensor, heads: bool = False, lesion_mask: Optional[torch.Tensor] = None):
        skips = self._phase_skips(x)
        encoder_bottleneck = skips[-1]
        hybrid_context = None
        if isinstance(self.temporal, TemporalTransformer):
            skips[-1], hybrid_context = self.temporal(skips[-1], return_context=True)
        elif self.temporal is not None:
            skips[-1] = self.temporal(skips[-1])
        seg = self.decoder([fusion(s) for fusion, s in zip(self.phase_fusions, skips)])
        if not heads:
            return seg
        cls_logits = None
        if self.cls_head is not None:
            log_prior = None
            if self.lesion_channel is not None:
                if lesion_mask is None:
                    # The full-resolution output: nnU-Net gives the coarsest deep-supervision output
                    # loss weight 0, so that one never learns where the lesion is.
                    full_resolution = seg[0] if isinstance(seg, (list, tuple)) else seg
                    lesion_mask = lesion_probability(full_resolution, self.lesion_channel, self.lesion_activation)
                log_prior = lesion_log_prior(lesion_mask, encoder_bottleneck.shape[3:])
            cls_logits = self.cls_head(self._case_feature(encoder_bottleneck, skips[-1], log_prior, hybrid_context))
        return NetworkOutput(seg=seg, cls_logits=cls_logits)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements of one sample, for nnU-Net-style VRAM planning: the encoder once per
        phase, the fused skips, the temporal tokens and the decoder."""
        phases = 1 if self.fusion == "early" else self.num_phases
        total = self.encoder.compute_conv_feature_map_size(input_size) * phases
        sizes = encoder_skip_sizes(self.encoder, input_size)
        for ch, size in zip(self.encoder.output_channels, sizes):
            total += numel(ch, *size)  # fused skip
        if isinstance(self.temporal, TemporalTransformer):
            width = self.temporal.proj_in.out_features
            layers = len(self.temporal.layers)
            # per layer: attention in/out projections and the 4x FFN, per voxel sequence
            total += numel(phases, width, *sizes[-1]) * layers * 8
        total += self.decoder.compute_conv_feature_map_size(input_size)
        return int(total)
