"""MTI-Net against STD-Net and stock nnU-Net, like for like, on the CPU: the same phantom 4-phase
dynamic MRI (HCC vs hemangioma, with enhancement curves), the same nnU-Net plans (CPU-demo), the
same fold-0 split and the same short schedule; each trained with ``nnUNetv2_train`` and predicted on
held-out cases (``nnunet-liver predict`` for the multi-task methods, ``nnUNetv2_predict`` for stock
nnU-Net), then scored by ``nnunet-liver evaluate``: tumor Dice (label 2), curve MAE per phase (source
units), class accuracy and AUC.

    python benchmarks/mti_net_vs_stdnet_cpu.py [--schedule demo] [--train-cases 16] [--test-cases 8]
                                               [--configuration 2d]   # the MTI-Net paper's 2D setting
    python benchmarks/mti_net_vs_stdnet_cpu.py --tiny      # a smoke run of the whole pipeline

Work folder: ``demo_work_mti_benchmark/`` (git-ignored as ``demo_work_*/``; ``--work``); results:
``benchmarks/results/mti_net_vs_stdnet_cpu/<run name>/`` (summary.json, summary.md, the evaluations'
per-case tables and the training logs' loss lines). The numbers are what this CPU run measured on a
small phantom with a short schedule: a check that the pipeline trains and the heads learn, not an
estimate of the methods' accuracy at full training.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PLANS = "nnUNetPlans_CPUDemo"
METHODS = {"MTI-Net": "nnUNetTrainerMTINet", "STD-Net": "nnUNetTrainerSTDNet", "nnU-Net": "nnUNetTrainer"}
BASELINE = "mean curve (no image)"


def _run(cmd, env, log: Path, **extra_env) -> float:
    env = dict(env, **extra_env)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run([str(BIN / cmd[0]), *map(str, cmd[1:])], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}")
    return time.time() - t0


def _data(args, root: Path, env) -> Path:
    sys.path.insert(0, str(REPO))
    from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw

    config = PhantomConfig(modality="MRI", shape=tuple(args.shape), n_lesions_range=(1, 2),
                           lesion_diameter_range_mm=(12, 28), p_no_lesion=0.0, slice_spacing_range=(2.0, 3.0),
                           inplane_spacing_range=(0.9, 1.1), lesion_classes=("HCC", "hemangioma"))
    cases = generate_cases(args.train_cases + args.test_cases, config, seed=args.seed, progress=False)
    return write_nnunet_raw(root / "raw", args.dataset_id, "MTIBenchmarkMRI", cases[:args.train_cases],
                            cases[args.train_cases:], overwrite=True)


def _evaluation_targets(dataset: Path, out: Path) -> Path:
    targets = json.loads((dataset / "dataset.json").read_text())
    targets.update(json.loads((dataset / "test_targets.json").read_text()))  # held-out classes and curves
    out.write_text(json.dumps(targets))
    return out


def _score(evaluation: Path) -> dict:
    rows = list(csv.DictReader(open(evaluation / "per_case_metrics.csv")))
    dice = [float(r["tumor_dice"]) for r in rows if r.get("tumor_dice") not in (None, "", "nan")]
    summary = json.loads((evaluation / "summary.json").read_text())
    result = {"n_cases": len(rows), "tumor_dice_mean": statistics.mean(dice) if dice else None,
              "tumor_dice_sd": statistics.stdev(dice) if len(dice) > 1 else None}
    for block in (summary.get("characterization") or {}).values():
        pooled = block.get("pooled") or {}
        result.update(class_accuracy=pooled.get("accuracy"), class_auc=pooled.get("auc_ovr_macro"),
                      class_n_cases=pooled.get("n_cases"))
    for block in (summary.get("regression") or {}).values():
        pooled = block.get("pooled") or {}
        result.update(curve_mae_overall=pooled.get("mae_overall"), curve_mae_per_phase=pooled.get("mae_per_phase"),
                      curve_mae_relative=pooled.get("mae_relative_overall"), curve_n_cases=pooled.get("n_cases"))
    return result


def _mean_curve_baseline(dataset: Path) -> dict:
    """Curve MAE of predicting every held-out case's enhancement curve as the mean of the training cases'
    curves, without looking at an image: the figure a curve head has to beat. The same MAE as ``nnunet-liver
    evaluate`` (``evaluation.characterization.regression_metrics``)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from nnunet_liver_ext.evaluation.characterization import regression_metrics

    train = json.loads((dataset / "dataset.json").read_text())
    test = json.loads((dataset / "test_targets.json").read_text())
    mean_curve = np.mean([curve for curve in train["enhancement"].values()], axis=0)
    cases = sorted(test["enhancement"])
    true = np.array([test["enhancement"][c] for c in cases])
    metrics = regression_metrics(true, np.repeat(mean_curve[None], len(cases), 0), train["phases"])
    return {"trainer": "(none: mean training curve)", "train_s": None, "n_cases": len(cases), "tumor_dice_mean": None,
            "tumor_dice_sd": None, "curve_mae_overall": metrics["mae_overall"],
            "curve_mae_relative": metrics["mae_relative_overall"],
            "curve_mae_per_phase": metrics["mae_per_phase"], "curve_n_cases": metrics["n_cases"]}


