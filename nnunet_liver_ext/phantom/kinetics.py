"""Intensity per tissue and phase, and the enhancement kinetics of each lesion class.

Values are given for the four phases of a modality in acquisition order (CT: pre-contrast,
arterial, portal venous, delayed; MRI: pre, arterial, portal venous, delay). CT values are
HU; MRI values are relative to the liver's pre-contrast signal (scaled per case by a scanner
gain). The aorta peaks in the arterial phase, the liver parenchyma in the portal venous phase.

Lesion kinetics, relative to the liver L and the blood pool of the same phase:
  HCC          arterial hyper-enhancement, near-iso in portal venous, washout (hypo) when
               delayed; optional capsule that enhances late.
  hemangioma   peripheral nodules as bright as blood in the arterial phase, centripetal fill-in
               (about half the volume in portal venous, most of it when delayed), persistent.
  metastasis   enhancing rim around a hypo-enhancing centre in every phase.
  cyst         water density / T1-dark fluid, no enhancement.
HCC and hemangioma are deliberately alike on average in the portal venous phase: what tells
them apart is the arterial and delayed behaviour (the point of a multiphase model).
"""
from __future__ import annotations

import numpy as np

from nnunet_liver_ext.phantom.case import TISSUES

# tissue -> (pre, arterial, portal venous, delayed) in HU
CT_TISSUE_VALUES = {
    "air": (-1000, -1000, -1000, -1000),
    "subcutaneous_fat": (-105, -105, -103, -104),
    "muscle": (50, 58, 68, 62),
    "visceral_fat": (-95, -95, -93, -94),
    "bowel": (30, 70, 85, 65),
    "cortical_bone": (750, 750, 755, 752),
    "cancellous_bone": (230, 235, 245, 240),
    "spinal_canal": (15, 15, 20, 18),
    "aorta": (42, 320, 170, 120),
    "ivc": (40, 75, 150, 115),
    "portal_vein": (42, 110, 185, 125),
    "hepatic_vein": (42, 55, 165, 125),
    "kidney_cortex": (32, 190, 175, 125),
    "kidney_medulla": (30, 80, 165, 150),
    "spleen": (48, 125, 125, 105),
    "liver": (58, 78, 115, 95),
}

# tissue -> (pre, arterial, portal venous, delay), relative to the liver's pre-contrast signal
# (T1-weighted fat-suppressed gradient echo after a gadolinium bolus).
MRI_TISSUE_VALUES = {
    "air": (0.03, 0.03, 0.03, 0.03),
    "subcutaneous_fat": (0.30, 0.30, 0.31, 0.31),
    "muscle": (0.55, 0.65, 0.80, 0.80),
    "visceral_fat": (0.28, 0.28, 0.29, 0.29),
    "bowel": (0.60, 0.90, 1.10, 1.00),
    "cortical_bone": (0.05, 0.05, 0.05, 0.05),
    "cancellous_bone": (0.40, 0.45, 0.55, 0.55),
    "spinal_canal": (0.25, 0.25, 0.27, 0.28),
    "aorta": (0.50, 3.00, 1.90, 1.50),
    "ivc": (0.50, 0.80, 1.80, 1.50),
    "portal_vein": (0.50, 1.50, 2.00, 1.60),
    "hepatic_vein": (0.50, 0.60, 1.80, 1.60),
    "kidney_cortex": (0.80, 2.50, 1.90, 1.60),
    "kidney_medulla": (0.60, 1.20, 1.90, 1.90),
    "spleen": (0.75, 1.80, 1.55, 1.35),
    "liver": (1.00, 1.20, 1.60, 1.45),
}

# Tissues whose signal does not come from contrast uptake (no bolus scaling for them).
_NON_ENHANCING = {"air", "subcutaneous_fat", "visceral_fat", "cortical_bone", "spinal_canal"}


