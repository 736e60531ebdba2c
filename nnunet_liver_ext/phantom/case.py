"""The generated case: images per phase, labels, lesion truth and geometry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from nnunet_liver_ext.phantom.config import REFERENCE_PHASE, PhantomConfig

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# Tissue codes of `PhantomCase.tissue_map` (lesions are in `lesion_map`, not here).
TISSUES = {
    "air": 0, "subcutaneous_fat": 1, "muscle": 2, "visceral_fat": 3, "bowel": 4,
    "cortical_bone": 5, "cancellous_bone": 6, "spinal_canal": 7, "aorta": 8, "ivc": 9,
    "portal_vein": 10, "hepatic_vein": 11, "kidney_cortex": 12, "kidney_medulla": 13,
    "spleen": 14, "liver": 15,
}
TISSUE_NAMES = {code: name for name, code in TISSUES.items()}


@dataclass
class Lesion:
    """One lesion. `center_zyx_vox` is in voxel indices of the reference (motion-free) grid."""

    class_name: str
    center_zyx_vox: tuple
    diameter_mm: float
    low_contrast: bool
    n_voxels: int = 0
    capsule: bool = False


@dataclass
class PhantomCase:
    """One synthetic case.

    Arrays are (z, y, x). `images[k]` is phase `phases[k]` as acquired (phase-specific rigid
    motion applied, same voxel grid for all phases); `aligned_images[k]` is the same phase
    without motion. `label` (0 background, 1 liver, 2 tumor), `lesion_map` (k for
    `lesions[k-1]`) and `tissue_map` (codes in `TISSUES`) are in the reference frame.
    `spacing` is (z, y, x) mm; `origin` (x, y, z) mm and `direction` (row-major 3x3) follow
    SimpleITK. `motion[k]` describes the rigid transform T of phase k as a SimpleITK
    `Euler3DTransform` (angles in degrees here, rotation about `center_mm`): a point at p in
    the reference frame appears at T(p) in phase k, so T is what registering phase k (moving)
    to the reference (fixed) recovers.
    """

    case_id: str
    modality: str
    phases: tuple
    images: list
    aligned_images: list
    label: np.ndarray
    lesion_map: np.ndarray
    lesions: list
    case_class: Optional[str]
    curve: Optional[list]
    spacing: tuple
    origin: tuple
    direction: tuple
    motion: list
    acquisition_times_s: list
    tissue_map: Optional[np.ndarray] = None
    lesion_curves: list = field(default_factory=list)
    seed: Optional[int] = None
    index: Optional[int] = None
    config: Optional[PhantomConfig] = None

    @property
    def reference_index(self) -> int:
        return self.phases.index(REFERENCE_PHASE)

    def phase_index(self, phase: str) -> int:
        if phase not in self.phases:
            raise KeyError(f"case {self.case_id} has no phase {phase!r}; it has {self.phases}")
        return self.phases.index(phase)

    def image(self, phase: str, aligned: bool = False) -> np.ndarray:
        """The (z, y, x) image of `phase`, as acquired unless `aligned`."""
        return (self.aligned_images if aligned else self.images)[self.phase_index(phase)]

    def to_sitk(self, array: np.ndarray):
        """`array` (z, y, x) as a SimpleITK image with this case's spacing, origin and direction."""
        import SimpleITK as sitk

        array = np.asarray(array)
        if array.shape != self.label.shape:
            raise ValueError(f"case {self.case_id}: array shape {array.shape} != case shape {self.label.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image

    def motion_transform(self, phase: str):
        """Phase `phase`'s motion as a SimpleITK Euler3DTransform (reference -> phase frame)."""
        return euler_transform(self.motion[self.phase_index(phase)])


def euler_transform(motion: dict):
    """SimpleITK Euler3DTransform from a `PhantomCase.motion` entry."""
    import SimpleITK as sitk

    rx, ry, rz = (np.deg2rad(a) for a in motion["rotation_deg"])
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in motion.get("center_mm", (0.0, 0.0, 0.0))))
    transform.SetRotation(float(rx), float(ry), float(rz))
    transform.SetTranslation(tuple(float(t) for t in motion["translation_mm"]))
    return transform
