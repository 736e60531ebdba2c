"""`nnunet-liver evaluate` (any prediction/ground-truth folder pair) and `nnunet-liver benchmark`
(cross-validation comparison of trainers from nnU-Net's results folder)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_metric_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="worker processes for the per-case metrics (default: nnU-Net's default_num_processes, "
                        "at most the CPU count)")
    p.add_argument("--connectivity", type=int, default=3, choices=(1, 2, 3),
                   help="lesion connected-component connectivity: 1 faces (6-neighbourhood), 2 +edges (18), "
                        "3 +corners (26, default)")
    p.add_argument("--size-strata", type=float, nargs="+", default=[10.0, 20.0], metavar="MM",
                   help="lesion diameter boundaries in mm (default: 10 20 -> <10, 10-20, >=20 mm)")
    p.add_argument("--surface-dice-tolerance", type=float, nargs="*", default=[2.0], metavar="MM",
                   help="surface Dice tolerance(s) in mm (default 2; none to skip)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="all liver/tumor metrics for a prediction folder against a ground-truth folder",
        description="Like nnUNetv2_evaluate_folder, with HD95, ASSD, VOE, RVD, both liver definitions, lesion "
                    "detection and (with CASE.json files) characterization. Writes per_case_metrics.csv, "
                    "lesions.csv, summary.json, report.md and plots/.")
    ev.add_argument("pred_dir", help="folder of predicted label maps (CASE.nii.gz, optional CASE.json)")
    ev.add_argument("gt_dir", help="folder of ground-truth label maps with the same file names")
    ev.add_argument("-o", "--output", default=None, help="output folder (default: PRED_DIR/liver_evaluation)")
    ev.add_argument("--dataset-json", default=None,
                    help="dataset.json for labels, file ending and characterization targets "
                         "(default: PRED_DIR/dataset.json if present, else LiTS labels 1 liver, 2 tumor)")
    _add_metric_options(ev)
    ev.set_defaults(func=_evaluate)

    bm = subparsers.add_parser(
        "benchmark", help="cross-validation comparison of trainers from nnU-Net's fold_k/validation predictions",
        description="Reads $nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_k/validation for "
                    "every trainer and fold, the ground truth and splits from $nnUNet_preprocessed, computes all "
                    "metrics per case (cached, incremental) and writes a CSV, a Markdown report with bootstrap CIs "
                    "and Wilcoxon tests against the baseline, and plots.")
    bm.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    bm.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    bm.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    bm.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer class names to compare")
    bm.add_argument("--baseline", default=None,
                    help="trainer the others are tested against (added if not listed; 'none': no paired tests). "
                         "Default: stock nnU-Net on the methods' schedule, i.e. nnUNetTrainer_tiny for "
                         "nnUNetTrainerSTDNet_tiny and nnUNetTrainer for full-length trainers")
    bm.add_argument("-f", "--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds (default 0-4)")
    bm.add_argument("-o", "--output", default=None,
                    help="output folder (default: $nnUNet_results/<dataset>/benchmark__<plans>__<configuration>)")
    _add_metric_options(bm)
    bm.set_defaults(func=_benchmark)


def _num_processes(requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"-np must be >= 1, got {requested}")
        return requested
    from nnunetv2.configuration import default_num_processes

    return max(1, min(default_num_processes, os.cpu_count() or 1))


def _run(inputs, out_dir: Path, args) -> int:
    from nnunet_liver_ext.evaluation.benchmark import compute_all
    from nnunet_liver_ext.evaluation.report import aggregate, write_report

    rows, lesion_rows, stats = compute_all(inputs.jobs, inputs.settings, out_dir,
                                           num_processes=_num_processes(args.num_processes),
                                           progress=not args.quiet)
    summary = aggregate(inputs, rows, lesion_rows)
    plot_files = []
    if not args.no_plots:
        from nnunet_liver_ext.evaluation.plots import make_all_plots

        plot_files = make_all_plots(rows, summary, inputs.settings.regions, out_dir)
    write_report(inputs, rows, lesion_rows, out_dir, plot_files, stats, summary=summary)
    comp = inputs.completeness
    for t in comp.missing_trainers:
        print(f"WARNING: no results folder for trainer {t}", file=sys.stderr)
    for t, folds in comp.missing_folds.items():
        for fold, why in folds:
            print(f"WARNING: {t} fold {fold}: {why}", file=sys.stderr)
    for t, cases in comp.missing_cases.items():
        print(f"WARNING: {t}: {len(cases)} case(s) without prediction: "
              + ", ".join(c if f is None else f"{c} (fold {f})" for f, c in cases), file=sys.stderr)
    print(f"{len(rows)} case evaluations ({stats['computed']} computed, {stats['cached']} cached); "
          f"report: {out_dir / 'report.md'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from nnunet_liver_ext.evaluation.benchmark import collect_folder

    try:
        dataset_json_path = Path(args.dataset_json) if args.dataset_json else Path(args.pred_dir) / "dataset.json"
        dataset_json = None
        if args.dataset_json or dataset_json_path.is_file():
            try:
                dataset_json = json.loads(dataset_json_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read dataset.json {dataset_json_path}: {e}") from e
        inputs = collect_folder(args.pred_dir, args.gt_dir, dataset_json, connectivity=args.connectivity,
                                size_strata_mm=args.size_strata,
                                surface_dice_tolerances_mm=args.surface_dice_tolerance)
        out_dir = Path(args.output) if args.output else Path(args.pred_dir) / "liver_evaluation"
        return _run(inputs, out_dir, args)
    except ValueError as e:
        print(f"nnunet-liver evaluate: error: {e}", file=sys.stderr)
        return 1


def _benchmark(args: argparse.Namespace) -> int:
    from nnunet_liver_ext.evaluation.benchmark import collect_benchmark

    try:
        inputs = collect_benchmark(args.dataset, args.configuration, args.trainers, plans=args.plans,
                                   folds=args.folds, baseline=args.baseline, connectivity=args.connectivity,
                                   size_strata_mm=args.size_strata,
                                   surface_dice_tolerances_mm=args.surface_dice_tolerance)
        out_dir = Path(args.output) if args.output else \
            Path(os.environ["nnUNet_results"]) / inputs.dataset_name / f"benchmark__{args.plans}__{args.configuration}"
        return _run(inputs, out_dir, args)
    except ValueError as e:
        print(f"nnunet-liver benchmark: error: {e}", file=sys.stderr)
        return 1
