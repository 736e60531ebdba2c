"""Benchmark figures (matplotlib, Agg backend: no display needed).

Every axis is labelled and every title names the trainer(s). Functions take the per-case
rows / lesion rows of ``benchmark.compute_all`` and the summary of ``report.aggregate``, and
return the PNG paths they wrote (nothing is written when there is nothing to draw).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_liver_ext.evaluation.benchmark import finite


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def violin_per_region(rows: Sequence[dict], trainers: Sequence[str], regions, metric: str, ylabel: str,
                      path: Path) -> Path | None:
    """One panel per region: per-case distribution of ``metric`` for each trainer.

    Drawn even when a trainer has no finite value (e.g. HD95 with every prediction empty):
    the panel says so instead of the file going missing.
    """
    plt = _pyplot()
    data = {r.key: [finite(row[f"{r.key}_{metric}"] for row in rows if row["trainer"] == t) for t in trainers]
            for r in regions}
    if not any(row["trainer"] in trainers for row in rows):
        return None
    fig, axes = plt.subplots(1, len(regions), figsize=(max(4.0, 1.6 * len(trainers)) * len(regions), 4.6),
                             squeeze=False)
    for ax, region in zip(axes[0], regions):
        values = data[region.key]
        positions = [i for i, v in enumerate(values) if v.size]
        if positions:
            parts = ax.violinplot([values[i] for i in positions], positions=positions, showmedians=True,
                                  showextrema=True)
            for body in parts["bodies"]:
                body.set_alpha(0.5)
            rng = np.random.default_rng(0)
            for i in positions:
                ax.scatter(i + rng.uniform(-0.08, 0.08, values[i].size), values[i], s=8, color="k", zorder=3)
        for i, v in enumerate(values):
            if not v.size:
                ax.text(i, 0.5, "no finite value", ha="center", va="center", transform=ax.get_xaxis_transform(),
                        fontsize=8)
        ax.set_xticks(range(len(trainers)))
        ax.set_xticklabels(trainers, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(trainers) - 0.4)
        ax.set_xlabel("trainer")
        ax.set_ylabel(ylabel)
        ax.set_title(region.display, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Per-case {ylabel}: {' vs '.join(trainers)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def size_stratum_bars(by_size: dict, strata: Sequence[str]) -> tuple[list, list, list, list]:
    """(Dice means, Dice sds, recalls, empty) per stratum for the bars. A stratum without reference lesions has
    no Dice and no recall: its bars have height 0 and it is marked "no lesions" (a bar at the metric's 0 would
    read as "all missed"); an sd undefined for one lesion is drawn as none."""
    empty = [by_size[s]["n_lesions"] == 0 for s in strata]
    mean = [0.0 if e else by_size[s]["lesion_dice"]["mean"] for e, s in zip(empty, strata)]
    sd = [by_size[s]["lesion_dice"]["sd"] if not e and math.isfinite(by_size[s]["lesion_dice"]["sd"]) else 0.0
          for e, s in zip(empty, strata)]
    recall = [0.0 if e else by_size[s]["recall"] for e, s in zip(empty, strata)]
    return mean, sd, recall, empty


def lesion_dice_by_size(summary: dict, path: Path) -> Path | None:
    """Grouped bars: mean lesion Dice (with sd) and detection recall per size stratum and trainer."""
    lesions = summary.get("lesions") or {}
    if not lesions:
        return None
    plt = _pyplot()
    trainers = list(lesions)
    strata = list(next(iter(lesions.values()))["by_size"])
    if not any(lesions[t]["by_size"][s]["n_lesions"] for t in trainers for s in strata):
        return None
    fig, (ax_dice, ax_rec) = plt.subplots(1, 2, figsize=(11, 4.4))
    width = 0.8 / len(trainers)
    x = np.arange(len(strata))
    for i, t in enumerate(trainers):
        by = lesions[t]["by_size"]
        mean, sd, recall, empty = size_stratum_bars(by, strata)
        offs = x - 0.4 + width * (i + 0.5)
        label = f"{t} ({sum(by[s]['n_lesions'] for s in strata)} lesions)"
        ax_dice.bar(offs, mean, width, yerr=sd, capsize=3, label=label)
        ax_rec.bar(offs, recall, width, label=label)
        for ax in (ax_dice, ax_rec):
            for position in offs[np.array(empty, dtype=bool)]:
                ax.text(position, 0.02, "no lesions", rotation=90, ha="center", va="bottom", fontsize=7)
    for ax, ylabel in ((ax_dice, "lesion Dice (mean ± sd)"), (ax_rec, "detection recall (IoU > 0.5)")):
        ax.set_xticks(x)
        ax.set_xticklabels(strata)
        ax.set_xlabel("reference lesion diameter (equivalent sphere)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax_dice.set_title(f"Tumor Dice by lesion size: {', '.join(trainers)}", fontsize=9)
    ax_rec.set_title(f"Lesion detection by size: {', '.join(trainers)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix_plot(trainer: str, confusion: Sequence[Sequence[int]], classes: Sequence[str],
                          path: Path) -> Path:
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=float)
    row_sum = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sum, out=np.zeros_like(cm), where=row_sum > 0)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.1 * len(classes) + 2))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)))
    ax.set_yticklabels(classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix: {trainer} (n={int(cm.sum())})", fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def enhancement_curves(trainer: str, rows: Sequence[dict], phases: Sequence[str], path: Path) -> Path | None:
    """Left: mean (± sd) true and predicted curves; right: predicted against true per phase."""
    rows = [r for r in rows if r["trainer"] == trainer and "curve_mae" in r]
    if not rows:
        return None
    plt = _pyplot()
    true = np.array([[float(r[f"curve_true_{p}"]) for p in phases] for r in rows])
    pred = np.array([[float(r[f"curve_pred_{p}"]) for p in phases] for r in rows])
    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = np.arange(len(phases))
    for data, label, style in ((true, "true", "-o"), (pred, "predicted", "--s")):
        mean, sd = data.mean(0), (data.std(0, ddof=1) if len(data) > 1 else np.zeros(data.shape[1]))  # the report's sd
        ax_c.plot(x, mean, style, label=f"{label} (mean ± sd)")
        ax_c.fill_between(x, mean - sd, mean + sd, alpha=0.2)
    ax_c.set_xticks(x)
    ax_c.set_xticklabels(phases)
    ax_c.set_xlabel("phase")
    ax_c.set_ylabel("enhancement")
    ax_c.set_title(f"Enhancement curves: {trainer} (n={len(rows)})", fontsize=10)
    ax_c.legend(fontsize=8)
    for j, p in enumerate(phases):
        ax_s.scatter(true[:, j], pred[:, j], s=14, label=p)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax_s.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k:", lw=1, label="identity")
    ax_s.set_xlabel("true enhancement")
    ax_s.set_ylabel("predicted enhancement")
    ax_s.set_title(f"Predicted vs true per phase: {trainer}", fontsize=10)
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_all_plots(rows: Sequence[dict], summary: dict, regions, out_dir: str | Path) -> list[Path]:
    """Every benchmark figure into ``out_dir/plots``; returns the files written."""
    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    trainers = summary["trainers"]
    written = [
        violin_per_region(rows, trainers, regions, "dice", "Dice", plot_dir / "violin_dice.png"),
        violin_per_region(rows, trainers, regions, "hd95_mm", "HD95 (mm)", plot_dir / "violin_hd95.png"),
        lesion_dice_by_size(summary, plot_dir / "lesion_dice_by_size.png"),
    ]
    for t, c in (summary.get("characterization") or {}).items():
        written.append(confusion_matrix_plot(t, c["pooled"]["confusion_matrix"], c["pooled"]["classes"],
                                             plot_dir / f"confusion_{_safe(t)}.png"))
    for t, r in (summary.get("regression") or {}).items():
        written.append(enhancement_curves(t, rows, r["phases"], plot_dir / f"enhancement_{_safe(t)}.png"))
    return [p for p in written if p is not None]
