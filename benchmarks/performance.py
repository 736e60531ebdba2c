"""Performance of stock nnU-Net's ``nnUNetTrainer`` and every method's main trainer, measured in one run
on identical data: training step time (eager and torch.compile'd), memory against the VRAM-aware
planners' estimate, sliding-window inference of one 3-phase case, parameters and FLOPs, and AMP
stability. Writes ``performance.json`` and ``performance.md`` (a table, ratios against stock).

Steps (``python benchmarks/performance.py STEP... --out DIR``; each writes ``DIR/parts/<step>.json`` and
merges into what an earlier call left there, so a run may be split over several calls):

- ``data``: phantom CT cases (3 phases) -> nnU-Net raw -> nnU-Net's fingerprint -> nnU-Net's plans
  (``nnUNetPlans``, 3d_fullres preprocessed) and every network's VRAM-aware plans
  (``trainer_plans.planners``, ``nnUNetPlans_<Net>``, which reuse nnU-Net's preprocessed data).
- ``flops``: parameters, and forward FLOPs (``torch.utils.flop_counter``) of the inference network
  (deep supervision off) at the common patch, batch 1, on the benchmark's device; and a training step's
  FLOPs by part (forward and backward, deep supervision and heads on). ``--device meta`` counts them at
  any size without computing anything.
- ``timing``: seconds per ``trainer.train_step`` (forward, loss, backward, optimiser step; nnU-Net's fp16
  AMP and grad scaler on CUDA) on ONE batch from nnU-Net's own data loader, drawn once and cached, the
  same for every trainer, at the common configuration: stock nnU-Net's 3d_fullres plans (patch and
  batch size). ``--modes eager compiled`` (compiled: torch.compile through nnU-Net's
  ``nnUNet_compile``; CUDA only, nnU-Net never compiles on the CPU). Memory: on CUDA the peak allocated
  during the timed steps against the GB the planner's estimate predicts for that patch and batch
  (nnU-Net's own estimate for stock); on the CPU the bytes autograd saves in one training forward under
  bf16 autocast against the estimate in stock's bytes per element (``trainer_plans.memory``).
  ``--own-plans``: each network also at the patch and batch its own planner chose (eager), peak against
  the plans' prediction and VRAM target. ``--amp-iterations N``: each trainer, fresh, first runs N train
  steps on batches of nnU-Net's data loader with nnU-Net's CUDA defaults (AMP; torch.compile when
  ``compiled`` is among the modes) and records non-finite losses, steps the grad scaler skipped and
  non-finite weights; its timing follows. Each trainer's figures are saved as it finishes, and a trainer
  that parts/timing.json already has every asked figure of is skipped (``--again`` measures it anew), so
  a call cut off at the device's limit goes on where it stopped.
- ``inference``: nnU-Net's sliding-window prediction (``nnUNetPredictor``, step 0.5, Gaussian, no
  mirroring, one patch at a time, fp16 autocast on CUDA) of one random 3-phase case of ``--case-shape``
  (224^3 by default) with each trainer's inference network; median of 2 runs after a warm-up.
- ``report``: ``DIR/performance.json`` and ``DIR/performance.md`` from the parts.
- ``profile``: each trainer's eager train step on the same batch under ``torch.profiler``, time and FLOPs by
  part of the network, forward and backward (``benchmarks/step_profile.py``): where the time goes.
- ``all``: data flops timing profile inference report.

Sizes: the default is the GPU size (phantom 12 cases of 96x192x192, nnU-Net's plans for an 8 GB target,
20 timed iterations after 3 warm-up ones, a 224^3 case). ``--small`` is the CPU size (5 cases of
16x48x48, 2 timed iterations after 1, a 24x64x64 case): it tests the script, its figures are CPU
figures of tiny networks' inputs and say little about a GPU.

On the CPU (this repository's test; results in benchmarks/results/performance_cpu/):

    python benchmarks/performance.py all --small --amp-iterations 2 --out benchmarks/results/performance_cpu

On the GPU machine (../shared/GPU.md): a session has 30 minutes of device time, not enough for every call
below, so they come in the order of what they are worth, and a run may span sessions. Step 2 (SimpleITK) in
one call, then with ``.whl/rest`` carried one call per line (each under the 10-minute limit of a call; the
machine keeps ``$TMPDIR`` between calls while it stays up, every call returns all results so far under
``$OUT``, and a call that reaches its limit keeps each trainer that finished):

    bash benchmarks/performance_gpu.sh data flops timing inference --own-plans
    bash benchmarks/performance_gpu.sh timing --modes compiled --amp-iterations 200 --trainers nnUNetTrainer nnUNetTrainerSTDNet
    bash benchmarks/performance_gpu.sh timing --modes compiled --amp-iterations 200 --trainers nnUNetTrainerDynTransNet nnUNetTrainerMambaCodebook
    bash benchmarks/performance_gpu.sh timing --modes compiled --amp-iterations 200 --trainers nnUNetTrainerMTINet
    bash benchmarks/performance_gpu.sh profile report

Copy the returned ``performance.json``, ``performance.md`` and ``parts/`` to
``benchmarks/results/performance_gpu/`` after each session. A later session's first call (the data step
again: ``data`` makes the same phantom from the same seed) starts from those committed parts
(``performance_gpu.sh`` copies them in) and skips what they hold; the table says where a trainer's figures
come from another machine start than stock's. The Mamba2 scan runs where the package would run it:
mamba-ssm's pure-Python wheel does not import as a package (no ``selective_scan_cuda``), so the timing is our
PyTorch SSD, and the table says so; ``benchmarks/mamba_ssm_parity_gpu.sh`` times mamba-ssm's kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import forward_flops, sliding_window_seconds, timed_train_steps  # noqa: E402
from step_profile import network_part_flops, profile_train_step  # noqa: E402

DATASET_ID = 951
DATASET_NAME = f"Dataset{DATASET_ID}_PhantomPerformance"
#: the trainers compared, each with the preset of its VRAM-aware planner (None: nnU-Net's own planning)
TRAINERS = {"nnUNetTrainer": None, "nnUNetTrainerSTDNet": "stdnet", "nnUNetTrainerDynTransNet": "dyntransnet",
            "nnUNetTrainerMambaCodebook": "mamba-codebook", "nnUNetTrainerMTINet": "mti-net"}
BASELINE = "nnUNetTrainer"
CONFIGURATION = "3d_fullres"
SIZES = {  # cases, phantom shape, timed iterations, warm-up iterations, inference case shape
    "gpu": dict(cases=12, shape=(96, 192, 192), iterations=20, warmup=3, case_shape=(224, 224, 224)),
    "small": dict(cases=5, shape=(16, 48, 48), iterations=2, warmup=1, case_shape=(24, 64, 64)),
}


# ------------------------------------------------------------------ setup
def set_folders(work: Path) -> None:
    """nnU-Net's three folders under ``work`` (nnU-Net 2.8 reads them from the environment when used)."""
    for var, name in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / name)


