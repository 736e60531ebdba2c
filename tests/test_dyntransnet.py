"""DynTransNet as a plain torch module: the network contract, the paper's modules (D-MSA, FM-M, RM),
the attention layout that makes 3D patches fit, the ablations; and the trainer's warm-up and clipping."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.dyntransnet import (ConcatFusion, DynamicMSA, DynTransNet, FeatureMix,
                                                   ResidualModule, WeightedSumFusion, attention_with_key_bias,
                                                   cumulative_strides, window_partition, window_reverse)
from test_mti_net_trainer import make_batch, make_trainer, nnunet_folders  # noqa: F401

torch.set_num_threads(1)


def plans_kwargs(dim: int = 3, features=(8, 16, 16, 32)) -> dict:
    """arch_kwargs as nnU-Net's plans give them (imports resolved), CPU-small, with an anisotropic
    first downsampling as nnU-Net plans for thick-slice CT."""
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    n = len(features)
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]][:n] if dim == 3 else [[1, 1]] + [[2, 2]] * (n - 1)
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]][:n] if dim == 3 else [[3, 3]] * n
    return dict(n_stages=n, features_per_stage=list(features), conv_op=conv, kernel_sizes=kernels, strides=strides,
                n_conv_per_stage=[1] * n, n_conv_per_stage_decoder=[1] * (n - 1), conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


SHAPE3D = (8, 32, 32)  # stage grids 8x16x16 (windowed, shifted), 4x8x8 (windowed), 2x4x4 (global)
SHAPE2D = (32, 32)


def make(dim=3, deep_supervision=False, **kwargs) -> DynTransNet:
    torch.manual_seed(0)
    kwargs.setdefault("window_size", 4)
    kwargs.setdefault("max_global_tokens", 64)
    kwargs.setdefault("head_dim", 8)
    return DynTransNet(3, 3, deep_supervision, **kwargs, **plans_kwargs(dim))


def nnunet_deep_supervision_shapes(patch, strides):
    """The target shapes nnU-Net's deep supervision builds: nnUNetTrainer._get_deep_supervision_scales."""
    scales = list(list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0))[:-1]
    return [tuple(int(round(p * s)) for p, s in zip(patch, scale)) for scale in scales]


@pytest.mark.parametrize("dim,shape", [(3, SHAPE3D), (2, SHAPE2D)])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_contract_2d_3d_deep_supervision(dim, shape, deep_supervision):
    net = make(dim, deep_supervision)
    x = torch.randn(2, 3, *shape)
    out = net(x)
    if deep_supervision:
        expected = nnunet_deep_supervision_shapes(shape, plans_kwargs(dim)["strides"])
        assert isinstance(out, list) and [tuple(o.shape[2:]) for o in out] == expected
        assert all(o.shape[:2] == (2, 3) for o in out)
    else:
        assert out.shape == (2, 3, *shape)
    wrapped = net(x, heads=True, lesion_mask=torch.ones(2, 1, *shape))
    assert isinstance(wrapped, NetworkOutput)
    assert wrapped.cls_logits is None and wrapped.curve is None and wrapped.aux_losses == {}
    seg = wrapped.seg if deep_supervision else [wrapped.seg]
    for a, b in zip(seg, out if deep_supervision else [out]):
        torch.testing.assert_close(a, b)  # lesion_mask is ignored, heads=True changes nothing


def test_case_classes_build_nothing():
    without, with_classes = make(num_case_classes=0), make(num_case_classes=4)
    assert [n for n, _ in without.named_parameters()] == [n for n, _ in with_classes.named_parameters()]


def test_deep_supervision_outputs_follow_nnunets_scales_for_the_cpu_demo_plans():
    """The phantom's CPU-demo plans (nnunet-liver plan --preset cpu-demo): 5 stages, patch 24x64x64."""
    kwargs = dict(plans_kwargs(features=(8, 16, 32, 64)), n_stages=5, features_per_stage=[8, 16, 32, 64, 64],
                  strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                  kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                  n_conv_per_stage=[1] * 5, n_conv_per_stage_decoder=[1] * 4)
    net = DynTransNet(3, 3, True, patch_size=(24, 64, 64), window_size=8, **kwargs)
    layouts = [stage.attention_layout(g) for stage, g in zip(net.stages, [(24, 32, 32), (24, 16, 16), (12, 8, 8),
                                                                          (6, 4, 4)])]
    assert layouts[0] == [((8, 8, 8), (0, 0, 0)), ((8, 8, 8), (4, 4, 4))]  # windows, then shifted windows
    assert layouts[2][0][0] is None and layouts[3][0][0] is None  # 768 and 96 tokens: global
    expected = nnunet_deep_supervision_shapes((24, 64, 64), kwargs["strides"])
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 24, 64, 64))
    assert [tuple(o.shape[2:]) for o in out] == expected == [(24, 64, 64), (24, 32, 32), (24, 16, 16), (12, 8, 8)]


