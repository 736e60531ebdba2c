"""Measurements the benchmark scripts share: timed nnU-Net train steps, forward FLOPs, sliding-window
inference. Imported by ``benchmarks/performance.py``, ``gpu_stdnet_vs_nnunet.py``, ``mamba_codebook_flops.py``
(scripts run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path``)."""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def count_cpu_flash_attention() -> None:
    """Torch up to 2.11 (the GPU machine's) counts no FLOPs for the CPU flash-attention kernels, which it
    runs for ``scaled_dot_product_attention`` on the CPU: there they get the CUDA flash kernels' formulas
    (the same arguments, led by query, key, value and, backward, the output's gradient), as newer torch
    registers them itself. Called at import."""
    aten = torch.ops.aten
    pairs = ((getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), flop_counter.sdpa_flop),
             (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
              flop_counter.sdpa_backward_flop))
    for op, formula in pairs:
        if op is not None and op not in flop_counter.flop_registry and op.default not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # formula: already shape-wrapped


count_cpu_flash_attention()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_train_steps(trainer, batch: dict, iterations: int, warmup: int) -> dict:
    """Seconds per ``trainer.train_step(batch)`` (forward, loss, backward, optimiser step; nnU-Net's AMP and grad
    scaler on CUDA) over ``iterations`` steps after ``warmup`` untimed ones (torch.compile and cuDNN's autotuning
    happen there), the peak GPU memory of the timed steps, and whether every loss was finite.

    The same batch every step: the figure is the network's and optimiser's cost, not the data loader's.
    ``resident_gb``: what was allocated when the timed steps began (weights, gradients, optimiser state, and
    anything an earlier trainer left behind); ``scaler_skipped_steps``: timed steps whose update the grad scaler
    skipped (its scale fell), which cost less than a real step."""
    device = trainer.device
    scaler = getattr(trainer, "grad_scaler", None)
    trainer.network.train()
    losses = []
    start = time.perf_counter()
    for _ in range(warmup):
        losses.append(float(trainer.train_step(batch)["loss"]))
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    skipped = 0
    start = time.perf_counter()
    for _ in range(iterations):
        # float(loss) syncs every step anyway (nnU-Net's train_step returns it on the CPU), so reading the scale does too
        scale = scaler.get_scale() if scaler is not None else None
        losses.append(float(trainer.train_step(batch)["loss"]))
        skipped += int(scale is not None and scaler.get_scale() < scale)
    synchronize(device)
    result = {"s_per_iteration": (time.perf_counter() - start) / iterations, "warmup_s": warmup_s,
              "iterations": iterations, "warmup": warmup, "scaler_skipped_steps": skipped if scaler else None,
              "losses_finite": bool(torch.isfinite(torch.tensor(losses)).all())}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        result["resident_gb"] = resident / 2 ** 30
    return result


def forward_flops(network: nn.Module, input_shape: Sequence[int], device, depth: Optional[int] = None,
                  **forward_kwargs) -> Tuple[int, Dict[str, int]]:
    """FLOPs of one eval-mode forward of ``network`` on a zero input (``torch.utils.flop_counter``: matrix
    products, convolutions and attention, 2 per multiply-accumulate; norms and element-wise ops are not
    counted) and the counts per module (``depth`` levels). On ``meta`` nothing is computed."""
    network = network.eval()
    counter = FlopCounterMode(display=False, depth=depth)
    with torch.no_grad(), counter:
        network(torch.zeros(*input_shape, device=device), **forward_kwargs)
    return int(counter.get_total_flops()), {name: int(sum(ops.values()))
                                            for name, ops in counter.get_flop_counts().items()}


def sliding_window_seconds(network: nn.Module, plans_manager, configuration_manager, dataset_json: dict,
                           trainer_name: str, case: torch.Tensor, device: torch.device, repeats: int = 2,
                           mirroring: bool = False) -> dict:
    """nnU-Net's sliding-window prediction (``nnUNetPredictor.predict_sliding_window_return_logits``: Gaussian
    weighting, step 0.5, the plans' patch, one patch per forward, fp16 autocast on CUDA) of ``case``
    ``(C, *S)`` with ``network``; the median of ``repeats`` timed runs after one warm-up. Eager: the
    predictor compiles only when nnUNet_compile says so, and callers set it to f."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    network = network.to(device).eval()
    predictor.manual_initialization(network, plans_manager, configuration_manager, [network.state_dict()],
                                    dataset_json, trainer_name, (0, 1, 2) if mirroring else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(case)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"seconds": sorted(times[1:])[len(times[1:]) // 2], "warmup_s": times[0], "repeats": repeats,
            "mirroring": mirroring, "output_shape": list(logits.shape), "peak_memory_gb": peak,
            "finite": bool(torch.isfinite(torch.as_tensor(logits)).all())}
