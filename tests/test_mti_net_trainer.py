"""MTI-Net's trainers as nnU-Net trainer objects, in process and fast: tiny plans (as nnU-Net writes them)
and a synthetic batch in nnU-Net's layout, so the real ``__init__``, ``initialize``, ``configure_optimizers``,
loss, ``train_step``, ``save_checkpoint`` and ``load_checkpoint`` run without a data pipeline.

- the generator step leaves the discriminator's weights alone, the discriminator step the generator's;
- a checkpoint round trip restores the discriminator and its Adam state (what ``--c`` does);
- every trainer variant trains three alternating steps with its network wrapped in DDP as nnU-Net wraps
  it (no ``find_unused_parameters``; gloo, one process): every generator parameter has a gradient after
  each generator step, and the discriminator trains.
"""
import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_liver_ext.paths import TRAINERS_DIR

torch.set_num_threads(1)

PHASES = ["pre", "arterial", "portal_venous", "delay"]
PATCH = (16, 32, 32)
PLANS = {
    "dataset_name": "Dataset943_MTINetUnit", "plans_name": "nnUNetPlans_Unit",
    "original_median_spacing_after_transp": [2.0, 1.0, 1.0], "original_median_shape_after_transp": [16, 32, 32],
    "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {str(c): {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0,
                                                             "percentile_00_5": 0.0, "percentile_99_5": 1.0,
                                                             "std": 1.0} for c in range(4)},
    "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_Unit_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(PATCH), "median_image_size_in_voxels": [16, 32, 32],
        "spacing": [2.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"] * 4,
        "use_mask_for_norm": [False] * 4, "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}},
}
DATASET_JSON = {
    "name": "MTINetUnit", "channel_names": {str(c): "T1" for c in range(4)},
    "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 3, "file_ending": ".nii.gz",
    "phases": PHASES,
    "characterization": {"classes": ["HCC", "hemangioma"], "cases": {"a": 0, "b": 1, "c": 0}},
    "enhancement": {"a": [300.0, 700.0, 650.0, 500.0], "b": [300.0, 400.0, 600.0, 800.0], "c": [250.0, 650.0, 600.0, 420.0]},
}
VARIANTS = ["nnUNetTrainerMTINet", "nnUNetTrainerMTINet_paper", "nnUNetTrainerMTINet_noMdIEF",
            "nnUNetTrainerMTINet_noSpectral", "nnUNetTrainerMTINet_noSpatial", "nnUNetTrainerMTINet_noTIM",
            "nnUNetTrainerMTINet_noTDD", "nnUNetTrainerMTINet_segOnly", "nnUNetTrainerMTINet_segReg",
            "nnUNetTrainerMTINet_segCls", "nnUNetTrainerMTINet_noWeightSharing"]


