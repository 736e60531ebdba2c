"""The Mamba-codebook U-Net as a plain torch module (network contract, ablations, VQ codebook, GFR scan
order) and its inclusion loss; CPU, tiny tensors."""
import math

import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunet_liver_ext.losses.inclusion import eroded_region_probability, inclusion_loss
from nnunet_liver_ext.networks.contract import NetworkOutput
from nnunet_liver_ext.networks.mamba_codebook import (GlobalFeatureRepresentation, MambaCodebookUNet,
                                                      MultiScaleContext, VectorQuantizer)
from nnunet_liver_ext.networks.ssd import Mamba2SSD
from test_mti_net_trainer import make_batch, make_trainer, nnunet_folders  # noqa: F401
from test_std_net import plans_kwargs

torch.set_num_threads(1)


def make(dim=3, deep_supervision=False, in_channels=2, **kwargs) -> MambaCodebookUNet:
    torch.manual_seed(0)
    return MambaCodebookUNet(in_channels, 3, deep_supervision, **kwargs, **plans_kwargs(dim))


SHAPES = {3: (8, 16, 16), 2: (16, 16)}
VARIANTS = [{}, {"gfr": "mhsa"}, {"bidirectional": True}, {"gfr_scan": "columns"}, {"use_mce": False},
            {"use_codebook": False}, {"gfr": None}, {"dead_code_restart": True},
            {"stage_features": (4, 8)}]


@pytest.mark.parametrize("dim", [3, 2])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_contract_2d_3d_deep_supervision(dim, deep_supervision):
    net = make(dim, deep_supervision)
    shape = SHAPES[dim]
    x = torch.randn(2, 2, *shape)
    seg = net(x)
    out = net(x, heads=True, lesion_mask=torch.zeros(2, 1, *shape))
    assert isinstance(out, NetworkOutput) and out.cls_logits is None and out.curve is None
    assert set(out.aux_losses) == {"vq"} and out.aux_losses["vq"].ndim == 0
    if deep_supervision:
        assert isinstance(seg, list) and len(seg) == 2  # one per decoder stage, as nnU-Net's UNetDecoder
        assert [tuple(s.shape) for s in seg] == [(2, 3, *[d // f for d in shape]) for f in (1, 2)]
    else:
        assert seg.shape == (2, 3, *shape)
    assert out.seg_highres.shape == (2, 3, *shape)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "default")
@pytest.mark.parametrize("dim", [3, 2])
def test_every_parameter_gets_a_gradient(variant, dim):
    """DDP without find_unused_parameters: one training step must reach every parameter."""
    net = make(dim, True, **variant).train()
    x = torch.randn(2, 2, *SHAPES[dim])
    out = net(x, heads=True, lesion_mask=torch.zeros(2, 1, *SHAPES[dim]))
    loss = sum(s.float().square().mean() for s in out.seg) + 0.4 * sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert ("vq" in out.aux_losses) == variant.get("use_codebook", True)
    assert (net.gfr is None) == (variant.get("gfr", "mamba") is None)
    assert (net.mce is None) == (not variant.get("use_mce", True))


def test_ablation_modules_and_bad_arguments():
    assert isinstance(make(gfr="mamba").gfr.mixer, Mamba2SSD)
    assert isinstance(make(gfr="mhsa").gfr.mixer, nn.Module) and not isinstance(make(gfr="mhsa").gfr.mixer, Mamba2SSD)
    assert make(bidirectional=True).gfr.mixer_reverse is not None
    with pytest.raises(ValueError, match="characterization head"):
        make(num_case_classes=3)
    with pytest.raises(ValueError, match="gfr"):
        make(gfr="transformer")
    with pytest.raises(ValueError, match="divisible by headdim"):
        make(headdim=48)
    with pytest.raises(ValueError, match="gfr_scan"):
        make(gfr_scan="hilbert")
    with pytest.raises(ValueError, match="codebook size"):
        make(codebook_size=1)
    paper_like = make(stage_features=(4, 8, 16, 32))  # more widths than plans stages: the plans' 3 stages
    assert list(paper_like.encoder.output_channels) == [4, 8, 16]


def test_straight_through_gradient_reaches_the_encoder():
    """With the codebook on and no L_vq, the segmentation loss alone still trains the bottleneck stage
    (argmin has no gradient; the straight-through estimator passes it on)."""
    net = make(gfr=None).train()
    x = torch.randn(2, 2, *SHAPES[3])
    net(x).float().square().mean().backward()
    bottleneck_stage = net.encoder.stages[-1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bottleneck_stage.parameters())

    vq = VectorQuantizer(4, 8)
    vq.initialized.fill_(True)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_st, _, _ = vq(z)
    upstream = torch.randn_like(z_st)
    (z_st * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # the identity in the backward pass


def test_vq_forward_and_loss_gradients_are_the_papers():
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 5, beta=0.25)
    vq.initialized.fill_(True)
    z = torch.randn(2, 3, 4, requires_grad=True)
    z_st, loss, indices = vq(z)
    flat = z.detach().transpose(1, 2).reshape(-1, 3)
    expected_index = torch.cdist(flat, vq.codes.detach()).argmin(1)
    assert torch.equal(indices.flatten(), expected_index)
    z_q = vq.codes.detach()[expected_index]
    torch.testing.assert_close(z_st.detach().transpose(1, 2).reshape(-1, 3), z_q)
    loss.backward()
    n = flat.numel()
    # d/dz: beta * 2 (z - z_q) / n (commitment); d/de_k: sum over assigned of 2 (e_k - z) / n (codebook term)
    torch.testing.assert_close(z.grad.transpose(1, 2).reshape(-1, 3), 0.25 * 2 * (flat - z_q) / n)
    code_grad = torch.zeros(5, 3).index_add_(0, expected_index, 2 * (z_q - flat) / n)
    torch.testing.assert_close(vq.codes.grad, code_grad)
    torch.testing.assert_close(loss, 1.25 * ((flat - z_q) ** 2).mean())


def _train_codes(optimizer_factory, steps=30):
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8).train()
    features = torch.randn(2, 4, 6, 6) + 3.0
    vq(features)  # first training batch: codes initialised from the features
    with torch.no_grad():
        vq.codes.add_(torch.randn_like(vq.codes))  # push them off
    before = vq.codes.detach().clone()
    optimizer = optimizer_factory(vq.parameters())
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        _, loss, _ = vq(features)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return (vq.codes.detach() - before).norm(dim=1).mean().item(), losses


def test_codes_move_towards_the_features_under_adamw():
    moved, losses = _train_codes(lambda p: torch.optim.AdamW(p, lr=0.05))
    assert moved > 0.3
    assert losses[-1] < 0.7 * losses[0]  # 0.64 here; 0.49-0.64 over seeds 0-4
    # why the trainer gives the codebook AdamW: under nnU-Net's SGD the same steps barely move the codes,
    # because a code's gradient is a mean over all bottleneck elements
    moved_sgd, _ = _train_codes(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.99, nesterov=True))
    assert moved > 5 * moved_sgd, (moved, moved_sgd)  # 1.19 vs 0.19 here; the gap grows with the bottleneck size


