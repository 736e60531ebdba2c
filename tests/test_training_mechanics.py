"""The multi-task mechanics every method's trainer shares (nnunet_liver_ext.training, .losses)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_liver_ext.losses.case_losses import masked_cross_entropy, masked_l1
from nnunet_liver_ext.training.augmentation import PHASE_SYNCHRONIZED_TRANSFORMS
from nnunet_liver_ext.training.case_labels import CaseTargets
from nnunet_liver_ext.training.multitask_trainer import LiverMultiTaskTrainer, tumor_label_value
from nnunet_liver_ext.training.optim import HybridOptimizer, PolyLRPerGroup, PolyLRWithLinearWarmup, split_parameters
from nnunet_liver_ext.training.schedules import WarmupCosineLRScheduler
from test_mti_net_trainer import make_batch, make_trainer, nnunet_folders  # noqa: F401

DATASET_JSON = {
    "labels": {"background": 0, "liver": 1, "tumor": 2},
    "phases": ["arterial", "portal_venous", "delayed"],
    "characterization": {"classes": ["HCC", "hemangioma"], "cases": {"a": 0, "b": 1}},
    "enhancement": {"a": [150.0, 100.0, 60.0], "b": [60.0, 100.0, 110.0]},
}


def _intensity_transforms(trainer_class):
    transforms = trainer_class.get_training_transforms(
        patch_size=(16, 32, 32), rotation_for_DA=(0.0, 0.0), deep_supervision_scales=None, mirror_axes=(0, 1, 2),
        do_dummy_2d_data_aug=False)
    found = []
    for t in transforms.transforms:
        inner = t.transform if isinstance(t, RandomTransform) else t
        if isinstance(inner, PHASE_SYNCHRONIZED_TRANSFORMS):
            found.append(inner)
    return found


def test_intensity_augmentation_is_shared_by_all_phases_unlike_stock_nnunet():
    ours, stock = _intensity_transforms(LiverMultiTaskTrainer), _intensity_transforms(nnUNetTrainer)
    assert len(ours) == len(stock) >= 3
    assert all(t.synchronize_channels for t in ours)
    assert not any(t.synchronize_channels for t in stock)
    # behaviour, not just the flag: identical phases stay identical under the synchronized transforms
    image = torch.rand(1, 8, 16, 16).expand(3, -1, -1, -1).clone()
    for transform in ours:
        torch.manual_seed(0)
        out = transform(image=image.clone())["image"]
        torch.testing.assert_close(out[0], out[1])
        torch.testing.assert_close(out[0], out[2])


def test_case_targets_lookup_and_unknown_cases():
    targets = CaseTargets.from_dataset_json(DATASET_JSON)
    labels, known = targets.class_labels(["b", "zzz", "a"], torch.device("cpu"))
    assert labels.tolist() == [1, -1, 0] and known.tolist() == [True, False, True]
    curves, known = targets.curves(["a", "zzz"], 3, torch.device("cpu"))
    assert curves[0].tolist() == [150.0, 100.0, 60.0] and known.tolist() == [True, False]
    assert not CaseTargets.from_dataset_json({"labels": {"background": 0}}).has_classes


@pytest.mark.parametrize("patch,message", [
    ({"characterization": {"classes": ["HCC"], "cases": {"case_7": 3}}}, "case 'case_7' has class index 3"),
    # one past the last class: the class head has no such output
    ({"characterization": {"classes": ["HCC"], "cases": {"case_7": 1}}}, "case 'case_7' has class index 1"),
    ({"enhancement": {"case_8": [1.0, 2.0]}}, "case 'case_8' has 2 values"),
    # one NaN made the standardisation stats NaN, and with them every case's curve loss
    ({"enhancement": {"case_9": [1.0, float("nan"), 2.0]}}, "case 'case_9' has .*finite numbers"),
    ({"enhancement": {"case_9": [1.0, None, 2.0]}}, "case 'case_9' has"),
    ({"enhancement": {"case_9": 7}}, "case 'case_9' has 7"),
    ({"phases": "pv"}, "'phases' must be a list of distinct phase names"),  # was read as phases 'p' and 'v'
    ({"phases": ["arterial", "arterial", "delayed"]}, "'phases' must be a list of distinct"),
])
def test_case_targets_reject_bad_entries_naming_the_case(patch, message):
    with pytest.raises(ValueError, match=message):
        CaseTargets.from_dataset_json({**DATASET_JSON, **patch})


def test_tumor_label_from_names():
    assert tumor_label_value(DATASET_JSON) == 2
    assert tumor_label_value({"labels": {"background": 0, "liver": 1, "cancer": 2}}) == 2
    assert tumor_label_value({"labels": {"background": 0, "organ": 1, "lesionish": 3}}) == 3


def test_masked_losses_match_the_unmasked_loss_on_the_kept_samples_and_stay_connected():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 2, -1, 1])
    mask = torch.tensor([True, True, False, False])
    torch.testing.assert_close(masked_cross_entropy(logits, labels, mask), F.cross_entropy(logits[:2], labels[:2]))
    none = masked_cross_entropy(logits, labels, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()  # graph-connected: DDP sees a gradient (zero) for every head parameter
    assert logits.grad is not None and logits.grad.abs().sum() == 0
    # an excluded sample's inf (an fp16 overflow) used to make the connected zero NaN
    logits = torch.tensor([[float("inf"), 0.0, 0.0]] * 2, requires_grad=True)
    none = masked_cross_entropy(logits, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().sum() == 0
    pred, target = torch.randn(3, 4), torch.randn(3, 4)
    keep = torch.tensor([False, True, True])
    torch.testing.assert_close(masked_l1(pred, target, keep), (pred[1:] - target[1:]).abs().mean())


def test_hybrid_optimizer_steps_both_decays_each_group_from_its_own_rate_and_round_trips():
    # the halves differ in size, so parameters put in the wrong half do not pass unnoticed
    net = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 4), "temporal": torch.nn.Linear(4, 2, bias=False)})
    sgd_params, adam_params = split_parameters(net, ("temporal.",))
    assert [id(p) for p in sgd_params] == [id(net["encoder"].weight), id(net["encoder"].bias)]
    assert [id(p) for p in adam_params] == [id(net["temporal"].weight)]
    optimizer = HybridOptimizer([torch.optim.SGD(sgd_params, 1e-2, momentum=0.99, nesterov=True),
                                 torch.optim.AdamW(adam_params, 1e-3)])
    scheduler = PolyLRPerGroup(optimizer, max_steps=10)
    scheduler.step(5)
    np.testing.assert_allclose([g["lr"] for g in optimizer.param_groups], [1e-2 * 0.5 ** 0.9, 1e-3 * 0.5 ** 0.9])
    before = [p.detach().clone() for p in net.parameters()]
    net["temporal"](net["encoder"](torch.randn(2, 4))).sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    optimizer.zero_grad()  # both halves: a stale AdamW gradient would be added to the next step's
    assert all(p.grad is None for p in net.parameters())
    state = optimizer.state_dict()
    fresh = HybridOptimizer([torch.optim.SGD(sgd_params, 1.0, momentum=0.99, nesterov=True),
                             torch.optim.AdamW(adam_params, 1.0)])
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ValueError, match="does not match"):
        fresh.load_state_dict(torch.optim.SGD(sgd_params, 1.0).state_dict())


def _lrs_of_a_run(scheduler, optimizer, epochs, iterations):
    """Per epoch: the rate at the epoch's start (what nnU-Net logs), then the rate each iteration trains at,
    stepping as nnU-Net and the DynTransNet trainer do."""
    lrs = []
    for epoch in epochs:
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[1]["lr"])
        for _ in range(iterations):
            scheduler.begin_iteration()
            lrs.append(optimizer.param_groups[1]["lr"])
    return lrs


def test_poly_with_linear_warmup_per_iteration_and_the_epoch_start_shows_the_first_rate():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-2},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    scheduler = PolyLRWithLinearWarmup(optimizer, max_steps=4, iterations_per_epoch=3, warmup_iterations=5)
    lrs = _lrs_of_a_run(scheduler, optimizer, range(4), 3)
    poly = [1e-3 * (1 - e / 4) ** 0.9 for e in range(4)]
    expected = []
    for epoch in range(4):
        rates = [poly[epoch] * min(1.0, (epoch * 3 + i + 1) / 5) for i in range(3)]
        expected += [rates[0]] + rates  # the epoch's start shows its first iteration's rate
    assert lrs == pytest.approx(expected)
    # the range the trainer logs: the last epoch stepped (3) is past the warm-up; epoch 1 spans iterations 3-5
    assert scheduler.epoch_warmup() is None
    scheduler.step(1)
    for _ in range(2):
        scheduler.begin_iteration()
    assert scheduler.epoch_warmup() == pytest.approx((10 * poly[1] * 4 / 5, 10 * poly[1]))  # group 0: SGD, 10x
    # each group from its own rate: the SGD group is ten times the AdamW one throughout
    assert optimizer.param_groups[0]["lr"] == pytest.approx(10 * optimizer.param_groups[1]["lr"])
    # --c: a new scheduler stepped at epoch 1 trains exactly as the uninterrupted run did from there
    resumed = PolyLRWithLinearWarmup(optimizer, max_steps=4, iterations_per_epoch=3, warmup_iterations=5)
    assert _lrs_of_a_run(resumed, optimizer, range(1, 4), 3) == pytest.approx(expected[4:])
    no_warmup = PolyLRWithLinearWarmup(optimizer, max_steps=4, iterations_per_epoch=3, warmup_iterations=0)
    assert _lrs_of_a_run(no_warmup, optimizer, [2], 2) == pytest.approx([poly[2]] * 3)
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        PolyLRWithLinearWarmup(optimizer, max_steps=4, iterations_per_epoch=0, warmup_iterations=5)


def test_warmup_cosine_schedule():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = WarmupCosineLRScheduler(optimizer, 1e-4, max_steps=120, warmup_steps=20)
    scheduler.step(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 / 20)
    scheduler.step(19)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    scheduler.step(70)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-4)
    scheduler.step(120)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _poisoned_trainer_and_batch(monkeypatch, tmp_path):
    """A tiny STD-Net trainer whose class term is NaN, initialised on the CPU, and one batch."""
    from nnunet_liver_ext.trainers.nnUNetTrainerSTDNet import nnUNetTrainerSTDNet
    from test_characterization_predictor import _trainer_plans

    class Poisoned(nnUNetTrainerSTDNet):
        def case_loss_terms(self, output, target, keys):
            terms = super().case_loss_terms(output, target, keys)
            terms["cls"] = terms["cls"] * float("nan")
            return terms

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    # a user's nnUNet_preprocessed makes nnU-Net's __init__ read the plans' data_identifier, which these lack
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    dataset_json = dict(DATASET_JSON, channel_names={"0": "CT", "1": "CT", "2": "CT"}, file_ending=".nii.gz")
    trainer = Poisoned(dict(_trainer_plans(dataset_json["labels"]), continue_training=False), "3d_fullres", 0,
                       dataset_json, device=torch.device("cpu"))
    # everything of nnU-Net's initialize() but its look at the (here absent) preprocessed folder
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.infer_dataset_class", lambda folder: None)
    trainer.initialize()
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 16, 32, 32)
    target[:, :, 4:8, 8:16, 8:16] = 2
    batch = {"data": torch.randn(2, 3, 16, 32, 32), "keys": ["a", "b"],
             "target": [target, target[:, :, ::2, ::2, ::2], target[:, :, ::4, ::4, ::4]]}
    return trainer, batch


def test_a_non_finite_loss_term_stops_training_naming_term_and_iteration(monkeypatch, tmp_path):
    """Without a grad scaler (CPU), a NaN in one case-level term stops the step before the optimizer sees it."""
    trainer, batch = _poisoned_trainer_and_batch(monkeypatch, tmp_path)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.iteration_in_epoch = 7
    with pytest.raises(FloatingPointError, match=r"'cls': nan.*epoch 0, iteration 7 \(cases \['a', 'b'\]\)"):
        trainer.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_with_a_grad_scaler_a_non_finite_step_is_skipped_until_too_many_in_a_row(monkeypatch, tmp_path):
    """nnU-Net's CUDA path: its grad scaler skips a step whose gradients are not finite, so one bad fp16 batch
    does not end a long run; the weights stay as they were, and max_non_finite_steps in a row stop it."""
    trainer, batch = _poisoned_trainer_and_batch(monkeypatch, tmp_path)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.train_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    assert trainer.grad_scaler.get_scale() == 512.0  # the scaler saw the non-finite gradients and skipped
    trainer.max_non_finite_steps = 3
    trainer.train_step(batch)
    with pytest.raises(FloatingPointError, match="3 steps in a row, stopped"):
        trainer.train_step(batch)


def test_curves_whose_length_is_not_the_channel_count_stop_training_at_once_without_a_phases_key(monkeypatch,
                                                                                                  tmp_path):
    """Without 'phases' the channels are the phases; 4-value curves on 3 channels used to fail in the first batch's
    torch.tensor, naming nothing."""
    from nnunet_liver_ext.trainers.nnUNetTrainerMTINet import nnUNetTrainerMTINet
    from test_characterization_predictor import _trainer_plans

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)  # as in _poisoned_trainer_and_batch
    labels = {"background": 0, "liver": 1, "tumor": 2}
    dataset_json = {"labels": labels, "channel_names": {"0": "T1", "1": "T1", "2": "T1"}, "file_ending": ".nii.gz",
                    "characterization": {"classes": ["A", "B"], "cases": {"a": 0, "b": 1}},
                    "enhancement": {"a": [1.0, 2.0, 3.0, 4.0], "b": [2.0, 2.0, 2.0, 2.0]}}
    with pytest.raises(ValueError, match=r"curves of 4 values, but without a 'phases' key the 3 input channels"):
        nnUNetTrainerMTINet(dict(_trainer_plans(labels), continue_training=False), "3d_fullres", 0, dataset_json,
                            device=torch.device("cpu"))


# ------------------------------------------------------------------ the shared train_step, on a real trainer
def test_stdnet_trains_attention_and_head_with_adamw_and_the_convolutions_with_nnunets_sgd(
        nnunet_folders):  # noqa: F811
    """Swapped halves or rates (SGD on the Transformer left it at chance, training/optim.py) would pass unseen."""
    trainer = make_trainer("nnUNetTrainerSTDNet")
    sgd, adamw = trainer.optimizer.optimizers
    assert (type(sgd), type(adamw)) == (torch.optim.SGD, torch.optim.AdamW)
    named = dict(trainer.network.named_parameters())
    adaptive = {n for n in named if n.startswith(("temporal.", "case_pool.", "cls_head."))}
    assert adaptive and any(n.startswith("cls_head.") for n in adaptive)
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    in_sgd = {id(p) for g in sgd.param_groups for p in g["params"]}
    assert in_adamw == {id(named[n]) for n in adaptive}
    assert in_sgd == {id(p) for n, p in named.items() if n not in adaptive}
    # nnU-Net's SGD (lr 1e-2, momentum 0.99, Nesterov) and AdamW at 1e-3
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 1e-3]
    assert sgd.defaults["momentum"] == 0.99 and sgd.defaults["nesterov"]


def test_class_term_counts_only_patches_that_show_the_lesion(nnunet_folders):  # noqa: F811
    """A patch without tumor voxels cannot show the lesion's class: trained on it, the head would learn the
    class from liver alone."""
    from nnunet_liver_ext.networks.contract import NetworkOutput

    trainer = make_trainer("nnUNetTrainerSTDNet")
    batch = make_batch(trainer)
    for t in batch["target"]:
        t[1][t[1] == 2] = 1  # sample "b": liver only
    cls_logits = torch.zeros(2, 2, requires_grad=True)
    terms = trainer.case_loss_terms(NetworkOutput(seg=batch["target"], cls_logits=cls_logits), batch["target"],
                                    batch["keys"])
    terms["cls"].backward()
    assert cls_logits.grad[0].abs().sum() > 0 and cls_logits.grad[1].abs().sum() == 0
    # uniform logits: cross-entropy ln 2 for sample "a" alone, weighted
    assert float(terms["cls"].detach()) == pytest.approx(trainer.loss_weights["cls"] * math.log(2), rel=1e-6)


def test_train_step_gives_the_heads_the_reference_tumor_and_reports_every_term(nnunet_folders,  # noqa: F811
                                                                            monkeypatch):
    """The heads learn from the reference lesion from the first iteration (guide_heads_with_reference_lesion),
    and the case-level terms reach the step's result, from which the epoch's log line is written."""
    trainer = make_trainer("nnUNetTrainerSTDNet")
    batch = make_batch(trainer)
    masks = []
    forward = trainer.network.forward

    def spy(x, heads=False, lesion_mask=None):
        masks.append(lesion_mask)
        return forward(x, heads=heads, lesion_mask=lesion_mask)

    monkeypatch.setattr(trainer.network, "forward", spy)
    result = trainer.train_step(batch)
    assert torch.equal(masks[0], (batch["target"][0] == 2).float())
    assert {"loss", "seg_loss", "cls_loss"} <= set(result)
    assert float(result["loss"]) == pytest.approx(float(result["seg_loss"]) + float(result["cls_loss"]), rel=1e-5)
    trainer.guide_heads_with_reference_lesion = False
    trainer.train_step(batch)
    assert masks[1] is None  # the network's own lesion probability, as in inference

