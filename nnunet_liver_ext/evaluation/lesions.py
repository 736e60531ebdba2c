"""Lesion-wise detection: connected components, IoU matching, size strata.

Masks are boolean arrays of shape (z, y, x); ``spacing`` is in the same axis order.

* Lesions are the connected components of the tumor mask. The connectivity is always
  explicit: 1 = faces (6-neighbourhood in 3D), 2 = faces+edges (18), 3 = faces+edges+corners
  (26), as in ``scipy.ndimage.generate_binary_structure(ndim, connectivity)``.
* A reference lesion is detected when some predicted component has IoU > 0.5 with it. With
  a threshold above 0.5 a lesion can match at most one component and vice versa (two
  components with IoU > 0.5 with the same lesion would each cover more than half of it),
  so the matching is unique without an assignment step.
  TP = matched reference lesions, FN = unmatched reference lesions, FP = unmatched predicted
  components. Precision/recall/F1 are pooled over cases from these counts.
* Lesion Dice: Dice between a reference lesion and the union of the predicted components
  that touch it (0 when none does), so a lesion split into pieces is still scored.
* Size: volume in mm^3 and the equivalent-sphere diameter (6 V / pi)^(1/3) in mm; strata
  by that diameter, default < 10 mm, 10-20 mm, >= 20 mm.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.ndimage import generate_binary_structure, label

DETECTION_IOU_THRESHOLD = 0.5
DEFAULT_CONNECTIVITY = 3
DEFAULT_SIZE_STRATA_MM = (10.0, 20.0)


def label_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask.

    Returns (component map of the mask's shape with 0 = background and 1..n the
    components, n).
    """
    if not 1 <= int(connectivity) <= mask.ndim:
        raise ValueError(f"connectivity must be in 1..{mask.ndim} for a {mask.ndim}-D mask, got {connectivity}")
    components, n = label(mask.astype(bool, copy=False), structure=generate_binary_structure(mask.ndim, int(connectivity)))
    return components, int(n)


def equivalent_diameter_mm(volume_mm3: float) -> float:
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def size_stratum(diameter_mm: float, strata_mm: Sequence[float] = DEFAULT_SIZE_STRATA_MM) -> str:
    """Label of the stratum a diameter falls in, e.g. '<10mm', '10-20mm', '>=20mm'."""
    return stratum_labels(strata_mm)[int(np.searchsorted(np.asarray(strata_mm, float), diameter_mm, side="right"))]


def stratum_labels(strata_mm: Sequence[float] = DEFAULT_SIZE_STRATA_MM) -> list[str]:
    edges = [float(e) for e in strata_mm]
    # NaN compares false both ways, so it passed the order test and put no lesion in any stratum
    if not edges or not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])) \
            or edges[0] <= 0:
        raise ValueError(f"size strata must be positive and strictly increasing, got {strata_mm}")
    labels = [f"<{edges[0]:g}mm"]
    labels += [f"{a:g}-{b:g}mm" for a, b in zip(edges, edges[1:])]
    labels.append(f">={edges[-1]:g}mm")
    return labels


def match_lesions(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], connectivity: int,
                  strata_mm: Sequence[float] = DEFAULT_SIZE_STRATA_MM) -> tuple[dict, list[dict]]:
    """Match predicted tumor components to reference lesions.

    Returns ``(counts, lesions)``: counts has ``lesion_tp``, ``lesion_fp``, ``lesion_fn``,
    ``n_ref_lesions``, ``n_pred_lesions`` (ints); lesions has one dict per reference lesion
    (``lesion_id``, ``volume_mm3``, ``diameter_mm``, ``stratum``, ``detected``, ``best_iou``,
    ``lesion_dice``) and one per unmatched predicted component (``kind`` 'false_positive',
    its size, ``detected`` False).
    """
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} != reference shape {ref_mask.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref_mask.ndim:
        raise ValueError(f"spacing {spacing} does not match a {ref_mask.ndim}-D mask (array axis order)")
    voxel_mm3 = float(np.prod(spacing))
    ref_cc, n_ref = label_components(ref_mask, connectivity)
    pred_cc, n_pred = label_components(pred_mask, connectivity)
    ref_sizes = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    # Joint histogram of (reference id, predicted id) over voxels where both are foreground:
    # intersections of every pair in one pass.
    both = (ref_cc > 0) & (pred_cc > 0)
    pair_codes = ref_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both]
    codes, inter = np.unique(pair_codes, return_counts=True)
    pairs_ref, pairs_pred = codes // (n_pred + 1), codes % (n_pred + 1)

    matched_pred: set[int] = set()
    lesions: list[dict] = []
    for ref_id in range(1, n_ref + 1):
        sel = pairs_ref == ref_id
        touching, inter_r = pairs_pred[sel], inter[sel]
        ious = inter_r / (ref_sizes[ref_id] + pred_sizes[touching] - inter_r) if touching.size else np.zeros(0)
        best = int(np.argmax(ious)) if ious.size else -1
        detected = bool(best >= 0 and ious[best] > DETECTION_IOU_THRESHOLD)
        if detected:
            matched_pred.add(int(touching[best]))
        touched_volume = int(pred_sizes[touching].sum())
        volume = float(ref_sizes[ref_id]) * voxel_mm3
        diameter = equivalent_diameter_mm(volume)
        lesions.append(dict(
            kind="reference", lesion_id=ref_id, volume_mm3=volume, diameter_mm=diameter,
            stratum=size_stratum(diameter, strata_mm), detected=detected,
            best_iou=float(ious[best]) if best >= 0 else 0.0,
            lesion_dice=float(2 * inter_r.sum() / (ref_sizes[ref_id] + touched_volume)),
        ))
    for pred_id in range(1, n_pred + 1):
        if pred_id in matched_pred:
            continue
        volume = float(pred_sizes[pred_id]) * voxel_mm3
        diameter = equivalent_diameter_mm(volume)
        lesions.append(dict(kind="false_positive", lesion_id=pred_id, volume_mm3=volume, diameter_mm=diameter,
                            stratum=size_stratum(diameter, strata_mm), detected=False,
                            best_iou=float("nan"), lesion_dice=float("nan")))
    tp = len(matched_pred)
    counts = dict(lesion_tp=tp, lesion_fp=n_pred - tp, lesion_fn=n_ref - tp, n_ref_lesions=n_ref, n_pred_lesions=n_pred)
    return counts, lesions


def detection_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Lesion-wise precision, recall, F1 from (pooled) counts.

    A score whose denominator is 0 is NaN (e.g. recall with no reference lesion), except F1
    when there is neither a reference nor a predicted lesion, which is NaN as well: nothing
    was there to detect.
    """
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return dict(lesion_precision=precision, lesion_recall=recall, lesion_f1=f1)
