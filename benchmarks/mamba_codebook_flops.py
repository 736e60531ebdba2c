"""Parameters and FLOPs of the Mamba-codebook U-Net (default and ``_paper`` configurations, with stock
nnU-Net's PlainConvUNet on the same plans as reference), and Mamba versus MHSA at the bottleneck
(parameters, latency, memory: the paper's Table 3) ON THE CPU at small sizes.

    python benchmarks/mamba_codebook_flops.py [--out benchmarks/results/mamba_codebook] [--quick]

- Plans: nnU-Net-style 3d_fullres plans written out here (6 stages, 32..320 features, 3x3x3 kernels,
  strides 1,2,2,2,2,2, two convolutions per stage, InstanceNorm, LeakyReLU; 1 input channel, 3
  classes) since the phantom's plans are CPU-sized. The paper's crop (48 slices) is not divisible
  by the 6-stage networks' total stride 32, so only ``_paper`` (4 stages) is counted there. ``_paper`` uses the first 4 stages with
  ``PAPER_STAGE_FEATURES`` of the trainer module.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; a
  multiply-add counts 2) on meta tensors, so nothing is allocated; one forward in eval mode
  without deep supervision. MACs = FLOPs / 2 (many papers, likely this one, report MACs as
  "FLOPs"). Input sizes: a 128^3 patch, and the paper's 48 x 256 x 256 crop.
- Mamba vs MHSA: the GFR module of each kind (Mamba with the network's default chunk size 64, plus a
  sweep of the chunk size at the largest size) (pre-norm residual, the same input and output) at
  the ``_paper`` bottleneck width, in eval mode under ``torch.no_grad``, ``torch.set_num_threads(1)``,
  median of repeated forwards; memory = growth of the peak resident set size of a fresh
  subprocess during the forwards (includes allocator slack; CPU only: no GPU figure is claimed).
  The CPU is shared with other work, so latencies are indicative; the ratio is the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunet_liver_ext.networks.mamba_codebook import GlobalFeatureRepresentation, MambaCodebookUNet  # noqa: E402
from perf_common import forward_flops  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
from nnunet_liver_ext.trainers.nnUNetTrainerMambaCodebook import PAPER_STAGE_FEATURES  # noqa: E402


def plans_3d_fullres(n_stages: int = 6) -> dict:
    features = [32, 64, 128, 256, 320, 320][:n_stages]
    return dict(n_stages=n_stages, features_per_stage=features, conv_op=nn.Conv3d,
                kernel_sizes=[[3, 3, 3]] * n_stages, strides=[[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True,
                norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def build(name: str) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    arch = plans_3d_fullres()
    if name == "nnUNet PlainConvUNet (stock)":
        return PlainConvUNet(1, num_classes=3, deep_supervision=False, **arch)
    if name == "nnUNetTrainerMambaCodebook":
        return MambaCodebookUNet(1, 3, False, dead_code_restart=True, **arch)
    if name == "nnUNetTrainerMambaCodebook_paper":
        return MambaCodebookUNet(1, 3, False, stage_features=PAPER_STAGE_FEATURES, **arch)
    raise KeyError(name)


def count_flops(net: nn.Module, shape) -> int:
    return forward_flops(net.to("meta"), (1, 1, *shape), "meta")[0]


def networks_table(quick: bool) -> list:
    rows = []
    shapes = [(128, 128, 128), (48, 256, 256)] if not quick else [(32, 64, 64)]
    for name in ("nnUNet PlainConvUNet (stock)", "nnUNetTrainerMambaCodebook", "nnUNetTrainerMambaCodebook_paper"):
        net = build(name)
        params = sum(p.numel() for p in net.parameters())
        parts = {}
        if isinstance(net, MambaCodebookUNet):
            for part in ("encoder", "mce", "codebook", "gfr"):
                module = getattr(net, part)
                parts[part] = sum(p.numel() for p in module.parameters()) if module is not None else 0
            parts["decoder (without the encoder it references)"] = params - sum(parts.values())
        row = {"network": name, "params": params, "params_by_part": parts}
        for shape in shapes:
            strides = 2 ** (len(getattr(net, "encoder").strides) - 1)
            if any(d % strides for d in shape):  # the decoder's skips would not match: nnU-Net never plans this
                row[f"GFLOPs@{'x'.join(map(str, shape))}"] = row[f"GMACs@{'x'.join(map(str, shape))}"] = "n/a"
                continue
            flops = count_flops(build(name), shape)
            row[f"GFLOPs@{'x'.join(map(str, shape))}"] = round(flops / 1e9, 2)
            row[f"GMACs@{'x'.join(map(str, shape))}"] = round(flops / 2e9, 2)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ Mamba vs MHSA (one config per process)
def measure_one(kind: str, tokens_shape, batch: int, channels: int, repeats: int, chunk_size: int = 64) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    block = GlobalFeatureRepresentation(channels, kind, "volume", d_state=16, chunk_size=chunk_size).eval()
    x = torch.randn(batch, channels, *tokens_shape)
    params = sum(p.numel() for p in block.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        block(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            block(x)
            times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(x)
    return {"kind": kind, "chunk_size": chunk_size if kind == "mamba" else None, "batch": batch, "channels": channels, "tokens": int(torch.tensor(tokens_shape).prod()),
            "grid": list(tokens_shape), "params": params, "latency_ms_median": round(1e3 * statistics.median(times), 2),
            "latency_ms_per_sample": round(1e3 * statistics.median(times) / batch, 2),
            "repeats": repeats, "peak_rss_growth_MiB": round((after - before) / 1024, 1),
            "MFLOPs": round(counter.get_total_flops() / 1e6, 1)}


def bottleneck_table(quick: bool) -> list:
    channels = PAPER_STAGE_FEATURES[-1]
    # the _paper bottleneck of a 48 x 256 x 256 crop is 6 x 32 x 32 (strides 1, 2, 2, 2); smaller grids too
    grids = [(6, 16, 16), (6, 32, 32)] if not quick else [(4, 8, 8)]
    batches = (1, 4) if not quick else (1,)
    rows = []
    for grid in grids:
        for batch in batches:
            for kind in ("mamba", "mhsa"):
                repeats = 3 if quick or batch * grid[0] * grid[1] * grid[2] > 2048 else 10
                cmd = [sys.executable, __file__, "--one", kind, ",".join(map(str, grid)), str(batch), str(channels),
                       str(repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ,
                                     OMP_NUM_THREADS="1"))
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    # the PyTorch scan's chunk size: speed and memory only (the result does not depend on it)
    for chunk in ((256, 128, 32) if not quick else (16,)):
        grid, batch = grids[-1], batches[-1]
        cmd = [sys.executable, __file__, "--one", "mamba", ",".join(map(str, grid)), str(batch), str(channels), "3",
               str(chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def write(out: Path, networks: list, bottleneck: list, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": "CPU (no GPU figure in this file)", "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": 1, "quick": quick,
            "command": "python benchmarks/mamba_codebook_flops.py" + (" --quick" if quick else "")}
    (out / "mamba_codebook_flops.json").write_text(json.dumps({"meta": meta, "networks": networks,
                                                                "bottleneck_mamba_vs_mhsa_cpu": bottleneck}, indent=2))
    lines = ["# Mamba-codebook U-Net: parameters, FLOPs, Mamba vs MHSA (CPU)", "",
             f"Produced by `{meta['command']}` (torch {meta['torch']}, {meta['cpu_count']} CPU cores, shared machine).",
             "", "## Networks on nnU-Net-style 3d_fullres plans (1 input channel, 3 classes, eval, no deep supervision)",
             ""]
    keys = [k for k in networks[0] if k.startswith(("GFLOPs", "GMACs"))]
    lines += ["| network | params | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in networks:
        lines.append(f"| {r['network']} | {r['params'] / 1e6:.3f} M | " + " | ".join(str(r[k]) for k in keys) + " |")
    for r in networks:
        if r["params_by_part"]:
            lines.append("")
            lines.append(f"{r['network']} parameters by part: " +
                         ", ".join(f"{k} {v:,}" for k, v in r["params_by_part"].items()))
    lines += ["", f"## Mamba vs MHSA at the `_paper` bottleneck (C = {bottleneck[0]['channels']}), CPU, 1 thread, "
              "eval, no_grad", "", "Labelled CPU: the paper's Table 3 is on a GPU; these are not comparable to it in "
              "absolute terms.", "",
              "| block | chunk | grid (tokens) | batch | params | latency ms (median) | ms / sample | peak RSS growth MiB | MFLOPs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in bottleneck:
        lines.append(f"| {r['kind']} | {r['chunk_size'] or ''} | {'x'.join(map(str, r['grid']))} ({r['tokens']}) | {r['batch']} | {r['params']:,} | "
                     f"{r['latency_ms_median']} | {r['latency_ms_per_sample']} | {r['peak_rss_growth_MiB']} | {r['MFLOPs']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mamba_codebook"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a test of the script, not a result)")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # KIND GRID BATCH CHANNELS REPEATS [CHUNK]
    args = parser.parse_args()
    if args.one:
        kind, grid, batch, channels, repeats, *chunk = args.one
        print(json.dumps(measure_one(kind, tuple(int(g) for g in grid.split(",")), int(batch), int(channels),
                                     int(repeats), *(int(c) for c in chunk))))
        return
    torch.set_num_threads(1)
    write(Path(args.out), networks_table(args.quick), bottleneck_table(args.quick), args.quick)


if __name__ == "__main__":
    main()