@pytest.fixture(scope="module")
def nnunet_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mti_trainer")
    preprocessed = root / "pre" / PLANS["dataset_name"] / "nnUNetPlans_Unit_3d_fullres"
    preprocessed.mkdir(parents=True)
    (preprocessed / "a.b2nd").touch()  # initialize() infers the dataset class from the file ending; never read
    saved = {k: os.environ.get(k) for k in ("nnUNet_preprocessed", "nnUNet_results", "nnUNet_raw", "nnUNet_extTrainer")}
    os.environ.update(nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"),
                      nnUNet_raw=str(root / "raw"), nnUNet_extTrainer=str(TRAINERS_DIR))
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_trainer(name: str, dataset_json: dict = DATASET_JSON, continue_training: bool = False, plans: dict = PLANS,
                 configuration: str = "3d_fullres"):
    """As nnunetv2.run.run_training.get_trainer_from_args builds it, then initialize()."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    torch.manual_seed(0)
    plans = dict(copy.deepcopy(plans), continue_training=continue_training)
    trainer = recursive_find_trainer_class_by_name(name)(plans, configuration, 0, copy.deepcopy(dataset_json),
                                                         torch.device("cpu"))
    trainer.initialize()
    return trainer


def catalogue_trainers() -> list:
    """Every method trainer and variant of the package (the catalogue's), so tests over all trainers cover a
    method added later without being edited."""
    from nnunet_liver_ext.catalogue import load_catalogue

    catalogue = load_catalogue()
    assert not catalogue.errors, catalogue.errors
    return [e.name for e in catalogue.bases()]


def make_batch(trainer, keys=("a", "b")) -> dict:
    """A batch as nnU-Net's loader gives it: data (B, 4, *patch), the deep-supervision targets, case keys."""
    torch.manual_seed(1)
    label = torch.zeros(len(keys), 1, *PATCH)
    label[:, :, 2:14, 4:28, 4:28] = 1
    label[:, :, 5:11, 10:20, 10:20] = 2
    data = torch.randn(len(keys), 4, *PATCH) + label * torch.tensor([0.5, 2.0, 1.5, 1.0]).view(1, 4, 1, 1, 1)
    targets = [F.interpolate(label, size=[round(p * s) for p, s in zip(PATCH, scale)], mode="nearest")
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets, "keys": list(keys)}


def split(network):
    named = dict(network.named_parameters())
    return ({n: p for n, p in named.items() if not n.startswith("discriminator.")},
            {n: p for n, p in named.items() if n.startswith("discriminator.")})


def snapshot(params: dict) -> dict:
    return {n: p.detach().clone() for n, p in params.items()}


def changed(a: dict, b: dict) -> list:
    return [n for n in a if not torch.equal(a[n], b[n])]


def test_generator_step_leaves_the_discriminator_and_discriminator_step_the_generator(nnunet_folders):
    trainer = make_trainer("nnUNetTrainerMTINet")
    generator, discriminator = split(trainer.network)
    assert discriminator and trainer.discriminator_optimizer is trainer.optimizer.optimizers[-1]
    before_g, before_d = snapshot(generator), snapshot(discriminator)
    seen = {}
    update = trainer._discriminator_update

    def spy(disc, pairs):
        seen.update(g=snapshot(generator), d=snapshot(discriminator), kept=int(pairs["mask"].sum()))
        return update(disc, pairs)

    trainer._discriminator_update = spy
    result = trainer.train_step(make_batch(trainer))
    after_g, after_d = snapshot(generator), snapshot(discriminator)
    assert seen["kept"] == 2
    assert not changed(before_d, seen["d"]), "the generator step changed the discriminator"
    # coarsest deep-supervision output: nnU-Net gives it loss weight 0 outside DDP, so it has no gradient
    frozen = [n for n in generator if n not in changed(before_g, seen["g"])]
    assert all(n.startswith("decoder.seg_layers.0.") for n in frozen), frozen
    assert not changed(seen["g"], after_g), "the discriminator step changed the generator"
    assert len(changed(seen["d"], after_d)) == len(discriminator), "the discriminator step left some of it alone"
    assert {"seg_loss", "cls_loss", "curve_loss", "tim_loss", "adv_loss", "disc_loss"} <= set(result)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in result.values())


@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "grad-scaler"])
def test_generator_step_clips_at_the_trainers_norm_without_the_discriminator(nnunet_folders, monkeypatch, scaler):
    """The generator's update is the shared one (clipping at ``grad_clip_norm``, not a fixed 12), with the
    discriminator's gradients dropped before the norm is taken."""
    trainer = make_trainer("nnUNetTrainerMTINet")
    trainer.grad_clip_norm = 3.0
    if scaler:
        trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    _, discriminator = split(trainer.network)
    clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def spy(parameters, max_norm, *args, **kwargs):
        seen.append((max_norm, sum(p.grad is not None for p in discriminator.values())))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer.train_step(make_batch(trainer))
    assert seen == [(3.0, 0)]


def test_a_non_finite_step_under_the_grad_scaler_leaves_generator_and_discriminator_alone(nnunet_folders):
    """nnU-Net's grad scaler skips the generator's non-finite step; the discriminator's step, which has no
    scaler, is not taken on those pairs."""
    trainer = make_trainer("nnUNetTrainerMTINet")
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    case_loss_terms = trainer.case_loss_terms
    trainer.case_loss_terms = lambda *args: {k: v * float("nan") if k == "curve" else v
                                             for k, v in case_loss_terms(*args).items()}
    before = snapshot(dict(trainer.network.named_parameters()))
    result = trainer.train_step(make_batch(trainer))
    assert not changed(before, snapshot(dict(trainer.network.named_parameters())))
    assert np.isnan(result["disc_loss"]) and trainer.grad_scaler.get_scale() == 512.0


