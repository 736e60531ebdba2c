"""Which optimiser trains DynTransNet inside nnU-Net? A short CPU probe on phantom volumes.

The same phantom cases, the same CPU-demo-sized plans (8..64 features, one conv per stage), nnU-Net's
Dice+CE loss, no augmentation, full volumes of 16 x 48 x 48 as the patch, batch 2, one thread:

- ``unet_sgd``: stock nnU-Net ``PlainConvUNet`` with nnU-Net's SGD (lr 1e-2, momentum 0.99, Nesterov,
  weight decay 3e-5, polynomial decay, gradient clipping at 12): the reference;
- ``dtn_sgd``: DynTransNet with exactly that optimiser;
- ``dtn_hybrid``: DynTransNet with nnU-Net's SGD on the convolutional stem and decoder and AdamW
  (lr 1e-3, weight decay 1e-5) on the transformer stages (``training.optim.HybridOptimizer``);
- ``dtn_adamw``: DynTransNet with AdamW for everything as nnU-Net's Primus trainers train their
  transformer (lr 3e-4, weight decay 5e-2, betas (0.9, 0.98), linear warm-up over the first 10 % of
  the steps, polynomial decay, gradient clipping at 1);
- ``dtn_adamw_1e-3``: the same with lr 1e-3.

It reports the mean training loss over the last 10 steps, held-out liver (region {1, 2}) and tumor
Dice (argmax of the logits on 4 unseen cases) and seconds per step, and writes
benchmarks/results/dyntransnet_optimizer_probe/probe.json.

    python benchmarks/dyntransnet_optimizer_probe.py [--steps 80]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_liver_ext.networks.dyntransnet import DynTransNet
from nnunet_liver_ext.phantom import PhantomConfig, generate_cases
from nnunet_liver_ext.training.optim import HybridOptimizer

SHAPE = (16, 48, 48)
OUT = Path(__file__).resolve().parent / "results" / "dyntransnet_optimizer_probe"


def plans_kwargs() -> dict:
    """The CPU-demo plans' 3d_fullres arch_kwargs for the phantom (nnunet-liver plan --preset cpu-demo)."""
    return dict(n_stages=5, features_per_stage=[8, 16, 32, 64, 64], conv_op=nn.Conv3d,
                kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1] * 5,
                n_conv_per_stage_decoder=[1] * 4, conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def load_cases(n: int, seed: int):
    config = PhantomConfig(shape=SHAPE, n_lesions_range=(1, 2), lesion_diameter_range_mm=(10, 24), p_no_lesion=0.0)
    cases = generate_cases(n, config, seed=seed, progress=False)
    images = np.stack([np.stack(c.images) for c in cases]).astype(np.float32)
    # nnU-Net's CT normalisation in spirit: clip, then one global mean / std
    images = np.clip(images, -200, 300)
    images = (images - images.mean()) / images.std()
    labels = np.stack([c.label for c in cases])[:, None].astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(labels)


def dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    inter = (pred & ref).sum().item()
    total = pred.sum().item() + ref.sum().item()
    return 1.0 if total == 0 else 2 * inter / total


def make_optimizer(name: str, net: nn.Module, steps: int):
    """(optimizer, lr at step, clip norm)."""
    sgd = dict(lr=1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    poly = lambda step: (1 - step / steps) ** 0.9  # noqa: E731
    if name.endswith("sgd"):
        return torch.optim.SGD(net.parameters(), **sgd), poly, 12.0
    if name == "dtn_hybrid":
        adaptive = [p for n, p in net.named_parameters() if n.startswith("stages.")]
        rest = [p for n, p in net.named_parameters() if not n.startswith("stages.")]
        return HybridOptimizer([torch.optim.SGD(rest, **sgd),
                                torch.optim.AdamW(adaptive, lr=1e-3, weight_decay=1e-5)]), poly, 12.0
    lr = 1e-3 if name.endswith("1e-3") else 3e-4
    warmup = max(1, steps // 10)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * poly(step)  # noqa: E731
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-2, betas=(0.9, 0.98)), schedule, 1.0


def run(name: str, steps: int, train, test, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    kwargs = plans_kwargs()
    if name.startswith("unet"):
        net = PlainConvUNet(3, num_classes=3, deep_supervision=False, **kwargs)
    else:
        net = DynTransNet(3, 3, False, patch_size=SHAPE, **kwargs)
    optimizer, schedule, clip = make_optimizer(name, net, steps)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    images, labels = train
    rng = np.random.default_rng(seed)
    losses, start = [], time.perf_counter()
    net.train()
    for step in range(steps):
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * schedule(step)
        idx = rng.choice(len(images), 2, replace=False)
        x, y = images[idx], labels[idx]
        if rng.random() < 0.5:  # the only augmentation: a left-right flip
            x, y = x.flip(-1), y.flip(-1)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        losses.append(float(loss.item()))
    seconds = (time.perf_counter() - start) / steps
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(test[0][i:i + 1]).argmax(1) for i in range(len(test[0]))])
    ref = test[1][:, 0].long()
    return {"name": name, "steps": steps, "final_train_loss_mean_last10": float(np.mean(losses[-10:])),
            "first_train_loss": losses[0], "held_out_dice_liver_region": dice(pred > 0, ref > 0),
            "held_out_dice_tumor": dice(pred == 2, ref == 2), "seconds_per_step": seconds,
            "loss_curve_every_10": [float(np.mean(losses[i:i + 10])) for i in range(0, steps, 10)]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--configs", nargs="+",
                        default=["unet_sgd", "dtn_sgd", "dtn_hybrid", "dtn_adamw", "dtn_adamw_1e-3"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = load_cases(8, seed=11), load_cases(4, seed=12)
    results = []
    for name in args.configs:
        result = run(name, args.steps, train, test)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve_every_10"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"shape": SHAPE, "batch": 2, "threads": 1, "train_cases": 8, "test_cases": 4,
            "torch": torch.__version__,
            "command": f"python benchmarks/dyntransnet_optimizer_probe.py --steps {args.steps}"}
    (args.out / "probe.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