def tissue_table(modality: str, rng: np.random.Generator) -> np.ndarray:
    """Per-case lookup table, float32 (n_tissue_codes, 4 canonical phases).

    Randomises the bolus (enhancement scaled by 0.85-1.15), the arterial timing (the
    arterial peak of the aorta by a further 0.8-1.15) and the liver's native density
    (steatosis lowers it), within plausible ranges.
    """
    source = CT_TISSUE_VALUES if modality == "CT" else MRI_TISSUE_VALUES
    unit = 1.0 if modality == "CT" else 0.01  # per-case offsets, HU or relative signal
    bolus = rng.uniform(0.85, 1.15)
    arterial_timing = rng.uniform(0.8, 1.15)
    liver_native = rng.uniform(-10.0, 8.0) * unit
    table = np.zeros((max(TISSUES.values()) + 1, 4), dtype=np.float32)
    for name, values in source.items():
        v = np.asarray(values, dtype=np.float64)
        if name not in _NON_ENHANCING:
            enh = (v - v[0]) * bolus
            if name in ("aorta", "kidney_cortex", "spleen"):
                enh[1] *= arterial_timing
            v = v[0] + enh + rng.uniform(-3.0, 3.0) * unit
        if name == "liver":
            v = v + liver_native
        table[TISSUES[name]] = v
    return table


def lesion_compartments(class_name: str, modality: str, liver: np.ndarray, blood: np.ndarray,
                        rng: np.random.Generator, low_contrast: bool) -> dict:
    """Compartment intensities of one lesion, each a float64 array over the 4 canonical phases,
    before contrast scaling; plus the geometric parameters of its pattern.

    liver, blood: the case's liver and aorta values over the 4 canonical phases.
    """
    L = liver
    if modality == "CT":
        s, water = 1.0, (rng.uniform(18, 30) if low_contrast else rng.uniform(0, 15))
    else:
        s, water = 0.01, (rng.uniform(0.45, 0.55) if low_contrast else rng.uniform(0.25, 0.35))
    # MRI offsets are expressed in % of the liver's pre-contrast signal (s converts).
    if class_name == "HCC":
        core = L + s * np.array([-12.0 if s == 1 else -25.0,
                                 rng.uniform(45, 75) if s == 1 else rng.uniform(45, 80),
                                 rng.uniform(-22, 0),
                                 -rng.uniform(18, 32) if s == 1 else -rng.uniform(25, 40)])
        capsule = L + s * np.array([-5.0, -3.0, 20.0, 28.0])
        return {"core": core, "capsule": capsule, "has_capsule": bool(rng.random() < 0.5),
                "mosaic": 10.0 * s}
    if class_name == "hemangioma":
        unfilled = L[0] + s * (-15.0 if s == 1 else -45.0) + s * np.array([0.0, 3.0, 8.0, 12.0])
        filled = np.array([unfilled[0], 0.78 * blood[1], L[2] + s * (55.0 if s == 1 else 45.0),
                           L[3] + s * (35.0 if s == 1 else 35.0)])
        return {"unfilled": unfilled, "filled": filled,
                "fill_arterial": rng.uniform(0.06, 0.14), "fill_portal": rng.uniform(0.38, 0.62),
                "fill_delayed": rng.uniform(0.82, 1.0)}
    if class_name == "metastasis":
        rim = L + s * np.array([-8.0, 25.0, 8.0, 0.0])
        if s == 1:
            centre = np.array([32.0, 36.0, 46.0, 56.0]) + rng.uniform(-5, 5)
        else:
            centre = np.array([0.55, 0.60, 0.70, 0.80]) + rng.uniform(-0.05, 0.05)
        return {"rim": rim, "centre": centre, "rim_depth": rng.uniform(0.14, 0.24)}
    if class_name == "cyst":
        return {"fluid": np.full(4, water)}
    raise ValueError(f"unknown lesion class {class_name!r}")


def fill_depth(volume_fraction: float) -> float:
    """Depth (0 surface .. 1 centre) of a front enclosing `volume_fraction` of a sphere."""
    return float(1.0 - (1.0 - np.clip(volume_fraction, 0.0, 1.0)) ** (1.0 / 3.0))
