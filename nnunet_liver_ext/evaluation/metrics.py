"""Segmentation overlap and surface metrics with the conventions of DESIGN.md.

Arrays are label maps or boolean masks of shape (z, y, x) (any ndim works) and
``spacing`` is ALWAYS in array-axis order, i.e. the reverse of SimpleITK's
``GetSpacing()``. Distances come out in the unit of the spacing (mm for NIfTI).

Definitions (TP/FP/FN are voxel counts of the binary masks P = prediction, R = reference):

* Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), VOE = 1 - IoU
* RVD = (|P| - |R|) / |R| (signed: positive means over-segmentation)
* precision = TP / (TP + FP), recall = TP / (TP + FN)
* Surfaces are the boundary voxels ``mask & ~erode(mask)`` with the face-connected
  (6-neighbourhood in 3D) structuring element and voxels outside the image counted as
  background - the definition of MONAI ``get_mask_edges`` and medpy ``connectivity=1``.
  d(P->R) are the Euclidean distances (scaled by spacing) of every boundary voxel of P to
  the nearest boundary voxel of R, and vice versa.
* ASSD = mean of the *pooled* distances d(P->R) u d(R->P) (LiTS, medpy ``assd``, MONAI
  ``compute_average_surface_distance(symmetric=True)``). It is NOT the mean of the two
  directed means: that one weights both surfaces equally regardless of their size.
* HD95 = max(95th percentile of d(P->R), 95th percentile of d(R->P)) (MONAI
  ``compute_hausdorff_distance(percentile=95)``, Metrics Reloaded). It is NOT the 95th
  percentile of the pooled distances (what medpy ``hd95`` returns).
* Surface Dice at tolerance t (optional; Nikolov et al. with boundary voxel counts as in
  MONAI ``compute_surface_dice(use_subvoxels=False)``):
  (#{d(P->R) <= t} + #{d(R->P) <= t}) / (#boundary(P) + #boundary(R)).
* Unannotated voxels (nnU-Net's ignore label, ``unannotated``): both masks are taken as empty
  there, and a voxel whose background neighbours are all unannotated is no boundary voxel: where
  the annotation stops, the reference's surface is unknown, and a cut through both masks would
  otherwise count as a surface on which they agree. The surfaces are the observable ones. A
  non-empty mask may have none (an annotated pocket it fills): then ASSD and HD95 are NaN and
  surface Dice is 0, or NaN when neither mask has an observable surface.

Empty-mask policy (``EMPTY_MASK_POLICY`` below, printed as a table in every report). Each
result carries ``status`` so cases with a NaN are counted, never silently dropped:

=============  =========================  ==========================  ===========================
metric         both empty ("both_empty")  only R empty ("ref_empty")  only P empty ("pred_empty")
=============  =========================  ==========================  ===========================
Dice, IoU      1                          0                           0
VOE            0                          1                           1
RVD            0                          NaN (division by 0)         -1
precision      1                          0                           NaN (no prediction)
recall         1                          NaN (nothing to find)       0
ASSD, HD95     0                          NaN                         NaN
surface Dice   1                          0                           0
=============  =========================  ==========================  ===========================
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, generate_binary_structure
from scipy.spatial import cKDTree

from nnunet_liver_ext.dataset_json import IGNORE_NAME, TUMOR_NAMES, named_tumor

NAN = float("nan")

STATUS_BOTH_PRESENT = "both_present"
STATUS_BOTH_EMPTY = "both_empty"
STATUS_REF_EMPTY = "ref_empty"
STATUS_PRED_EMPTY = "pred_empty"
STATUSES = (STATUS_BOTH_PRESENT, STATUS_BOTH_EMPTY, STATUS_REF_EMPTY, STATUS_PRED_EMPTY)

SURFACE_DICE_SLACK_MM = 1e-6

OVERLAP_METRICS = ("dice", "iou", "voe", "rvd", "precision", "recall")
SURFACE_METRICS = ("assd_mm", "hd95_mm")

# (metric, both empty, only reference empty, only prediction empty): what the code returns,
# as text for the report. Kept next to the code that implements it; a test checks they agree.
EMPTY_MASK_POLICY = (
    ("Dice, IoU", "1", "0", "0"),
    ("VOE", "0", "1", "1"),
    ("RVD", "0", "NaN (division by 0)", "-1"),
    ("precision", "1", "0", "NaN (no predicted voxel)"),
    ("recall", "1", "NaN (no reference voxel)", "0"),
    ("ASSD, HD95", "0", "NaN", "NaN"),
    ("surface Dice", "1", "0", "0"),
)


@dataclass(frozen=True)
class Region:
    """A structure evaluated as the union of some label values.

    ``key`` names CSV columns (``{key}_{metric}``); ``display`` is the name the report prints.
    """
    key: str
    labels: tuple[int, ...]
    display: str


LIVER_REGION = Region("liver_region", (1, 2), "liver (region {1,2}: liver incl. tumor, LiTS)")
LIVER_LABEL1 = Region("liver_label1", (1,), "liver label 1 only (nnU-Net summary.json)")
TUMOR = Region("tumor", (2,), "tumor (label 2)")
DEFAULT_REGIONS = (LIVER_REGION, LIVER_LABEL1, TUMOR)


def regions_from_labels(labels: Mapping[str, int | Sequence[int]] | None) -> tuple[Region, ...]:
    """Regions to evaluate for a dataset.json ``labels`` dict.

    With the LiTS schema (liver=1, tumor=2; the tumor may be named like MSD's ``cancer`` or ``lesion``,
    ``dataset_json.TUMOR_NAMES``) both liver definitions and the tumor are returned. Any other schema gets
    one region per foreground entry (nnU-Net region entries, given as lists of label values, become
    unions). nnU-Net's ignore label is no region: its voxels are left out of every metric
    (``benchmark.compute_case``).
    """
    if labels is None:
        return DEFAULT_REGIONS
    if not isinstance(labels, Mapping):
        raise TypeError(f"dataset.json 'labels' must be a dict name -> value, got {type(labels).__name__}")
    if labels.get("liver") == 1 and named_tumor(labels) == 2:
        tumor_name = next(name for name in TUMOR_NAMES if name in labels)
        return DEFAULT_REGIONS if tumor_name == TUMOR.key else \
            (LIVER_REGION, LIVER_LABEL1, Region(TUMOR.key, TUMOR.labels, f"{tumor_name} (label 2)"))
    regions = []
    for name, value in labels.items():
        if name == IGNORE_NAME:
            continue
        values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if values == (0,):
            continue
        if 0 in values:
            raise ValueError(f"label '{name}' includes background 0: {value}")
        key = "".join(c if c.isalnum() else "_" for c in name.lower())
        regions.append(Region(key, values, f"{name} (label{'s' if len(values) > 1 else ''} "
                                            f"{', '.join(map(str, values))})"))
    if not regions:
        raise ValueError(f"dataset.json 'labels' has no foreground label: {dict(labels)}")
    return tuple(regions)


def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[float, ...] | None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {ref.ndim}-D array "
                         f"(spacing must be in array axis order, e.g. (z, y, x))")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def mask_status(pred_mask: np.ndarray, ref_mask: np.ndarray) -> str:
    """One of STATUSES, from the emptiness of the two masks."""
    has_pred, has_ref = bool(pred_mask.any()), bool(ref_mask.any())
    if has_pred and has_ref:
        return STATUS_BOTH_PRESENT
    if not has_pred and not has_ref:
        return STATUS_BOTH_EMPTY
    return STATUS_PRED_EMPTY if has_ref else STATUS_REF_EMPTY


def overlap_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray) -> dict[str, float]:
    """Dice, IoU, VOE, RVD, precision, recall of two boolean masks of equal shape.

    Empty masks follow the module's policy table; nothing is ever a silent 0.
    """
    _check_pair(pred_mask, ref_mask)
    pred_mask, ref_mask = pred_mask.astype(bool, copy=False), ref_mask.astype(bool, copy=False)
    tp = int(np.count_nonzero(pred_mask & ref_mask))
    n_pred, n_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
    fp, fn = n_pred - tp, n_ref - tp
    if n_pred == 0 and n_ref == 0:
        return dict(dice=1.0, iou=1.0, voe=0.0, rvd=0.0, precision=1.0, recall=1.0)
    iou = tp / (tp + fp + fn)
    return dict(
        dice=2 * tp / (2 * tp + fp + fn),
        iou=iou,
        voe=1.0 - iou,
        rvd=(n_pred - n_ref) / n_ref if n_ref else NAN,
        precision=tp / n_pred if n_pred else NAN,
        recall=tp / n_ref if n_ref else NAN,
    )


def boundary(mask: np.ndarray, unannotated: np.ndarray | None = None) -> np.ndarray:
    """Boundary voxels of a boolean mask: mask minus its face-connected erosion.

    Voxels on the array edge count as boundary (outside the array is background). With ``unannotated``
    (a boolean mask of the same shape, disjoint from ``mask``), a neighbour there does not make a
    boundary: only annotated background or the array edge does.
    """
    structure = generate_binary_structure(mask.ndim, 1)
    inside = mask if unannotated is None else mask | unannotated
    return mask & ~binary_erosion(inside, structure=structure, border_value=0)


def _annotated_only(pred_mask: np.ndarray, ref_mask: np.ndarray, unannotated: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Boolean masks with the unannotated voxels taken out (``unannotated`` None where there are none)."""
    pred_mask, ref_mask = pred_mask.astype(bool, copy=False), ref_mask.astype(bool, copy=False)
    if unannotated is None:
        return pred_mask, ref_mask, None
    if unannotated.shape != ref_mask.shape:
        raise ValueError(f"unannotated mask shape {unannotated.shape} != reference shape {ref_mask.shape}")
    unannotated = unannotated.astype(bool, copy=False)
    if not unannotated.any():
        return pred_mask, ref_mask, None
    return pred_mask & ~unannotated, ref_mask & ~unannotated, unannotated


