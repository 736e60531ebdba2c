"""Random rigid misregistration of phases, for the robustness test of the STD-Net paper.

Multiphase networks assume that the phases of a case are registered (nnU-Net's raw format has them
on one grid). The test moves phases by small random rigid transforms at inference (the paper: up to
5 mm and 7 degrees) and measures how much the segmentation suffers.

Convention (physical coordinates, mm, SimpleITK's x, y, z): a perturbation with rotation R (angle
``angle_deg`` about the unit ``axis``) and translation t moves the content at point p of the image
to ``p' = R (p - c) + c + t``, where c is the image's centre. So t is the displacement of the
centre, and no point within r mm of the centre moves by more than ``|t| + 2 r sin(angle / 2)``.
The perturbed image is resampled onto the original grid (size, spacing, origin, direction and
pixel type kept) with linear interpolation; voxels that come from outside the image get the
image's minimum (air for CT).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RigidPerturbation:
    """A rigid motion about the image centre: ``angle_deg`` about unit ``axis`` (x, y, z), then
    ``translation_mm`` (x, y, z)."""
    axis: tuple
    angle_deg: float
    translation_mm: tuple

    @property
    def shift_mm(self) -> float:
        return float(np.linalg.norm(self.translation_mm))

    def rotation_matrix(self) -> np.ndarray:
        """(3, 3) rotation matrix (Rodrigues' formula) in x, y, z."""
        k = np.asarray(self.axis, dtype=np.float64)
        k = k / np.linalg.norm(k)
        theta = math.radians(self.angle_deg)
        cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
        return np.eye(3) + math.sin(theta) * cross + (1.0 - math.cos(theta)) * cross @ cross

    def to_json(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


IDENTITY = RigidPerturbation(axis=(0.0, 0.0, 1.0), angle_deg=0.0, translation_mm=(0.0, 0.0, 0.0))


def _unit_vector(rng: np.random.Generator) -> tuple:
    v = rng.standard_normal(3)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def random_perturbation(rng: np.random.Generator, max_mm: float, max_deg: float, scale: float = 1.0
                        ) -> RigidPerturbation:
    """A rotation of uniform angle in [-max_deg, max_deg] about a uniformly random axis, and a
    translation of uniform length in [0, max_mm] in a uniformly random direction, both times
    ``scale``. The random numbers drawn do not depend on ``scale``, so one generator state gives
    the same motions at every scale, only larger or smaller."""
    axis = _unit_vector(rng)
    angle_fraction = float(rng.uniform(-1.0, 1.0))
    direction = np.asarray(_unit_vector(rng))
    length_fraction = float(rng.uniform(0.0, 1.0))
    translation = direction * length_fraction * max_mm * scale
    return RigidPerturbation(axis=axis, angle_deg=angle_fraction * max_deg * scale,
                             translation_mm=tuple(float(t) for t in translation))


def image_centre(image) -> tuple:
    """Physical centre (x, y, z) of a SimpleITK image: the point halfway between its first and last voxel."""
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])


def content_transform(image, perturbation: RigidPerturbation):
    """The SimpleITK transform p -> R (p - c) + c + t that moves the content of ``image``."""
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetCenter(image_centre(image))
    transform.SetMatrix(tuple(float(x) for x in perturbation.rotation_matrix().ravel()))
    transform.SetTranslation(tuple(float(t) for t in perturbation.translation_mm))
    return transform


def perturb_image(image, perturbation: RigidPerturbation):
    """``image`` (3-D SimpleITK image) with its content moved by ``perturbation``, on the same grid.
    Resampling pulls each output voxel from the inverse-transformed point of the input."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise ValueError(f"rigid perturbation needs a 3-D image, got {image.GetDimension()}-D")
    inverse = content_transform(image, perturbation).GetInverse()
    outside = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, inverse, sitk.sitkLinear, outside, image.GetPixelID())


def perturb_case_files(files: Sequence[str], out_files: Sequence[str], perturbations: Sequence[RigidPerturbation]
                       ) -> None:
    """Writes channel ``k`` of a case, moved by ``perturbations[k]``, to ``out_files[k]``. A channel
    whose perturbation is the identity is copied unchanged (byte for byte), so the reference phase
    is exactly the unperturbed input."""
    import shutil

    import SimpleITK as sitk

    for src, dst, perturbation in zip(files, out_files, perturbations):
        if perturbation.angle_deg == 0.0 and perturbation.shift_mm == 0.0:
            shutil.copyfile(src, dst)
        else:
            sitk.WriteImage(perturb_image(sitk.ReadImage(src), perturbation), dst, True)
