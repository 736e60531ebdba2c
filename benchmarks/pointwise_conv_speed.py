"""A 1x1 convolution as nnU-Net's convolution module runs it against ``blocks.pointwise_conv`` (a bmm over the
expanded weight), forward and backward, at the shapes where this package uses the product: PhaseFusion's
score (STD-Net: B x N phase feature maps of the top stage, one output channel) and FM-M's gate (DynTransNet, one
output channel), plus a C -> C/2 convolution for comparison (MdIEF's and FM-M's other 1x1 convolutions stay
convolutions).

Why: on the CPU a convolution with one output channel ran an order of magnitude below the product
(``benchmarks/results/performance_cpu``: STD-Net's phase_fusions 10.7 + 164 ms forward + backward as a
convolution, 6.9 + 30.9 ms as a product). On CUDA cuDNN picks its own algorithm; this script says whether the
product is as fast there too (fp16 autocast, as nnU-Net trains), so the choice can be made per device.

    python benchmarks/pointwise_conv_speed.py --out DIR            # GPU sizes on CUDA (nnU-Net's 3d_fullres top stage)
    python benchmarks/pointwise_conv_speed.py --small --out DIR    # CPU test size

On the GPU machine (../shared/GPU.md, after its step 2, carrying .whl/rest), in the same call as other work:
``source benchmarks/gpu_env.sh && python3 benchmarks/pointwise_conv_speed.py --out $OUT/pointwise_conv``;
the output goes to ``benchmarks/results/pointwise_conv_gpu/``. ``benchmarks/results/pointwise_conv_cpu/`` is
the small CPU run.

Writes ``DIR/pointwise_conv.json`` and ``DIR/pointwise_conv.md``: milliseconds (median of the timed repeats) and
the product's time as a ratio of the convolution's, in the same run, after checking that both give the same
output and gradients.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nnunet_liver_ext.networks.blocks import pointwise_conv  # noqa: E402

#: (name, batch x phases, in channels, out channels, spatial) at nnU-Net's 3d_fullres top stage for a LiTS-size
#: patch (80 x 160 x 160, batch 2, 3 phases: STD-Net's shared encoder sees 6 maps of 32 channels)
GPU_CASES = (("PhaseFusion score", 6, 32, 1, (80, 160, 160)), ("FM-M gate (psi)", 2, 16, 1, (80, 160, 160)),
             ("1x1 C -> C/2", 2, 32, 16, (80, 160, 160)))
SMALL_CASES = tuple((name, b, c, o, (8, 24, 24)) for name, b, c, o, _ in GPU_CASES)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward_backward(fn, x: torch.Tensor, conv: nn.Module, repeats: int, warmup: int, amp: bool) -> dict:
    """Median milliseconds of ``fn(conv, x)`` and of the backward of its sum, over ``repeats`` after ``warmup``."""
    forward, backward = [], []
    for i in range(warmup + repeats):
        x.grad, conv.weight.grad = None, None
        _synchronize(x.device)
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            y = fn(conv, x)
        _synchronize(x.device)
        middle = time.perf_counter()
        y.float().sum().backward()
        _synchronize(x.device)
        end = time.perf_counter()
        if i >= warmup:
            forward.append((middle - start) * 1e3)
            backward.append((end - middle) * 1e3)
    return {"forward_ms": statistics.median(forward), "backward_ms": statistics.median(backward)}


def check_equal(conv: nn.Module, x: torch.Tensor, amp: bool) -> float:
    """Largest difference between the two outputs relative to the output's scale (a wrong product fails here)."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
        ours, theirs = pointwise_conv(conv, x).float(), conv(x).float()
    error = float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12))
    if error > (1e-2 if amp else 1e-4):
        raise AssertionError(f"pointwise_conv differs from the convolution by {error:.2e} (relative)")
    return error


def run(cases, device: torch.device, repeats: int, warmup: int) -> dict:
    amp = device.type == "cuda"
    rows = []
    for name, batch, channels, out_channels, spatial in cases:
        torch.manual_seed(0)
        conv = nn.Conv3d(channels, out_channels, 1).to(device)
        x = torch.randn(batch, channels, *spatial, device=device, requires_grad=True)
        error = check_equal(conv, x, amp)
        as_conv = time_forward_backward(lambda c, t: c(t), x, conv, repeats, warmup, amp)
        as_product = time_forward_backward(pointwise_conv, x, conv, repeats, warmup, amp)
        total_conv = as_conv["forward_ms"] + as_conv["backward_ms"]
        total_product = as_product["forward_ms"] + as_product["backward_ms"]
        rows.append({"case": name, "input": [batch, channels, *spatial], "out_channels": out_channels,
                     "convolution": as_conv, "product": as_product, "relative_error": error,
                     "product_over_convolution": total_product / total_conv})
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "amp": "fp16 autocast" if amp else "fp32", "repeats": repeats,
            "warmup": warmup, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# 1x1 convolution vs blocks.pointwise_conv ({result['device']}, torch {result['torch']}, "
             f"{result['amp']})", "",
             f"Median of {result['repeats']} forward + backward passes after {result['warmup']} warm-up ones; "
             "x conv: the product's forward + backward time over the convolution's, same run.", "",
             "| case | input | out channels | conv fwd ms | conv bwd ms | product fwd ms | product bwd ms | x conv |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {'x'.join(map(str, r['input']))} | {r['out_channels']} | "
                     f"{r['convolution']['forward_ms']:.3g} | {r['convolution']['backward_ms']:.3g} | "
                     f"{r['product']['forward_ms']:.3g} | {r['product']['backward_ms']:.3g} | "
                     f"{r['product_over_convolution']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="the CPU test size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cases = SMALL_CASES if args.small else GPU_CASES
    repeats = args.repeats or (3 if args.small else 20)
    result = run(cases, device, repeats, warmup=1 if args.small else 5)
    result["command"] = "python benchmarks/pointwise_conv_speed.py " + " ".join(argv or sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pointwise_conv.json").write_text(json.dumps(result, indent=2))
    (args.out / "pointwise_conv.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