def surface_points(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                   unannotated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boundary voxels of two masks (observable ones with ``unannotated``), as ``(n, ndim)`` float64
    coordinates scaled by ``spacing`` (array axis order), P's then R's."""
    spacing = _check_pair(pred_mask, ref_mask, spacing)
    pred_mask, ref_mask, unannotated = _annotated_only(pred_mask, ref_mask, unannotated)
    scale = np.asarray(spacing, dtype=np.float64)
    if not pred_mask.any() and not ref_mask.any():
        return np.zeros((0, ref_mask.ndim)), np.zeros((0, ref_mask.ndim))
    # Every boundary voxel lies inside the union's bounding box, so only that box is eroded.
    # A one-voxel margin keeps the erosion identical to the uncropped one (the margin's
    # unannotated voxels are cropped with it, and beyond the image edge border_value=0 plays
    # the role of background).
    union_coords = np.nonzero(pred_mask | ref_mask)
    crop = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in union_coords)
    unannotated = None if unannotated is None else unannotated[crop]
    offset = np.asarray([c.start for c in crop], dtype=np.float64)
    return tuple((np.argwhere(boundary(mask[crop], unannotated)) + offset) * scale for mask in (pred_mask, ref_mask))


def directed_surface_distances(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                               unannotated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances d(P->R) and d(R->P) between the boundaries of two masks that have one.

    Returns two 1-D float64 arrays: one entry per boundary voxel of P (distance to the
    nearest boundary voxel of R) and one per boundary voxel of R. ``spacing`` is in array
    axis order. With ``unannotated``, the observable boundaries (module docstring).
    """
    pred_points, ref_points = surface_points(pred_mask, ref_mask, spacing, unannotated)
    if not len(pred_points) or not len(ref_points):
        raise ValueError("surface distances need two masks with a boundary (see the empty-mask policy)")
    return _nearest_distances(pred_points, ref_points)


def _nearest_distances(pred_points: np.ndarray, ref_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Exact nearest-neighbour distances between the two boundary point sets: the same values
    # as an EDT of the boundary (what MONAI and medpy do), at a fraction of the cost on
    # clinical volumes where the boundaries are a few 1e5 voxels in a 1e7-voxel box.
    d_pr = cKDTree(ref_points).query(pred_points, k=1)[0]
    d_rp = cKDTree(pred_points).query(ref_points, k=1)[0]
    return d_pr.astype(np.float64), d_rp.astype(np.float64)


def surface_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                    surface_dice_tolerances_mm: Sequence[float] = (),
                    unannotated: np.ndarray | None = None) -> dict[str, float]:
    """ASSD (pooled), HD95 (max of directed 95th percentiles), surface Dice per tolerance.

    Keys: ``assd_mm``, ``hd95_mm`` and ``nsd_{t:g}mm`` for each tolerance t (in mm, i.e. the
    spacing's unit). Empty masks follow the module's policy table; ``unannotated`` voxels (nnU-Net's
    ignore label) the module docstring.
    """
    spacing = _check_pair(pred_mask, ref_mask, spacing)
    for t in surface_dice_tolerances_mm:
        if not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"surface Dice tolerance must be >= 0 mm, got {t}")
    pred_mask, ref_mask, unannotated = _annotated_only(pred_mask, ref_mask, unannotated)
    status = mask_status(pred_mask, ref_mask)
    nsd_keys = [nsd_key(t) for t in surface_dice_tolerances_mm]
    if status == STATUS_BOTH_EMPTY:
        return dict(assd_mm=0.0, hd95_mm=0.0, **{k: 1.0 for k in nsd_keys})
    if status != STATUS_BOTH_PRESENT:
        return dict(assd_mm=NAN, hd95_mm=NAN, **{k: 0.0 for k in nsd_keys})
    pred_points, ref_points = surface_points(pred_mask, ref_mask, spacing, unannotated)
    if not len(pred_points) or not len(ref_points):  # only with unannotated voxels
        nsd = NAN if not len(pred_points) and not len(ref_points) else 0.0
        return dict(assd_mm=NAN, hd95_mm=NAN, **{k: nsd for k in nsd_keys})
    d_pr, d_rp = _nearest_distances(pred_points, ref_points)
    result = dict(
        assd_mm=float(np.concatenate([d_pr, d_rp]).mean()),
        hd95_mm=float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))),
    )
    for t, key in zip(surface_dice_tolerances_mm, nsd_keys):
        # Distances exactly at the tolerance (common on a grid: 0.6-0.8-1.0 mm triangles)
        # count as within it; the slack absorbs the last-bit rounding of the coordinates.
        within = t + SURFACE_DICE_SLACK_MM
        result[key] = float((np.count_nonzero(d_pr <= within) + np.count_nonzero(d_rp <= within))
                            / (d_pr.size + d_rp.size))
    return result


