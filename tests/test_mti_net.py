"""MTI-Net as a plain torch module: the network contract, MdIEF, TIM's curve and the discriminator."""
import pytest
import torch
from torch import nn

from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.mti_net import (HighPassFilter, MdIEF, MTINet, TaskDrivenDiscriminator,
                                               masked_phase_means)
from test_std_net import plans_kwargs

torch.set_num_threads(1)
SHAPE3D = (16, 32, 32)


def make(num_phases=4, dim=3, deep_supervision=True, num_case_classes=2, **kwargs) -> MTINet:
    torch.manual_seed(0)
    kwargs.setdefault("embed_dim", 32)
    kwargs.setdefault("disc_embed_dim", 16)
    return MTINet(num_phases, 3, deep_supervision, num_case_classes=num_case_classes, **kwargs, **plans_kwargs(dim))


# ---------------------------------------------------------------------------------------- MdIEF
@pytest.mark.parametrize("dims,shape", [(2, (2, 3, 12, 10)), (3, (2, 3, 6, 8, 7))])
def test_high_pass_removes_the_dc_component_and_keeps_high_frequencies(dims, shape):
    hpf = HighPassFilter(dims, cutoff=0.1)
    x = torch.randn(*shape) + 5.0
    out = hpf(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    # the DC component (the spatial mean) is gone
    torch.testing.assert_close(out.flatten(2).mean(-1), torch.zeros(shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(hpf(torch.full(shape, 3.0)), torch.zeros(shape), atol=1e-5, rtol=0)
    # a Nyquist checkerboard along the last axis passes almost unchanged (H = 1 - exp(-0.25 / 0.02))
    checker = (torch.arange(shape[-1]) % 2 * 2 - 1.0).expand(*shape).contiguous()
    if shape[-1] % 2 == 0:
        torch.testing.assert_close(hpf(checker), checker, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dims,shape", [(2, (2, 3, 12, 9)), (3, (1, 2, 6, 8, 7)), (3, (1, 2, 5, 6, 8))])
def test_high_pass_backward_is_the_same_filter_and_matches_autograd(dims, shape):
    """The filter is self-adjoint (H real): its custom backward equals autograd's backward of the plain
    rfftn/irfftn formula (odd and even sizes: the Nyquist bins), and passes gradcheck."""
    from nnunet_liver_ext.networks.mti_net import SymmetricFourierFilter, fourier_filter

    hpf = HighPassFilter(dims, cutoff=0.15)
    axes = tuple(range(-dims, 0))
    transfer = hpf.transfer_function(shape[-dims:], "cpu").double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*shape, dtype=torch.float64)
    ours = torch.autograd.grad((SymmetricFourierFilter.apply(x, transfer, axes) * weight).sum(), x)[0]
    plain = torch.autograd.grad((fourier_filter(x, transfer, axes) * weight).sum(), x)[0]
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: SymmetricFourierFilter.apply(t, transfer, axes), (x,))
    # a complex transfer function (a one-voxel shift along the first axis) has another adjoint, the opposite
    # shift: the comparison above can fail
    frequencies = torch.fft.fftfreq(shape[-dims], dtype=torch.float64).view(-1, *[1] * (dims - 1))
    shift = transfer * torch.exp(-2j * torch.pi * frequencies)
    ours = torch.autograd.grad((SymmetricFourierFilter.apply(x, shift, axes) * weight).sum(), x)[0]
    plain = torch.autograd.grad((fourier_filter(x, shift, axes) * weight).sum(), x)[0]
    assert not torch.allclose(ours, plain, atol=1e-6)


def test_high_pass_runs_in_fp32_and_returns_the_input_dtype():
    x = torch.randn(1, 2, 8, 8).to(torch.bfloat16)
    assert HighPassFilter(2)(x).dtype == torch.bfloat16


@pytest.mark.parametrize("dim", [2, 3])
def test_domain_weights_are_a_softmax_over_the_two_domains(dim):
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    fusion = MdIEF(conv, 8, plans_kwargs(dim))
    x = torch.randn(3, 8, *([6] * dim))
    x_spe = fusion.spectral_features(x)
    gamma = fusion.domain_weights(x, x_spe)
    assert gamma.shape == (3, 2, 8) and (gamma > 0).all()
    torch.testing.assert_close(gamma.sum(1), torch.ones(3, 8))
    # eq. 1 by hand: exp(P_spa) / (exp(P_spa) + exp(P_spe)) with P = GAP
    p_spa, p_spe = x.flatten(2).mean(-1), x_spe.flatten(2).mean(-1)
    torch.testing.assert_close(gamma[:, 0], torch.exp(p_spa) / (torch.exp(p_spa) + torch.exp(p_spe)))
    # and the fusion X_spa (1 + gamma_spa) + X_spe (1 + gamma_spe)
    view = (3, 8) + (1,) * dim
    expected = x * (1 + gamma[:, 0].view(view)) + x_spe * (1 + gamma[:, 1].view(view))
    torch.testing.assert_close(fusion(x), expected)


def test_mdief_ablation_modes():
    x = torch.randn(2, 8, 6, 6, 6)
    no_spatial = MdIEF(nn.Conv3d, 8, plans_kwargs(3), mode="no_spatial")
    torch.testing.assert_close(no_spatial(x), no_spatial.spectral(no_spatial.high_pass(x)))
    no_spectral = MdIEF(nn.Conv3d, 8, plans_kwargs(3), mode="no_spectral")
    assert no_spectral.high_pass is None
    torch.testing.assert_close(no_spectral.spectral_features(x), no_spectral.spectral(x))
    assert make(mdief="none").mdief is None
    with pytest.raises(ValueError, match="mdief must be one of"):
        make(mdief="spectral")


# ---------------------------------------------------------------------------------------- TIM
def test_tim_curve_is_the_masked_mean_for_a_perfect_mask():
    torch.manual_seed(1)
    image = torch.randn(2, 4, 5, 6, 7)
    mask = torch.zeros(2, 1, 5, 6, 7)
    mask[0, 0, 1:3, 2:5, 1:4] = 1
    mask[1, 0, 4, 0, :] = 1
    curve = masked_phase_means(image, mask)
    for b in range(2):
        inside = mask[b, 0].bool()
        expected = torch.stack([image[b, n][inside].mean() for n in range(4)])
        torch.testing.assert_close(curve[b], expected, atol=1e-5, rtol=1e-5)


def test_tim_curve_averages_the_channels_of_a_phase_and_is_differentiable_in_the_probability():
    image = torch.randn(1, 4, 8, 8)  # 2 phases x 2 channels
    probability = torch.rand(1, 1, 8, 8, requires_grad=True)
    curve = masked_phase_means(image, probability, channels_per_phase=2)
    per_channel = masked_phase_means(image, probability.detach())
    torch.testing.assert_close(curve.detach(), per_channel.view(1, 2, 2).mean(-1))
    curve.sum().backward()
    assert probability.grad is not None and probability.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("dim,shape", [(3, SHAPE3D), (2, (32, 32))])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_contract_2d_3d_deep_supervision(dim, shape, deep_supervision):
    net = make(dim=dim, deep_supervision=deep_supervision)
    x = torch.randn(2, 4, *shape)
    seg = net(x)
    out = net(x, heads=True)
    assert isinstance(out, NetworkOutput)
    if deep_supervision:
        assert isinstance(seg, list) and [s.shape for s in seg] == [(2, 3, *shape), (2, 3, *[s // 2 for s in shape])]
    else:
        assert isinstance(seg, torch.Tensor) and seg.shape == (2, 3, *shape)
    assert out.curve.shape == (2, 4) and out.cls_logits.shape == (2, 2)
    assert out.seg_highres.shape == (2, 3, *shape)
    assert net.compute_conv_feature_map_size(shape) > make(dim=dim, num_phases=1, discriminator=False,
                                                           curve_head=False, num_case_classes=0,
                                                           mdief="none").compute_conv_feature_map_size(shape)


def test_feature_map_size_counts_encoder_and_mdief_once_per_phase():
    """The VRAM planners size the patch and batch from this count: each phase runs the encoder and MdIEF's
    filtered, spectral and fused maps at every skip."""
    from nnunet_liver_ext.networks.blocks import encoder_skip_sizes, numel

    two, three = make(num_phases=2), make(num_phases=3)
    added = three.compute_conv_feature_map_size(SHAPE3D) - two.compute_conv_feature_map_size(SHAPE3D)
    mdief = 3 * sum(numel(ch, *size) for ch, size in zip(two.encoder.output_channels,
                                                          encoder_skip_sizes(two.encoder, SHAPE3D)))
    assert added >= two.encoder.compute_conv_feature_map_size(SHAPE3D) + mdief


def test_forward_never_runs_the_discriminator():
    net = make()
    calls = []
    net.discriminator.register_forward_hook(lambda *args: calls.append(1))
    net(torch.randn(1, 4, *SHAPE3D), heads=True)
    net(torch.randn(1, 4, *SHAPE3D))
    assert not calls


@pytest.mark.parametrize("kwargs,present,absent", [
    ({}, ["transformer", "curve_head", "cls_head", "discriminator", "mdief"], []),
    ({"num_case_classes": 0, "discriminator": False}, ["transformer", "curve_head"], ["cls_head", "discriminator"]),
    ({"curve_head": False, "discriminator": False}, ["transformer", "cls_head"], ["curve_head", "discriminator"]),
    ({"curve_head": False, "num_case_classes": 0, "discriminator": False}, [],
     ["transformer", "token_pools", "curve_head", "cls_head", "discriminator"]),
    ({"mdief": "none"}, ["discriminator"], ["mdief"]),
])
def test_builds_only_what_is_asked_and_every_parameter_gets_a_gradient(kwargs, present, absent):
    """One training-like step (heads on, reference lesion mask, every loss the trainer would add): no
    parameter may be left without a gradient, or nnU-Net's DDP fails on the next step."""
    net = make(**kwargs)
    for name in present:
        assert getattr(net, name) is not None, name
    for name in absent:
        assert getattr(net, name) is None, name
    x = torch.randn(2, 4, *SHAPE3D)
    mask = torch.zeros(2, 1, *SHAPE3D)
    mask[:, :, 4:9, 10:20, 10:20] = 1
    out = net(x, heads=True, lesion_mask=mask)
    loss = sum(s.float().mean() for s in out.seg)
    loss = loss + masked_phase_means(x, torch.softmax(out.seg[0], 1)[:, 2:3]).sum()
    if out.curve is not None:
        loss = loss + out.curve.abs().mean()
    if out.cls_logits is not None:
        loss = loss + out.cls_logits.logsumexp(-1).mean()
    if net.discriminator is not None:
        loss = loss + net.discriminator(out.curve, out.cls_logits.softmax(-1)).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_a_given_lesion_mask_steers_the_heads():
    net = make().eval()
    x = torch.randn(1, 4, *SHAPE3D)
    a, b = torch.zeros(1, 1, *SHAPE3D), torch.zeros(1, 1, *SHAPE3D)
    a[..., :4, :8, :8] = 1
    b[..., 10:, 20:, 20:] = 1
    with torch.no_grad():
        out_a, out_b = net(x, heads=True, lesion_mask=a), net(x, heads=True, lesion_mask=b)
        own = net(x, heads=True)
    assert not torch.allclose(out_a.curve, out_b.curve, atol=1e-6)
    assert not torch.allclose(own.curve, out_a.curve, atol=1e-6)


def test_phase_order_matters_for_the_curve():
    net = make().eval()
    x = torch.randn(1, 4, *SHAPE3D)
    with torch.no_grad():
        a, b = net(x, heads=True).curve, net(x[:, [3, 2, 1, 0]], heads=True).curve
    assert not torch.allclose(a, b[:, [3, 2, 1, 0]], atol=1e-6)


def test_shared_encoder_is_one_batched_call_and_no_sharing_has_one_encoder_per_phase():
    shared, unshared = make(mdief="none"), make(mdief="none", share_encoder=False)
    assert shared.encoders is None and len(unshared.encoders) == 4
    n = sum(p.numel() for p in shared.encoder.parameters())
    assert sum(p.numel() for p in unshared.encoders.parameters()) == 4 * n
    x = torch.randn(2, 4, *SHAPE3D)
    with torch.no_grad():
        batched = shared.phase_features(x)
        for phase in range(4):
            for stage, feats in enumerate(shared.encoder(x[:, phase:phase + 1])):
                torch.testing.assert_close(batched[stage][:, phase], feats, rtol=1e-5, atol=1e-5)
    unshared(x, heads=True)


def test_channels_per_phase():
    net = make(num_phases=8, channels_per_phase=2)
    assert net.num_phases == 4
    assert net(torch.randn(1, 8, *SHAPE3D), heads=True).curve.shape == (1, 4)


def test_discriminator_shapes_and_phase_order():
    torch.manual_seed(0)
    disc = TaskDrivenDiscriminator(4, 3, embed_dim=16, num_layers=2, num_heads=4, dropout=0.0)
    curve, probs = torch.randn(5, 4), torch.softmax(torch.randn(5, 3), -1)
    logits = disc(curve, probs)
    assert logits.shape == (5,) and logits.dtype == torch.float32
    assert not torch.allclose(logits, disc(curve.flip(-1), probs), atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"mdief": "x"}, "mdief must be one of"),
    ({"num_case_classes": 0}, "the discriminator"),
    ({"curve_head": False}, "the discriminator"),
    ({"num_case_classes": -1}, "num_case_classes"),
    ({"lesion_channel": 3}, "lesion_channel"),
    ({"channels_per_phase": 3}, "multiple of channels_per_phase"),
    ({"embed_dim": 30}, "divisible by num_heads"),
    ({"hpf_cutoff": 0.0}, "cutoff"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_wrong_number_of_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 4 input channels"):
        make()(torch.randn(1, 3, *SHAPE3D))


def test_mti_net_lesion_prior_follows_the_full_resolution_output_not_the_untrained_coarsest():
    """Guards against TIM's and the heads' pooling taking its lesion prior from the coarsest deep-supervision
    output (loss weight 0 in nnU-Net, so it never learns where the lesion is)."""
    net = make(num_phases=2, deep_supervision=True).eval()
    x = torch.randn(1, 2, 8, 16, 16)
    with torch.no_grad():
        before = net(x, heads=True)
        net.decoder.seg_layers[0].bias[-1] += 5.0  # the coarsest output
        after_coarse = net(x, heads=True)
        torch.testing.assert_close(after_coarse.cls_logits, before.cls_logits)
        torch.testing.assert_close(after_coarse.curve, before.curve)
        net.decoder.seg_layers[-1].bias[-1] += 5.0  # the full-resolution output steers the heads
        assert not torch.allclose(net(x, heads=True).cls_logits, before.cls_logits)
