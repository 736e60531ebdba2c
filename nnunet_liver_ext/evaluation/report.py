"""Aggregate per-case results into CSV, JSON and a Markdown report.

Statistics (stated again in every report):
* mean +- sd (ddof=1) over cases, pooled over the evaluated folds and per fold; NaN values
  (undefined by the empty-mask policy) are excluded and counted;
* 95 % percentile-bootstrap CI of the mean over cases (``N_BOOTSTRAP`` resamples, fixed
  ``BOOTSTRAP_SEED`` so reports are reproducible);
* Wilcoxon signed-rank test (two-sided, ``scipy.stats.wilcoxon``) of each trainer against
  the baseline, paired by case over the cases where both have a finite value; identical
  pairs everywhere give p = 1. Exact p-values where the null distribution is exact (no
  zero differences, no ties, n <= 50), else the tie-corrected normal approximation.
* Lesion detection precision/recall/F1 from counts pooled over cases.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_liver_ext.evaluation import lesions as lesion_metrics
from nnunet_liver_ext.evaluation.benchmark import BenchmarkInputs, finite
from nnunet_liver_ext.evaluation.characterization import classification_metrics, regression_metrics
from nnunet_liver_ext.evaluation.metrics import EMPTY_MASK_POLICY, STATUSES, nsd_key

N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 12345
CONFIDENCE = 0.95

METRIC_TITLES = {
    "dice": "Dice ↑", "iou": "IoU ↑", "voe": "VOE ↓", "rvd": "RVD (signed)", "precision": "precision ↑",
    "recall": "recall ↑", "assd_mm": "ASSD (mm) ↓", "hd95_mm": "HD95 (mm) ↓",
}


def metric_title(metric: str) -> str:
    if metric.startswith("nsd_"):
        return f"surface Dice @{metric[4:]} ↑"
    return METRIC_TITLES.get(metric, metric)


# --- statistics ------------------------------------------------------------------------------

def bootstrap_ci(values: np.ndarray, n_resamples: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of a 1-D array (NaN-free)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def describe(values) -> dict:
    raw = [v for v in values if v != "" and v is not None]
    vals = finite(raw)
    out = dict(n=int(vals.size), n_undefined=len(raw) - int(vals.size))
    out["mean"] = float(vals.mean()) if vals.size else math.nan
    out["sd"] = float(vals.std(ddof=1)) if vals.size > 1 else math.nan
    out["median"] = float(np.median(vals)) if vals.size else math.nan
    out["ci_low"], out["ci_high"] = bootstrap_ci(vals)
    return out


def paired_wilcoxon(values_by_case: dict[str, float], baseline_by_case: dict[str, float]) -> dict:
    """Two-sided Wilcoxon signed-rank test paired by case (finite pairs only). ``n_pairs`` counts the pairs,
    ``n_differing`` those the test ranks (scipy's default drops equal pairs: e.g. cases tumor-free for both)."""
    from scipy.stats import wilcoxon

    cases = [c for c in values_by_case if c in baseline_by_case]
    x = np.array([values_by_case[c] for c in cases], dtype=float)
    y = np.array([baseline_by_case[c] for c in cases], dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = dict(n_pairs=int(x.size), n_differing=int(np.count_nonzero(x != y)),
               median_difference=float(np.median(x - y)) if x.size else math.nan)
    if x.size == 0:
        out["p"] = math.nan
    elif np.all(x == y):
        out["p"] = 1.0
    else:
        # Exact null distribution when it is defined (no zero differences, no ties, n <= 50);
        # otherwise the tie-corrected normal approximation, the switch R's wilcox.test makes (R's
        # default also applies a continuity correction, scipy's correction=False here does not).
        # scipy's "auto" would fall back to a permutation test, seconds per call for little gain.
        d = np.abs(x - y)
        nonzero = d[d != 0]
        exact = nonzero.size == d.size and np.unique(nonzero).size == nonzero.size and d.size <= 50
        out["p"] = float(wilcoxon(x, y, method="exact" if exact else "approx").pvalue)
        out["method"] = "exact" if exact else "normal approximation"
    return out


# --- formatting ------------------------------------------------------------------------------

def _f(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _stat_cell(d: dict, with_ci: bool = True) -> str:
    if d["n"] == 0:
        return f"n/a (undefined for {d['n_undefined']})" if d["n_undefined"] else "n/a"
    digits = 2 if abs(d["mean"]) >= 10 else 3
    cell = f"{_f(d['mean'], digits)} ± {_f(d['sd'], digits)}"
    if with_ci and d["n"] > 1:  # one case: the bootstrap interval is the value itself, no interval
        cell += f" [{_f(d['ci_low'], digits)}, {_f(d['ci_high'], digits)}]"
    cell += f" (n={d['n']}"
    cell += f", NaN {d['n_undefined']})" if d["n_undefined"] else ")"
    return cell


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _trainer_label(trainer: str, baseline: str | None) -> str:
    return f"{trainer} (baseline)" if trainer == baseline else trainer


# --- CSV -------------------------------------------------------------------------------------

def write_csv(rows: Sequence[dict], path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


# --- aggregation -----------------------------------------------------------------------------

def _by_trainer(rows: Sequence[dict], trainers: Sequence[str]) -> dict[str, list[dict]]:
    return {t: [r for r in rows if r["trainer"] == t] for t in trainers}


def _metric_names(inputs: BenchmarkInputs) -> list[str]:
    return ["dice", "iou", "voe", "rvd", "precision", "recall", "assd_mm", "hd95_mm"] + \
        [nsd_key(t) for t in inputs.settings.surface_dice_tolerances_mm]


def aggregate(inputs: BenchmarkInputs, rows: Sequence[dict], lesion_rows: Sequence[dict]) -> dict:
    """Everything the report prints, as one JSON-able dict."""
    trainers = [t for t in inputs.trainers if t not in inputs.completeness.missing_trainers]
    per_trainer = _by_trainer(rows, trainers)
    baseline = inputs.baseline if inputs.baseline in per_trainer and per_trainer[inputs.baseline] else None
    folds = sorted({r["fold"] for r in rows if r["fold"] != ""})
    summary: dict = dict(trainers=trainers, baseline=baseline, folds=folds, segmentation={}, lesions={},
                         characterization={}, regression={})
    cases = {t: {r["case"] for r in per_trainer[t]} for t in trainers}
    summary["cases"] = dict(per_trainer={t: len(c) for t, c in cases.items()},
                            common=len(set.intersection(*cases.values())) if cases else 0)
    for region in inputs.settings.regions:
        reg: dict = {}
        for metric in _metric_names(inputs):
            col = f"{region.key}_{metric}"
            entry: dict = {}
            base_by_case = {r["case"]: r[col] for r in per_trainer.get(baseline, [])} if baseline else {}
            for t in trainers:
                trs = per_trainer[t]
                e = dict(pooled=describe(r[col] for r in trs),
                         per_fold={str(f): describe(r[col] for r in trs if r["fold"] == f) for f in folds})
                if baseline and t != baseline:
                    e["vs_baseline"] = paired_wilcoxon({r["case"]: r[col] for r in trs}, base_by_case)
                entry[t] = e
            reg[metric] = entry
        reg["status_counts"] = {t: {s: sum(r[f"{region.key}_status"] == s for r in per_trainer[t]) for s in STATUSES}
                                for t in trainers}
        summary["segmentation"][region.key] = reg
    if inputs.settings.tumor_labels is not None:
        summary["lesions"] = _aggregate_lesions(inputs, per_trainer, lesion_rows, folds)
    summary["characterization"], summary["regression"] = _aggregate_characterization(inputs, per_trainer, folds)
    return summary


def _aggregate_lesions(inputs, per_trainer, lesion_rows, folds) -> dict:
    out = {}
    strata = lesion_metrics.stratum_labels(inputs.settings.size_strata_mm)
    for t, trs in per_trainer.items():
        def pooled(rs):
            tp, fp, fn = (int(sum(r[k] for r in rs)) for k in ("lesion_tp", "lesion_fp", "lesion_fn"))
            return dict(tp=tp, fp=fp, fn=fn, n_ref=tp + fn, n_pred=tp + fp, **lesion_metrics.detection_scores(tp, fp, fn))
        lr = [x for x in lesion_rows if x["trainer"] == t]
        by_size = {}
        for s in strata:
            ref = [x for x in lr if x["kind"] == "reference" and x["stratum"] == s]
            by_size[s] = dict(n_lesions=len(ref), n_detected=sum(bool(x["detected"]) for x in ref),
                              recall=(sum(bool(x["detected"]) for x in ref) / len(ref)) if ref else math.nan,
                              lesion_dice=describe(x["lesion_dice"] for x in ref),
                              n_false_positives=sum(1 for x in lr if x["kind"] == "false_positive" and x["stratum"] == s))
        out[t] = dict(pooled=pooled(trs), per_fold={str(f): pooled([r for r in trs if r["fold"] == f]) for f in folds},
                      by_size=by_size)
    return out


def _aggregate_characterization(inputs, per_trainer, folds) -> tuple[dict, dict]:
    char, reg = {}, {}
    classes = (inputs.dataset_json.get("characterization") or {}).get("classes")
    for t, trs in per_trainer.items():
        scored = [r for r in trs if r.get("char_available") and r.get("true_class_index", "") != ""]
        if classes and scored:
            def cls(rs):
                if not rs:
                    return None
                probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rs])
                return classification_metrics([int(r["true_class_index"]) for r in rs], probs, classes,
                                              y_pred=[int(r["pred_class_index"]) for r in rs])
            char[t] = dict(pooled=cls(scored), per_fold={str(f): cls([r for r in scored if r["fold"] == f])
                                                          for f in folds})
        curve_rows = [r for r in trs if "curve_mae" in r]
        if curve_rows:
            phases = [k[len("curve_true_"):] for k in curve_rows[0] if k.startswith("curve_true_")]

            def mae(rs):
                if not rs:
                    return None
                true = np.array([[float(r[f"curve_true_{p}"]) for p in phases] for r in rs])
                pred = np.array([[float(r[f"curve_pred_{p}"]) for p in phases] for r in rs])
                return regression_metrics(true, pred, phases)
            reg[t] = dict(pooled=mae(curve_rows), phases=phases,
                          per_fold={str(f): mae([r for r in curve_rows if r["fold"] == f]) for f in folds})
    return char, reg


# --- Markdown --------------------------------------------------------------------------------

def write_report(inputs: BenchmarkInputs, rows: Sequence[dict], lesion_rows: Sequence[dict], out_dir: str | Path,
                 plot_files: Sequence[Path] = (), cache_stats: dict | None = None, summary: dict | None = None) -> dict:
    """Write per_case_metrics.csv, lesions.csv, summary.json and report.md; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "per_case_metrics.csv")
    write_csv(lesion_rows, out_dir / "lesions.csv")
    if summary is None:
        summary = aggregate(inputs, rows, lesion_rows)
    (out_dir / "summary.json").write_text(json.dumps(_json_clean(summary), indent=1))
    md = _markdown(inputs, rows, summary, out_dir, plot_files, cache_stats)
    (out_dir / "report.md").write_text("\n".join(md))
    return summary


def _json_clean(o):
    """Plain JSON: NaN/inf (undefined values) become null, numpy scalars Python numbers."""
    if isinstance(o, dict):
        return {str(k): _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _pooled(folds) -> str:
    if len(folds) > 1:
        return f", pooled over {len(folds)} folds"
    return f", fold {folds[0]}" if folds else ""


def _title(inputs: BenchmarkInputs, rows, trainers, folds) -> str:
    """What was read, in numbers: folds (when the predictions come from folds) and distinct cases."""
    n_cases = len({r["case"] for r in rows})
    if inputs.dataset_name:
        read = (f"{_count(len(folds), 'fold')} ({', '.join(map(str, folds))}), " if folds else "") + \
            _count(n_cases, "case")
        return f"Benchmark, {read}: {inputs.dataset_name}, {inputs.configuration}, {inputs.plans}"
    return f"Evaluation of {', '.join(trainers)}: {_count(n_cases, 'case')}"


def _markdown(inputs: BenchmarkInputs, rows, summary, out_dir: Path, plot_files, cache_stats) -> list[str]:
    s = inputs.settings
    trainers, baseline, folds = summary["trainers"], summary["baseline"], summary["folds"]
    comp = inputs.completeness
    others = [t for t in trainers if t != baseline]
    md = [f"# {_title(inputs, rows, trainers, folds)}", ""]
    md.append(f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by nnunet-liver.")
    md.append(f"Trainers: {', '.join(_trainer_label(t, baseline) for t in inputs.trainers)}.")
    if inputs.baseline:
        md.append(f"Baseline for the paired tests: **{inputs.baseline}**"
                  + (f" ({inputs.baseline_reason})" if inputs.baseline_reason else "")
                  + ("" if baseline else " (no predictions found: no paired tests)") + ".")
    elif inputs.dataset_name and len(trainers) > 1:
        md.append("No baseline (--baseline none): no paired tests.")
    if inputs.folds is not None:
        md.append(f"Folds requested: {', '.join(map(str, inputs.folds))}; validation predictions of each fold "
                  f"(nnU-Net `fold_k/validation`), pooled, every case appears in exactly one fold.")
    if cache_stats:
        md.append(f"Cases computed this run: {cache_stats['computed']}; reused from the cache: {cache_stats['cached']}.")
    md.append("")

    md += ["## Completeness", ""]
    counts = {t: sum(r["trainer"] == t for r in rows) for t in trainers}
    table = []
    for t in inputs.trainers:
        if t in comp.missing_trainers:
            table.append([t, "**no results folder**", "0", "-", "-", "-", "-"])
            continue
        mf = comp.missing_folds.get(t, [])
        table.append([_trainer_label(t, baseline), str(counts.get(t, 0)),
                      ", ".join(f"fold {f} ({why})" for f, why in mf) or "none",
                      str(len(comp.missing_cases.get(t, []))), str(len(comp.unexpected_files.get(t, []))),
                      "none (no CASE.json)" if t in comp.no_characterization else
                      f"{counts.get(t, 0) - len(comp.missing_case_json.get(t, []))} CASE.json",
                      str(len(comp.missing_case_json.get(t, [])))])
    md += _table(["trainer", "cases evaluated", "missing folds", "missing cases", "predictions not in split",
                  "characterization", "missing CASE.json"], table)
    for attr, what in (("missing_cases", "Missing cases (in the fold's validation split, no prediction file)"),
                       ("unexpected_files", "Predictions not in the fold's validation split (not evaluated)"),
                       ("missing_case_json", "Predictions without CASE.json (characterization not scored)")):
        items = getattr(comp, attr)
        for t, lst in items.items():
            md.append(f"- {what}, {t}: " + ", ".join(
                f"{case} (fold {fold})" if fold is not None else case for fold, case in lst))
    if comp.cases_without_truth:
        md.append(f"- Cases with a CASE.json but no class in dataset.json: {', '.join(comp.cases_without_truth)}")
    if others and baseline:
        md.append(f"- Paired tests use the cases both the trainer and {baseline} have; n is printed per test.")
    md.append("")

    md += ["## Conventions", ""]
    md += [
        "- Spacing in array-axis order (z, y, x), read from the ground truth (SimpleITK's GetSpacing() reversed).",
        "- Regions: " + "; ".join(f"`{r.key}` = {r.display}" for r in s.regions) + ".",
        "- Dice, IoU, precision, recall from voxel TP/FP/FN; VOE = 1 - IoU; RVD = (|P| - |R|) / |R| "
        "(positive = over-segmentation).",
        "- Surfaces: boundary voxels (face-connected erosion); ASSD = mean of the pooled distances of both "
        "directions (LiTS); HD95 = max of the two directed 95th percentiles (MONAI, Metrics Reloaded); "
        "surface Dice at " + ", ".join(f"{t:g} mm" for t in s.surface_dice_tolerances_mm) + ".",
        *([f"- Unannotated voxels (nnU-Net's ignore label {s.ignore_label} in the reference) count for no metric: "
           "reference and prediction are background there, and a voxel next to them is no surface voxel on that "
           "side (where the annotation stops is no surface); a mask without an observable surface has NaN "
           "distances."] if s.ignore_label is not None else []),
        f"- Lesions: connected components with connectivity {s.connectivity} "
        f"({ {1: 6, 2: 18, 3: 26}.get(s.connectivity, '?') }-neighbourhood in 3D) of label(s) "
        f"{list(s.tumor_labels) if s.tumor_labels else 'n/a'}; detected when a predicted component has IoU > "
        f"{lesion_metrics.DETECTION_IOU_THRESHOLD}; size strata by equivalent-sphere diameter: "
        f"{', '.join(lesion_metrics.stratum_labels(s.size_strata_mm))}.",
        f"- Statistics: mean ± sd (ddof 1) [95 % percentile-bootstrap CI of the mean, {N_BOOTSTRAP} resamples, "
        f"seed {BOOTSTRAP_SEED}] (n cases, NaN = undefined under the empty-mask policy, excluded). "
        "p: two-sided Wilcoxon signed-rank test against the baseline, paired by case (exact without zero "
        "differences or ties and n <= 50, else tie-corrected normal approximation); pairs with equal values "
        "(e.g. cases tumor-free for both) are dropped from the ranks, and the cell says how many differ when "
        "that is fewer than n.",
        "",
        "### Empty-mask policy",
        "",
    ]
    md += _table(["metric", "both empty", "only reference empty", "only prediction empty"],
                 [list(r) for r in EMPTY_MASK_POLICY])

    md += [f"## Segmentation{_pooled(folds)}", ""]
    counts = summary["cases"]["per_trainer"]
    unequal_cases = len(set(counts.values())) > 1 or summary["cases"]["common"] < max(counts.values(), default=0)
    if unequal_cases:
        md += ["Each trainer's mean covers its own cases, and they differ (" +
               ", ".join(f"{t}: {n}" for t, n in counts.items()) + f"; {summary['cases']['common']} in common): "
               "compare the means with care; the paired column uses the common cases only. The missing ones are "
               "listed under Completeness.", ""]
    other_cases_note = ["The trainers' case sets differ (see Segmentation): these counts are over each "
                        "trainer's own cases.", ""] if unequal_cases else []
    for region in s.regions:
        reg = summary["segmentation"][region.key]
        md += [f"### {region.display}", ""]
        header = ["metric"] + [_trainer_label(t, baseline) for t in trainers] + \
                 [f"{t} vs {baseline}: median Δ, p (n)" for t in others if baseline]
        table = []
        for metric in _metric_names(inputs):
            row = [metric_title(metric)] + [_stat_cell(reg[metric][t]["pooled"]) for t in trainers]
            for t in others:
                if baseline:
                    w = reg[metric][t]["vs_baseline"]
                    k = w["n_differing"]
                    differing = "" if k == w["n_pairs"] else f", {k} differ{'s' if k == 1 else ''}"
                    row.append(f"{_f(w['median_difference'], 3)}, p={_p(w['p'])} (n={w['n_pairs']}{differing})")
            table.append(row)
        md += _table(header, table)
        md.append("Cases by mask status: " + "; ".join(
            f"{t}: " + ", ".join(f"{k} {v}" for k, v in reg["status_counts"][t].items() if v)
            for t in trainers))
        md.append("")

    if folds:
        md += ["## Segmentation per fold", "", "mean ± sd (n) of each fold's validation cases.", ""]
        for region in s.regions:
            reg = summary["segmentation"][region.key]
            md += [f"### {region.display}", ""]
            table = []
            for metric in ("dice", "hd95_mm", "assd_mm", "rvd"):
                for t in trainers:
                    table.append([metric_title(metric), t] +
                                 [_stat_cell(reg[metric][t]["per_fold"][str(f)], with_ci=False) for f in folds] +
                                 [_stat_cell(reg[metric][t]["pooled"], with_ci=False)])
            md += _table(["metric", "trainer"] + [f"fold {f}" for f in folds] + ["pooled"], table)
        md.append("All metrics of every fold are in summary.json (`segmentation.<region>.<metric>.<trainer>.per_fold`).")
        md.append("")

    if summary["lesions"]:
        md += ["## Lesion detection", ""] + other_cases_note
        table = []
        for t in trainers:
            p = summary["lesions"][t]["pooled"]
            per_fold = ", ".join(f"{f}: {_f(summary['lesions'][t]['per_fold'][str(f)]['lesion_f1'])}" for f in folds)
            table.append([_trainer_label(t, baseline), p["n_ref"], p["n_pred"], p["tp"], p["fp"], p["fn"],
                          _f(p["lesion_precision"]), _f(p["lesion_recall"]), _f(p["lesion_f1"]), per_fold or "-"])
        md += _table(["trainer", "reference lesions", "predicted lesions", "TP", "FP", "FN", "precision", "recall",
                      "F1", "F1 per fold"], table)
        md += ["### Tumor Dice by lesion size", "",
               "Per reference lesion: Dice with the predicted components touching it; recall = detected / lesions.",
               ""]
        table = []
        for t in trainers:
            for stratum, d in summary["lesions"][t]["by_size"].items():
                table.append([t, stratum, d["n_lesions"], _f(d["recall"]),
                              _stat_cell(d["lesion_dice"]), d["n_false_positives"]])
        md += _table(["trainer", "diameter", "reference lesions", "recall", "lesion Dice", "false-positive components"],
                     table)

    md += ["## Characterization", ""]
    for t in comp.no_characterization:
        if t in trainers:
            md.append(f"- {t}: not available - its prediction folders contain no CASE.json "
                      f"(stock nnU-Net writes segmentations only).")
    if not (inputs.dataset_json.get("characterization") or {}).get("classes"):
        md.append("- dataset.json has no `characterization` entry: classification is not scored.")
    md.append("")
    if summary["characterization"]:
        if len(summary["characterization"]) > 1:
            md += other_cases_note
        table = []
        for t, c in summary["characterization"].items():
            p = c["pooled"]
            table.append([t, p["n_cases"], _f(p["accuracy"]), _f(p["balanced_accuracy"]), _f(p["auc_ovr_macro"]),
                          _f(p["precision_weighted"]), _f(p["recall_weighted"]), _f(p["f1_weighted"]),
                          ", ".join(f"{f}: {_f(v['accuracy']) if v else 'n/a'}" for f, v in c["per_fold"].items())])
        md += _table(["trainer", "cases", "accuracy", "balanced accuracy", "AUC (OvR macro)", "precision (weighted)",
                      "recall (weighted)", "F1 (weighted)", "accuracy per fold"], table)
        for t, c in summary["characterization"].items():
            cm, classes = c["pooled"]["confusion_matrix"], c["pooled"]["classes"]
            md += [f"Confusion matrix, {t} (rows true, columns predicted):", ""]
            md += _table(["true \\ predicted"] + classes, [[classes[i]] + row for i, row in enumerate(cm)])
    if summary["regression"]:
        md += ["### Enhancement curve regression (MAE, curve units)", ""]
        table = []
        for t, r in summary["regression"].items():
            p = r["pooled"]
            table.append([t, p["n_cases"], _f(p["mae_overall"])] + [_f(p["mae_per_phase"][ph]) for ph in r["phases"]]
                         + [_f(p.get("mae_relative_overall")) if p.get("mae_relative_overall") is not None
                            else "n/a"]
                         + [", ".join(f"{f}: {_f(v['mae_overall']) if v else 'n/a'}" for f, v in r["per_fold"].items())])
        phases = next(iter(summary["regression"].values()))["phases"]
        md += _table(["trainer", "cases", "MAE overall"] + [f"MAE {ph}" for ph in phases]
                     + [f"MAE relative (curve / {phases[0]})", "MAE per fold"], table)
        md += ["Relative MAE: both curves divided by their first phase's value, so a scanner's global signal "
               "gain cancels (it measures the curve's shape); n/a where a first-phase value is not positive.", ""]

    if plot_files:
        md += ["## Plots", ""]
        for p in plot_files:
            rel = Path(p).relative_to(out_dir)
            md += [f"![{rel.stem}]({rel.as_posix()})", ""]
    md += ["## Files", "", "- `per_case_metrics.csv`: one row per trainer, fold and case (all metrics).",
           "- `lesions.csv`: one row per reference lesion and per unmatched predicted component.",
           "- `summary.json`: every aggregate of this report, per fold included.", ""]
    return md