def test_loss_weights_scale_their_terms(nnunet_folders):
    trainer = make_trainer("nnUNetTrainerMTINet")
    trainer.network.eval()  # no dropout: the same outputs for both steps
    batch = make_batch(trainer)
    state = copy.deepcopy(trainer.network.state_dict())
    base = trainer.train_step(batch)
    trainer.network.load_state_dict(state)
    trainer.loss_weights = {**trainer.loss_weights, "tim": 2 * trainer.loss_weights["tim"],
                            "adv": 3 * trainer.loss_weights["adv"]}
    doubled = trainer.train_step(batch)
    assert float(doubled["tim_loss"]) == pytest.approx(2 * float(base["tim_loss"]), rel=1e-4)
    assert float(doubled["adv_loss"]) == pytest.approx(3 * float(base["adv_loss"]), rel=1e-4)
    assert float(base["tim_loss"]) > 0


def test_curve_term_counts_only_patches_that_show_the_lesion(nnunet_folders):
    """The curve is the lesion's enhancement: a patch without tumor voxels cannot show it, so, like the class
    term, the curve term leaves such a sample out (its curve head output gets no gradient from it)."""
    from nnunet_liver_ext.networks.contract import NetworkOutput
    from nnunet_liver_ext.training.plans import liver_ext_block

    trainer = make_trainer("nnUNetTrainerMTINet")
    batch = make_batch(trainer)
    for t in batch["target"]:
        t[1][t[1] == 2] = 1  # sample "b": liver only
    curve = torch.zeros(2, 4, requires_grad=True)
    terms = trainer.case_loss_terms(NetworkOutput(seg=batch["target"], curve=curve), batch["target"], batch["keys"])
    terms["curve"].backward()
    assert curve.grad[0].abs().sum() > 0 and curve.grad[1].abs().sum() == 0
    # standardised with the mean and SD of every curve value of dataset.json, computed here, not read back from
    # the plans the trainer wrote (where a wrong SD would hide in both sides)
    values = np.array(list(DATASET_JSON["enhancement"].values()))
    mean, std = values.mean(), values.std()
    assert liver_ext_block(trainer.plans_manager.plans)["enhancement_stats"] == pytest.approx([mean, std])
    expected = (torch.tensor(DATASET_JSON["enhancement"]["a"]) - mean) / std
    assert float(terms["curve"]) == pytest.approx(trainer.loss_weights["curve"] * float(expected.abs().mean()), rel=1e-5)
    for t in batch["target"]:
        t[0][t[0] == 2] = 1  # no sample shows the lesion: a graph-connected zero
    curve.grad = None
    terms = trainer.case_loss_terms(NetworkOutput(seg=batch["target"], curve=curve), batch["target"], batch["keys"])
    assert float(terms["curve"]) == 0.0
    terms["curve"].backward()
    assert curve.grad.abs().sum() == 0


def test_tim_loss_is_zero_for_a_perfect_prediction_and_not_for_a_wrong_one(nnunet_folders):
    from nnunet_liver_ext.networks.contract import NetworkOutput

    trainer = make_trainer("nnUNetTrainerMTINet")
    batch = make_batch(trainer)
    tumor = batch["target"][0] == 2
    perfect = torch.where(tumor, 50.0, -50.0).float()
    logits = torch.cat((torch.zeros_like(perfect), torch.zeros_like(perfect), perfect), 1)
    assert float(trainer.tim_loss(batch["data"], NetworkOutput(seg=[logits]), tumor)) < 1e-4
    shifted = torch.roll(logits, shifts=8, dims=-1)
    assert float(trainer.tim_loss(batch["data"], NetworkOutput(seg=[shifted]), tumor)) > 0.1


