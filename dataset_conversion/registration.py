"""Rigid registration of contrast phases onto the reference (portal-venous) phase.

Mattes mutual information (phases differ in contrast, not in anatomy), an Euler3D transform
centred on the fixed image, and a three-level pyramid (shrink 4/2/1, smoothing 2/1/0
voxels). Sampling is random with a fixed seed, so a conversion is reproducible and fast.

Transform convention (SimpleITK's): the recovered transform T maps a physical point of the
fixed (reference) grid to the matching point of the moving phase, so
`registered(x) = moving(T(x))` is what `sitk.Resample(moving, fixed, T)` computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS_VOX = (2, 1, 0)


@dataclass
class RegistrationResult:
    transform: sitk.Euler3DTransform
    metric_before: float
    metric_after: float
    stop_condition: str
    overlap_fraction: float

    def summary(self) -> dict:
        """JSON-friendly record for the conversion report (angles in degrees, shifts in mm)."""
        params = self.transform.GetParameters()
        return {
            "rotation_deg": [round(math.degrees(a), 4) for a in params[:3]],
            "translation_mm": [round(t, 4) for t in params[3:]],
            "center_mm": [round(c, 4) for c in self.transform.GetCenter()],
            "metric_before": round(self.metric_before, 5),
            "metric_after": round(self.metric_after, 5),
            "overlap_fraction": round(self.overlap_fraction, 4),
            "stop_condition": self.stop_condition,
        }


def _as_float(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32) if image.GetPixelID() != sitk.sitkFloat32 else image


def _configured_method(seed: int, sampling_percentage: float, bins: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling_percentage, seed)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def evaluate_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, bins: int = 32) -> float:
    """Mattes MI (SimpleITK's sign: lower is better) over all fixed voxels at full resolution."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(_as_float(fixed), _as_float(moving)))


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the fixed grid whose transformed position lies inside the moving image."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    covered = sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return float(sitk.GetArrayViewFromImage(covered).mean())


def register_rigid(fixed: sitk.Image, moving: sitk.Image, *, seed: int = 12345,
                   sampling_percentage: float = 0.1, histogram_bins: int = 32,
                   iterations_per_level: int = 60, fixed_mask: sitk.Image | None = None) -> RegistrationResult:
    """Rigidly register `moving` onto `fixed` (both 3D, any pixel type, any grids).

    Returns the Euler3D transform (fixed -> moving physical points) and the full-resolution
    metric before (identity) and after. `fixed_mask` (nonzero = use) restricts the metric,
    e.g. to a dilated liver.
    """
    if not 0 < sampling_percentage <= 1:
        raise ValueError(f"sampling_percentage must be in (0, 1], got {sampling_percentage}")
    fixed_f, moving_f = _as_float(fixed), _as_float(moving)
    # Start from identity, rotating about the fixed image's centre: phases of one study share
    # a frame of reference, so physical coordinates already agree up to patient motion.
    # (Centring the two fields of view would "fix" a truncated phase into the wrong place.)
    initial = sitk.Euler3DTransform()
    initial.SetCenter(fixed_f.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed_f.GetSize()]))
    method = _configured_method(seed, sampling_percentage, histogram_bins)
    if fixed_mask is not None:
        method.SetMetricFixedMask(sitk.Cast(fixed_mask > 0, sitk.sitkUInt8))
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                    numberOfIterations=iterations_per_level,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    # One optimizer step = about one millimetre whatever the parameter (radians vs mm).
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS_VOX))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    final = method.Execute(fixed_f, moving_f)
    # Execute returns a composite holding one Euler3D; unwrap so callers get parameters.
    if isinstance(final, sitk.CompositeTransform) or final.GetName() == "CompositeTransform":
        final = sitk.CompositeTransform(final).GetNthTransform(0)
    euler = sitk.Euler3DTransform(final)
    identity = sitk.Euler3DTransform()
    identity.SetCenter(euler.GetCenter())
    return RegistrationResult(
        transform=euler,
        metric_before=evaluate_metric(fixed_f, moving_f, identity, histogram_bins),
        metric_after=evaluate_metric(fixed_f, moving_f, euler, histogram_bins),
        stop_condition=method.GetOptimizerStopConditionDescription(),
        overlap_fraction=overlap_fraction(fixed_f, moving_f, euler),
    )