def _loss_lines(model: Path) -> list:
    logs = sorted((model / "fold_0").glob("training_log_*.txt"))
    if not logs:
        return []
    keep = ("train terms", "train_loss", "Pseudo dice", "Epoch time", "Characterization on validation", "Optimizer")
    return [line.rstrip() for line in open(logs[-1]) if any(k in line for k in keep)]


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(results: dict, meta: dict) -> str:
    phases = meta["phases"]
    lines = [f"# MTI-Net vs STD-Net vs nnU-Net, CPU, `{meta.get('configuration', '3d_fullres')}`, schedule "
             f"`{meta['schedule']}`", "",
             f"Phantom 4-phase dynamic MRI ({meta['train_cases']} training cases, fold 0 of nnU-Net's 5-fold split; "
             f"{meta['test_cases']} held-out cases), classes {meta['classes']}, grid {meta['shape']} (z, y, x), "
             f"plans `{PLANS}`, {meta['cpu_count']} CPU cores. Wall time {meta['wall_s']:.0f} s in all.", "",
             "| method | trainer | tumor Dice (held-out, mean ± sd) | curve MAE overall | "
             + " | ".join(f"MAE {p}" for p in phases) + f" | curve MAE relative (/ {phases[0]}) | class accuracy | "
             "class AUC | train wall s |",
             "|---|---|---|---|" + "---|" * len(phases) + "---|---|---|---|"]
    for method, r in results.items():
        per_phase = r.get("curve_mae_per_phase") or {}
        dice = "n/a" if r["tumor_dice_mean"] is None else f"{_fmt(r['tumor_dice_mean'])} ± {_fmt(r['tumor_dice_sd'])}"
        lines.append(f"| {method} | `{r['trainer']}` | {dice} | {_fmt(r.get('curve_mae_overall'), 1)} | "
                     + " | ".join(_fmt(per_phase.get(p), 1) for p in phases)
                     + f" | {_fmt(r.get('curve_mae_relative'))} | {_fmt(r.get('class_accuracy'))} | {_fmt(r.get('class_auc'))} | {_fmt(r['train_s'], 0)} |")
    lines += ["", "Curve MAE relative: both curves divided by their first phase's value, so the phantom's per-case "
                  "scanner gain (which nnU-Net's z-score normalisation removes from the images) cancels: it measures "
                  "the curve's shape. Runs scored before it existed show n/a."]
    if BASELINE in results:
        lines += ["", f"{BASELINE}: no network; every held-out case's curve predicted as the mean curve of the "
                      f"{meta['train_cases']} training cases (the MAE a curve head has to beat)."]
    lines += ["", "n/a: the method has no such head (STD-Net has no curve head; stock nnU-Net has no case heads). "
              "Curve MAE is in the phantom's MRI signal units; the phantom draws a scanner gain per case that "
              "nnU-Net's per-image z-score normalisation removes, so part of it is not predictable from the "
              "normalised images by any method.", ""]
    return "\n".join(lines)


