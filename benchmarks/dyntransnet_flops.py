"""Parameters and FLOPs of DynTransNet next to stock nnU-Net's U-Net, built from the same plans.

Configurations:
- ``3d_fullres_128``: nnU-Net's default 3d_fullres plans for an isotropic dataset with a 128^3 patch,
  written out by hand as nnU-Net's ExperimentPlanner produces them (6 stages, 32..320 features,
  3x3x3 kernels, stride 2 per stage, two convolutions per stage, InstanceNorm, LeakyReLU), 3 input
  phases, 3 classes;
- ``cpu_demo_24x64x64``: the CPU-demo plans of the phantom (``nnunet-liver plan --preset cpu-demo``;
  patch 24 x 64 x 64), the configuration of benchmarks/dyntransnet_vs_nnunet_cpu.sh.

FLOPs are PyTorch's ``torch.utils.flop_counter.FlopCounterMode`` of one forward pass at batch 1
(2 FLOPs per multiply-accumulate; convolutions, matrix products and scaled-dot-product attention;
normalisation and element-wise operations are not counted), deep supervision off as in inference.
By default the forward runs on ``meta`` tensors (shapes only, no arithmetic), which gives the counts of
the real CPU forward without its minutes; ``--check`` runs one small configuration both ways and
stops if they differ. Also reported: ``compute_conv_feature_map_size`` (nnU-Net's VRAM proxy).

Writes benchmarks/results/dyntransnet_flops/flops.json and flops.md.

    python benchmarks/dyntransnet_flops.py [--check]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_liver_ext.networks.dyntransnet import DynTransNet
from perf_common import forward_flops  # benchmarks/ (this script's folder) is on sys.path

OUT = Path(__file__).resolve().parent / "results" / "dyntransnet_flops"
IN_CHANNELS, CLASSES = 3, 3


def default_3d_fullres_128() -> dict:
    return dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
                kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, n_conv_per_stage=[2] * 6,
                n_conv_per_stage_decoder=[2] * 5, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def cpu_demo_24x64x64() -> dict:
    return dict(n_stages=5, features_per_stage=[8, 16, 32, 64, 64], conv_op=nn.Conv3d,
                kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1] * 5,
                n_conv_per_stage_decoder=[1] * 4, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


CONFIGS = {"3d_fullres_128": (default_3d_fullres_128, (128, 128, 128)),
           "cpu_demo_24x64x64": (cpu_demo_24x64x64, (24, 64, 64))}
NETWORKS = {
    "nnU-Net PlainConvUNet": lambda kw, patch: PlainConvUNet(IN_CHANNELS, num_classes=CLASSES, deep_supervision=False,
                                                             **kw),
    "DynTransNet": lambda kw, patch: DynTransNet(IN_CHANNELS, CLASSES, False, patch_size=patch, **kw),
    "DynTransNet plainMSA": lambda kw, patch: DynTransNet(IN_CHANNELS, CLASSES, False, patch_size=patch,
                                                          dynamic_bias=False, **kw),
}


def count(build, kwargs: dict, patch, device: str) -> dict:
    with torch.device(device):
        net = build(kwargs, patch)
    total, counts = forward_flops(net, (1, IN_CHANNELS, *patch), device, depth=3)
    # FLOPs per top-level part of the network; a ModuleList (never called itself) as the sum of its members
    by_module = {}
    for name, flops in counts.items():
        parts = name.split(".")
        if len(parts) == 2 or (len(parts) == 3 and ".".join(parts[:2]) not in counts):
            by_module[parts[1]] = by_module.get(parts[1], 0) + flops
    return {"parameters": int(sum(p.numel() for p in net.parameters())),
            "forward_flops": total,
            "flops_by_top_module": by_module,
            "feature_map_elements": int(net.compute_conv_feature_map_size(patch))}


def check(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    kwargs = cpu_demo_24x64x64()
    patch = (8, 32, 32)
    for name, build in NETWORKS.items():
        real, meta = count(build, kwargs, patch, "cpu"), count(build, kwargs, patch, "meta")
        if real["forward_flops"] != meta["forward_flops"] or real["parameters"] != meta["parameters"]:
            raise SystemExit(f"{name}: CPU and meta counts differ: {real} vs {meta}")
        print(f"check {name} at {patch}: CPU and meta forward agree ({real['forward_flops']} FLOPs)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="first compare meta and real CPU counts on a small patch")
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.check:
        check()
    results = {}
    for config, (plans, patch) in CONFIGS.items():
        results[config] = {"patch_size": list(patch), "arch_kwargs": {k: (v.__name__ if isinstance(v, type) else v)
                                                                      for k, v in plans().items()}, "networks": {}}
        for name, build in NETWORKS.items():
            results[config]["networks"][name] = count(build, plans(), patch, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": args.device, "batch": 1, "input_channels": IN_CHANNELS,
            "classes": CLASSES, "deep_supervision": False,
            "dyntransnet_defaults": "window_size 8, max_global_tokens 1024, depth 2, head_dim 32, mlp_ratio 4",
            "command": "python benchmarks/dyntransnet_flops.py" + (" --check" if args.check else "")}
    (args.out / "flops.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = ["# DynTransNet vs nnU-Net U-Net: parameters and forward FLOPs", "",
             f"`{meta['command']}` (torch {meta['torch']}, FlopCounterMode on {args.device} tensors, batch 1, "
             f"{IN_CHANNELS} input channels, {CLASSES} classes, deep supervision off). FLOPs count convolutions, "
             "matrix products and attention (2 per multiply-accumulate), not norms or element-wise ops.", ""]
    for config, result in results.items():
        base = result["networks"]["nnU-Net PlainConvUNet"]
        lines += [f"## {config} (patch {result['patch_size']})", "",
                  "| network | parameters (M) | forward GFLOPs | x U-Net FLOPs | feature-map elements (M) |",
                  "|---|---|---|---|---|"]
        for name, r in result["networks"].items():
            lines.append(f"| {name} | {r['parameters'] / 1e6:.2f} | {r['forward_flops'] / 1e9:.1f} | "
                         f"{r['forward_flops'] / base['forward_flops']:.2f} | {r['feature_map_elements'] / 1e6:.1f} |")
        dtn = result["networks"]["DynTransNet"]["flops_by_top_module"]
        lines += ["", "DynTransNet forward GFLOPs by part: " + ", ".join(
            f"{k} {v / 1e9:.1f}" for k, v in dtn.items()), ""]
    (args.out / "flops.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
