"""STD-Net against stock nnU-Net on the same phantom plans and schedule, on one GPU.

Run on the GPU machine by ``benchmarks/gpu_run.sh`` (see ../shared/GPU.md). ``--device cpu --schedule tiny``
at a tiny ``--shape`` runs every step on the CPU: tests/test_gpu_stdnet_vs_nnunet.py does, so that the GPU
machine's scarce minutes are not spent finding a bug. Steps, each a subcommand so they can be split across
calls:

- ``data``: phantom CT cases (3 phases) -> nnU-Net raw -> ``nnUNetv2_plan_and_preprocess``;
- ``timing``: seconds per training iteration (fp16 autocast, nnU-Net's ``train_step`` on the plans'
  patch and batch size, the same random batch for both), eager and ``torch.compile``d, with peak
  memory; stock ``nnUNetTrainer`` and ``nnUNetTrainerSTDNet`` measured in the same process;
- ``train``: ``nnUNetTrainer_short`` and ``nnUNetTrainerSTDNet_short`` (same schedule) on fold 0,
  run side by side (their timings come from ``timing``, not from these runs);
- ``report``: ``nnunet-liver benchmark`` on fold 0, plus a JSON/Markdown summary with ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from perf_common import timed_train_steps  # benchmarks/ (this script's folder) is on sys.path

DATASET_ID = 950
DATASET_NAME = f"Dataset{DATASET_ID}_PhantomGPU"

def trainers(args) -> tuple:
    """Stock nnU-Net and STD-Net on the same schedule (training.schedules)."""
    return f"nnUNetTrainer_{args.schedule}", f"nnUNetTrainerSTDNet_{args.schedule}"


def _entry(module: str, function: str, argv: list, env=None, log=None) -> subprocess.Popen:
    code = f"import sys; from {module} import {function} as f; sys.argv = {argv!r}; f()"
    return subprocess.Popen([sys.executable, "-c", code], env=env or os.environ.copy(),
                            stdout=log or None, stderr=subprocess.STDOUT if log else None)


def data(args) -> None:
    from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw
    t0 = time.time()
    config = PhantomConfig(shape=tuple(args.shape), n_lesions_range=(1, 3), p_no_lesion=0.0)
    cases = generate_cases(args.cases, config, seed=11, progress=False)
    write_nnunet_raw(os.environ["nnUNet_raw"], DATASET_ID, DATASET_NAME.split("_", 1)[1], cases, overwrite=True)
    print(f"phantom: {args.cases} cases {args.shape} in {time.time() - t0:.1f} s", flush=True)
    p = _entry("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_and_preprocess_entry",
               ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", str(args.np),
                "-npfp", str(args.np)])
    assert p.wait() == 0, "plan_and_preprocess failed"


def _timed_steps(trainer, iterations: int, warmup: int) -> dict:
    import torch
    cm = trainer.configuration_manager
    torch.manual_seed(0)
    data = torch.randn(trainer.batch_size, trainer.num_input_channels, *cm.patch_size, device=trainer.device)
    target = [torch.randint(0, 3, (trainer.batch_size, 1, *[int(round(p * s)) for p, s in zip(cm.patch_size, scale)]),
                            device=trainer.device).float() for scale in trainer._get_deep_supervision_scales()]
    keys = list(trainer.dataset_json.get("characterization", {}).get("cases", {}))[:trainer.batch_size]
    keys = keys or ["none"] * trainer.batch_size
    batch = {"data": data, "target": target, "keys": keys}
    return timed_train_steps(trainer, batch, iterations, warmup)


def timing(args) -> None:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    device = torch.device(args.device)
    # as nnUNetv2_train does (run_training.py); without it 3d convolutions run about 2x slower
    torch.backends.cudnn.benchmark = device.type == "cuda"
    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans, dataset_json = load_json(pre / "nnUNetPlans.json"), load_json(pre / "dataset.json")
    results = {}
    for compiled in (False, True) if args.compile and device.type == "cuda" else (False,):  # nnU-Net: CUDA only
        os.environ["nnUNet_compile"] = "t" if compiled else "f"
        for name in trainers(args):
            # run_training sets continue_training; nnU-Net 2.8 pops it in __init__
            trainer = recursive_find_trainer_class_by_name(name)(dict(plans, continue_training=False), "3d_fullres", 0,
                                                                 dataset_json, device)
            trainer.initialize()
            key = f"{name}{' compiled' if compiled else ''}"
            try:
                results[key] = _timed_steps(trainer, args.iterations, warmup=5 if compiled else 3)
            except Exception as e:  # a network that does not compile is a finding, not a crash
                results[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            results[key]["parameters_M"] = sum(p.numel() for p in trainer.network.parameters()) / 1e6
            print(key, results[key], flush=True)
            del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    cm = plans["configurations"]["3d_fullres"]
    results["setup"] = {"patch_size": cm["patch_size"], "batch_size": cm["batch_size"],
                        "features_per_stage": cm["architecture"]["arch_kwargs"]["features_per_stage"],
                        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                        "device": device.type, "torch": torch.__version__, "iterations_timed": args.iterations,
                        "autocast": "fp16 (nnU-Net default on CUDA)" if device.type == "cuda" else "none (CPU)"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "timing.json").write_text(json.dumps(results, indent=2))


def train(args) -> None:
    env = dict(os.environ, nnUNet_compile="f", nnUNet_n_proc_DA=str(max(args.np - 1, 0)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in trainers(args):
        log = open(out / f"train_{name}.log", "w")
        procs.append(_entry("nnunetv2.run.run_training", "run_training_entry",
                            ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", name, "-device", args.device],
                            env, log))
    codes = [p.wait() for p in procs]
    assert codes == [0, 0], f"training exit codes {codes}; see {out}/train_*.log"


def report(args) -> None:
    out = Path(args.out)
    names = trainers(args)
    p = _entry("nnunet_liver_ext.cli", "main",
               ["nnunet-liver", "benchmark", "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", *names,
                "--baseline", names[0], "-f", "0", "-o", str(out / "benchmark"), "-np", str(args.np)])
    assert p.wait() == 0, "benchmark failed"
    summary = json.loads((out / "benchmark" / "summary.json").read_text())
    timing_results = json.loads((out / "timing.json").read_text())
    base, ours = (timing_results[t] for t in names)
    ratios = {"s_per_iteration_ratio_eager": ours["s_per_iteration"] / base["s_per_iteration"]}
    if "peak_memory_gb" in base and "peak_memory_gb" in ours:  # CUDA only
        ratios["peak_memory_ratio_eager"] = ours["peak_memory_gb"] / base["peak_memory_gb"]
    base_c, ours_c = (timing_results.get(f"{t} compiled", {}) for t in names)
    if "s_per_iteration" in base_c and "s_per_iteration" in ours_c:
        ratios["s_per_iteration_ratio_compiled"] = ours_c["s_per_iteration"] / base_c["s_per_iteration"]
    (out / "gpu_summary.json").write_text(json.dumps({"ratios_stdnet_over_stock": ratios, "timing": timing_results,
                                                      "benchmark_summary": summary}, indent=2, default=str))
    print(json.dumps(ratios, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+", choices=["data", "timing", "train", "report"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 160, 160))
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--schedule", default="short", help="training.schedules entry of both trainers")
    parser.add_argument("-np", type=int, default=8, help="processes for preprocessing, data loading, evaluation")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="time eager mode only (torch.compile costs minutes of warm-up per network)")
    args = parser.parse_args()
    for step in args.steps:
        t0 = time.time()
        globals()[step](args)
        print(f"== step {step}: {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
