"""Case-level characterization metrics: lesion class and enhancement-curve regression.

Classification inputs: ``y_true`` (N,) class indices into ``class_names`` and
``probabilities`` (N, K) with one row per case (rows need not sum exactly to 1; the
argmax is the prediction unless ``y_pred`` is given). Regression inputs: (N, P) arrays,
one column per phase.

Conventions:
* AUC is one-vs-rest, macro-averaged over the classes present in ``y_true`` (a class with
  no true case has no ROC curve); with a single class present the AUC is NaN. Two classes
  use the positive-class column (binary ROC AUC).
* Precision/recall/F1 are support-weighted; a class never predicted contributes precision 0
  (sklearn ``zero_division=0``) - stated here rather than silently warned about.
* The confusion matrix is K x K over all classes, rows = true, columns = predicted.
* MAE per phase and overall (mean over every case and phase) in the curve's unit.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

CASE_JSON_KEYS = ("case", "classes", "probabilities", "predicted_class", "predicted_index")


def classification_metrics(y_true: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str],
                           y_pred: Sequence[int] | None = None) -> dict:
    """Accuracy, balanced accuracy, AUC (OvR macro), weighted P/R/F1, confusion matrix."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support, roc_auc_score)

    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    k = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape != (y_true.size, k):
        raise ValueError(f"probabilities must have shape (n_cases={y_true.size}, n_classes={k}), "
                         f"got {probabilities.shape}")
    if y_true.size == 0:
        raise ValueError("no case to score")
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"true class indices must be in 0..{k - 1}, got {sorted(set(y_true.tolist()))}")
    y_pred = np.argmax(probabilities, axis=1) if y_pred is None else np.asarray(y_pred, dtype=int)
    present = np.unique(y_true)
    if present.size < 2:
        auc = math.nan
    elif k == 2:
        auc = float(roc_auc_score(y_true, probabilities[:, 1]))
    else:
        # each present class against the rest on its own probability column, then the mean: sklearn's
        # multi_class="ovr" needs every class present; renormalising the present columns instead would
        # change each class's ranking (p_c / sum of the present p is not p_c)
        auc = float(np.mean([roc_auc_score(y_true == c, probabilities[:, c]) for c in present]))
    with warnings.catch_warnings():
        # a predicted class with no true case is legitimate here (small validation folds)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        balanced_accuracy = float(balanced_accuracy_score(y_true, y_pred))
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)),
                                                               average="weighted", zero_division=0)
    return dict(
        n_cases=int(y_true.size),
        accuracy=float(accuracy_score(y_true, y_pred)),
        balanced_accuracy=balanced_accuracy,
        auc_ovr_macro=auc,
        precision_weighted=float(precision),
        recall_weighted=float(recall),
        f1_weighted=float(f1),
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist(),
        classes=list(class_names),
    )


def regression_metrics(true_curves: np.ndarray, predicted_curves: np.ndarray,
                       phases: Sequence[str] | None = None) -> dict:
    """MAE per phase and overall of (N, P) enhancement curves, in the curves' units and relative to each
    curve's first phase (``mae_relative_*``: curve / its pre-contrast value, true and predicted alike).

    The relative MAE is scale-free: a scanner's global signal gain, which MRI intensities carry and nnU-Net's
    per-image z-score normalisation removes from the images, cancels in it, so it measures the curve's
    shape. It is None (with ``relative_note``) when a first-phase value is not positive (e.g. CT curves in
    HU), where the ratio means nothing."""
    true_curves = np.asarray(true_curves, dtype=float)
    predicted_curves = np.asarray(predicted_curves, dtype=float)
    if true_curves.shape != predicted_curves.shape or true_curves.ndim != 2:
        raise ValueError(f"curves must both be (n_cases, n_phases); got true {true_curves.shape}, "
                         f"predicted {predicted_curves.shape}")
    n_phases = true_curves.shape[1]
    phases = list(phases) if phases is not None else [f"phase_{i}" for i in range(n_phases)]
    if len(phases) != n_phases:
        raise ValueError(f"{len(phases)} phase names for {n_phases} phases")
    abs_err = np.abs(predicted_curves - true_curves)
    out = dict(n_cases=int(true_curves.shape[0]), mae_overall=float(abs_err.mean()),
               mae_per_phase={p: float(v) for p, v in zip(phases, abs_err.mean(axis=0))},
               mae_relative_overall=None, mae_relative_per_phase=None, relative_note=None)
    if (true_curves[:, 0] > 0).all() and (predicted_curves[:, 0] > 0).all():
        relative_err = np.abs(predicted_curves / predicted_curves[:, :1] - true_curves / true_curves[:, :1])
        out.update(mae_relative_overall=float(relative_err.mean()),
                   mae_relative_per_phase={p: float(v) for p, v in zip(phases, relative_err.mean(axis=0))})
    else:
        out["relative_note"] = f"a first-phase ({phases[0]}) value is not positive: no relative MAE"
    return out


def load_case_prediction(path: str | Path) -> dict:
    """Read and validate one ``{CASE}.json`` written next to a validation prediction."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read characterization file {path}: {e}") from e
    missing = [k for k in CASE_JSON_KEYS if k not in data]
    if missing:
        raise ValueError(f"characterization file {path} lacks {missing}")
    classes, probs = list(data["classes"]), [float(p) for p in data["probabilities"]]
    if len(classes) != len(probs):
        raise ValueError(f"characterization file {path}: {len(classes)} classes but {len(probs)} probabilities")
    idx = None
    if classes:  # a method with a curve head only (e.g. MTI-Net seg + regression) writes no classes
        idx = int(data["predicted_index"])
        if not 0 <= idx < len(classes) or classes[idx] != data["predicted_class"]:
            raise ValueError(f"characterization file {path}: predicted_index {idx} does not name "
                             f"predicted_class {data['predicted_class']!r} in {classes}")
    curve = data.get("enhancement_curve")
    phases = data.get("phases")
    if curve is not None:
        curve = [float(v) for v in curve]
        if phases is not None and len(phases) != len(curve):
            raise ValueError(f"characterization file {path}: {len(curve)} curve values for phases {phases}")
    return dict(case=str(data["case"]), classes=classes, probabilities=probs, predicted_index=idx,
                predicted_class=str(data["predicted_class"]) if classes else None, enhancement_curve=curve,
                phases=list(phases) if phases is not None else None,
                lesion_voxels=data.get("lesion_voxels"))
