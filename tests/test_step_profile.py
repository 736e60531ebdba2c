"""benchmarks/step_profile.py: a training step's time and FLOPs by part of the network (issue 13, item 3).

The attribution is checked where the answer is known: a two-part network whose FLOPs per part and pass
follow from its shapes, and the real trainers, whose FLOPs by part must add up to what
``torch.utils.flop_counter`` counts for the whole step (nothing lost, nothing counted twice).
"""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from test_mti_net_trainer import make_batch, make_trainer, nnunet_folders  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_profile  # noqa: E402

torch.set_num_threads(1)
BATCH, WIDTH, WIDE = 32, 64, 2048


class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Linear(WIDTH, WIDTH)
        self.large = nn.Sequential(nn.Linear(WIDTH, WIDE), nn.ReLU(), nn.Linear(WIDE, WIDE))

    def forward(self, x):
        return self.large(torch.relu(self.small(x)))  # the relu between the parts is glue: "other"


class TwoPartTrainer:
    """The two things of a trainer the profile uses: ``network``, ``train_step`` (and ``device``)."""

    def __init__(self):
        torch.manual_seed(0)
        self.network = TwoParts()
        self.device = torch.device("cpu")
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=0.01)

    def train_step(self, batch):
        self.optimizer.zero_grad()
        loss = self.network(batch["data"]).square().mean()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}


def test_flops_by_part_follow_from_the_shapes():
    trainer = TwoPartTrainer()
    flops = step_profile.part_flops(trainer, {"data": torch.randn(BATCH, WIDTH)},
                                    step_profile.network_parts(trainer.network))
    mac_small, mac_large = BATCH * WIDTH * WIDTH, BATCH * (WIDTH * WIDE + WIDE * WIDE)
    # the input needs no gradient: the first layer's backward is its weight gradient only
    assert flops["small"] == {"forward": 2 * mac_small, "backward": 2 * mac_small}
    assert flops["large"] == {"forward": 2 * mac_large, "backward": 4 * mac_large}
    assert "other" not in flops  # the glue has no matrix products


def test_time_goes_to_the_part_that_spends_it():
    trainer = TwoPartTrainer()
    result = step_profile.profile_train_step(trainer, {"data": torch.randn(BATCH, WIDTH)})
    parts = result["parts"]
    assert set(parts) >= {"small", "large", "optimizer"}
    # the large part has ~1000x the small one's FLOPs; on any machine it takes most of the step
    assert parts["large"]["total_ms"] > 5 * parts["small"]["total_ms"]
    assert parts["large"]["backward_ms"] > 0 and parts["large"]["forward_ms"] > 0
    assert parts["large"]["share"] > 0.5
    assert result["step_ms"] == pytest.approx(sum(p["total_ms"] for p in parts.values()))


@pytest.mark.parametrize("name", ["nnUNetTrainer", "nnUNetTrainerSTDNet", "nnUNetTrainerMTINet",
                                  "nnUNetTrainerMambaCodebook"])
def test_trainer_flops_by_part_add_up_to_the_flop_counter(nnunet_folders, name):  # noqa: F811
    trainer = make_trainer(name)
    batch = make_batch(trainer)
    parts = step_profile.step_parts(trainer)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    flops = step_profile.part_flops(trainer, batch, parts)
    assert sum(f["forward"] + f["backward"] for f in flops.values()) == counter.get_total_flops()
    assert {"encoder", "decoder"} <= set(flops)
    # the glue between parts holds no convolution or matrix product of note
    other = flops.get("other", {"forward": 0, "backward": 0})
    assert other["forward"] + other["backward"] < 0.01 * counter.get_total_flops()
    for part in ("encoder", "decoder"):  # both passes of the convolutional parts are found
        assert flops[part]["forward"] > 0 and flops[part]["backward"] > flops[part]["forward"]


def test_stdnet_profile_attributes_its_parts(nnunet_folders):  # noqa: F811
    trainer = make_trainer("nnUNetTrainerSTDNet")
    result = step_profile.profile_train_step(trainer, make_batch(trainer))
    parts = result["parts"]
    assert {"encoder", "temporal", "phase_fusions", "decoder", "cls_head", "loss", "optimizer"} <= set(parts)
    for part in ("encoder", "temporal", "phase_fusions", "decoder"):
        assert parts[part]["forward_ms"] > 0 and parts[part]["backward_ms"] > 0, part
    # what no part claims stays small: the attribution of backward operators found their parts
    assert parts.get("other", {"total_ms": 0})["total_ms"] < 0.2 * result["step_ms"]


def test_network_flops_on_meta_need_no_computation():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    arch = dict(n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2] * 3, n_conv_per_stage_decoder=[2] * 2,
                conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    shape = (1, 3, 16, 32, 32)
    torch.manual_seed(0)
    real = step_profile.network_part_flops(PlainConvUNet(3, num_classes=3, deep_supervision=True, **arch),
                                           shape, "cpu", heads=False)
    with torch.device("meta"):
        net = PlainConvUNet(3, num_classes=3, deep_supervision=True, **arch)
    assert step_profile.network_part_flops(net, shape, "meta", heads=False) == real


@pytest.mark.parametrize("name", ["nnUNetTrainerSTDNet", "nnUNetTrainerDynTransNet", "nnUNetTrainerMambaCodebook",
                                  "nnUNetTrainerMTINet"])
def test_every_method_counts_the_same_flops_on_meta(nnunet_folders, name):  # noqa: F811
    """The GPU-size count runs on ``meta``: every network's training forward and backward must run there (MTI-Net's
    autocast region did not) and count what the CPU counts. One known difference: ``meta`` has no fused
    attention kernel, so ``scaled_dot_product_attention`` runs its math path there, whose backward counts 2x the
    forward's matrix products; the fused kernels (CPU flash, CUDA flash / efficient) recompute the attention
    matrix and count 2.5x. DynTransNet's windowed attention shows it."""
    import copy

    trainer = make_trainer(name)
    shape = tuple(make_batch(trainer)["data"].shape)
    on_cpu = step_profile.network_part_flops(copy.deepcopy(trainer.network), shape, "cpu", heads=True)
    on_meta = step_profile.network_part_flops(copy.deepcopy(trainer.network).to("meta"), shape, "meta", heads=True)
    assert set(on_meta) == set(on_cpu)
    for part, flops in on_cpu.items():
        assert on_meta[part]["forward"] == flops["forward"], part
        assert 0.8 * flops["backward"] <= on_meta[part]["backward"] <= flops["backward"], (part, on_meta[part], flops)
    if name != "nnUNetTrainerDynTransNet":  # no fused attention: the same count
        assert on_meta == on_cpu
    assert sum(f["forward"] + f["backward"] for f in on_cpu.values()) > 0