def explicit_attention(q, k, v, bias):
    """The paper's formula written out: softmax(Q K^T / sqrt(d) + Delta) V, Delta (..., N) per key."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias.unsqueeze(-2)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("mode", ["qk", "mask"])
def test_attention_with_key_bias_is_the_papers_formula(mode):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 10, 8, dtype=torch.float64).unbind(0)
    bias = torch.relu(torch.randn(2, 4, 10, dtype=torch.float64)) * 3
    torch.testing.assert_close(attention_with_key_bias(q, k, v, bias, mode), explicit_attention(q, k, v, bias))
    bias[..., 3] = -1e4  # a masked key gets no weight
    torch.testing.assert_close(attention_with_key_bias(q, k, v, bias, mode), explicit_attention(q, k, v, bias))
    without_key = explicit_attention(q[..., :, :], k[..., [0, 1, 2, 4, 5, 6, 7, 8, 9], :],
                                     v[..., [0, 1, 2, 4, 5, 6, 7, 8, 9], :], bias[..., [0, 1, 2, 4, 5, 6, 7, 8, 9]])
    torch.testing.assert_close(attention_with_key_bias(q, k, v, bias, mode), without_key)


def reference_window_attention(msa: DynamicMSA, x, window, shift):
    """D-MSA inside each (shifted) window by brute force over a 2d grid: each window of the grid padded
    by ``shift`` in front holds the real tokens it covers, and they attend only to each other."""
    b, gh, gw, c = x.shape
    h, d = msa.num_heads, c // msa.num_heads
    q, k, v = msa.qkv(x).reshape(b, gh, gw, 3, h, d).permute(3, 0, 4, 1, 2, 5)  # (B, h, gh, gw, d)
    bias = msa.dynamic_bias(x).permute(0, 3, 1, 2)  # (B, h, gh, gw)
    out = torch.zeros(b, h, gh, gw, d, dtype=x.dtype)
    for i0 in range(-shift[0], gh, window[0]):
        for j0 in range(-shift[1], gw, window[1]):
            rows = slice(max(i0, 0), min(i0 + window[0], gh))
            cols = slice(max(j0, 0), min(j0 + window[1], gw))
            qq, kk, vv = (t[:, :, rows, cols].flatten(2, 3) for t in (q, k, v))
            out[:, :, rows, cols] = explicit_attention(qq, kk, vv, bias[:, :, rows, cols].flatten(2)).unflatten(
                2, (rows.stop - rows.start, cols.stop - cols.start))
    return msa.proj(out.permute(0, 2, 3, 1, 4).reshape(b, gh, gw, c))


@pytest.mark.parametrize("mode", ["qk", "mask"])
@pytest.mark.parametrize("grid,window,shift", [((8, 8), (4, 4), (0, 0)), ((8, 8), (4, 4), (2, 2)),
                                               ((7, 6), (4, 4), (0, 0)), ((7, 6), (4, 4), (2, 2)),
                                               ((6, 5), (3, 5), (1, 0))])
def test_windowed_and_shifted_dmsa_equals_brute_force(grid, window, shift, mode):
    torch.manual_seed(0)
    msa = DynamicMSA(8, 2, bias_mode=mode).double()
    nn.init.normal_(msa.delta.weight, std=1.0)  # a bias large enough to matter
    x = torch.randn(2, *grid, 8, dtype=torch.float64)
    torch.testing.assert_close(msa(x, window, shift), reference_window_attention(msa, x, window, shift))


def test_global_dmsa_equals_brute_force():
    torch.manual_seed(0)
    msa = DynamicMSA(8, 2).double()
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(msa(x), reference_window_attention(msa, x, (3, 4), (0, 0)))


def test_window_partition_roundtrip():
    x = torch.randn(2, 4, 6, 8, 5)
    windows = window_partition(x, (2, 3, 4))
    assert windows.shape == (2 * 2 * 2 * 2, 24, 5)
    torch.testing.assert_close(windows[0], x[0, :2, :3, :4].reshape(24, 5))
    torch.testing.assert_close(window_reverse(windows, (2, 3, 4), (4, 6, 8), 2), x)


def test_dynamic_bias_depends_on_the_input_and_reaches_the_output():
    torch.manual_seed(0)
    msa = DynamicMSA(8, 2)
    nn.init.normal_(msa.delta.weight, std=1.0)
    x1, x2 = torch.randn(2, 1, 6, 6, 8).unbind(0)
    delta1, delta2 = msa.dynamic_bias(x1), msa.dynamic_bias(x2)
    assert delta1.shape == (1, 6, 6, 2) and (delta1 >= 0).all()
    assert not torch.allclose(delta1, delta2)
    # the bias changes the attention: zeroing W_d changes the output
    with torch.no_grad():
        before = msa(x1, (3, 3), (0, 0))
        msa.delta.weight.zero_()
        msa.delta.bias.fill_(-1.0)  # ReLU(-1) = 0: Delta = 0 everywhere
        plain = msa(x1, (3, 3), (0, 0))
    assert not torch.allclose(before, plain, atol=1e-5)
    reference = DynamicMSA(8, 2, dynamic_bias=False)
    reference.load_state_dict({k: v for k, v in msa.state_dict().items() if not k.startswith("delta.")})
    with torch.no_grad():
        torch.testing.assert_close(plain, reference(x1, (3, 3), (0, 0)))  # Delta = 0 is plain MSA


def test_bias_modes_give_the_same_network_output():
    torch.manual_seed(0)
    qk, mask = make(attention_bias_mode="qk"), make(attention_bias_mode="mask")
    mask.load_state_dict(qk.state_dict())
    x = torch.randn(1, 3, *SHAPE3D)
    with torch.no_grad():
        torch.testing.assert_close(qk(x), mask(x), rtol=1e-4, atol=1e-4)


def test_feature_mix_gate_lies_in_0_1_and_gradients_reach_both_inputs():
    torch.manual_seed(0)
    fmm = FeatureMix(nn.Conv3d, 6, 4, 5)
    decoder = torch.randn(2, 6, 3, 4, 4, requires_grad=True)
    encoder = torch.randn(2, 4, 3, 4, 4, requires_grad=True)
    fused, psi = fmm(decoder, encoder, return_gate=True)
    assert fused.shape == (2, 5, 3, 4, 4) and psi.shape == (2, 1, 3, 4, 4)
    assert (psi >= 0).all() and (psi <= 1).all() and psi.std() > 0
    fused.square().sum().backward()
    assert decoder.grad.abs().sum() > 0 and encoder.grad.abs().sum() > 0
    # the gate itself learns from both paths: its parameters get gradients too
    for name, p in fmm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # psi multiplies the encoder features: a closed gate leaves the decoder features alone in the concat
    with torch.no_grad():
        fmm.w_psi.bias.fill_(-1e4)
        closed, psi = fmm(decoder, encoder, return_gate=True)
        assert psi.max() < 1e-6
        torch.testing.assert_close(closed, fmm.w_f(torch.cat((decoder, torch.zeros_like(encoder)), 1)))


def test_residual_module_has_an_identity_path():
    torch.manual_seed(0)
    kwargs = plans_kwargs()
    rm = ResidualModule(nn.Conv3d, 4, [3, 3, 3], True, kwargs["norm_op"], kwargs["norm_op_kwargs"], None, None,
                        kwargs["nonlin"], kwargs["nonlin_kwargs"])
    x = torch.randn(2, 4, 4, 6, 6)
    out = rm(x)
    assert out.shape == x.shape and not torch.allclose(out, x)
    torch.testing.assert_close(out - x, rm.convs(x))
    with torch.no_grad():  # the last block's output is zero -> RM is the identity
        rm.convs.convs[1].norm.weight.zero_()
        rm.convs.convs[1].norm.bias.zero_()
    torch.testing.assert_close(rm(x), x)
    assert len([m for m in rm.modules() if isinstance(m, nn.Conv3d)]) == 2


@pytest.mark.parametrize("variant,check", [
    ({"dynamic_bias": False}, lambda net: all(m.delta is None for m in net.modules() if isinstance(m, DynamicMSA))),
    ({"fusion": "concat"}, lambda net: all(isinstance(f, ConcatFusion) for f in net.decoder.fusions)),
    ({"fusion": "sum"}, lambda net: all(isinstance(f, WeightedSumFusion) for f in net.decoder.fusions)),
    ({"residual_module": False}, lambda net: net.decoder.refinements is None),
])
def test_each_ablation_changes_only_its_module(variant, check):
    full, ablated = make(), make(**variant)
    assert check(ablated) and not check(full)
    changed = {n for n, _ in full.named_parameters()} ^ {n for n, _ in ablated.named_parameters()}
    prefixes = {"dynamic_bias": "stages.", "fusion": "decoder.fusions.", "residual_module": "decoder.refinements."}
    prefix = prefixes[next(iter(variant))]
    assert changed and all(n.startswith(prefix) for n in changed)
    assert any(isinstance(m, FeatureMix) for m in full.modules())
    assert any(isinstance(m, ResidualModule) for m in full.modules())
    assert sum(isinstance(m, DynamicMSA) and m.delta is not None for m in full.modules()) == 2 * len(full.stages)
    with torch.no_grad():
        assert ablated(torch.randn(1, 3, *SHAPE3D)).shape == (1, 3, *SHAPE3D)


def test_trainers_build_the_ablations():
    from nnunet_liver_ext.trainers import nnUNetTrainerDynTransNet as module

    expected = {"nnUNetTrainerDynTransNet": {}, "nnUNetTrainerDynTransNet_paper": {},
                "nnUNetTrainerDynTransNet_plainMSA": {"dynamic_bias": False},
                "nnUNetTrainerDynTransNet_concatFusion": {"fusion": "concat"},
                "nnUNetTrainerDynTransNet_sumFusion": {"fusion": "sum"},
                "nnUNetTrainerDynTransNet_noRM": {"residual_module": False}}
    for name, kwargs in expected.items():
        cls = getattr(module, name)
        assert cls.network_kwargs == kwargs and cls.network_class is DynTransNet
        assert cls.__doc__.strip().splitlines()[0]
        assert cls.dataset_keys_used == ("phases",) and not cls.dataset_keys_required
        for schedule in ("tiny", "demo", "short", "5epochs", "10epochs"):
            assert getattr(module, f"{name}_{schedule}").schedule_base is cls


@pytest.mark.parametrize("patch,works", [((6, 32, 32), [8, 32, 32]), ((8, 30, 32), [8, 32, 32]),
                                         ((8, 32, 36), [8, 32, 40])])
def test_bad_patch_size_is_rejected_naming_one_that_works(patch, works):
    factor = cumulative_strides(plans_kwargs()["strides"])[-1]
    assert factor == (4, 8, 8)
    with pytest.raises(ValueError, match=r"cannot tokenise a patch of .*a patch size of " + str(works).replace(
            "[", r"\[").replace("]", r"\]") + " would work"):
        make(patch_size=patch)
    net = make(patch_size=works)
    with torch.no_grad():
        assert net(torch.zeros(1, 3, *works)).shape == (1, 3, *works)
    with pytest.raises(ValueError, match="cannot tokenise"):
        net(torch.zeros(1, 3, *patch))


@pytest.mark.parametrize("kwargs,message", [
    ({"fusion": "add"}, "fusion must be one of"), ({"depth": 0}, "depth >= 1"),
    ({"window_size": (4, 4)}, "window_size must be"), ({"attention_bias_mode": "x"}, "bias_mode must be"),
    ({"n_stages": 1}, "n_stages >= 2"), ({"unknown_arg": 1}, "unknown arguments"),
    ({"num_case_classes": -1}, "num_case_classes")])
def test_bad_arguments_are_rejected_at_construction(kwargs, message):
    base = plans_kwargs()
    if "n_stages" in kwargs:
        base.update(n_stages=1, features_per_stage=[8], strides=[[1, 1, 1]], kernel_sizes=[[3, 3, 3]])
        kwargs = {}
    with pytest.raises(ValueError, match=message):
        DynTransNet(3, 3, False, **{**base, **kwargs})


def test_feature_map_size_counts_tokens_and_windows():
    net = make()
    small = net.compute_conv_feature_map_size(SHAPE3D)
    large = net.compute_conv_feature_map_size((8, 32, 64))
    assert small > net.stem.compute_conv_feature_map_size(SHAPE3D) > 0
    assert 1.7 < large / small < 2.3
    # a shifted block's padding adds window tokens: a larger window pads more
    assert make(window_size=8).compute_conv_feature_map_size(SHAPE3D) != small
    with pytest.raises(ValueError, match="cannot tokenise"):
        net.compute_conv_feature_map_size((8, 30, 32))


@pytest.mark.parametrize("num_case_classes", [0, 4])
@pytest.mark.parametrize("variant", [{}, {"dynamic_bias": False}, {"fusion": "concat"}, {"fusion": "sum"},
                                     {"residual_module": False}],
                         ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) or "full")
def test_ddp_every_parameter_gets_a_gradient(variant, num_case_classes, tmp_path):
    """nnU-Net wraps the network in DDP without find_unused_parameters: a parameter the step never
    reaches fails the second step. A one-process gloo group is enough to see it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    net = make(deep_supervision=True, num_case_classes=num_case_classes, **variant)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'ddp_rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(net)
        x = torch.randn(1, 3, *SHAPE3D)
        lesion = (torch.rand(1, 1, *SHAPE3D) > 0.9).float()
        for _ in range(2):
            out = ddp(x, heads=True, lesion_mask=lesion)
            sum(s.float().square().mean() for s in out.seg).backward()
        without_grad = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert without_grad == []
    finally:
        dist.destroy_process_group()