def preprocessed() -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def plans_name(trainer: str) -> str:
    from nnunet_liver_ext.trainer_plans.planners import PRESETS

    preset = TRAINERS[trainer]
    return "nnUNetPlans" if preset is None else f"nnUNetPlans_{PRESETS[preset].plans_suffix}"


def common_plans() -> dict:
    """Stock nnU-Net's plans: the configuration every trainer is measured at."""
    return load_json(preprocessed() / "nnUNetPlans.json")


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def release(device: torch.device) -> None:
    """Frees what the last trainer or network held before the next one is measured. Trainers sit in reference
    cycles (network, optimiser, loss, logger), so dropping the name frees nothing until the collector runs: without
    ``gc.collect`` the next peak would include a previous trainer's weights and optimiser state. Compiled graphs
    are dropped too."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine() -> str:
    """Which machine start a figure comes from (device name and boot id): ratios mean most within one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "?"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()
    return f"{name} (boot {boot})"


def make_trainer(name: str, plans: dict, device: torch.device, compile_network: bool):
    """The trainer as ``nnUNetv2_train`` builds it, then ``initialize()`` (nnU-Net's compile decision reads
    ``nnUNet_compile``)."""
    from nnunet_liver_ext.trainer_plans.planners import find_trainer_class

    os.environ["nnUNet_compile"] = "t" if compile_network else "f"
    seed_everything()
    trainer = find_trainer_class(name)(dict(copy.deepcopy(plans), continue_training=False), CONFIGURATION, 0,
                                       load_json(preprocessed() / "dataset.json"), device)
    trainer.initialize()
    return trainer


@contextlib.contextmanager
def loader_workers(n: int):
    """nnU-Net's data-loader processes (``nnUNet_n_proc_DA``) while a loader is made; only there, since
    nnU-Net's planner fails on 0 (it sets torch's threads to it)."""
    before = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("nnUNet_n_proc_DA")
        else:
            os.environ["nnUNet_n_proc_DA"] = before


def cached_batch(plans: dict, device: torch.device, key: str) -> dict:
    """One training batch of nnU-Net's data loader (stock trainer, its augmentation) for ``plans``, drawn
    once with fixed seeds in this process and cached on disk, so every trainer and every later call
    times the same batch."""
    path = preprocessed().parent.parent / f"batch_{key}.pt"
    if not path.is_file():
        _draw_batch(plans, path)
    batch = torch.load(path, weights_only=False)
    if device.type == "cuda":  # as nnU-Net's loader hands batches over on CUDA (pin_memory)
        batch = {"data": batch["data"].pin_memory(), "target": [t.pin_memory() for t in batch["target"]],
                 "keys": batch["keys"]}
    return batch


def _draw_batch(plans: dict, path: Path) -> None:
    trainer = make_trainer(BASELINE, plans, torch.device("cpu"), False)
    with loader_workers(0):  # a single-threaded loader: the seed decides the batch
        loader, _ = trainer.get_dataloaders()
    seed_everything()
    batch = next(loader)
    batch = {"data": batch["data"], "target": batch["target"], "keys": [str(k) for k in batch["keys"]]}
    torch.save(batch, path)


def finish_loaders(*loaders) -> None:
    """Stops nnU-Net's loader processes (and their pin-memory threads), which otherwise keep running, and
    taking CPU, while the next trainer is timed."""
    for loader in loaders:
        if hasattr(loader, "_finish"):
            loader._finish()