def _rescore(root: Path, out: Path) -> None:
    """Evaluate the predictions a finished run left under ``root`` again, keep its training figures, and
    rewrite ``out``'s summary (the baseline row included)."""
    summary = json.loads((out / "summary.json").read_text())
    dataset = next((root / "raw").glob("Dataset*"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for method, result in summary["results"].items():
        prediction = root / f"pred_{method}"
        if method == BASELINE or not prediction.is_dir():
            continue
        evaluation = root / f"rescore_{method}"
        _run(["nnunet-liver", "evaluate", prediction, dataset / "labelsTs", "-o", evaluation, "--dataset-json",
              root / "evaluation_targets.json", "-np", "1", "--quiet", "--no-plots"], env, root / "rescore.log")
        result.update(_score(evaluation))
        shutil.copy(evaluation / "per_case_metrics.csv", out / f"per_case_metrics_{method}.csv")
    summary["results"][BASELINE] = _mean_curve_baseline(dataset)
    summary["meta"]["rescore_command"] = " ".join(sys.argv)
    _write_summary(out, summary["results"], summary["meta"])


def _write_summary(out: Path, results: dict, meta: dict) -> None:
    (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "summary.md").write_text(_markdown(results, meta))
    print((out / "summary.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="demo", help="schedule suffix of training.schedules (default demo)")
    p.add_argument("--train-cases", type=int, default=16)
    p.add_argument("--test-cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[16, 48, 48], metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dataset-id", type=int, default=941)
    p.add_argument("--configuration", default="3d_fullres", choices=["3d_fullres", "2d"],
                   help="nnU-Net configuration for every method (2d: the MTI-Net paper's slices; faster on a CPU)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work", default=str(REPO / "demo_work_mti_benchmark"))
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "mti_net_vs_stdnet_cpu"))
    p.add_argument("--name", default=None, help="run name (default: the schedule)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny schedule, 6 + 2 cases, dataset 942")
    p.add_argument("--rescore", action="store_true",
                   help="score a finished run's predictions again (kept under --work) with the current "
                        "`nnunet-liver evaluate` and rewrite its summary; trains nothing")
    p.add_argument("--baseline-only", action="store_true",
                   help="regenerate the run's phantom (same seed and sizes), add the mean-curve baseline to its "
                        "summary.json and summary.md; trains nothing")
    args = p.parse_args()
    if args.tiny:
        args.schedule, args.train_cases, args.test_cases, args.dataset_id = "tiny", 6, 2, 942
        args.shape = [12, 48, 48]
    name = args.name or args.schedule + ("" if args.configuration == "3d_fullres" else f"_{args.configuration}")
    root = Path(args.work) / name
    out = Path(args.results) / name
    if args.rescore:
        _rescore(root, out)
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    log = root / "run.log"
    if args.baseline_only:
        summary = json.loads((out / "summary.json").read_text())
        meta = summary["meta"]
        if [meta["train_cases"], meta["test_cases"], meta["shape"], meta["seed"]] != \
                [args.train_cases, args.test_cases, args.shape, args.seed]:
            sys.exit(f"--baseline-only needs the run's own cases: {out / 'summary.json'} has train/test cases "
                     f"{meta['train_cases']}/{meta['test_cases']}, shape {meta['shape']}, seed {meta['seed']}")
        summary["results"][BASELINE] = _mean_curve_baseline(_data(args, root, {}))
        meta["baseline_command"] = " ".join(sys.argv)
        _write_summary(out, summary["results"], meta)
        return
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"), nnUNet_extTrainer=str(REPO / "nnunet_liver_ext" / "trainers"),
               nnUNet_def_n_proc="1", nnUNet_compile="f", PYTHONUNBUFFERED="1")
    t0 = time.time()
    dataset = _data(args, root, env)
    did = str(args.dataset_id)
    # one fingerprint and one set of plans for every method
    _run(["nnUNetv2_plan_and_preprocess", "-d", did, "-np", "1", "-npfp", "1", "--no_pp",
          "--verify_dataset_integrity"], env, log)
    _run(["nnunet-liver", "plan", "-d", did, "--preset", "cpu-demo", "--preprocess", "-c", args.configuration,
          "-np", "1"], env, log)
    targets = _evaluation_targets(dataset, root / "evaluation_targets.json")
    results = {}
    for method in args.methods:
        trainer = f"{METHODS[method]}_{args.schedule}"
        print(f"[{time.time() - t0:.0f} s] {method}: nnUNetv2_train {did} {args.configuration} 0 -tr {trainer}",
              flush=True)
        # nnUNet_n_proc_DA=0: in-process data loading (no pool of torch-importing workers on 2 cores)
        train_s = _run(["nnUNetv2_train", did, args.configuration, "0", "-tr", trainer, "-p", PLANS, "-device", "cpu"],
                       env, log, nnUNet_n_proc_DA="0")
        prediction = root / f"pred_{method}"
        predict = ["nnUNetv2_predict"] if method == "nnU-Net" else ["nnunet-liver", "predict"]
        _run([*predict, "-i", dataset / "imagesTs", "-o", prediction, "-d", did, "-c", args.configuration, "-p", PLANS,
              "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env, log)
        evaluation = root / f"evaluation_{method}"
        _run(["nnunet-liver", "evaluate", prediction, dataset / "labelsTs", "-o", evaluation, "--dataset-json",
              targets, "-np", "1", "--quiet", "--no-plots"], env, log)
        results[method] = {"trainer": trainer, "train_s": train_s, **_score(evaluation)}
        model = root / "res" / dataset.name / f"{trainer}__{PLANS}__{args.configuration}"
        (out / f"training_{method}.txt").write_text("\n".join(_loss_lines(model)) + "\n")
        shutil.copy(evaluation / "per_case_metrics.csv", out / f"per_case_metrics_{method}.csv")
        print(f"[{time.time() - t0:.0f} s] {method}: {json.dumps({k: v for k, v in results[method].items()})}",
              flush=True)
    results[BASELINE] = _mean_curve_baseline(dataset)
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    meta = {"schedule": args.schedule, "configuration": args.configuration, "train_cases": args.train_cases, "test_cases": args.test_cases,
            "shape": args.shape, "seed": args.seed, "classes": dataset_json["characterization"]["classes"],
            "phases": dataset_json["phases"], "cpu_count": os.cpu_count(), "wall_s": time.time() - t0,
            "command": " ".join(sys.argv)}
    _write_summary(out, results, meta)


if __name__ == "__main__":
    main()
