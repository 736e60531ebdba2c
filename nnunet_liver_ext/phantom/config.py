"""Phase names, lesion classes and the validated generation arguments of the phantom."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

CT_PHASES = ("pre_contrast", "arterial", "portal_venous", "delayed")
MRI_PHASES = ("pre", "arterial", "portal_venous", "delay")
DEFAULT_CT_PHASES = ("arterial", "portal_venous", "delayed")
LESION_CLASSES = ("HCC", "hemangioma", "metastasis", "cyst")
# Labels live in this phase's frame; converters register every other phase onto it.
REFERENCE_PHASE = "portal_venous"
MODALITIES = ("CT", "MRI")

# Default noise per modality: HU for CT, a fraction of the liver's pre-contrast signal for MRI.
DEFAULT_NOISE_SIGMA = {"CT": 12.0, "MRI": 0.04}

# Smallest volume a lesion may have, so that small grids (e.g. 32x96x96) still show it.
MIN_LESION_VOXELS = 30


def phases_for(modality: str) -> tuple[str, ...]:
    """All phase names valid for `modality`, in acquisition order."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return CT_PHASES if modality == "CT" else MRI_PHASES


def _pair(name: str, value, low: float, cast=float) -> tuple:
    try:
        lo, hi = (cast(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}") from None
    if not (low <= lo <= hi):
        raise ValueError(f"{name} must satisfy {low} <= min <= max, got {value!r}")
    return lo, hi


@dataclass
class PhantomConfig:
    """Everything that decides a phantom case apart from its seed and index.

    Spacing and shape are in array-axis order (z, y, x). Intensities: HU for CT, arbitrary
    scanner units for MRI (`noise_sigma` is then relative to the liver's pre-contrast signal).

    Attributes beyond the API contract:
        p_no_lesion: probability that a case has no lesion when `n_lesions_range` allows 0.
        low_contrast_fraction: share of lesions whose contrast is scaled down to 35-55 %.
        class_mixing: probability that a secondary lesion's class differs from the case's
            dominant class (multifocal disease usually shares one diagnosis).
        max_lesion_fraction: largest lesion diameter as a fraction of the liver's largest
            inscribed ball, so lesions always fit the (possibly tiny) volume.
    """

    modality: str = "CT"
    phases: Optional[tuple] = None
    shape: tuple = (64, 192, 192)
    inplane_spacing_range: tuple = (0.6, 1.0)
    slice_spacing_range: tuple = (1.5, 5.0)
    lesion_classes: tuple = LESION_CLASSES
    n_lesions_range: tuple = (0, 4)
    lesion_diameter_range_mm: tuple = (6.0, 60.0)
    contrast: float = 1.0
    noise_sigma: Optional[float] = None
    blur_sigma_mm: float = 0.7
    motion_mm: float = 3.0
    motion_deg: float = 2.0
    p_no_lesion: float = 0.15
    low_contrast_fraction: float = 0.2
    class_mixing: float = 0.25
    max_lesion_fraction: float = 0.75

    def __post_init__(self):
        valid = phases_for(self.modality)
        if self.phases is None:
            self.phases = DEFAULT_CT_PHASES if self.modality == "CT" else MRI_PHASES
        if isinstance(self.phases, str):
            raise ValueError(f"phases must be a sequence of phase names, got the string {self.phases!r}")
        self.phases = tuple(self.phases)
        unknown = [p for p in self.phases if p not in valid]
        if unknown:
            raise ValueError(f"unknown {self.modality} phase(s) {unknown}; valid phases: {valid}")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError(f"duplicate phases in {self.phases}")
        if REFERENCE_PHASE not in self.phases:
            raise ValueError(f"phases must contain the reference phase {REFERENCE_PHASE!r}, got {self.phases}")
        if list(self.phases) != sorted(self.phases, key=valid.index):
            raise ValueError(f"phases must be in acquisition order {valid}, got {self.phases}")

        try:
            self.shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape must be three integers (z, y, x), got {self.shape!r}") from None
        if len(self.shape) != 3 or self.shape[0] < 8 or min(self.shape[1:]) < 32:
            raise ValueError(f"shape must be (z, y, x) with z >= 8 and y, x >= 32, got {self.shape}")

        self.inplane_spacing_range = _pair("inplane_spacing_range", self.inplane_spacing_range, 1e-3)
        self.slice_spacing_range = _pair("slice_spacing_range", self.slice_spacing_range, 1e-3)
        self.lesion_diameter_range_mm = _pair("lesion_diameter_range_mm", self.lesion_diameter_range_mm, 1e-3)
        self.n_lesions_range = _pair("n_lesions_range", self.n_lesions_range, 0, cast=int)
        if self.n_lesions_range[1] > 20:
            raise ValueError(f"n_lesions_range allows at most 20 lesions, got {self.n_lesions_range}")

        self.lesion_classes = tuple(self.lesion_classes)
        bad = [c for c in self.lesion_classes if c not in LESION_CLASSES]
        if not self.lesion_classes or bad:
            raise ValueError(f"lesion_classes must be a non-empty subset of {LESION_CLASSES}, got {self.lesion_classes}")
        # A fixed order keeps class indices identical whatever order the user typed.
        self.lesion_classes = tuple(c for c in LESION_CLASSES if c in self.lesion_classes)

        if self.noise_sigma is None:
            self.noise_sigma = DEFAULT_NOISE_SIGMA[self.modality]
        for name, upper in (("contrast", 5.0), ("noise_sigma", 1e4), ("blur_sigma_mm", 10.0),
                            ("motion_mm", 50.0), ("motion_deg", 30.0), ("p_no_lesion", 1.0),
                            ("low_contrast_fraction", 1.0), ("class_mixing", 1.0),
                            ("max_lesion_fraction", 1.0)):
            value = float(getattr(self, name))
            if not (0.0 <= value <= upper):
                raise ValueError(f"{name} must lie in [0, {upper}], got {value}")
            setattr(self, name, value)
        if self.contrast == 0.0 or self.max_lesion_fraction == 0.0:
            raise ValueError("contrast and max_lesion_fraction must be > 0")

    @property
    def reference_index(self) -> int:
        return self.phases.index(REFERENCE_PHASE)

    def to_dict(self) -> dict:
        """JSON-ready copy (tuples become lists) for provenance records."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "PhantomConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown PhantomConfig field(s): {sorted(unknown)}")
        return cls(**values)