# ------------------------------------------------------------------ steps
def step_data(args, size: dict) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiment_dataset,
                                                                      preprocess_dataset)

    from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw
    from nnunet_liver_ext.trainer_plans.planners import PRESETS

    if (preprocessed() / "nnUNetPlans.json").is_file() and all(
            (preprocessed() / f"{plans_name(t)}.json").is_file() for t in TRAINERS):
        print("data: already there", flush=True)
        return {}
    start = time.perf_counter()
    config = PhantomConfig(shape=tuple(size["shape"]), n_lesions_range=(1, 3), p_no_lesion=0.0)
    write_nnunet_raw(os.environ["nnUNet_raw"], DATASET_ID, DATASET_NAME.split("_", 1)[1],
                     generate_cases(size["cases"], config, seed=13, progress=False), overwrite=True)
    extract_fingerprints([DATASET_ID], num_processes=args.np)
    plan_experiment_dataset(DATASET_ID, PRESETS["default"])
    preprocess_dataset(DATASET_ID, "nnUNetPlans", [CONFIGURATION], [args.np])
    for trainer, preset in TRAINERS.items():
        if preset is not None:
            plan_experiment_dataset(DATASET_ID, PRESETS[preset])
    print(f"data: {size['cases']} phantom cases of {size['shape']}, fingerprint, plans and preprocessing in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return {}


def _inference_network(name: str, plans: dict, dataset_json: dict, deep_supervision: bool = False):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_liver_ext.trainer_plans.planners import find_trainer_class
    from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

    trainer_class = find_trainer_class(name)
    if issubclass(trainer_class, LiverMultiTaskTrainer):  # the package's block in the plans, as training writes it
        plans = trainer_class.plans_with_liver_block(plans, dataset_json)
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    label_manager = plans_manager.get_label_manager(dataset_json)
    seed_everything()
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager,
                                                       len(dataset_json["channel_names"]),
                                                       label_manager.num_segmentation_heads, deep_supervision)
    return network, plans_manager, configuration_manager


def step_flops(args, size: dict) -> dict:
    plans, dataset_json = common_plans(), load_json(preprocessed() / "dataset.json")
    patch = plans["configurations"][CONFIGURATION]["patch_size"]
    results = {}
    for name in args.trainers:
        network, _, _ = _inference_network(name, plans, dataset_json)
        network = network.to(args.device)
        flops, _ = forward_flops(network, (1, len(dataset_json["channel_names"]), *patch), args.device)
        results[name] = {"parameters": int(sum(p.numel() for p in network.parameters())), "forward_flops": flops,
                         "patch_size": patch}
        del network
        # a training step's FLOPs by part: deep supervision and heads on, forward and backward, one sample
        network, _, _ = _inference_network(name, plans, dataset_json, deep_supervision=True)
        network = network.to(args.device)
        results[name]["train_flops_by_part"] = network_part_flops(
            network, (1, len(dataset_json["channel_names"]), *patch), args.device, heads=name != BASELINE)
        print(name, results[name], flush=True)
        network = None
        release(torch.device(args.device))
        args.save(results)
    return results


def predicted_memory(name: str, plans: dict, batch_size: int) -> dict:
    """The planner's estimate for ``name``'s network at ``plans``' 3d_fullres patch and ``batch_size``: its
    feature-map count times the calibration its own plans recorded (1 for stock nnU-Net's U-Net)."""
    from nnunet_liver_ext.trainer_plans.memory import build_network, predicted_gb
    from nnunet_liver_ext.trainer_plans.planners import find_trainer_class

    dataset_json = load_json(preprocessed() / "dataset.json")
    configuration = plans["configurations"][CONFIGURATION]
    factor = 1.0
    if TRAINERS[name] is not None:
        factor = load_json(preprocessed() / f"{plans_name(name)}.json")["configurations"][CONFIGURATION][
            "vram_estimate"]["calibration"]["factor"]
    network = build_network(find_trainer_class(name), dataset_json, configuration, len(dataset_json["channel_names"]),
                            len(dataset_json["labels"]), "meta")
    count = int(network.compute_conv_feature_map_size(list(configuration["patch_size"])))
    return {"feature_map_elements": count, "calibration_factor": factor, "estimate_per_sample": count * factor,
            "predicted_gb": predicted_gb(count * factor, batch_size, len(configuration["patch_size"]))}


def amp_check(trainer, iterations: int, workers: int) -> dict:
    """``iterations`` train steps of a fresh trainer on batches of its own nnU-Net data loader, as the first
    epoch of ``nnUNetv2_train`` runs them (nnU-Net's AMP and grad scaler on CUDA; warm-up of the learning rate
    where the trainer has one): non-finite losses (a trainer of this package stops on one, naming the term),
    steps the grad scaler skipped (its scale fell), and whether the weights are finite at the end.
    ``first_step_s`` holds torch.compile's compilation when the network is compiled."""
    with loader_workers(workers):
        loader, val_loader = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    non_finite, skipped, error, first_step_s = [], 0, None, None
    start = time.perf_counter()
    for i in range(iterations):
        if i == 1:
            first_step_s = time.perf_counter() - start
        scale = trainer.grad_scaler.get_scale() if trainer.grad_scaler is not None else None
        try:
            loss = float(trainer.train_step(next(loader))["loss"])
        except FloatingPointError as e:
            error = f"iteration {i}: {e}"
            break
        if not np.isfinite(loss):
            non_finite.append(i)
        if scale is not None and trainer.grad_scaler.get_scale() < scale:
            skipped += 1
    seconds = time.perf_counter() - start
    finish_loaders(loader, val_loader)
    weights_finite = all(bool(torch.isfinite(p).all()) for p in trainer.network.parameters())
    return {"iterations": iterations, "amp": trainer.grad_scaler is not None,
            "compiled": hasattr(trainer.network, "_orig_mod"), "non_finite_loss_iterations": non_finite,
            "grad_scaler_skipped_steps": skipped, "stopped": error, "weights_finite": weights_finite,
            "ok": not non_finite and error is None and weights_finite, "seconds": seconds,
            "first_step_s": first_step_s}


