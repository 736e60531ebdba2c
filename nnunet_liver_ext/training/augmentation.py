"""Data augmentation for multiphase inputs.

nnU-Net draws brightness, contrast and gamma augmentation independently per input channel. For
a multiphase scan the channels are phases, and the ratios between them (arterial
hyper-enhancement, wash-out, fill-in) are the signal the temporal methods characterize lesions
by: independent per-phase rescaling by x0.75-1.25 scrambles it. With the phases synchronized,
every phase of a sample gets the same intensity transform, so the augmentation still varies
scanners and contrast timing globally but keeps each case's enhancement pattern.
"""
from __future__ import annotations

from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

PHASE_SYNCHRONIZED_TRANSFORMS = (MultiplicativeBrightnessTransform, ContrastTransform, GammaTransform)


def synchronize_phase_intensity(transforms) -> int:
    """Sets ``synchronize_channels`` on the intensity transforms inside nnU-Net's training
    pipeline (in place); returns how many it changed, so a caller can insist on finding them."""
    changed = 0
    for transform in (transforms.transforms if isinstance(transforms, ComposeTransforms) else [transforms]):
        inner = transform.transform if isinstance(transform, RandomTransform) else transform
        if isinstance(inner, ComposeTransforms):
            changed += synchronize_phase_intensity(inner)
        elif isinstance(inner, PHASE_SYNCHRONIZED_TRANSFORMS):
            inner.synchronize_channels = True
            changed += 1
    return changed