def resample_onto(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                  is_label: bool = False) -> sitk.Image:
    """Moving image on the reference grid: linear for images (float32, outside filled with
    the moving image's minimum, i.e. air), nearest neighbour for labels (0 outside)."""
    transform = transform or sitk.Transform()
    if is_label:
        return sitk.Resample(moving, reference, transform, sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    moving_f = _as_float(moving)
    fill = float(sitk.GetArrayViewFromImage(moving_f).min())
    return sitk.Resample(moving_f, reference, transform, sitk.sitkLinear, fill, sitk.sitkFloat32)


def mask_points(mask: sitk.Image, label_values=(1, 2)) -> np.ndarray:
    """Physical (x, y, z) points of the voxels of `mask` whose value is in `label_values`;
    shape (N, 3)."""
    array = sitk.GetArrayViewFromImage(mask)
    zyx = np.argwhere(np.isin(array, label_values))
    if zyx.size == 0:
        return np.zeros((0, 3))
    index_xyz = zyx[:, ::-1].astype(np.float64)
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    return np.array(mask.GetOrigin()) + (direction @ (index_xyz * np.array(mask.GetSpacing())).T).T


def displacement_vox(transform_a: sitk.Transform, transform_b: sitk.Transform, points: np.ndarray,
                     grid: sitk.Image) -> np.ndarray:
    """|a(p) - b(p)| for each physical point p, in voxels of `grid` (displacement expressed
    along the grid axes and divided by the spacing per axis); shape (N,)."""
    if len(points) == 0:
        return np.zeros(0)
    a = np.array([transform_a.TransformPoint(tuple(p)) for p in points])
    b = np.array([transform_b.TransformPoint(tuple(p)) for p in points])
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    index_delta = (direction.T @ (a - b).T).T / np.array(grid.GetSpacing())
    return np.linalg.norm(index_delta, axis=1)


def euler_from_motion(rotation_deg, translation_mm, center) -> sitk.Euler3DTransform:
    """Euler3D transform from (rx, ry, rz) degrees and (tx, ty, tz) mm about `center` (x, y, z)."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in center))
    transform.SetRotation(*(math.radians(float(a)) for a in rotation_deg))
    transform.SetTranslation(tuple(float(t) for t in translation_mm))
    return transform


def subsample_points(points: np.ndarray, max_points: int = 20000, seed: int = 0) -> np.ndarray:
    """At most `max_points` of `points`, chosen reproducibly (residuals are means/maxima over
    a liver of 10^5-10^6 voxels; a random subset keeps the point loop cheap)."""
    if len(points) <= max_points:
        return points
    rng = np.random.default_rng(seed)
    return points[rng.choice(len(points), max_points, replace=False)]


def transform_from_summary(summary: dict) -> sitk.Euler3DTransform:
    """Rebuild the recovered transform from its report entry (`RegistrationResult.summary`)."""
    return euler_from_motion(summary["rotation_deg"], summary["translation_mm"], summary["center_mm"])


def residual_vs_truth(recovered: sitk.Transform, truth: sitk.Transform, label: sitk.Image,
                      max_points: int = 20000) -> dict:
    """Residual misalignment of a registration against a known motion (phantom truth):
    mean and max |recovered(p) - truth(p)| in voxels over the liver voxels p (labels 1, 2)
    of the reference grid `label`."""
    points = subsample_points(mask_points(label, (1, 2)), max_points)
    if len(points) == 0:
        raise ValueError("residual_vs_truth needs a label with liver voxels (1 or 2)")
    residual = displacement_vox(recovered, truth, points, label)
    return {"mean_vox": float(residual.mean()), "max_vox": float(residual.max())}