def mamba_scan_backends(network: torch.nn.Module, device: torch.device) -> list:
    """How the network's Mamba2 blocks scan on ``device`` (mamba-ssm's kernel or the PyTorch SSD): a Mamba
    figure means little without it."""
    from nnunet_liver_ext.networks.ssd import Mamba2SSD, describe_backend

    return sorted({describe_backend(device, m.backend) for m in network.modules() if isinstance(m, Mamba2SSD)})


def runnable_modes(args) -> list:
    return [m for m in args.modes if m == "eager" or torch.device(args.device).type == "cuda"]


def already_measured(entry: dict, name: str, args) -> bool:
    """Whether an earlier call (this session's, or a committed part: see ``performance_gpu.sh``) has every
    figure this call would measure for ``name``, so that a call cut off at the device's limit resumes."""
    if not entry:
        return False
    modes_done = all(mode in entry and "error" not in entry[mode] for mode in runnable_modes(args))
    amp_done = not args.amp_iterations or (entry.get("amp_check") or {}).get("iterations") == args.amp_iterations
    own_done = not args.own_plans or TRAINERS[name] is None or "own_plans" in entry
    return modes_done and amp_done and own_done


def step_timing(args, size: dict) -> dict:
    from nnunet_liver_ext.trainer_plans.memory import saved_for_backward_bytes
    from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnUNetv2_train does
    plans = common_plans()
    batch = cached_batch(plans, device, "common")
    batch_size, channels = batch["data"].shape[0], batch["data"].shape[1]
    earlier = load_json(args.out / "parts" / "timing.json")["results"] if (
        args.out / "parts" / "timing.json").is_file() else {}
    modes = runnable_modes(args)
    results = {}
    for name in args.trainers:
        if not args.again and already_measured(earlier.get(name), name, args):
            print(name, "already measured (parts/timing.json); --again measures it again", flush=True)
            continue
        entry = {"memory": predicted_memory(name, plans, batch_size), "measured_on": machine()}
        for mode in args.modes:
            if mode not in modes:
                entry[mode] = {"skipped": "nnU-Net does not compile on the CPU (nnUNetTrainer._do_i_compile)"}
                continue
            release(device)  # one trainer at a time on the device
            trainer = make_trainer(name, plans, device, mode == "compiled")
            scans = mamba_scan_backends(trainer.network, device)
            if scans:
                entry["mamba_scan"] = scans
            if args.amp_iterations and mode == modes[-1]:
                # a fresh trainer, as nnUNetv2_train starts (compiled on CUDA when asked for, nnU-Net's default);
                # its first steps also compile, which the timing's warm-up then need not
                try:
                    entry["amp_check"] = amp_check(trainer, args.amp_iterations, args.loader_workers)
                except Exception as e:  # e.g. a network that does not compile
                    entry["amp_check"] = {"ok": False, "iterations": args.amp_iterations, "amp": None,
                                          "compiled": None, "grad_scaler_skipped_steps": None,
                                          "error": f"{type(e).__name__}: {str(e)[:500]}"}
                print(name, "AMP check", entry["amp_check"], flush=True)
            try:
                entry[mode] = timed_train_steps(trainer, batch, size["iterations"], size["warmup"])
            except Exception as e:  # a network that does not compile is a finding, not a crash
                entry[mode] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            if device.type == "cpu" and mode == "eager":
                heads = isinstance(trainer, LiverMultiTaskTrainer)
                entry["memory"]["saved_activation_bytes_bf16"] = saved_for_backward_bytes(
                    trainer.network, (batch_size, channels, *batch["data"].shape[2:]), heads)
            print(name, mode, entry[mode], flush=True)
            trainer = None
        if args.own_plans and TRAINERS[name] is not None:
            own = load_json(preprocessed() / f"{plans_name(name)}.json")
            estimate = own["configurations"][CONFIGURATION]["vram_estimate"]
            release(device)
            trainer = make_trainer(name, own, device, False)
            own_batch = cached_batch(own, device, plans_name(name))
            entry["own_plans"] = {"plans": plans_name(name), "patch_size": own["configurations"][CONFIGURATION][
                "patch_size"], "batch_size": own["configurations"][CONFIGURATION]["batch_size"],
                "predicted_gb": estimate["predicted_gb"], "gpu_memory_target_gb": estimate["gpu_memory_target_gb"],
                **timed_train_steps(trainer, own_batch, size["iterations"], size["warmup"])}
            print(name, "own plans", entry["own_plans"], flush=True)
            trainer = None
        release(device)
        results[name] = entry
        args.save(results)  # each trainer as it finishes: a call cut off at the device's limit keeps them
    return results