def nsd_key(tolerance_mm: float) -> str:
    return f"nsd_{tolerance_mm:g}mm"


def region_metrics(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float],
                   surface_dice_tolerances_mm: Sequence[float] = (),
                   unannotated: np.ndarray | None = None) -> dict[str, float | int | str]:
    """All overlap and surface metrics of one binary structure, plus status and volumes, over the
    annotated voxels (all but ``unannotated``)."""
    spacing = _check_pair(pred_mask, ref_mask, spacing)
    pred_mask, ref_mask, unannotated = _annotated_only(pred_mask, ref_mask, unannotated)
    voxel_volume = float(np.prod(spacing))
    result: dict[str, float | int | str] = {"status": mask_status(pred_mask, ref_mask)}
    result.update(overlap_metrics(pred_mask, ref_mask))
    result.update(surface_metrics(pred_mask, ref_mask, spacing, surface_dice_tolerances_mm, unannotated))
    n_pred, n_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
    result.update(pred_volume_ml=n_pred * voxel_volume / 1000.0, ref_volume_ml=n_ref * voxel_volume / 1000.0)
    return result


def segmentation_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float],
                         regions: Sequence[Region] = DEFAULT_REGIONS,
                         surface_dice_tolerances_mm: Sequence[float] = (),
                         unannotated: np.ndarray | None = None) -> "OrderedDict[str, float | int | str]":
    """Per-region metrics of two label maps, flattened to ``{region.key}_{metric}`` keys.

    pred_labels, ref_labels: integer arrays of identical shape (z, y, x); spacing in the same
    axis order; ``unannotated``: boolean, the voxels no metric counts (nnU-Net's ignore label).
    """
    spacing = _check_pair(pred_labels, ref_labels, spacing)
    out: OrderedDict[str, float | int | str] = OrderedDict()
    for region in regions:
        values = np.asarray(region.labels)
        metrics = region_metrics(np.isin(pred_labels, values), np.isin(ref_labels, values), spacing,
                                 surface_dice_tolerances_mm, unannotated)
        for name, value in metrics.items():
            out[f"{region.key}_{name}"] = value
    return out


def metric_columns(regions: Sequence[Region], surface_dice_tolerances_mm: Sequence[float] = ()) -> list[str]:
    """The numeric per-case columns ``segmentation_metrics`` produces, in report order."""
    names = list(OVERLAP_METRICS) + list(SURFACE_METRICS) + [nsd_key(t) for t in surface_dice_tolerances_mm]
    return [f"{r.key}_{m}" for r in regions for m in names]