def test_first_training_batch_initialises_codes_from_features_eval_does_not():
    vq = VectorQuantizer(4, 16)
    features = torch.randn(1, 4, 5, 5) * 0.1 + 7.0
    vq.eval()(features)
    assert not bool(vq.initialized)
    vq.train()(features)
    assert bool(vq.initialized)
    assert vq.usage_stats()["restarted"] == 0  # the first initialisation is no restart of a dead code
    assert (vq.codes.detach() - 7.0).abs().max() < 1.0
    assert "initialized" in vq.state_dict() and "counts" not in vq.state_dict()
    assert "counts" not in dict(vq.named_buffers())  # DDP broadcasts buffers from rank 0 every step


@pytest.mark.parametrize("tokens", [16, 25])
def test_initial_codes_are_distinct_feature_vectors_while_the_batch_has_enough(tokens):
    """Drawn with replacement, a third of 16 codes would start as twins of one vector."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 16).train()
    features = torch.randn(1, 4, tokens)
    vq(features)
    nearest = torch.cdist(vq.codes.detach(), features[0].T).argmin(1)
    assert len(set(nearest.tolist())) == 16


def test_usage_statistics_on_a_constructed_example():
    vq = VectorQuantizer(3, 8).train()
    vq.initialized.fill_(True)
    with torch.no_grad():
        vq.codes.copy_(torch.eye(8, 3) * 10 + torch.arange(8).view(8, 1) * 0.0)
        vq.codes[3:] = torch.tensor([-50.0, -50.0, -50.0]) - torch.arange(5).view(5, 1).float() * 10
    # 4 vectors at code 0, 2 at code 1, 2 at code 2; codes 3..7 never used
    vectors = torch.stack([vq.codes[0]] * 4 + [vq.codes[1]] * 2 + [vq.codes[2]] * 2).detach()
    z = vectors.t().reshape(1, 3, 8)
    _, _, indices = vq(z)
    assert indices.flatten().tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    stats = vq.usage_stats(reset=False)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert stats["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))  # 2 ** 1.5
    assert stats["perplexity"] == pytest.approx(2 ** 1.5)
    assert (stats["used_codes"], stats["dead_codes"], stats["assignments"]) == (3, 5, 8)
    vq(z)  # counts accumulate over the epoch ...
    assert vq.usage_stats(reset=True)["assignments"] == 16
    assert vq.usage_stats()["assignments"] == 0  # ... and reset
    vq.eval()(z)
    assert vq.usage_stats()["assignments"] == 0  # validation does not count


def test_dead_code_restart_revives_a_dead_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 4, dead_code_restart=True, usage_decay=0.5, restart_threshold=0.1).train()
    vq.initialized.fill_(True)
    data = torch.randn(1, 2, 10, 10) * 0.1  # features around the origin
    with torch.no_grad():
        vq.codes.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [0.05, 0.05], [-0.05, 0.0]]))
    for step in range(6):  # code 1 is never chosen: its usage share halves every step
        _, _, indices = vq(data)
        if vq.restarted:
            break
        assert not (indices == 1).any()
    # 0.25 halves to 1/64 in four steps, below 0.1 / 4 codes: the fifth step restarts code 1 and no other
    assert step == 4 and int(vq.restarted) == 1
    assert vq.codes[1].detach().norm() < 1.0  # moved onto a feature vector
    _, _, indices = vq(data)
    assert (indices == 1).any()  # and in use again


def test_usage_share_is_a_moving_average_of_the_assignments():
    """usage_ema <- decay * usage_ema + (1 - decay) * share: it stays a distribution over the codes, which
    the dead-code threshold (a share) is compared with."""
    vq = VectorQuantizer(2, 4, usage_decay=0.9).train()
    vq.initialized.fill_(True)
    with torch.no_grad():
        vq.codes.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    vq(torch.zeros(1, 2, 3, 3))  # every vector on code 0
    assert vq.usage_ema.tolist() == pytest.approx([0.9 * 0.25 + 0.1, 0.9 * 0.25, 0.9 * 0.25, 0.9 * 0.25])
    assert float(vq.usage_ema.sum()) == pytest.approx(1.0)


def test_dead_code_threshold_is_a_share_of_a_uniform_use():
    """restart_threshold is relative to 1 / num_codes: with 0.5 and 4 codes a code below 1/8 of the assignments
    is dead; the codes above it keep what they learned."""
    vq = VectorQuantizer(2, 4, dead_code_restart=True, restart_threshold=0.5).train()
    vq.initialized.fill_(True)
    with torch.no_grad():
        vq.usage_ema.copy_(torch.tensor([0.3, 0.3, 0.3, 0.1]))
    before = vq.codes.detach().clone()
    vq(torch.randn(1, 2, 4, 4))
    assert int(vq.restarted) == 1
    assert torch.equal(vq.codes.detach()[:3], before[:3]) and not torch.equal(vq.codes.detach()[3], before[3])


def test_multi_scale_context_block_is_residual():
    """The MCE block adds its context to its input (x + fuse(...)): with the fuse branch at zero it is the
    identity, so an untrained block passes the encoder's features on."""
    torch.manual_seed(0)
    block = MultiScaleContext(nn.Conv3d, 8, 3, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                              nonlin=nn.LeakyReLU)
    with torch.no_grad():
        for parameter in block.fuse.parameters():
            parameter.zero_()
    x = torch.randn(2, 8, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(block(x), x)


def test_quantization_runs_in_fp32_under_autocast():
    vq = VectorQuantizer(4, 8).train()
    z = torch.randn(2, 4, 3, 3)
    vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_st, loss, indices = vq(z.bfloat16())
    assert loss.dtype == torch.float32 and z_st.dtype == torch.bfloat16
    assert torch.equal(indices.flatten(), vq.distances(z.bfloat16().float().transpose(1, 3).reshape(-1, 4)).argmin(1)
                       .view(2, 3, 3).transpose(1, 2).flatten())


def test_gfr_tokens_are_ordered_along_z():
    """Unidirectional Mamba over the z-ordered sequence: changing slice k changes the output at slices >= k
    only; bidirectional changes both sides; ``columns`` keeps every in-plane location its own sequence."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 3, 3)
    x2 = x.clone()
    x2[:, :, 3] += torch.randn(1, 8, 3, 3)  # not a constant: the LayerNorm would remove that
    for scan in ("volume", "columns"):
        gfr = GlobalFeatureRepresentation(8, "mamba", scan, d_state=4, headdim=8).eval()
        with torch.no_grad():
            diff = (gfr(x2) - gfr(x)).abs().amax(dim=(0, 1, 3, 4))
        assert torch.all(diff[:3] == 0) and torch.all(diff[3:] > 0), (scan, diff)
        torch.testing.assert_close(gfr.from_tokens(gfr.to_tokens(x), x), x)
    tokens = GlobalFeatureRepresentation(8, "mamba", "columns", d_state=4, headdim=8).to_tokens(x)
    torch.testing.assert_close(tokens[3 * 1 + 2], x[0, :, :, 1, 2].t())  # location (y=1, x=2), along z
    both = GlobalFeatureRepresentation(8, "mamba", "volume", bidirectional=True, d_state=4, headdim=8).eval()
    with torch.no_grad():
        diff = (both(x2) - both(x)).abs().amax(dim=(0, 1, 3, 4))
    assert torch.all(diff > 0)


def test_feature_map_size_counts_codebook_and_scan():
    shape = (16, 32, 32)
    full = make(gfr=None).compute_conv_feature_map_size(shape)
    no_codebook = make(gfr=None, use_codebook=False).compute_conv_feature_map_size(shape)
    tokens, channels = 4 * 8 * 8, 32
    assert full - no_codebook == tokens * (64 + 2 * channels)
    with_mamba = make().compute_conv_feature_map_size(shape)
    assert with_mamba > full
    assert make().compute_conv_feature_map_size((32, 64, 64)) > 7 * with_mamba


# ---------------------------------------------------------------- inclusion loss
def _logits_from_labels(labels: torch.Tensor, sharpness: float = 20.0) -> torch.Tensor:
    """Confident logits (B, 3, *S) for a label map (B, *S) of 0 background / 1 liver / 2 tumor."""
    return torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * sharpness


def _phantom(tumor_inside: bool, dim: int = 3) -> torch.Tensor:
    shape = (12, 20, 20) if dim == 3 else (20, 20)
    labels = torch.zeros(1, *shape, dtype=torch.long)
    liver = (slice(None),) + tuple(slice(2, 12) for _ in shape)
    labels[liver] = 1
    tumor = (slice(None),) + tuple(slice(5, 9) for _ in shape) if tumor_inside else \
        (slice(None),) + tuple(slice(s - 6, s - 2) for s in shape)
    labels[tumor] = 2
    return labels


@pytest.mark.parametrize("dim", [3, 2])
def test_inclusion_loss_zero_inside_positive_outside(dim):
    inside = inclusion_loss(_logits_from_labels(_phantom(True, dim)), liver_channel=1, tumor_channel=2)
    outside = inclusion_loss(_logits_from_labels(_phantom(False, dim)), liver_channel=1, tumor_channel=2)
    assert inside.item() < 1e-6
    assert outside.item() > 1e-2
    # the pointwise form mean(ReLU(p_T - (p_liver + p_T))) cannot tell them apart: it is 0 for any softmax
    probs = torch.softmax(_logits_from_labels(_phantom(False, dim)), 1)
    assert torch.relu(probs[:, 2] - (probs[:, 1] + probs[:, 2])).max() == 0


def test_inclusion_loss_is_zero_for_a_large_tumor_enclosed_by_liver_and_pushes_outside_tumor_down():
    labels = torch.zeros(1, 30, 30, dtype=torch.long)
    labels[:, 2:28, 2:28] = 1
    labels[:, 4:26, 4:26] = 2  # much larger than the erosion kernel, still enclosed
    assert inclusion_loss(_logits_from_labels(labels), 1, 2, kernel_size=3).item() < 1e-6
    logits = _logits_from_labels(_phantom(False, 2), sharpness=3.0).requires_grad_()  # not saturated
    inclusion_loss(logits, 1, 2).backward()
    outside_tumor = _phantom(False, 2) == 2
    assert logits.grad[:, 2][outside_tumor].sum() > 0  # descent lowers the tumor logits outside the liver


def test_a_tumor_at_the_border_of_a_patch_inside_the_liver_costs_nothing():
    """Training patches are cut out of the liver: the patch border is not outside the liver, so the erosion
    treats it as inside (a border counted as background would push every tumor near it down)."""
    labels = torch.ones(1, 8, 10, 10, dtype=torch.long)
    labels[:, 0:3, 0:3, 0:3] = 2
    assert inclusion_loss(_logits_from_labels(labels), liver_channel=1, tumor_channel=2).item() < 1e-6


def test_erosion_and_bad_arguments():
    p = torch.zeros(1, 1, 7, 7)
    p[..., 1:6, 1:6] = 1
    eroded = eroded_region_probability(p, 3)
    assert eroded[..., 2:5, 2:5].min() == 1 and eroded[..., 1, :].max() == 0
    with pytest.raises(ValueError):
        eroded_region_probability(p, 2)
    with pytest.raises(ValueError):
        inclusion_loss(torch.zeros(1, 3, 4, 4), 1, 1)


def test_inclusion_loss_runs_in_fp32_under_autocast():
    logits = _logits_from_labels(_phantom(False, 2)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = inclusion_loss(logits, 1, 2)
    assert value.dtype == torch.float32


def test_trainer_turns_inclusion_off_unless_labels_are_liver_and_tumor():
    from nnunet_liver_ext.trainers.nnUNetTrainerMambaCodebook import nnUNetTrainerMambaCodebook as trainer

    def channels(labels, regions_class_order=None):
        return trainer.liver_and_tumor_channels(LabelManager(labels, regions_class_order), {"labels": labels})

    assert channels({"background": 0, "liver": 1, "tumor": 2}) == (1, 2, "softmax")
    assert channels({"background": 0, "liver": 2, "cancer": 1}) == (2, 1, "softmax")
    assert channels({"background": 0, "tumor": 1}) is None
    assert channels({"background": 0, "liver": 1}) is None
    assert channels({"background": 0, "kidney": 1, "tumor": 2}) is None
    # region-based training: a liver region that contains the tumor region, outputs in dataset.json order
    assert channels({"background": 0, "liver": [1, 2], "tumor": 2}, [1, 2]) == (0, 1, "sigmoid")
    assert channels({"background": 0, "tumor": [2], "liver": [1, 2]}, [2, 1]) == (1, 0, "sigmoid")
    assert channels({"background": 0, "liver": [1], "tumor": [2]}, [1, 2]) is None  # the liver excludes the tumor


def test_inclusion_loss_on_region_outputs():
    # region logits (liver region ⊇ tumor, tumor): tumor inside the liver region costs nothing, outside it does
    liver = torch.full((1, 1, 9, 9, 9), -8.0)
    liver[..., 1:8, 1:8, 1:8] = 8.0
    tumor_inside = torch.full((1, 1, 9, 9, 9), -8.0)
    tumor_inside[..., 3:6, 3:6, 3:6] = 8.0
    assert float(inclusion_loss(torch.cat((liver, tumor_inside), 1), 0, 1, activation="sigmoid")) < 1e-3
    tumor_outside = torch.full((1, 1, 9, 9, 9), -8.0)
    tumor_outside[..., 0, 0, 0:3] = 8.0
    assert float(inclusion_loss(torch.cat((liver, tumor_outside), 1), 0, 1, activation="sigmoid")) > 2 / 9 ** 3


def test_trainer_weights_vq_and_inclusion_terms_and_reads_inclusion_from_the_full_resolution_output(
        nnunet_folders):  # noqa: F811
    """L = L_seg + 0.4 L_vq + 0.6 L_inc (the paper's eq. 8); the inclusion term reads the full-resolution output,
    which nnU-Net trains (it gives the coarsest deep-supervision output weight 0)."""
    trainer = make_trainer("nnUNetTrainerMambaCodebook")
    batch = make_batch(trainer)
    # logits of the reference (tumor inside the liver) at both resolutions, and with a tumor in the background
    full, coarse = (_logits_from_labels(t[:, 0].long()) for t in batch["target"])
    full_outside, coarse_outside = full.clone(), coarse.clone()
    for logits in (full_outside, coarse_outside):
        logits[:, :, 0, 0, :4] = torch.tensor([0.0, 0.0, 20.0]).view(1, 3, 1)
    terms = trainer.case_loss_terms(NetworkOutput(seg=[full_outside, coarse], aux_losses={"vq": torch.tensor(1.0)}),
                                    batch["target"], batch["keys"])
    assert float(terms["vq"]) == pytest.approx(0.4)
    assert float(terms["inc"]) == pytest.approx(0.6 * float(inclusion_loss(full_outside, 1, 2)))
    assert float(terms["inc"]) > 0
    terms = trainer.case_loss_terms(NetworkOutput(seg=[full, coarse_outside]), batch["target"], batch["keys"])
    assert float(terms["inc"]) < 1e-6  # the coarsest output's stray tumor does not count


def test_trainer_catalogue():
    import nnunet_liver_ext.trainers.nnUNetTrainerMambaCodebook as module

    names = ["nnUNetTrainerMambaCodebook", "nnUNetTrainerMambaCodebook_paper", "nnUNetTrainerMambaCodebook_noMCE",
             "nnUNetTrainerMambaCodebook_noCodebook", "nnUNetTrainerMambaCodebook_noGFR",
             "nnUNetTrainerMambaCodebook_MHSA", "nnUNetTrainerMambaCodebook_noInclusion",
             "nnUNetTrainerMambaCodebook_bidirectional"]
    for name in names:
        cls = getattr(module, name)
        first = cls.__doc__.strip().splitlines()[0]
        assert first and len(first) < 120, name
        assert hasattr(module, f"{name}_tiny") and hasattr(module, f"{name}_short")
    assert module.nnUNetTrainerMambaCodebook_noGFR.network_kwargs == {"dead_code_restart": True, "gfr": None}
    assert module.nnUNetTrainerMambaCodebook.aux_loss_weights == {"vq": 0.4}
    assert module.nnUNetTrainerMambaCodebook.inclusion_weight == 0.6


def test_encoder_path_is_the_plans_encoder_and_residual_encoder_plans_work():
    """Without MCE the encoder path is exactly the plans' encoder; ResEnc plans (n_blocks_per_stage) build a
    ResidualEncoder with its stem, and MCE sits in the path after each stage."""
    net = make(use_mce=False).eval()
    x = torch.randn(1, 2, *SHAPES[3])
    with torch.no_grad():
        for ours, theirs in zip(net.encode(x), net.encoder(x)):
            torch.testing.assert_close(ours, theirs)
    kwargs = plans_kwargs(3)
    kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    torch.manual_seed(0)
    resenc = MambaCodebookUNet(2, 3, True, **kwargs)
    assert type(resenc.encoder).__name__ == "ResidualEncoder" and resenc.encoder.stem is not None
    out = resenc(x, heads=True)
    (sum(s.square().mean() for s in out.seg) + out.aux_losses["vq"]).backward()
    assert all(p.grad is not None for p in resenc.parameters())


def test_paper_widths_on_deeper_plans_train_each_output_with_nnunets_weights(monkeypatch, tmp_path):
    """The ``_paper`` widths cut 5-stage plans to 4 stages: one target and loss weight per output the network
    has, the coarsest weighted 0 as nnU-Net does (its wrapper zips targets with outputs and would otherwise
    train that output with a weight of 0.13 and leave the weights summing to 0.93)."""
    from nnunet_liver_ext.trainers.nnUNetTrainerMambaCodebook import nnUNetTrainerMambaCodebook_paper
    from test_characterization_predictor import _trainer_plans

    labels = {"background": 0, "liver": 1, "tumor": 2}
    plans = _trainer_plans(labels)
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=5, features_per_stage=[8, 16, 32, 64, 64], kernel_sizes=[[3, 3, 3]] * 5,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], n_conv_per_stage=[1] * 5,
                n_conv_per_stage_decoder=[1] * 4)
    plans["configurations"]["3d_fullres"]["pool_op_kernel_sizes"] = arch["strides"]
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    # a user's nnUNet_preprocessed makes nnU-Net's __init__ read the plans' data_identifier, which these lack
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.infer_dataset_class", lambda folder: None)
    dataset_json = {"labels": labels, "channel_names": {"0": "CT", "1": "CT"}, "file_ending": ".nii.gz"}
    trainer = nnUNetTrainerMambaCodebook_paper(dict(plans, continue_training=False), "3d_fullres", 0, dataset_json,
                                               device=torch.device("cpu"))
    trainer.initialize()
    with torch.no_grad():
        outputs = trainer.network(torch.zeros(1, 2, 16, 32, 32))
    scales = trainer._get_deep_supervision_scales()
    assert len(outputs) == 3 and len(scales) == 3
    for output, scale in zip(outputs, scales):
        assert list(output.shape[2:]) == [round(s * f) for s, f in zip((16, 32, 32), scale)]
    weights = trainer.loss.weight_factors  # nnU-Net's DeepSupervisionWrapper
    assert len(weights) == 3 and weights[-1] == 0 and sum(weights) == pytest.approx(1.0)
