"""Misregistration robustness (the STD-Net paper's test): how much a trained model's Dice drops when the
phases of each held-out case are moved by random rigid transforms before prediction.

    python benchmarks/misregistration_robustness.py -i IMAGES -r LABELS -d DATASET -c CONFIG -tr TRAINER \
        [-p PLANS] [-f 0] [-device cpu] [--max-mm 5 --max-deg 7] [--scales 0.5 1] [--repeats 3] [--seed 0] \
        --work WORK -o robustness.json

IMAGES is an nnU-Net input folder (CASE_0000.nii.gz, ...), LABELS the reference segmentations
(CASE.nii.gz, 0 background, 1 liver, 2 tumor). Every case is checked like ``nnunet-liver predict``
checks it; a bad case is reported and left out. Then:

1. the unperturbed prediction (``CharacterizationPredictor``, the predictor of ``nnunet-liver
   predict``, one case at a time in this process);
2. for each scale s and repeat r: every phase except the reference phase (portal venous, or
   ``--reference-phase``; ``--perturb-all`` moves it too) is moved by its own random rigid
   transform (inference/perturbation.py: rotation of uniform angle in [-s*max_deg, s*max_deg]
   about a random axis through the image centre, translation of uniform length in [0, s*max_mm]
   in a random direction; linear interpolation onto the original grid), and the case is predicted
   again. The random numbers depend on (seed, repeat, case, phase) only, so every scale moves the
   phases in the same directions, by s times the same amounts;
3. liver (labels {1, 2}) and tumor (label 2) Dice of every prediction against LABELS
   (evaluation/metrics.py), the change against the unperturbed prediction per case, and the Dice
   between the perturbed and the unperturbed segmentation (how much the output moved). With a
   model that writes CASE.json, also how often the predicted class stays the same.

The reference phase is left in place by default because the reference segmentation lies on its
grid: moving it would measure the label's misalignment, not the network's robustness to
misregistered phases. The summary (printed and in the JSON) gives, per scale, the mean Dice, the
mean change with its standard deviation and a 95 % bootstrap interval over all (case, repeat) pairs,
and the worst case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REGIONS = ("liver_region", "tumor")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-i", required=True, help="input folder (CASE_0000.nii.gz, ...)")
    p.add_argument("-r", required=True, help="reference segmentations (CASE.nii.gz)")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration (2d, 3d_fullres, ...)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-tr", required=True, help="trainer")
    p.add_argument("-f", nargs="+", default=["0"], help="folds (default 0)")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (nnU-Net's default is to mirror)")
    p.add_argument("--max-mm", type=float, default=5.0, help="largest translation in mm [5]")
    p.add_argument("--max-deg", type=float, default=7.0, help="largest rotation in degrees [7]")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="fractions of the largest motion to test, e.g. 0.5 1 [1]")
    p.add_argument("--repeats", type=int, default=1, help="random draws per case and scale [1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-phase", default="portal_venous",
                   help="phase left in place (dataset.json 'phases'; channel 0 when the model has no phases)")
    p.add_argument("--perturb-all", action="store_true", help="move the reference phase too")
    p.add_argument("--work", required=True, help="folder for the perturbed images and the predictions (replaced)")
    p.add_argument("-o", required=True, help="output JSON")
    return p.parse_args(argv)


def _model(args):
    """Model folder and folds, through the same checks (and messages) as ``nnunet-liver predict``."""
    from nnunet_liver_ext.inference.cli import _check_model

    ns = argparse.Namespace(i=args.i, d=args.d, tr=args.tr, p=args.p, c=args.c, f=args.f, chk=args.chk, npp=1, nps=1,
                            step_size=0.5, num_parts=1, part_id=0, prev_stage_predictions=None)
    return _check_model(ns)


def _reference_channel(dataset_json: dict, name: str) -> int:
    phases = dataset_json.get("phases")
    if phases:
        if name not in phases:
            raise SystemExit(f"--reference-phase {name} is not one of the model's phases {phases}")
        return phases.index(name)
    return 0


def _draws(seed: int, repeat: int, case_index: int, n_channels: int, fixed: set, max_mm: float, max_deg: float,
           scale: float):
    """One perturbation per channel; identical generator state for every scale (see the module doc)."""
    from nnunet_liver_ext.inference.perturbation import IDENTITY, random_perturbation

    rng = np.random.default_rng([seed, repeat, case_index])
    draws = [random_perturbation(rng, max_mm, max_deg, scale) for _ in range(n_channels)]
    return [IDENTITY if k in fixed else d for k, d in enumerate(draws)]


def _dice(pred_path: Path, ref_path: Path, case: str) -> dict:
    from nnunet_liver_ext.evaluation.benchmark import read_label_map
    from nnunet_liver_ext.evaluation.metrics import LIVER_REGION, TUMOR, region_metrics

    pred, spacing, _ = read_label_map(pred_path, case)
    ref, _, _ = read_label_map(ref_path, case)
    return {r.key: float(region_metrics(np.isin(pred, r.labels), np.isin(ref, r.labels), spacing)["dice"])
            for r in (LIVER_REGION, TUMOR)}


def _predicted_class(folder: Path, case: str):
    path = folder / f"{case}.json"
    return json.loads(path.read_text()).get("predicted_class") if path.is_file() else None


def _bootstrap_ci(values: np.ndarray, seed: int, n: int = 2000) -> list:
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(rows: list, baseline: dict, scales: list, args) -> list:
    out = []
    for scale in scales:
        at = [r for r in rows if r["scale"] == scale]
        entry = {"scale": scale, "max_mm": scale * args.max_mm, "max_deg": scale * args.max_deg, "pairs": len(at)}
        for region in REGIONS:
            dice = np.array([r["dice"][region] for r in at])
            delta = np.array([r["dice"][region] - baseline[r["case"]][region] for r in at])
            agreement = np.array([r["agreement_with_unperturbed"][region] for r in at])
            worst = at[int(np.argmin(delta))]
            entry[region] = {
                "dice_unperturbed_mean": float(np.mean([baseline[c][region] for c in baseline])),
                "dice_mean": float(dice.mean()), "delta_mean": float(delta.mean()), "delta_sd": float(delta.std(ddof=1))
                if len(delta) > 1 else 0.0, "delta_ci95": _bootstrap_ci(delta, args.seed),
                "delta_median": float(np.median(delta)), "delta_worst": float(delta.min()),
                "worst_case": f"{worst['case']} (repeat {worst['repeat']})",
                "agreement_mean": float(agreement.mean())}
        same = [r["same_class"] for r in at if r["same_class"] is not None]
        entry["same_predicted_class"] = (sum(same) / len(same)) if same else None
        out.append(entry)
    return out


def summary_lines(summary: list, n_cases: int, args, reference: str) -> list:
    """The printed summary: a Markdown table, one row per scale and region."""
    moved = "every phase" if args.perturb_all else f"every phase but {reference}"
    lines = [f"Misregistration robustness: {args.tr}, {n_cases} cases x {args.repeats} draw(s); {moved} moved by "
             f"a random rigid transform (rotation about a random axis, translation in a random direction)", ""]
    head = "| max shift / rotation | region | Dice unperturbed | Dice perturbed | change (mean ± sd) | change 95 % CI | " \
           "worst change | Dice vs unperturbed output |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e in summary:
        for region in REGIONS:
            s = e[region]
            lines.append(f"| {e['max_mm']:g} mm / {e['max_deg']:g}° | {region} | {s['dice_unperturbed_mean']:.3f} | "
                         f"{s['dice_mean']:.3f} | {s['delta_mean']:+.3f} ± {s['delta_sd']:.3f} | "
                         f"[{s['delta_ci95'][0]:+.3f}, {s['delta_ci95'][1]:+.3f}] | {s['delta_worst']:+.3f} "
                         f"({s['worst_case']}) | {s['agreement_mean']:.3f} |")
    lines.append("")
    for e in summary:
        if e["same_predicted_class"] is not None:
            lines.append(f"predicted class unchanged at {e['max_mm']:g} mm / {e['max_deg']:g}°: "
                         f"{e['same_predicted_class']:.3f} of the (case, draw) pairs")
    return lines


def main(argv=None) -> int:
    args = _args(argv)
    started = time.time()
    model_folder, folds = _model(args)

    import torch

    from nnunet_liver_ext.inference.batch import predict_cases
    from nnunet_liver_ext.inference.characterization import CharacterizationPredictor
    from nnunet_liver_ext.inference.inputs import CaseInput, check_input_folder
    from nnunet_liver_ext.inference.perturbation import perturb_case_files
    from nnunet_liver_ext.paths import TRAINERS_DIR

    os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS_DIR))
    dataset_json = json.loads((Path(model_folder) / "dataset.json").read_text())
    check = check_input_folder(args.i, dataset_json)
    for case in check.bad:
        for problem in case.problems:
            print(f"input error, left out: {problem}", file=sys.stderr)
    refs = Path(args.r)
    cases = [c for c in check.good if (refs / f"{c.case}{dataset_json['file_ending']}").is_file()]
    if len(cases) < len(check.good):
        print(f"{len(check.good) - len(cases)} case(s) without a reference in {refs} left out", file=sys.stderr)
    if not cases:
        raise SystemExit("no case to evaluate")
    reference = _reference_channel(dataset_json, args.reference_phase)
    reference_name = (dataset_json.get("phases") or [f"channel {reference}"])[reference]
    fixed = set() if args.perturb_all else {reference}
    n_channels = len(cases[0].files)

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    predictor = CharacterizationPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not args.disable_tta,
                                          perform_everything_on_device=args.device == "cuda",
                                          device=torch.device(args.device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    ending = dataset_json["file_ending"]

    def run(inputs, out: Path):
        result = predict_cases(predictor, inputs, str(out), parallel=False)
        if result.failed:
            raise SystemExit(f"prediction failed: {result.failed}")

    t0 = time.time()
    run(cases, work / "pred_unperturbed")
    seconds_unperturbed = time.time() - t0
    baseline = {c.case: _dice(work / "pred_unperturbed" / f"{c.case}{ending}", refs / f"{c.case}{ending}", c.case)
                for c in cases}
    rows = []
    for scale in args.scales:
        for repeat in range(args.repeats):
            tag = f"scale{scale:g}_repeat{repeat}"
            images, out = work / f"images_{tag}", work / f"pred_{tag}"
            images.mkdir()
            moved_cases, motions = [], {}
            for index, c in enumerate(cases):
                draws = _draws(args.seed, repeat, index, n_channels, fixed, args.max_mm, args.max_deg, scale)
                files = [str(images / os.path.basename(f)) for f in c.files]
                perturb_case_files(c.files, files, draws)
                moved_cases.append(CaseInput(c.case, files))
                motions[c.case] = [d.to_json() for d in draws]
            run(moved_cases, out)
            for c in cases:
                pred = out / f"{c.case}{ending}"
                unperturbed_class = _predicted_class(work / "pred_unperturbed", c.case)
                moved_class = _predicted_class(out, c.case)
                rows.append({"case": c.case, "scale": scale, "repeat": repeat, "motion": motions[c.case],
                             "dice": _dice(pred, refs / f"{c.case}{ending}", c.case),
                             # Dice between the two outputs: how far the segmentation moved
                             "agreement_with_unperturbed": _dice(pred, work / "pred_unperturbed" / f"{c.case}{ending}",
                                                                 c.case),
                             "predicted_class": moved_class, "unperturbed_class": unperturbed_class,
                             "same_class": None if unperturbed_class is None else moved_class == unperturbed_class})
            print(f"{tag}: {len(cases)} cases predicted")
    summary = summarize(rows, baseline, args.scales, args)
    lines = summary_lines(summary, len(cases), args, reference_name)
    print("\n" + "\n".join(lines))
    result = {
        "command": "python benchmarks/misregistration_robustness.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": {"folder": str(model_folder), "trainer": args.tr, "plans": args.p, "configuration": args.c,
                  "folds": folds, "checkpoint": args.chk, "mirroring": not args.disable_tta},
        "perturbation": {"max_mm": args.max_mm, "max_deg": args.max_deg, "scales": args.scales,
                         "repeats": args.repeats, "seed": args.seed, "reference_phase": reference_name,
                         "moved": "all phases" if args.perturb_all else f"all phases but {reference_name}",
                         "interpolation": "linear", "convention": "p -> R (p - c) + c + t, c = image centre, mm"},
        "cases": [c.case for c in cases], "left_out": {c.case: [str(p) for p in c.problems] for c in check.bad},
        "unperturbed": baseline, "summary": summary, "summary_text": lines, "rows": rows,
        "seconds": {"total": round(time.time() - started, 1), "unperturbed_prediction": round(seconds_unperturbed, 1)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                    "torch": torch.__version__},
    }
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.o} ({result['seconds']['total']} s)")
    return 0


if __name__ == "__main__":
    from nnunet_liver_ext.errors import UserError

    try:
        sys.exit(main())
    except UserError as e:
        print(f"misregistration_robustness: error: {e}", file=sys.stderr)
        sys.exit(1)
