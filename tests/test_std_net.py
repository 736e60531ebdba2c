"""STD-Net as a plain torch module: the network contract and the properties the paper relies on."""
import pytest
import torch
from torch import nn

from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.std_net import STDNet, TemporalTransformer


def plans_kwargs(dim: int = 3, n_stages: int = 3, features=(8, 16, 32)) -> dict:
    """arch_kwargs as nnU-Net's plans give them (imports resolved), small enough for the CPU."""
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return dict(n_stages=n_stages, features_per_stage=list(features[:n_stages]), conv_op=conv,
                kernel_sizes=[[3] * dim] * n_stages, strides=[[1] * dim] + [[2] * dim] * (n_stages - 1),
                n_conv_per_stage=[1] * n_stages, n_conv_per_stage_decoder=[1] * (n_stages - 1), conv_bias=True,
                norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def make(num_phases=3, dim=3, deep_supervision=False, num_case_classes=4, **kwargs) -> STDNet:
    torch.manual_seed(0)
    kwargs.setdefault("num_layers", 2)
    kwargs.setdefault("num_heads", 4)
    return STDNet(num_phases, 3, deep_supervision, num_case_classes=num_case_classes, **kwargs,
                  **plans_kwargs(dim))


SHAPE3D = (16, 32, 32)


def test_shared_encoder_is_one_parameter_set_and_batched_equals_per_phase():
    net = make().eval()
    single = STDNet(1, 3, False, num_case_classes=4, num_layers=2, num_heads=4, **plans_kwargs())
    assert sum(p.numel() for p in net.encoder.parameters()) == sum(p.numel() for p in single.encoder.parameters())
    assert net.encoders is None
    x = torch.randn(2, 3, *SHAPE3D)
    with torch.no_grad():
        batched = net._phase_skips(x)
        for phase in range(3):
            separate = net.encoder(x[:, phase:phase + 1])
            for stage, feats in enumerate(separate):
                torch.testing.assert_close(batched[stage][:, phase], feats, rtol=1e-5, atol=1e-5)


def test_no_weight_sharing_has_one_encoder_per_phase():
    shared, unshared = make(), make(share_encoder=False)
    n_shared = sum(p.numel() for p in shared.encoder.parameters())
    assert len(unshared.encoders) == 3
    assert sum(p.numel() for p in unshared.encoders.parameters()) == 3 * n_shared


@pytest.mark.parametrize("variant,order_matters", [
    ({}, True), ({"temporal": "hybrid"}, True), ({"temporal": "convgru"}, True), ({"fusion": "early"}, True),
    ({"share_encoder": False}, True), ({"temporal": "mean"}, False)])
def test_phase_order_changes_the_class_output_except_without_temporal_modeler(variant, order_matters):
    net = make(**variant).eval()
    x = torch.randn(2, 3, *SHAPE3D)
    with torch.no_grad():
        a = net(x, heads=True).cls_logits
        b = net(x[:, [2, 0, 1]], heads=True).cls_logits
    if order_matters:
        assert not torch.allclose(a, b, atol=1e-6), "permuting the phases did not change the class output"
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim,shape", [(3, SHAPE3D), (2, (32, 32))])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_contract_2d_3d_deep_supervision(dim, shape, deep_supervision):
    net = make(dim=dim, deep_supervision=deep_supervision)
    x = torch.randn(2, 3, *shape)
    seg = net(x)
    out = net(x, heads=True)
    assert isinstance(out, NetworkOutput)
    if deep_supervision:
        assert isinstance(seg, list) and len(seg) == 2
        assert seg[0].shape == (2, 3, *shape)
        assert seg[1].shape == (2, 3, *[s // 2 for s in shape])
        assert out.seg_highres.shape == (2, 3, *shape)
    else:
        assert isinstance(seg, torch.Tensor) and seg.shape == (2, 3, *shape)
    assert out.cls_logits.shape == (2, 4)
    # nnU-Net toggles deep supervision through decoder.deep_supervision
    net.decoder.deep_supervision = False
    assert isinstance(net(x), torch.Tensor)


def test_single_phase_input_works():
    net = make(num_phases=1)
    out = net(torch.randn(1, 1, *SHAPE3D), heads=True)
    assert out.seg.shape == (1, 3, *SHAPE3D) and out.cls_logits.shape == (1, 4)


def test_without_case_classes_there_is_no_head():
    net = make(num_case_classes=0)
    out = net(torch.randn(1, 3, *SHAPE3D), heads=True)
    assert net.cls_head is None and out.cls_logits is None


def test_gradients_reach_encoder_temporal_modeler_and_head():
    net = make()
    out = net(torch.randn(2, 3, *SHAPE3D), heads=True)
    (out.seg.square().mean() + out.cls_logits.square().mean()).backward()

    def grad_norm(module):
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    assert grad_norm(net.encoder) > 0
    assert grad_norm(net.temporal.layers) > 0
    assert net.temporal.pos_embed.grad.abs().sum() > 0 and net.temporal.cls_token.grad.abs().sum() > 0
    assert grad_norm(net.cls_head) > 0
    assert grad_norm(net.decoder) > 0


def test_lesion_prior_follows_the_full_resolution_output_not_the_untrained_coarsest():
    """nnU-Net gives the coarsest deep-supervision output loss weight 0: a prior drawn from it
    would point the [CLS] pooling at locations the segmentation never learned."""
    net = make(deep_supervision=True).eval()
    x = torch.randn(1, 3, *SHAPE3D)
    with torch.no_grad():
        before = net(x, heads=True)
        coarsest_layer, full_resolution_layer = net.decoder.seg_layers[0], net.decoder.seg_layers[-1]
        coarsest_layer.bias[-1] += 5.0
        after_coarse = net(x, heads=True)
        torch.testing.assert_close(after_coarse.cls_logits, before.cls_logits)
        assert not torch.allclose(after_coarse.seg[-1], before.seg[-1])
        # ...while the full-resolution lesion probability steers the pooling, hence the class output
        full_resolution_layer.bias[-1] += 5.0
        assert not torch.allclose(net(x, heads=True).cls_logits, before.cls_logits)


def test_a_given_lesion_mask_replaces_the_networks_own_lesion_probability():
    net = make(deep_supervision=True).eval()
    x = torch.randn(1, 3, *SHAPE3D)
    corner, centre = torch.zeros(1, 1, *SHAPE3D), torch.zeros(1, 1, *SHAPE3D)
    corner[..., :6, :10, :10] = 1
    centre[..., 6:12, 10:22, 10:22] = 1
    with torch.no_grad():
        guided = net(x, heads=True, lesion_mask=corner).cls_logits
        net.decoder.seg_layers[-1].bias[-1] += 5.0  # the network's own lesion probability changes...
        torch.testing.assert_close(net(x, heads=True, lesion_mask=corner).cls_logits, guided)  # ...unused
        assert not torch.allclose(net(x, heads=True, lesion_mask=centre).cls_logits, guided)
        # the segmentation itself does not depend on the mask
        torch.testing.assert_close(net(x, heads=True, lesion_mask=centre).seg[0], net(x)[0])


def test_case_pooling_uses_the_same_locations_in_every_phase():
    from nnunet_liver_ext.networks.blocks import AttentionPool
    torch.manual_seed(0)
    pool = AttentionPool(4)
    tokens = torch.randn(2, 3, 10, 4)  # (B, N, L, C)
    pooled = pool(tokens)
    weights = torch.softmax(pool.score(tokens).squeeze(-1).mean(1), -1)  # (B, L)
    torch.testing.assert_close(pooled, (weights[:, None, :, None] * tokens).sum(2))
    # a location scored high in one phase is looked at in all of them
    tokens[:, 0, 3] = 50 * pool.score.weight.detach()[0]
    weights = torch.softmax(pool.score(tokens).squeeze(-1).mean(1), -1)
    assert (weights.argmax(-1) == 3).all()
    torch.testing.assert_close(pool(tokens)[:, 2], (weights[..., None] * tokens[:, 2]).sum(1))


def test_reference_phase_decodes_from_that_phase_alone():
    net = make(reference_phase=1).eval()
    x = torch.randn(1, 3, *SHAPE3D)
    y = x.clone()
    y[:, 0] = torch.randn_like(y[:, 0])  # change a non-reference phase...
    with torch.no_grad():
        # ...T still mixes phases at the bottleneck, so only the skips are phase-1 alone: the outputs
        # differ, but the highest-resolution skip fed to the decoder is phase 1's
        skips_x, skips_y = net._phase_skips(x), net._phase_skips(y)
        torch.testing.assert_close(net.phase_fusions[0](skips_x[0]), net.phase_fusions[0](skips_y[0]))


def test_feature_map_size_grows_with_phases():
    one, three = make(num_phases=1), make(num_phases=3)
    assert three.compute_conv_feature_map_size(SHAPE3D) > one.compute_conv_feature_map_size(SHAPE3D) > 0
    # the shared encoder runs once per phase: each phase adds at least its maps (the VRAM planners size the
    # patch and batch from this count)
    two = make(num_phases=2)
    added = three.compute_conv_feature_map_size(SHAPE3D) - two.compute_conv_feature_map_size(SHAPE3D)
    assert added >= two.encoder.compute_conv_feature_map_size(SHAPE3D)


@pytest.mark.parametrize("kwargs,message", [
    ({"temporal": "lstm"}, "temporal must be one of"),
    ({"fusion": "late"}, "fusion must be one of"),
    ({"channels_per_phase": 2}, "multiple of channels_per_phase"),
    ({"num_heads": 5}, "divisible by num_heads"),
    ({"reference_phase": 7}, "reference_phase must be in"),
    ({"fusion": "early", "reference_phase": 0}, "reference_phase needs fusion='decoupled'"),
    ({"num_case_classes": -1}, "num_case_classes must be >= 0"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_wrong_number_of_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 3 input channels"):
        make()(torch.randn(1, 2, *SHAPE3D))


STD_NET_VARIANTS = [{}, {"temporal": "hybrid", "num_layers": 3}, {"temporal": "convgru"}, {"temporal": "mean"},
                    {"fusion": "early"}, {"share_encoder": False}, {"reference_phase": 1}]


@pytest.mark.parametrize("num_case_classes", [0, 4])
@pytest.mark.parametrize("variant", STD_NET_VARIANTS, ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) or "std")
def test_ddp_trains_every_variant_with_and_without_case_classes(variant, num_case_classes, tmp_path):
    """nnU-Net wraps the network in DDP without find_unused_parameters: a parameter the training step
    never reaches (e.g. a [CLS] token built for a dataset without classes) fails the second step with
    "Expected to have finished reduction in the prior iteration". A one-process gloo group is enough
    to see it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nnunet_liver_ext.losses.case_losses import masked_cross_entropy

    net = make(deep_supervision=True, num_case_classes=num_case_classes, **variant)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'ddp_rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(net)
        x = torch.randn(2, 3, *SHAPE3D)
        lesion = (torch.rand(2, 1, *SHAPE3D) > 0.9).float()
        for _ in range(3):
            out = ddp(x, heads=True, lesion_mask=lesion)
            loss = sum(s.float().mean() for s in out.seg)
            if out.cls_logits is not None:  # a batch without tumor patches: the graph-connected zero
                loss = loss + masked_cross_entropy(out.cls_logits, torch.zeros(2, dtype=torch.long),
                                                   torch.zeros(2, dtype=torch.bool))
            loss.backward()
        without_grad = [name for name, p in net.named_parameters() if p.grad is None]
        assert without_grad == []
    finally:
        dist.destroy_process_group()
    if num_case_classes == 0:
        assert net.cls_head is None and net.case_pool is None
        if isinstance(net.temporal, TemporalTransformer):
            assert net.temporal.cls_token is None and net.temporal.pool is None


def test_hybrid_fusion_reaches_the_class_head():
    """Ablation (e) must train a different classification path than the full model: the class loss
    reaches the hybrid fusion's parameters, and they change the class output, in the paper's 6-layer
    T (fusion after layer 3) and when the fusion follows the last layer."""
    for num_layers in (6, 3):
        net = make(temporal="hybrid", num_layers=num_layers).eval()
        nn.init.normal_(net.temporal.hybrid.up.weight, std=1.0)  # the fusion starts as the identity
        x = torch.randn(2, 3, *SHAPE3D)
        lesion = (torch.rand(2, 1, *SHAPE3D) > 0.9).float()  # fixed pooling: only the hybrid path differs
        with torch.no_grad():
            before = net(x, heads=True, lesion_mask=lesion).cls_logits
            net.temporal.hybrid.context_proj.weight.mul_(3)
            after = net(x, heads=True, lesion_mask=lesion).cls_logits
        assert not torch.allclose(before, after, atol=1e-6)
        net(x, heads=True, lesion_mask=lesion).cls_logits.square().sum().backward()
        for name, p in net.temporal.hybrid.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("conv_op, spatial", [(nn.Conv3d, (5, 6, 7)), (nn.Conv2d, (6, 7))])
@pytest.mark.parametrize("out_channels, bias", [(1, True), (3, False)])
def test_pointwise_conv_is_the_convolution_as_a_matrix_product(conv_op, spatial, out_channels, bias):
    """PhaseFusion's and FM-M's single-channel scores run as a matrix product (a convolution with one output
    channel is slow on the CPU): the same values and gradients as the module, autocast's dtype, and a
    convolution that is no 1x1 is refused."""
    from nnunet_liver_ext.networks.blocks import pointwise_conv

    torch.manual_seed(0)
    conv = conv_op(4, out_channels, 1, bias=bias)
    x = torch.randn(3, 4, *spatial, requires_grad=True)
    ours, theirs = pointwise_conv(conv, x), conv(x)
    torch.testing.assert_close(ours, theirs)
    grads = [torch.autograd.grad(y.square().sum(), [x, conv.weight]) for y in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pointwise_conv(conv, x).dtype == conv(x).dtype == torch.bfloat16
    for bad in (conv_op(4, 1, 3), conv_op(4, 1, 1, stride=2), conv_op(4, 1, 1, padding=1)):
        with pytest.raises(ValueError, match="1x1 convolution"):
            pointwise_conv(bad, x)


def _temporal(case_token=False, hybrid_rank=None):
    torch.manual_seed(0)
    return TemporalTransformer(4, 3, 8, num_layers=1, num_heads=2, dropout=0.0, hybrid_rank=hybrid_rank,
                               case_token=case_token).eval()


@pytest.mark.parametrize("return_context", [False, True])
def test_an_untrained_temporal_modeler_leaves_the_encoder_features_intact(return_context):
    """Guards against T replacing the bottleneck features instead of adding its residual to them."""
    t = _temporal()
    features = torch.randn(2, 3, 4, 2, 2)
    with torch.no_grad():
        out = t(features, return_context=return_context)
    torch.testing.assert_close(out[0] if return_context else out, features)


def test_voxel_sequences_use_the_phase_rows_of_the_positional_encoding_not_the_cls_row():
    """Guards against the voxel path reading E_pos row 0 (the [CLS] row) as the first phase's encoding."""
    t = _temporal()
    nn.init.normal_(t.proj_out.weight)  # a trained T: its output depends on the positional encodings
    features = torch.randn(1, 3, 4, 2, 2)
    with torch.no_grad():
        before = t(features)
        t.pos_embed[:, 0] += 3.0  # the [CLS] row: the voxel path must not see it
        after_cls = t(features)
        t.pos_embed[:, 1] += 3.0  # the first phase's row
        after_phase = t(features)
    torch.testing.assert_close(after_cls, before)
    assert not torch.allclose(after_phase, before)


SMALL3D = (8, 16, 16)


def test_the_case_token_is_ts_output_at_the_cls_position():
    """Guards against the class head reading another position of T's [CLS] sequence (e.g. the last phase token)."""
    t = _temporal(case_token=True)
    features = torch.randn(2, 3, 4, 2, 2)
    with torch.no_grad():
        tokens = t.proj_in(features.flatten(3).transpose(2, 3))
        seq = torch.cat((t.cls_token.expand(2, -1, -1) + t.pos_embed[:, :1], t.pool(tokens) + t.pos_embed[:, 1:4]), 1)
        torch.testing.assert_close(t.case_token(features), t.norm(t.layers[0](seq)[:, 0]))


def test_the_convgru_class_path_sees_the_last_phase():
    """Guards against ablation (d) characterizing from the GRU state after the first phase (blind to the others)."""
    net = make(temporal="convgru").eval()
    x = torch.randn(1, 3, *SMALL3D)
    y = x.clone()
    y[:, 2] = torch.randn_like(y[:, 2])
    lesion = torch.zeros(1, 1, *SMALL3D)
    lesion[..., 2:6, 4:12, 4:12] = 1  # fixed pooling: only the temporal summary can differ
    with torch.no_grad():
        assert not torch.allclose(net(x, heads=True, lesion_mask=lesion).cls_logits,
                                  net(y, heads=True, lesion_mask=lesion).cls_logits)


def test_ablation_a_fuses_the_phases_by_their_plain_mean():
    """Guards against ablation (a) (no temporal modeler) fusing skips by learned attention instead of the mean."""
    net = make(temporal="mean").eval()
    assert sum(p.numel() for p in net.phase_fusions.parameters()) == 0
    skip = torch.randn(1, 3, 8, 4, 4, 4)
    torch.testing.assert_close(net.phase_fusions[0](skip), skip.mean(1))


def test_attention_fusion_weights_sum_to_one_over_the_phases():
    """Guards against phase-fusion weights normalised over the wrong axis (identical phases must fuse to themselves)."""
    from nnunet_liver_ext.networks.blocks import PhaseFusion
    torch.manual_seed(0)
    fusion = PhaseFusion(nn.Conv3d, 4, 3)
    with torch.no_grad():
        fusion.phase_bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    feature = torch.randn(2, 1, 4, 3, 3, 3)
    torch.testing.assert_close(fusion(feature.expand(-1, 3, -1, -1, -1, -1)), feature[:, 0])


def test_channels_per_phase_are_read_phase_major():
    """Guards against reading nnU-Net's channel order (phase 0's channels first) as channel-major."""
    torch.manual_seed(0)
    net = STDNet(4, 3, False, num_case_classes=0, channels_per_phase=2, num_layers=1, num_heads=4,
                 **plans_kwargs()).eval()
    x = torch.randn(1, 4, *SMALL3D)
    with torch.no_grad():
        skips = net._phase_skips(x)
        for phase in range(2):
            torch.testing.assert_close(skips[0][:, phase], net.encoder(x[:, 2 * phase:2 * phase + 2])[0])


def test_the_class_loss_does_not_train_the_segmentation_through_the_lesion_prior():
    """Guards against the network's own lesion probability being used undetached in the case pooling."""
    net = make()
    net(torch.randn(1, 3, *SMALL3D), heads=True).cls_logits.sum().backward()
    grad = net.decoder.seg_layers[-1].weight.grad
    assert grad is None or not grad.any()


def test_an_empty_lesion_mask_gives_finite_class_logits():
    """Guards against the log prior of a zero lesion probability being -inf everywhere (NaN class output)."""
    net = make().eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, *SMALL3D), heads=True, lesion_mask=torch.zeros(1, 1, *SMALL3D)).cls_logits
    assert torch.isfinite(logits).all()


def test_hybrid_cls_token_takes_the_mean_spatial_context_of_the_phases():
    """Guards against the hybrid fusion of the [CLS] sequence giving [CLS] one phase's context (and every phase
    token its neighbour's) instead of [CLS] the mean over phases."""
    t = _temporal(case_token=True, hybrid_rank=4)  # one layer: the fusion follows T's last layer
    nn.init.normal_(t.hybrid.up.weight)  # the fusion starts as the identity
    features, context = torch.randn(1, 3, 4, 2, 2), torch.randn(1, 1, 3, 8)
    swapped = context[:, :, [1, 0, 2]]  # same mean over phases, phase contexts exchanged
    with torch.no_grad():
        torch.testing.assert_close(t.case_token(features, hybrid_context=context),
                                   t.case_token(features, hybrid_context=swapped))
        assert not torch.allclose(t.case_token(features, hybrid_context=context),
                                  t.case_token(features, hybrid_context=context + 1.0))


def test_a_deeper_temporal_modeler_is_planned_with_more_memory():
    """Guards against the VRAM estimate counting T's activations once instead of once per layer."""
    shallow, deep = make(num_layers=1), make(num_layers=4)
    assert deep.compute_conv_feature_map_size(SMALL3D) > shallow.compute_conv_feature_map_size(SMALL3D)


def test_unwrap_network_finds_the_module_behind_torch_compile():
    """Guards against the trainer's heads, checkpoints and pretrained transfer reaching torch.compile's wrapper
    (keys prefixed ``_orig_mod.``, no ``transfer_skip_prefixes``) instead of the network."""
    from nnunet_liver_ext.networks.contract import unwrap_network

    net = make(num_case_classes=0)
    assert unwrap_network(torch.compile(net)) is net and unwrap_network(net) is net


def test_convgru_follows_the_gru_equations_with_its_reset_gate():
    """Guards against ablation (d)'s recurrence dropping the reset gate (or mixing update and candidate)."""
    from nnunet_liver_ext.networks.blocks import ConvGRU
    torch.manual_seed(0)
    gru = ConvGRU(nn.Conv3d, 2)
    features = torch.randn(1, 2, 2, 3, 3, 3)
    with torch.no_grad():
        hidden = torch.zeros_like(features[:, 0])
        for n in range(2):
            x = features[:, n]
            update, reset = torch.sigmoid(gru.gates(torch.cat((x, hidden), 1))).chunk(2, 1)
            candidate = torch.tanh(gru.candidate(torch.cat((x, reset * hidden), 1)))
            hidden = (1 - update) * hidden + update * candidate
        torch.testing.assert_close(gru(features)[:, -1], hidden)