def test_trainer_warms_up_linearly_from_the_first_step(nnunet_folders):  # noqa: F811
    """The warm-up's first step trains at lr / warm-up steps (not at 0, a wasted step), rising by as much per
    step to the scheduler's rate; without it AdamW's first steps at 1e-3 move the transformer too far."""
    trainer = make_trainer("nnUNetTrainerDynTransNet")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 1, 200  # 5 %: a 10-step warm-up
    assert trainer.warmup_iterations() == 10
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.on_train_epoch_start()  # the scheduler's rate for epoch 0: 1e-3
    batch = make_batch(trainer)
    lrs = []
    for _ in range(3):
        trainer.train_step(batch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-4, 2e-4, 3e-4])


def test_trainer_logs_the_rate_its_warm_up_epochs_train_with(nnunet_folders):  # noqa: F811
    """nnU-Net logs and plots the rate set at the epoch's start: during the warm-up that is the epoch's first
    step's, not the polynomial rate the warm-up scales (which no step of a warm-up epoch trained with)."""
    trainer = make_trainer("nnUNetTrainerDynTransNet")
    trainer.num_epochs, trainer.num_iterations_per_epoch = 4, 10  # a 2-step warm-up
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    printed = []
    trainer.print_to_log_file = lambda *args, **kwargs: printed.append(" ".join(map(str, args)))
    trainer.on_train_epoch_start()
    trainer.train_step(make_batch(trainer))
    assert trainer.logger.get_value("lrs", step=None) == pytest.approx([0.5e-3])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert "Warm-up: the learning rate rises linearly from 0.0005 to 0.001 over this epoch" in printed
    trainer.current_epoch = 1
    printed.clear()
    trainer.on_train_epoch_start()  # past the warm-up: the polynomial rate, and no warm-up line
    assert trainer.logger.get_value("lrs", step=1) == pytest.approx(1e-3 * 0.75 ** 0.9)
    assert not any(line.startswith("Warm-up") for line in printed)


def test_trainer_clips_gradients_at_its_own_norm_on_the_cpu_path(nnunet_folders, monkeypatch):  # noqa: F811
    """The transformer trains with clipping at 1 (Primus'), not nnU-Net's 12, also without a grad scaler."""
    trainer = make_trainer("nnUNetTrainerDynTransNet")
    assert trainer.grad_scaler is None
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer.train_step(make_batch(trainer))
    assert norms == [1.0]


def test_compiles_without_graph_breaks():
    net = make(deep_supervision=True)
    x = torch.randn(1, 3, *SHAPE3D)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for a, b in zip(compiled(x), net(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