def step_profile(args, size: dict) -> dict:
    """Each trainer's eager train step on the common batch under ``torch.profiler``, by part
    (``benchmarks/step_profile.py``)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    plans = common_plans()
    batch = cached_batch(plans, device, "common")
    results = {}
    for name in args.trainers:
        release(device)
        trainer = make_trainer(name, plans, device, False)
        results[name] = profile_train_step(trainer, batch, warmup=size["warmup"])
        print(name, "profile", {k: v for k, v in results[name].items() if k != "parts"}, flush=True)
        trainer = None
        args.save(results)
    release(device)
    return results


def step_inference(args, size: dict) -> dict:
    os.environ["nnUNet_compile"] = "f"  # eager inference, as nnUNetv2_predict runs by default
    device = torch.device(args.device)
    plans, dataset_json = common_plans(), load_json(preprocessed() / "dataset.json")
    channels = len(dataset_json["channel_names"])
    case = torch.randn(channels, *args.case_shape, generator=torch.Generator().manual_seed(0))
    results = {}
    for name in args.trainers:
        release(device)
        network, plans_manager, configuration_manager = _inference_network(name, plans, dataset_json)
        results[name] = {"case_shape": [channels, *args.case_shape], "measured_on": machine(),
                         **sliding_window_seconds(network, plans_manager, configuration_manager, dataset_json, name,
                                                  case, device)}
        print(name, results[name], flush=True)
        network = None
        args.save(results)
    release(device)
    return results


# ------------------------------------------------------------------ report
def merged(out: Path) -> dict:
    trainers: dict = {}
    meta: dict = {}
    for part in sorted((out / "parts").glob("*.json")):
        content = load_json(part)
        meta[part.stem] = content["meta"]
        for name, result in content["results"].items():
            trainers.setdefault(name, {})[part.stem] = result
    return {"meta": meta, "trainers": trainers}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _ratio(value, base):
    return value / base if value is not None and base else None


def report_table(results: dict) -> str:
    """The Markdown table of ``performance.json``: every figure comes from the parts, ratios against stock."""
    rows = results["trainers"]

    def get(name, *keys):
        value = rows.get(name, {})
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    timing_meta = results["meta"].get("timing", {})
    if not timing_meta and "flops" in results["meta"]:  # FLOPs only, e.g. counted at the GPU size on ``meta``
        flops_meta = results["meta"]["flops"]
        patch = next((r["flops"]["patch_size"] for r in rows.values() if "flops" in r), None)
        lines = [f"# Training FLOPs: stock nnU-Net and the methods' main trainers (size: {flops_meta.get('size')})", "",
                 f"Produced by `{'`, then `'.join(flops_meta.get('commands', [flops_meta.get('command')]))}`; torch "
                 f"{flops_meta.get('torch')}; device `{flops_meta.get('device')}` (`meta`: shapes only, nothing "
                 f"computed). Common configuration: stock nnU-Net's 3d_fullres plans, patch {patch}. No timing in "
                 f"this run."]
        return "\n".join(lines + targets_section(results)) + "\n"
    lines = [f"# Performance: stock nnU-Net and the methods' main trainers ({timing_meta.get('device_name', '?')}; "
             f"size: {timing_meta.get('size', '?')})", "",
             f"Produced by `{'`, then `'.join(timing_meta.get('commands', [timing_meta.get('command', '?')]))}`; torch "
             f"{timing_meta.get('torch', '?')}. Common configuration: stock nnU-Net's 3d_fullres plans, patch "
             f"{timing_meta.get('patch_size')}, batch {timing_meta.get('batch_size')}, the same batch for every "
             f"trainer; {timing_meta.get('iterations')} timed iterations after {timing_meta.get('warmup')} warm-up "
             f"one(s). x stock: ratio to `{BASELINE}` in the same run.", "",
             "| trainer | parameters (M) | forward GFLOPs (patch, batch 1) | s / iteration eager | x stock | "
             "s / iteration compiled | x stock | memory measured | memory predicted by the planner | measured / "
             "predicted | inference s (one case) | x stock | AMP check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in rows:
        params, flops = get(name, "flops", "parameters"), get(name, "flops", "forward_flops")
        eager, compiled = get(name, "timing", "eager", "s_per_iteration"), \
            get(name, "timing", "compiled", "s_per_iteration")
        compiled_text = _fmt(compiled) if compiled is not None else (
            "n/a" if get(name, "timing", "compiled", "skipped") else
            ("error" if get(name, "timing", "compiled", "error") else "-"))
        peak = get(name, "timing", "eager", "peak_memory_gb")
        predicted = get(name, "timing", "memory", "predicted_gb")
        if peak is not None:
            measured_text, predicted_text, ratio = f"{peak:.2f} GB peak", f"{predicted:.2f} GB", _ratio(peak, predicted)
        else:  # CPU: bytes saved for backward (bf16 autocast) against the estimate in stock's bytes per element
            saved = get(name, "timing", "memory", "saved_activation_bytes_bf16")
            base_saved = get(BASELINE, "timing", "memory", "saved_activation_bytes_bf16")
            base_estimate = get(BASELINE, "timing", "memory", "estimate_per_sample")
            estimate = get(name, "timing", "memory", "estimate_per_sample")
            expected = estimate * base_saved / base_estimate if None not in (saved, base_saved, base_estimate,
                                                                             estimate) else None
            measured_text = f"{saved / 2 ** 20:.0f} MB saved (CPU, bf16)" if saved else "-"
            predicted_text = f"{expected / 2 ** 20:.0f} MB" if expected else "-"
            ratio = _ratio(saved, expected)
        inference = get(name, "inference", "seconds")
        amp = get(name, "timing", "amp_check")
        amp_text = "-" if not amp else f"error: {amp['error'][:120]}" if amp.get("error") else (
            f"{'ok' if amp['ok'] else 'FAILED'}: {amp['iterations']} it., {'AMP' if amp['amp'] else 'fp32'}"
            f"{', compiled' if amp['compiled'] else ''}, {amp['grad_scaler_skipped_steps']} skipped"
            f"{', stopped: ' + amp['stopped'][:120] if amp.get('stopped') else ''}")
        lines.append(
            f"| `{name}` | {_fmt(params / 1e6 if params else None)} | {_fmt(flops / 1e9 if flops else None)} | "
            f"{_fmt(eager)} | {_fmt(_ratio(eager, get(BASELINE, 'timing', 'eager', 's_per_iteration')))} | "
            f"{compiled_text} | {_fmt(_ratio(compiled, get(BASELINE, 'timing', 'compiled', 's_per_iteration')))} | "
            f"{measured_text} | {predicted_text} | {_fmt(ratio)} | {_fmt(inference)} | "
            f"{_fmt(_ratio(inference, get(BASELINE, 'inference', 'seconds')))} | {amp_text} |")
    own = [(name, get(name, "timing", "own_plans")) for name in rows if get(name, "timing", "own_plans")]
    if own:
        lines += ["", "Each network at its own planner's plans (eager):", "",
                  "| trainer | plans | patch | batch | s / iteration | peak GB | predicted GB | VRAM target GB |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, o in own:
            lines.append(f"| `{name}` | {o['plans']} | {o['patch_size']} | {o['batch_size']} | "
                         f"{_fmt(o['s_per_iteration'])} | {_fmt(o.get('peak_memory_gb'))} | {_fmt(o['predicted_gb'])} | "
                         f"{_fmt(o['gpu_memory_target_gb'])} |")
    notes = ["Training step: `trainer.train_step` (forward, loss, backward, optimiser step; fp16 AMP and grad scaler "
                 "on CUDA, fp32 on the CPU) on one batch of nnU-Net's data loader; compiled: torch.compile through "
                 "nnU-Net's `nnUNet_compile` (nnU-Net never compiles on the CPU). FLOPs: `torch.utils.flop_counter`, "
                 "one forward of the inference network (deep supervision off), 2 per multiply-accumulate, norms and "
                 "element-wise operations not counted."]
    if any(get(name, "timing", "eager", "peak_memory_gb") is not None for name in rows):
        notes.append("Memory: peak GPU memory allocated during the timed steps (weights, gradients, optimiser state "
                     "and activations) against the GB that nnU-Net's reference scaling (560e6 feature-map elements "
                     "per sample fill 8 GB at batch 2) gives the planner's estimate at this patch and batch; for stock "
                     "nnU-Net the estimate is nnU-Net's own. Equal ratios across the rows mean the estimates rank the "
                     "networks' memory as the GPU does.")
    else:
        notes.append("Memory on the CPU (no GPU figure): bytes autograd saves for backward in one training forward "
                     "under bf16 autocast, against the planner's calibrated estimate in stock's measured bytes per "
                     "element. The planners calibrate at the planned patch, which at this size is the benchmark's "
                     "patch, so a ratio near 1 checks the bookkeeping; tests/test_planners.py checks the calibration "
                     "at another patch.")
    if get(BASELINE, "inference", "case_shape"):
        notes.append(f"Inference: one random {get(BASELINE, 'inference', 'case_shape')} case (channels, *spatial) "
                     "with nnU-Net's sliding window (step 0.5, Gaussian, no mirroring, one patch per forward), median "
                     "of 2 runs after a warm-up. AMP check: train steps on batches of the trainer's own data loader; "
                     "'skipped' counts steps whose gradients the grad scaler found non-finite.")
    base_machine = {step: get(BASELINE, step, "measured_on") for step in ("timing", "inference")}
    for name in rows:
        for step, machine_name in base_machine.items():
            other = get(name, step, "measured_on")
            if other and machine_name and other != machine_name:
                notes.append(f"`{name}`'s {step} figures come from another machine start ({other}) than stock's "
                             f"({machine_name}): its ratios compare two machines.")
    for name in rows:
        if get(name, "timing", "mamba_scan"):
            notes.append(f"Mamba2 scan of `{name}`: {'; '.join(get(name, 'timing', 'mamba_scan'))}.")
    lines += [line for note in notes for line in ("", note)]
    return "\n".join(lines + targets_section(results) + profile_section(results)) + "\n"


def _train_flops(results: dict, name: str):
    parts = results["trainers"].get(name, {}).get("flops", {}).get("train_flops_by_part")
    return {part: f["forward"] + f["backward"] for part, f in parts.items()} if parts else None


#: issue 13's speed targets, as ratios to stock nnU-Net in the same run
STEP_TARGET, INFERENCE_TARGET, FLOPS_TARGET, MEMORY_TOLERANCE = 1.5, 2.0, 0.8, 0.2


def targets_section(results: dict) -> list:
    """Training FLOPs against stock (the step-time ratio a network has at stock's FLOP/s), achieved FLOP/s
    against stock's, and issue 13's targets, each met or not with the figure and, where the FLOPs alone
    exceed it, the part that does."""
    rows = results["trainers"]
    base_flops = _train_flops(results, BASELINE)
    if not base_flops:
        return []
    base_total = sum(base_flops.values())

    def timing(name, mode, key="s_per_iteration"):
        return rows.get(name, {}).get("timing", {}).get(mode, {}).get(key)

    lines = ["", "## Against issue 13's targets", "",
             f"Training FLOPs: one sample's training forward (deep supervision, heads) and backward at the common "
             f"patch, counted by part (`benchmarks/step_profile.py`); their ratio to stock's is the step-time ratio a "
             f"network has when it runs at stock's FLOP/s. FLOP/s x stock = (FLOPs x stock) / (time x stock). Targets: "
             f"STD-Net's step <= {STEP_TARGET}x, its inference <= {INFERENCE_TARGET}x, every method's FLOP/s >= "
             f"{FLOPS_TARGET}x, measured memory within +-{MEMORY_TOLERANCE:.0%} of the planner's estimate.", "",
             "| trainer | training GFLOPs / sample | x stock | step x stock eager | compiled | FLOP/s x stock eager | "
             "compiled | inference x stock |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name in rows:
        flops = _train_flops(results, name)
        if not flops:
            continue
        flop_ratio = sum(flops.values()) / base_total
        step = {m: _ratio(timing(name, m), timing(BASELINE, m)) for m in ("eager", "compiled")}
        rate = {m: flop_ratio / step[m] if step[m] else None for m in step}
        inference = _ratio(rows[name].get("inference", {}).get("seconds"),
                           rows.get(BASELINE, {}).get("inference", {}).get("seconds"))
        lines.append(f"| `{name}` | {_fmt(sum(flops.values()) / 1e9)} | {_fmt(flop_ratio)} | {_fmt(step['eager'])} "
                     f"| {_fmt(step['compiled'])} | {_fmt(rate['eager'])} | {_fmt(rate['compiled'])} "
                     f"| {_fmt(inference)} |")
        if name == BASELINE:
            continue
        # the part that adds most FLOPs over stock's part of the same name (or over nothing)
        extra = {part: value - base_flops.get(part, 0) for part, value in flops.items()}
        top = max(extra, key=extra.get)
        why = (f"{top} {flops[top] / 1e9:.4g} GFLOPs vs stock's {base_flops.get(top, 0) / 1e9:.4g}, "
               f"{extra[top] / max(1, sum(extra.values())):.0%} of the extra FLOPs")
        for mode in ("eager", "compiled"):
            if rate[mode] is not None:
                verdicts.append(f"- `{name}` FLOP/s {mode}: {rate[mode]:.2f}x stock, target >= {FLOPS_TARGET}: "
                                f"{'met' if rate[mode] >= FLOPS_TARGET else 'NOT met'}.")
        if name == "nnUNetTrainerSTDNet":
            for mode in ("eager", "compiled"):
                if step[mode] is None:
                    continue
                met = step[mode] <= STEP_TARGET
                reason = "" if met else (
                    f" Out of reach at stock's FLOP/s: its training FLOPs are {flop_ratio:.2f}x stock's ({why})."
                    if flop_ratio > STEP_TARGET else
                    f" Its FLOPs are {flop_ratio:.2f}x stock's: the rest is time per FLOP (see the profile).")
                verdicts.append(f"- `{name}` step {mode}: {step[mode]:.2f}x stock, target <= {STEP_TARGET}: "
                                f"{'met' if met else 'NOT met'}.{reason}")
            if inference is not None:
                verdicts.append(f"- `{name}` inference: {inference:.2f}x stock, target <= {INFERENCE_TARGET}: "
                                f"{'met' if inference <= INFERENCE_TARGET else 'NOT met'}.")
        peak, predicted = timing(name, "eager", "peak_memory_gb"), \
            rows[name].get("timing", {}).get("memory", {}).get("predicted_gb")
        base_peak, base_predicted = timing(BASELINE, "eager", "peak_memory_gb"), \
            rows.get(BASELINE, {}).get("timing", {}).get("memory", {}).get("predicted_gb")
        if peak is not None and predicted:
            # nnU-Net's GB are reference units (560e6 elements fill "8 GB"), not allocated bytes: stock's own ratio
            # shows how far they are from the allocator on this GPU, and the planner estimates the methods in them
            within = abs(peak / predicted - 1) <= MEMORY_TOLERANCE
            text = (f"- `{name}` memory: {peak / predicted:.2f}x the estimate, target within +-{MEMORY_TOLERANCE:.0%}: "
                    f"{'met' if within else 'NOT met'}.")
            if base_peak and base_predicted:
                relative = (peak / predicted) / (base_peak / base_predicted)
                text += (f" Stock's peak is {base_peak / base_predicted:.2f}x nnU-Net's own estimate; against that, "
                         f"{relative:.2f}x: {'met' if abs(relative - 1) <= MEMORY_TOLERANCE else 'NOT met'}.")
            verdicts.append(text)
    lines += ["", "Training GFLOPs per sample by part (x stock's part of the same name):", ""]
    for name in rows:
        flops = _train_flops(results, name)
        if flops:
            lines.append(f"- `{name}`: " + ", ".join(
                f"{part} {value / 1e9:.4g}" + (f" (x{value / base_flops[part]:.2f})" if base_flops.get(part) else "")
                for part, value in sorted(flops.items(), key=lambda kv: -kv[1])))
    return lines + ([""] + verdicts if verdicts else [])


def profile_section(results: dict) -> list:
    """The profiled eager step of every trainer by part, and each method's time over stock's by part."""
    rows = {name: r["profile"] for name, r in results["trainers"].items() if r.get("profile")}
    if not rows:
        return []
    basis = next(iter(rows.values()))["time_basis"]
    lines = ["", "## Where the training step's time goes", "",
             f"One eager `train_step` on the common batch under `torch.profiler`, every operator attributed to the "
             f"network part that ran it, forward and backward ({basis}; `benchmarks/step_profile.py`). GFLOP/s counts "
             f"convolutions, matrix products and attention only: a part whose work is element-wise, a norm or an "
             f"FFT shows a low figure by construction.", "",
             "| trainer | part | forward ms | backward ms | share | GFLOPs | GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for name, profile in rows.items():
        for part, r in profile["parts"].items():
            lines.append(f"| `{name}` | {part} | {_fmt(r['forward_ms'])} | {_fmt(r['backward_ms'])} | "
                         f"{_fmt(r['share'], 2)} | {_fmt(r['forward_gflops'] + r['backward_gflops'])} | "
                         f"{_fmt(r['gflop_per_s'])} |")
        lines.append(f"| `{name}` | **step** | | | | {_fmt(profile['step_gflops'])} | "
                     f"{_fmt(profile['step_gflop_per_s'])} ({_fmt(profile['step_ms'])} ms) |")
    base = rows.get(BASELINE)
    if base:
        lines += ["", "Milliseconds over stock's profiled step, by part (a part stock also has: the difference):", ""]
        for name, profile in rows.items():
            if name == BASELINE:
                continue
            extra = {part: r["total_ms"] - base["parts"].get(part, {}).get("total_ms", 0.0)
                     for part, r in profile["parts"].items()}
            listed = ", ".join(f"{part} {ms:+.3g}" for part, ms in sorted(extra.items(), key=lambda kv: -kv[1]))
            lines.append(f"- `{name}`: {profile['step_ms'] - base['step_ms']:+.3g} ms in all: {listed}")
    return lines


def step_report(args, size: dict) -> None:
    results = merged(args.out)
    (args.out / "performance.json").write_text(json.dumps(results, indent=2))
    (args.out / "performance.md").write_text(report_table(results))
    print(report_table(results))


# ------------------------------------------------------------------ main
STEPS = {"data": step_data, "flops": step_flops, "timing": step_timing, "profile": step_profile,
         "inference": step_inference, "report": step_report}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("steps", nargs="+", choices=[*STEPS, "all"])
    parser.add_argument("--out", type=Path, required=True, help="results folder (parts/, performance.json, .md)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nnunet_liver_performance",
                        help="nnU-Net's folders: raw, preprocessed, results (default: in the temp folder)")
    parser.add_argument("--small", action="store_true", help="the CPU size (a test of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"])
    parser.add_argument("--own-plans", action="store_true", help="also time each network at its own plans")
    parser.add_argument("--amp-iterations", type=int, default=0, help="AMP stability check: train steps per trainer")
    parser.add_argument("--again", action="store_true",
                        help="timing: measure trainers that parts/timing.json already has every asked figure of")
    parser.add_argument("--case-shape", type=int, nargs=3, default=None, help="inference case (spatial shape)")
    parser.add_argument("-np", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="processes for nnU-Net's fingerprint and preprocessing")
    args = parser.parse_args(argv)
    size = SIZES["small" if args.small else "gpu"]
    args.case_shape = tuple(args.case_shape or size["case_shape"])
    steps = ["data", "flops", "timing", "profile", "inference", "report"] if "all" in args.steps else args.steps
    set_folders(args.work)
    args.loader_workers = 0 if args.small else max(1, (os.cpu_count() or 2) - 2)
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    meta = {"command": "python benchmarks/performance.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": args.device, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "size": "small (CPU test size)" if args.small else "gpu", **size,
            "modes": args.modes, "amp_iterations": args.amp_iterations,
            "call": f"{platform.node()}:{os.getpid()}:{time.time():.0f}"}
    for step in steps:
        start = time.perf_counter()
        args.save = lambda results, step=step: save_part(args.out, step, meta, results)
        results = STEPS[step](args, size)
        if step != "report":
            args.save(results)
        print(f"== step {step}: {time.perf_counter() - start:.1f} s", flush=True)


def save_part(out: Path, step: str, meta: dict, results: dict) -> None:
    """``out/parts/<step>.json``, merged with what earlier calls left: per trainer, a later call's entries
    (e.g. ``compiled`` timings) join the earlier ones; the commands of all calls are kept, each once (a step
    saves after every trainer)."""
    path = out / "parts" / f"{step}.json"
    previous = load_json(path) if path.is_file() else {"meta": {}, "results": {}}
    merged_results = copy.deepcopy(previous["results"])
    for name, entry in results.items():
        merged_results.setdefault(name, {}).update(entry)
    commands, calls = previous["meta"].get("commands", []), previous["meta"].get("calls", [])
    if meta.get("call") is None or meta["call"] not in calls:
        commands, calls = commands + [meta["command"]], calls + [meta.get("call")]
    meta = dict(meta, commands=commands, calls=calls)
    if step == "timing":
        configuration = common_plans()["configurations"][CONFIGURATION]
        meta.update(patch_size=configuration["patch_size"], batch_size=configuration["batch_size"])
    path.write_text(json.dumps({"meta": meta, "results": merged_results}, indent=2, default=str))


if __name__ == "__main__":
    main()
