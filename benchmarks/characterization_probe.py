"""Can STD-Net's characterization path learn the phantom's lesion classes? (CPU probe)

Isolates the class head from nnU-Net's patch sampling and schedule: phantom CT cases, normalised
per phase as nnU-Net's CTNormalization does (dataset foreground percentiles and z-score), one
patch per sample centred (with jitter) on the case's largest lesion, AdamW for every parameter,
loss = nnU-Net's Dice+CE segmentation loss x ``--seg-weight`` + cross-entropy of the class head.
Prints the training cross-entropy and the held-out accuracy every 25 steps.

``--prior`` decides where the [CLS] path pools: ``network`` (the network's own detached lesion
probability, in training and validation), ``reference`` (what the trainers do: the reference
lesion mask in training, the network's own probability in validation), ``none`` (learned
attention alone, ``lesion_channel=None``) or ``oracle`` (the reference mask in training and
validation: what T can do once it knows where the lesion is).

    python benchmarks/characterization_probe.py --variant transformer --prior reference --steps 600
    python benchmarks/characterization_probe.py --summarize benchmarks/results/characterization_probe/*.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_liver_ext.networks.std_net import STDNet
from nnunet_liver_ext.phantom.config import PhantomConfig
from nnunet_liver_ext.phantom.generator import generate_cases


def small_arch(n_stages: int = 4) -> dict:
    """A CPU-sized PlainConvUNet configuration like nnUNetPlannerCPUDemo's."""
    return {"n_stages": n_stages, "features_per_stage": [min(8 * 2 ** i, 64) for i in range(n_stages)],
            "conv_op": nn.Conv3d, "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * (n_stages - 1),
            "strides": [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n_stages - 2),
            "n_conv_per_stage": [1] * n_stages, "n_conv_per_stage_decoder": [1] * (n_stages - 1),
            "conv_bias": True, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True}}


def ct_normalise(cases):
    """Per phase: clip to the foreground 0.5/99.5 percentiles, z-score with foreground mean/std."""
    n_phases = len(cases[0].aligned_images)
    out = [[None] * n_phases for _ in cases]
    for k in range(n_phases):
        fg = np.concatenate([c.aligned_images[k][c.label > 0][::10] for c in cases]).astype(np.float64)
        lo, hi = np.percentile(fg, [0.5, 99.5])
        mean, std = fg.mean(), fg.std()
        for i, c in enumerate(cases):
            out[i][k] = ((np.clip(c.aligned_images[k], lo, hi) - mean) / max(std, 1e-8)).astype(np.float32)
    return [np.stack(phases) for phases in out]


def lesion_patch(image, case, patch, rng, jitter):
    """A patch (N + 1, Z, Y, X) of ``image`` (N, Z, Y, X) and the case's label map, around the
    case's largest lesion, zero-padded at borders."""
    largest = max(range(len(case.lesions)), key=lambda i: case.lesions[i].n_voxels)
    zyx = np.argwhere(case.lesion_map == largest + 1).mean(0)
    centre = zyx + rng.integers(-jitter, jitter + 1, size=3) * np.array([0.5, 1, 1])
    start = np.round(centre - np.array(patch) / 2).astype(int)
    pad = [(0, 0)] + [(p, p) for p in patch]
    padded = np.pad(np.concatenate([image, case.label[None].astype(np.float32)]), pad)
    s = start + np.array(patch)
    return padded[:, s[0]:s[0] + patch[0], s[1]:s[1] + patch[1], s[2]:s[2] + patch[2]]


def summarize(paths, steps=(100, 200, 300, 400, 500, 600)) -> str:
    """A markdown table of probe outputs: held-out accuracy at some steps, last training CE."""
    lines = ["| variant | prior | " + " | ".join(f"acc @{s}" for s in steps) + " | train CE (last 25) |",
             "|---|---|" + "---|" * (len(steps) + 1)]
    for path in paths:
        result = json.load(open(path))
        by_step = {row["step"]: row for row in result["history"]}
        accs = [f"{by_step[s]['val_acc']:.2f}" if s in by_step else "" for s in steps]
        lines.append(f"| {result['args']['variant']} | {result['args']['prior']} | " + " | ".join(accs)
                     + f" | {result['history'][-1]['train_ce']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print a table of earlier outputs and exit")
    p.add_argument("--variant", default="transformer",
                   help="transformer | mean | convgru | early (STDNet temporal/fusion) ")
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--val", type=int, default=12)
    p.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96))
    p.add_argument("--patch", type=int, nargs=3, default=(16, 48, 48))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--jitter", type=int, default=8)
    p.add_argument("--prior", choices=("network", "reference", "none", "oracle"), default="reference")
    p.add_argument("--seg-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    t0 = time.time()
    config = PhantomConfig(shape=tuple(args.shape), n_lesions_range=(1, 2), lesion_diameter_range_mm=(10, 30),
                           p_no_lesion=0.0)
    cases = generate_cases(args.cases, config, seed=args.seed, progress=False)
    classes = sorted({c.case_class for c in cases})
    images = ct_normalise(cases)
    labels = np.array([classes.index(c.case_class) for c in cases])
    print(f"{len(cases)} cases in {time.time() - t0:.0f} s; classes {classes}, counts {np.bincount(labels).tolist()}")
    train_idx, val_idx = np.arange(args.val, len(cases)), np.arange(args.val)

    kwargs = {"temporal": args.variant} if args.variant != "early" else {"fusion": "early"}
    if args.prior == "none":
        kwargs["lesion_channel"] = None
    net = STDNet(3, 3, False, num_case_classes=len(classes), num_layers=2, num_heads=4, **kwargs, **small_arch())
    seg_loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              dice_class=MemoryEfficientSoftDiceLoss)

    def batch(indices, jitter):
        patches = torch.from_numpy(np.stack([lesion_patch(images[i], cases[i], args.patch, rng, jitter)
                                             for i in indices]))
        return patches[:, :-1], patches[:, -1:], torch.from_numpy(labels[indices])
    optim = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=1e-5)
    rng = np.random.default_rng(args.seed)
    history = []
    losses = []
    for step in range(1, args.steps + 1):
        net.train()
        pick = rng.choice(train_idx, args.batch)
        x, seg_target, y = batch(pick, args.jitter)
        out = net(x, heads=True, lesion_mask=(seg_target == 2).float() if args.prior in ("reference", "oracle")
                  else None)
        loss = nn.functional.cross_entropy(out.cls_logits, y)
        cls_ce = loss.item()
        if args.seg_weight > 0:
            loss = loss + args.seg_weight * seg_loss(out.seg, seg_target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(cls_ce)
        if step % 25 == 0 or step == args.steps:
            net.eval()
            with torch.no_grad():
                vx, vseg, vy = batch(val_idx, 0)
                vlog = net(vx, heads=True, lesion_mask=(vseg == 2).float() if args.prior == "oracle" else None).cls_logits
                vce = nn.functional.cross_entropy(vlog, vy).item()
                acc = float((vlog.argmax(1) == vy).float().mean())
            row = {"step": step, "train_ce": float(np.mean(losses[-25:])), "val_ce": vce, "val_acc": acc,
                   "s": round(time.time() - t0)}
            history.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        json.dump({"args": vars(args), "history": history}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
