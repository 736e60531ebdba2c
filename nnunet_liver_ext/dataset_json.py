"""The dataset.json conventions this package reads (label names, phases), shared by training, inference and
evaluation."""
from typing import Mapping, Optional, Sequence, Union

#: the tumor class, first match wins (LiTS "tumor", MSD Task03 "cancer")
TUMOR_NAMES = ("tumor", "cancer", "lesion")

#: nnU-Net's ignore label (sparse annotation): voxels not annotated, left out of its loss and its metrics;
#: no class and no network output, and by nnU-Net's rule the highest label value
IGNORE_NAME = "ignore"


def named_tumor(labels: Mapping) -> Optional[Union[int, Sequence[int]]]:
    """The value under the first of ``TUMOR_NAMES`` in dataset.json's ``labels`` (a label value, or a region's
    list of values), or None."""
    return next((labels[name] for name in TUMOR_NAMES if name in labels), None)


def ignore_label(labels: Optional[Mapping]) -> Optional[int]:
    """nnU-Net's ignore label of dataset.json's ``labels``, or None."""
    value = (labels or {}).get(IGNORE_NAME)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"dataset.json labels: {IGNORE_NAME!r} must be one integer label value (nnU-Net's ignore "
                         f"label), got {value!r}")
    return value


def checked_phases(phases) -> tuple:
    """dataset.json's ``phases``: a non-empty list of distinct names (a string would be read letter by letter)."""
    if not isinstance(phases, (list, tuple)) or not phases or \
            not all(isinstance(p, str) and p.strip() for p in phases) or len(set(phases)) != len(phases):
        raise ValueError(f"dataset.json 'phases' must be a list of distinct phase names in channel order, e.g. "
                         f"[\"arterial\", \"portal_venous\", \"delayed\"]; got {phases!r}")
    return tuple(phases)


def channels_per_phase(phases: Sequence[str], num_image_channels: int) -> int:
    """Image channels per phase: dataset.json's ``phases`` name the phases in channel order, each phase one block
    of consecutive channels (``channel_names``), one channel per phase in the converters' datasets."""
    phases = checked_phases(phases)
    if num_image_channels < len(phases) or num_image_channels % len(phases):
        raise ValueError(f"{num_image_channels} image channels cannot be split into the {len(phases)} phases "
                         f"{list(phases)} of dataset.json (each phase takes the same number of consecutive channels)")
    return num_image_channels // len(phases)