def test_checkpoint_round_trip_restores_the_discriminator_and_its_adam(nnunet_folders, tmp_path):
    trainer = make_trainer("nnUNetTrainerMTINet")
    for _ in range(2):
        trainer.train_step(make_batch(trainer))
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    restored = make_trainer("nnUNetTrainerMTINet", continue_training=True)
    _, fresh_d = split(restored.network)
    _, trained_d = split(trainer.network)
    assert changed(snapshot(trained_d), snapshot(fresh_d)), "a fresh discriminator should differ from a trained one"
    restored.load_checkpoint(path)  # what nnUNetv2_train --c does
    _, restored_d = split(restored.network)
    assert not changed(snapshot(trained_d), snapshot(restored_d))
    saved, loaded = trainer.discriminator_optimizer.state_dict(), restored.discriminator_optimizer.state_dict()
    assert len(saved["state"]) == len(trained_d) and saved["state"].keys() == loaded["state"].keys()
    for index, state in saved["state"].items():
        assert float(state["step"]) == 2.0
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(state[key]), torch.as_tensor(loaded["state"][index][key])), key
    # the generator's optimizers come back too, and training goes on
    assert restored.optimizer.state_dict()["hybrid"][0]["state"].keys() == \
        trainer.optimizer.state_dict()["hybrid"][0]["state"].keys()
    restored.train_step(make_batch(restored))


class GlooGroup:
    """A one-process gloo group around one test (torch allows one default group at a time)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)

    def close(self):
        dist.destroy_process_group()


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_trains_under_ddp_without_unused_parameters(nnunet_folders, name):
    """nnU-Net wraps the network in DDP without find_unused_parameters: a parameter without a gradient
    in one step fails the next forward. A one-process gloo group reproduces that."""
    trainer = make_trainer(name)  # constructed before the group exists: nnU-Net would pick cuda under DDP
    group = GlooGroup()
    try:
        generator, discriminator = split(trainer.network)
        # as nnUNetTrainer.initialize does under DDP: coarsest deep-supervision weight 1e-6 instead of 0
        trainer.is_ddp = True
        trainer.loss = trainer._build_loss()
        trainer.network = DDP(trainer.network)
        without_gradient = []
        generator_update = trainer._generator_update

        def spy(loss, disc):
            generator_update(loss, disc)
            without_gradient.extend(n for n, p in generator.items() if p.grad is None)

        trainer._generator_update = spy
        before_d = snapshot(discriminator)
        for iteration in range(3):
            result = trainer.train_step(make_batch(trainer))
        assert not without_gradient, sorted(set(without_gradient))
        assert len(changed(before_d, snapshot(discriminator))) == len(discriminator)
        network = trainer.network.module
        expect_curve = name not in ("nnUNetTrainerMTINet_segOnly", "nnUNetTrainerMTINet_segCls")
        expect_cls = name not in ("nnUNetTrainerMTINet_segOnly", "nnUNetTrainerMTINet_segReg")
        expect_tdd = expect_curve and expect_cls and name != "nnUNetTrainerMTINet_noTDD"
        assert (network.curve_head is not None) == expect_curve
        assert (network.cls_head is not None) == expect_cls
        assert (network.discriminator is not None) == expect_tdd
        assert ("disc_loss" in result) == expect_tdd and ("adv_loss" in result) == expect_tdd
        assert ("tim_loss" in result) == (trainer.loss_weights["tim"] > 0)
        if name == "nnUNetTrainerMTINet_paper":
            assert [type(o).__name__ for o in trainer.optimizer.optimizers] == ["Adam", "Adam"]
            assert trainer.optimizer.param_groups[0]["lr"] == 1e-4
    finally:
        group.close()


def test_ddp_reports_a_parameter_left_without_gradient(nnunet_folders):
    """The check above can fail: with the coarsest deep-supervision output at loss weight 0 (nnU-Net's
    non-DDP setting), its parameters get no gradient and the DDP-wrapped network fails within 3 steps."""
    trainer = make_trainer("nnUNetTrainerMTINet_segOnly")
    group = GlooGroup()
    try:
        trainer.network = DDP(trainer.network)
        with pytest.raises(RuntimeError, match="(?i)reduction|unused|ready"):
            for _ in range(3):
                trainer.train_step(make_batch(trainer))
    finally:
        group.close()


@pytest.mark.parametrize("name,missing", [("nnUNetTrainerMTINet", "characterization"),
                                          ("nnUNetTrainerMTINet_segReg", "enhancement")])
def test_datasets_without_the_required_keys_are_refused(nnunet_folders, name, missing):
    dataset_json = {k: v for k, v in DATASET_JSON.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        make_trainer(name, dataset_json)
