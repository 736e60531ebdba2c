"""Weights of another model into one of this package's networks: ``nnUNetv2_train -pretrained_weights``
from a single-phase model (stock nnU-Net, or STD-Net with one phase) into a multiphase network.

nnU-Net's own loader (``nnunetv2.run.load_pretrained_weights``) requires every key of the network but
the segmentation layers to exist in the source with the same shape. A multiphase STD-Net or MTI-Net
never passes that against a single-phase model: it has modules the source lacks (temporal model,
phase fusion, MdIEF, heads), per-phase encoders where the source has one, and, with early fusion,
a first layer with N times the input channels. Networks that can take such weights bind
:func:`load_pretrained_state` as a method and name the prefixes of their case-level heads in
``transfer_skip_prefixes``; ``training.pretrained`` routes ``-pretrained_weights`` to it.

The rule, key by key over the network's state dict (every alias included: dynamic-network-architectures'
decoder holds the encoder again as ``decoder.encoder.*``):

1. Never transferred: nnU-Net's segmentation layers (``.seg_layers.``, as nnU-Net's own loader) and the
   network's ``transfer_skip_prefixes`` (class and curve heads, MTI-Net's discriminator): their outputs
   mean the labels, classes and curves of the source's dataset, not of this one.
2. A key the source has with the same shape is copied (nnU-Net's rule): the shared phase encoder
   ``encoder.*`` from nnU-Net's PlainConvUNet / ResidualEncoderUNet ``encoder.*`` of the same plans, the
   decoder's stages and transposed convolutions (the phase-fused skips have the plans' widths).
3. One encoder per phase (``encoders.<n>.*``) takes the source's ``encoder.*`` where the source has no
   per-phase key of its own: every phase starts from the single-phase encoder.
4. The first convolution of an encoder, when only its input channels differ (``C_src`` in the source,
   ``C`` here), is adapted so that an input whose phases all show the same image gets the response the
   source gave that image:
   - ``C = r * C_src`` (a one-channel CT model into an early-fusion encoder of r phases): the kernel tiled
     r times along the input-channel axis, divided by r;
   - ``C_src = r * C`` (a stock nnU-Net trained on the r phases as channels into the shared per-phase
     encoder): the sum of the kernel's r channel groups (phase-major order, nnU-Net's channel order).
   Any other difference: not transferred (shape mismatch).
   In nnU-Net's cascade (3d_cascade_fullres) the last ``P`` input channels of every encoder's first
   convolution are the previous stage's one-hot segmentation (the network's ``previous_stage_channels``).
   A source without them (a 3d_fullres or 3d_lowres model) gives the image channels as above, and the
   segmentation channels' weights start at zero, so that the stage first answers as the source did and
   learns from the segmentation with training; they are never read as more phases. A source that is a
   cascade stage itself (an nnU-Net checkpoint says so: its plans, configuration and dataset.json) gives its
   image channels under the same rule; its segmentation channels are copied into a stage of the same
   labels, start at zero in a stage of other labels, and are dropped for a network outside the cascade (never
   read as phases). A plain state dict does not say: its first layer is copied where the shapes agree.
5. Everything else keeps its initialisation and is reported: ``missing in source`` (the temporal
   Transformer, phase fusion, MdIEF, ... of a single-phase source) or ``shape mismatch``.

When no weight of the encoder was transferred, nothing is loaded and a ``UserError`` names the file: a
network trained from scratch by mistake would otherwise look like a fine-tuned one. The encoder must
come from the same plans (stages, widths, kernels); nnU-Net's ``nnUNetv2_move_plans_between_datasets``
gives the pretraining dataset the target's plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunet_liver_ext.errors import UserError

SEG_LAYER_MARK = ".seg_layers."
ENCODER_PREFIXES = ("encoder.", "encoders.")
HEAD = "head or segmentation layer, never transferred"
MISSING = "missing in source"
SHAPE = "shape mismatch"
#: prefixes DDP and torch.compile put in front of the keys of a model saved outside nnU-Net
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class TransferReport:
    """What :func:`load_pretrained_state` did, key by key (the network's state-dict keys).

    loaded: copied unchanged. adapted: key -> the first-layer rule applied. skipped: key -> (reason, detail),
    reason one of ``HEAD``, ``MISSING``, ``SHAPE``. unused_source: source keys no key here took.
    """

    source: str
    network: str
    loaded: List[str] = field(default_factory=list)
    adapted: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    unused_source: List[str] = field(default_factory=list)

    def transferred(self, prefixes: Tuple[str, ...] = ()) -> List[str]:
        keys = self.loaded + list(self.adapted)
        return [k for k in keys if k.startswith(prefixes)] if prefixes else keys

    def by_module(self) -> List[str]:
        """One line per top-level module: how many of its tensors were transferred, why the others were not."""
        modules: Dict[str, Dict[str, int]] = {}
        for key in self.loaded + list(self.adapted):
            counts = modules.setdefault(key.split(".", 1)[0], {})
            counts["transferred"] = counts.get("transferred", 0) + 1
        for key, (reason, _) in self.skipped.items():
            counts = modules.setdefault(key.split(".", 1)[0], {})
            counts[reason] = counts.get(reason, 0) + 1
        lines = []
        for module, counts in modules.items():
            total = sum(counts.values())
            others = ", ".join(f"{n} {reason}" for reason, n in counts.items() if reason != "transferred")
            line = f"{module}: {counts.get('transferred', 0)}/{total} transferred"
            lines.append(line + (f" ({others})" if others else ""))
        return lines

    def format(self) -> str:
        """The printed report: a summary line, then every key under its outcome."""
        lines = [f"Pretrained weights {self.source} -> {self.network}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.adapted)} adapted (first layer), {len(self.skipped)} kept their initialisation, "
                 f"{len(self.unused_source)} source tensors unused (networks.transfer has the rule)"]
        lines += [f"  {line}" for line in self.by_module()]
        lines.append(f"loaded ({len(self.loaded)}):")
        lines += [f"  {k}" for k in self.loaded]
        if self.adapted:
            lines.append(f"adapted ({len(self.adapted)}):")
            lines += [f"  {k}: {rule}" for k, rule in self.adapted.items()]
        for reason in (HEAD, MISSING, SHAPE):
            keys = [(k, detail) for k, (r, detail) in self.skipped.items() if r == reason]
            if keys:
                lines.append(f"skipped, {reason} ({len(keys)}):")
                lines += [f"  {k}" + (f" ({detail})" if detail else "") for k, detail in keys]
        if self.unused_source:
            lines.append(f"source tensors not used ({len(self.unused_source)}):")
            lines += [f"  {k}" for k in self.unused_source]
        return "\n".join(lines)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without the ``module.`` / ``_orig_mod.`` of a DDP / torch.compile model saved as it was."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def first_layer_keys(network: nn.Module) -> set:
    """State-dict keys (aliases included) of the weight of each encoder's first convolution."""
    encoders = [getattr(network, "encoder", None)] + list(getattr(network, "encoders", None) or [])
    weights = set()
    for encoder in encoders:
        if encoder is None:
            continue
        first = next((m for m in encoder.modules() if isinstance(m, _ConvNd)), None)
        if first is not None:
            weights.add(id(first.weight))
    return {name for name, p in network.named_parameters(remove_duplicate=False) if id(p) in weights}


def adapt_first_layer(source: torch.Tensor, shape: torch.Size, previous_stage_channels: int = 0,
                      source_previous_stage_channels: int = 0) -> Optional[Tuple[torch.Tensor, str]]:
    """Rule 4 of the module docstring: a kernel ``(out, C_src, *k)`` as ``(out, C, *k)``, with the rule's
    description; None when more than the input channels differ or neither image channel count divides the
    other. The last ``previous_stage_channels`` P of the C channels, and the last
    ``source_previous_stage_channels`` P_src of the C_src, are a cascade's segmentation: the image channels
    follow the rule, and the P are the source's P_src where both stages segment the same labels (P == P_src),
    zero otherwise."""
    if source.dim() != len(shape) or source.dim() < 3 or source.shape[0] != shape[0] \
            or source.shape[2:] != shape[2:]:
        return None
    p, p_src = previous_stage_channels, source_previous_stage_channels
    if p or p_src:
        if shape[1] - p < 1 or source.shape[1] - p_src < 1:
            return None
        source_image = source[:, :source.shape[1] - p_src]
        image_shape = torch.Size((shape[0], shape[1] - p, *shape[2:]))
        if image_shape == source_image.shape:
            image, rule = source_image, f"image input channels {source_image.shape[1]} kept"
        else:
            adapted = adapt_first_layer(source_image, image_shape)
            if adapted is None:
                return None
            image, rule = adapted
        if p and p == p_src:
            return torch.cat((image, source[:, -p:]), 1), f"{rule}; the previous stage's {p} segmentation channels " \
                                                          f"copied"
        if p_src:
            rule += f"; the source's {p_src} previous-stage segmentation channels dropped"
        if not p:
            return image, rule
        zeros = source.new_zeros(shape[0], p, *shape[2:])
        return torch.cat((image, zeros), 1), f"{rule}; the previous stage's {p} segmentation channels start at 0"
    c_src, c = source.shape[1], shape[1]
    if c % c_src == 0:
        r = c // c_src
        return source.repeat(1, r, *([1] * (source.dim() - 2))) / r, \
            f"input channels {c_src} -> {c}: kernel tiled {r} times, divided by {r}"
    if c_src % c == 0:
        r = c_src // c
        return source.reshape(source.shape[0], r, c, *source.shape[2:]).sum(1), \
            f"input channels {c_src} -> {c}: sum of the kernel's {r} channel groups"
    return None


def plan_transfer(network: nn.Module, source_state: Mapping[str, torch.Tensor], source: str = "pretrained weights",
                  skip_prefixes: Tuple[str, ...] = (), source_previous_stage_channels: Optional[int] = None
                  ) -> Tuple[Dict[str, torch.Tensor], TransferReport]:
    """(the network's new state dict, the report) under the module docstring's rule; changes nothing.
    ``source_previous_stage_channels``: the source's cascade input channels (None: unknown, a plain state dict)."""
    src = strip_wrapper_prefixes(source_state)
    state = network.state_dict()
    first = first_layer_keys(network)
    previous_stage_channels = int(getattr(network, "previous_stage_channels", 0) or 0)
    report = TransferReport(source=source, network=type(network).__name__)
    used = set()
    new_state = dict(state)
    for key, target in state.items():
        if SEG_LAYER_MARK in key or key.startswith(tuple(skip_prefixes)):
            report.skipped[key] = (HEAD, "")
            continue
        source_key = key
        if key not in src and key.startswith("encoders."):
            # encoders.<n>.rest <- encoder.rest: every phase's encoder starts from the single-phase one
            rest = key.split(".", 2)[2]
            source_key = "encoder." + rest
        if source_key not in src:
            report.skipped[key] = (MISSING, "")
            continue
        value = src[source_key]
        if not isinstance(value, torch.Tensor):
            report.skipped[key] = (SHAPE, f"source entry is a {type(value).__name__}, not a tensor")
            continue
        # a first layer whose cascade channels differ from the source's is adapted even where the shapes agree
        # (a 1-phase stage with 2 segmentation channels against 3 phases)
        layouts_differ = key in first and source_previous_stage_channels is not None \
            and source_previous_stage_channels != previous_stage_channels
        if value.shape == target.shape and not layouts_differ:
            new_state[key] = value.to(dtype=target.dtype)
            report.loaded.append(key)
            used.add(source_key)
            continue
        adapted = adapt_first_layer(value.to(dtype=target.dtype), target.shape, previous_stage_channels,
                                    source_previous_stage_channels or 0) if key in first else None
        if adapted is not None:
            new_state[key], report.adapted[key] = adapted[0], f"from {source_key}, {adapted[1]}"
            used.add(source_key)
        else:
            report.skipped[key] = (SHAPE, f"source {tuple(value.shape)}, here {tuple(target.shape)}")
    _share_among_aliases(network, new_state, report)
    report.unused_source = [k for k in src if k not in used]
    return new_state, report


def _share_among_aliases(network: nn.Module, new_state: Dict[str, torch.Tensor], report: TransferReport) -> None:
    """Keys naming one tensor (``encoder.*`` and ``decoder.encoder.*``) get one value, the transferred one, and
    count as loaded: a source without the alias keys (a plain state dict) would otherwise have the report call
    them missing although their tensor was loaded, and the result would rest on ``load_state_dict`` copying
    the aliases in registration order onto views of the same parameter."""
    groups: Dict[int, List[str]] = {}
    for key, tensor in network.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    for keys in groups.values():
        done = [k for k in keys if k in report.adapted or k in report.loaded]
        if not done or len(done) == len(keys):
            continue
        for key in keys:
            if key not in done and report.skipped.get(key, (None,))[0] != HEAD:
                new_state[key] = new_state[done[0]]
                report.skipped.pop(key, None)
                report.loaded.append(key)


def load_pretrained_state(self: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "pretrained weights",
                          source_previous_stage_channels: Optional[int] = None) -> TransferReport:
    """Loads ``state_dict`` (an nnU-Net checkpoint's ``network_weights``) under the module docstring's rule
    and returns the report; networks bind it as a method (``load_pretrained_state = load_pretrained_state``)
    and list their heads in ``transfer_skip_prefixes``. ``source_previous_stage_channels``: how many of the
    source's input channels are a cascade's segmentation (``training.pretrained`` reads it from the
    checkpoint); None when unknown.

    Raises UserError (naming ``source``) and loads nothing when no encoder weight could be transferred."""
    new_state, report = plan_transfer(self, state_dict, source, tuple(getattr(self, "transfer_skip_prefixes", ())),
                                      source_previous_stage_channels)
    encoder_keys = [k for k in new_state if k.startswith(ENCODER_PREFIXES)]
    if not report.transferred(ENCODER_PREFIXES):
        mismatched = [f"{k} ({d})" for k, (r, d) in report.skipped.items() if k in encoder_keys and r == SHAPE][:3]
        found = [k for k in strip_wrapper_prefixes(state_dict)][:3]
        raise UserError(
            f"{source}: none of the {len(encoder_keys)} encoder tensors of {type(self).__name__} could be taken from "
            f"it (" + (f"shape mismatches such as {mismatched}" if mismatched else f"its keys look like {found}")
            + "); nothing was loaded",
            "pretrain with the plans of this dataset (nnUNetv2_move_plans_between_datasets -s THIS_DATASET -t "
            "PRETRAINING_DATASET -sp PLANS -tp PLANS, then nnUNetv2_preprocess and nnUNetv2_train on the "
            "pretraining dataset), or train without -pretrained_weights")
    self.load_state_dict(new_state)
    return report
