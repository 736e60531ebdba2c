"""The rigid misregistration of the robustness test (inference/perturbation.py): bounded, the identity
at zero, on the input's grid, and it moves the content where the convention says (checked with the
centroid of a bright ball, computed independently of SimpleITK's transform classes)."""
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.inference.perturbation import (IDENTITY, RigidPerturbation, image_centre, perturb_case_files,
                                                     perturb_image, random_perturbation)

SPACING = (0.8, 0.8, 2.5)  # x, y, z in mm: anisotropic, as CT
SIZE = (48, 48, 24)
ORIGIN = (-20.0, 13.0, 40.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated in-plane: index and physical axes differ


def ball_image(centre_mm, radius_mm=6.0) -> sitk.Image:
    """A smooth bright ball (float32) at a physical point, on the test grid."""
    image = sitk.Image(SIZE, sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    points = physical_points(image)
    distance = np.linalg.norm(points - np.asarray(centre_mm), axis=-1)
    values = 1000.0 / (1.0 + np.exp((distance - radius_mm) / 0.7))  # smooth edge: linear interpolation is fair
    array = values.transpose(2, 1, 0).astype(np.float32)  # (x, y, z) -> SimpleITK's array order (z, y, x)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


def physical_points(image) -> np.ndarray:
    """(x, y, z, 3) physical coordinates of every voxel: origin + direction @ (index * spacing)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()], indexing="ij"), -1).astype(np.float64)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T


def centroid(image) -> np.ndarray:
    weights = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float64)
    return (physical_points(image) * weights[..., None]).sum((0, 1, 2)) / weights.sum()


def test_random_perturbations_stay_within_the_bounds_and_use_them():
    rng = np.random.default_rng(0)
    draws = [random_perturbation(rng, max_mm=5.0, max_deg=7.0) for _ in range(2000)]
    angles = np.array([abs(p.angle_deg) for p in draws])
    shifts = np.array([p.shift_mm for p in draws])
    assert angles.max() <= 7.0 and shifts.max() <= 5.0 + 1e-9
    assert angles.max() > 6.9 and shifts.max() > 4.9  # the whole range is drawn, not a fraction of it
    for p in draws[:50]:  # the matrix is a rotation by exactly that angle
        r = p.rotation_matrix()
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1, 1))) == pytest.approx(abs(p.angle_deg), abs=1e-6)


def test_scale_shrinks_the_same_motion():
    full = random_perturbation(np.random.default_rng(3), 5.0, 7.0, scale=1.0)
    half = random_perturbation(np.random.default_rng(3), 5.0, 7.0, scale=0.5)
    assert half.axis == full.axis and half.angle_deg == pytest.approx(full.angle_deg / 2)
    np.testing.assert_allclose(half.translation_mm, np.asarray(full.translation_mm) / 2)


def test_zero_perturbation_is_the_identity_and_the_grid_is_kept():
    image = ball_image(image_centre(ball_image((0, 0, 0))))
    moved = perturb_image(image, IDENTITY)
    np.testing.assert_allclose(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(image), atol=1e-3)
    p = random_perturbation(np.random.default_rng(1), 5.0, 7.0)
    for result in (moved, perturb_image(image, p)):
        assert result.GetSize() == image.GetSize() and result.GetPixelID() == image.GetPixelID()
        np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing())
        np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin())
        np.testing.assert_allclose(result.GetDirection(), image.GetDirection())


def test_content_moves_as_the_convention_says():
    """A ball at p goes to R (p - c) + c + t (c: image centre), in mm, on an anisotropic rotated grid."""
    reference = ball_image((0, 0, 0))
    c = np.asarray(image_centre(reference))
    p = c + np.array([8.0, -5.0, 6.0])  # off-centre, so the rotation moves it too
    image = ball_image(p)
    perturbation = RigidPerturbation(axis=(0.3, -0.5, 0.8), angle_deg=7.0, translation_mm=(3.0, -2.0, 3.0))
    expected = perturbation.rotation_matrix() @ (p - c) + c + np.asarray(perturbation.translation_mm)
    moved = centroid(perturb_image(image, perturbation))
    np.testing.assert_allclose(centroid(image), p, atol=0.05)
    # linear interpolation on 0.8 x 0.8 x 2.5 mm voxels: the centroid lands within a few tenths of a mm
    np.testing.assert_allclose(moved, expected, atol=0.3)
    assert np.linalg.norm(moved - p) > 3.0  # it did move


def test_identity_channels_are_copied_byte_for_byte(tmp_path):
    image = ball_image(np.asarray(image_centre(ball_image((0, 0, 0)))) + 4.0)
    files = []
    for k in range(2):
        files.append(str(tmp_path / f"case_000{k}.nii.gz"))
        sitk.WriteImage(image, files[-1], True)
    out = [str(tmp_path / f"out_000{k}.nii.gz") for k in range(2)]
    moved = random_perturbation(np.random.default_rng(2), 5.0, 7.0)
    perturb_case_files(files, out, [IDENTITY, moved])
    assert open(out[0], "rb").read() == open(files[0], "rb").read()
    assert not np.allclose(sitk.GetArrayFromImage(sitk.ReadImage(out[1])), sitk.GetArrayFromImage(image))
