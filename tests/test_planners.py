"""The VRAM-aware planners of the four networks (trainer_plans/planners.py, trainer_plans/memory.py).

- every network's memory estimate grows with the patch size and with the number of phases (2d and 3d);
- the calibration is a measurement: the calibrated estimate of each network, taken at one patch,
  predicts the bytes autograd saves (bf16 autocast, CPU) at a larger patch within 15 %, relative to
  nnU-Net's U-Net;
- on a small phantom dataset (nnU-Net's fingerprint and planning API, in process) each planner writes
  ``nnUNetPlans_<Net>.json``; nnU-Net's PlansManager loads it, the method's trainer builds its network
  from it and trains two iterations on batches from nnU-Net's own data loader;
- a VRAM target decides patch and batch from the network's estimate: at the same small target the
  networks whose estimate is larger than the U-Net's get smaller patches than stock nnU-Net;
- a configuration a network cannot take is refused at planning time with a UserError naming the
  constraint and the patch size (DynTransNet with fewer than two stages, a Mamba2 head size that
  does not divide the block's width, channels that do not split evenly into the phases).
"""
import copy
import functools
import json
import re

import numpy as np
import pytest
import torch

from nnunet_liver_ext.errors import UserError
from nnunet_liver_ext.trainer_plans.memory import (build_network, bytes_per_element, calibration_factor,
                                                   predicted_gb)
from nnunet_liver_ext.trainer_plans.planners import PRESETS, NetworkPlanner, find_trainer_class

torch.set_num_threads(1)

NETWORK_PRESETS = ("stdnet", "dyntransnet", "mamba-codebook", "mti-net")
PHASE_NAMES = ("pre", "arterial", "portal_venous", "delayed")
DATASET_ID = 962


def unit_dataset_json(phases: int) -> dict:
    names = list(PHASE_NAMES[-phases:])
    return {"name": "PlannerUnit", "channel_names": {str(i): "CT" for i in range(phases)},
            "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 2, "file_ending": ".nii.gz",
            "phases": names, "characterization": {"classes": ["HCC", "cyst"], "cases": {"a": 0, "b": 1}},
            "enhancement": {"a": [100.0 + 50 * i for i in range(phases)], "b": [90.0] * phases}}


def arch_kwargs(dims: int, n_stages: int = 4) -> dict:
    """nnU-Net's default architecture kwargs (32 base features, 2 convolutions per stage), as plans store them."""
    strides = [[1] * dims] + ([[1, 2, 2]] if dims == 3 else [[2, 2]]) + [[2] * dims] * (n_stages - 2)
    return {"n_stages": n_stages, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(n_stages)],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": [[3] * dims] * n_stages,
            "strides": strides, "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def configuration(patch, n_stages: int = 4) -> dict:
    return NetworkPlanner.configuration_dict(patch, "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                             arch_kwargs(len(patch), n_stages),
                                             ["conv_op", "norm_op", "dropout_op", "nonlin"])


def trainer_of(preset: str) -> type:
    return find_trainer_class(PRESETS[preset].trainer_name)


@pytest.mark.parametrize("preset", NETWORK_PRESETS)
@pytest.mark.parametrize("patches", [[(16, 32, 32), (16, 64, 64), (32, 64, 64)], [(32, 32), (64, 64), (64, 128)]],
                         ids=["3d", "2d"])
def test_estimate_grows_with_patch_size_and_phases(preset, patches):
    trainer = trainer_of(preset)
    counts = np.array([[build_network(trainer, unit_dataset_json(n), configuration(p), n, 3)
                        .compute_conv_feature_map_size(list(p)) for n in (1, 2, 3, 4)] for p in patches])
    assert (np.diff(counts, axis=0) > 0).all(), f"not increasing with the patch size: {counts.tolist()}"
    assert (np.diff(counts, axis=1) > 0).all(), f"not increasing with the phases: {counts.tolist()}"


@pytest.mark.parametrize("preset", NETWORK_PRESETS)
def test_calibrated_estimate_predicts_saved_bytes_at_another_patch(preset):
    trainer = trainer_of(preset)
    data = unit_dataset_json(3)
    calibration = calibration_factor(trainer, data, configuration((16, 48, 48)), 3, 3)
    assert calibration["patch"] == [16, 48, 48]
    nnunet = find_trainer_class("nnUNetTrainer")
    larger = configuration((32, 64, 64))
    ours = bytes_per_element(build_network(trainer, data, larger, 3, 3, "cpu"), (32, 64, 64), 3, True)
    unet = bytes_per_element(build_network(nnunet, data, larger, 3, 3, "cpu"), (32, 64, 64), 3, False)
    assert ours / unet == pytest.approx(calibration["factor"], rel=0.15), (ours, unet, calibration)


def test_predicted_gb_is_nnunets_reference_scaling_in_elements_and_batch_size():
    """nnU-Net's ExperimentPlanner: 560e6 elements per sample at batch 2 (3d), 85e6 at batch 12 (2d) fill 8 GB;
    the GB grow with both, so a doubled batch needs twice the memory."""
    assert predicted_gb(560e6, 2, 3) == pytest.approx(8.0)
    assert predicted_gb(560e6, 4, 3) == pytest.approx(16.0)
    assert predicted_gb(280e6, 2, 3) == pytest.approx(4.0)
    assert predicted_gb(85e6, 24, 2) == pytest.approx(16.0)
    assert predicted_gb(100e6, 3, 3, reference=(100e6, 1, 24.0)) == pytest.approx(72.0)  # a ResEnc planner's own


# ------------------------------------------------------------------ planning a phantom dataset with nnU-Net's API
@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Five 3-phase phantom CT cases of 16x48x48 with nnU-Net's fingerprint, nnU-Net's own plans (preprocessed
    3d_fullres, which the network plans share) and every network's plans at nnU-Net's default 8 GB target."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiment_dataset,
                                                                      preprocess_dataset)

    from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw

    root = tmp_path_factory.mktemp("planners")
    with pytest.MonkeyPatch.context() as env:
        for name in ("raw", "pre", "res"):
            (root / name).mkdir()
        env.setenv("nnUNet_raw", str(root / "raw"))
        env.setenv("nnUNet_preprocessed", str(root / "pre"))
        env.setenv("nnUNet_results", str(root / "res"))
        config = PhantomConfig(shape=(16, 48, 48), n_lesions_range=(1, 2), p_no_lesion=0.0)
        dataset = write_nnunet_raw(root / "raw", DATASET_ID, "PlannerPhantom",
                                   generate_cases(5, config, seed=4, progress=False))
        extract_fingerprints([DATASET_ID], num_processes=1)
        plan_experiment_dataset(DATASET_ID, PRESETS["default"])
        preprocess_dataset(DATASET_ID, "nnUNetPlans", ["3d_fullres"], [1])
        plans = {preset: plan_experiment_dataset(DATASET_ID, PRESETS[preset])[1] for preset in NETWORK_PRESETS}
        yield {"root": root, "pre": root / "pre" / dataset.name, "plans": plans,
               "dataset_json": json.loads((dataset / "dataset.json").read_text())}


def load_plans(phantom, name: str) -> dict:
    return json.loads((phantom["pre"] / f"{name}.json").read_text())


@pytest.mark.parametrize("preset", NETWORK_PRESETS)
def test_planner_writes_plans_that_nnunet_loads_and_trains_with(phantom, preset, monkeypatch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = phantom["plans"][preset]
    assert name == f"nnUNetPlans_{PRESETS[preset].plans_suffix}"
    plans = load_plans(phantom, name)
    stock = load_plans(phantom, "nnUNetPlans")
    assert plans["experiment_planner_used"] == PRESETS[preset].__name__
    for config in ("2d", "3d_fullres"):
        planned = PlansManager(plans).get_configuration(config)
        # same spacing and normalisation as nnU-Net's plans: their preprocessed data are reused
        assert planned.data_identifier == f"nnUNetPlans_{config}"
        assert planned.spacing == stock["configurations"][config]["spacing"]
        estimate = plans["configurations"][config]["vram_estimate"]
        assert estimate["trainer"] == PRESETS[preset].trainer_name
        # nnU-Net's reference scaling: 8 GB for 560e6 elements at batch 2 (3d), 85e6 at batch 12 (2d)
        elements, reference_batch = {2: (85e6, 12), 3: (560e6, 2)}[len(planned.patch_size)]
        assert estimate["predicted_gb"] == pytest.approx(
            8 * estimate["estimate_per_sample"] * planned.batch_size / (elements * reference_batch), rel=1e-3)
        assert estimate["predicted_gb"] <= estimate["gpu_memory_target_gb"]

    train_two_iterations(phantom, plans, trainer_of(preset), monkeypatch)


def train_two_iterations(phantom, plans: dict, trainer_class: type, monkeypatch) -> None:
    """nnU-Net's trainer path: constructor, initialize(), nnU-Net's data loader (in this process), two train steps."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for var, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(phantom["root"] / folder))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    configuration_manager = PlansManager(plans).get_configuration("3d_fullres")
    torch.manual_seed(0)
    trainer = trainer_class(dict(copy.deepcopy(plans), continue_training=False), "3d_fullres", 0,
                            copy.deepcopy(phantom["dataset_json"]), torch.device("cpu"))
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    for _ in range(2):
        batch = next(loader)
        assert tuple(batch["data"].shape) == (configuration_manager.batch_size, 3, *configuration_manager.patch_size)
        result = trainer.train_step(batch)
        assert np.isfinite(result["loss"])


def _plan(phantom, planner, target: float, name: str) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    with pytest.MonkeyPatch.context() as env:
        for var, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
            env.setenv(var, str(phantom["root"] / folder))
        plans, _ = plan_experiment_dataset(DATASET_ID, planner, gpu_memory_target_in_gb=target,
                                           overwrite_plans_name=name)
    return plans["configurations"]["3d_fullres"]


def test_vram_target_sets_patch_and_batch_from_the_network_estimate(phantom):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    target = 0.03
    stock = _plan(phantom, ExperimentPlanner, target, "nnUNetPlans_small")
    voxels = {"stock": np.prod(stock["patch_size"]) * stock["batch_size"]}
    for preset in NETWORK_PRESETS:
        planned = _plan(phantom, PRESETS[preset], target, f"nnUNetPlans_{preset}_small")
        estimate = planned["vram_estimate"]
        voxels[preset] = np.prod(planned["patch_size"]) * planned["batch_size"]
        # the search stopped where the network's estimate fits the target at nnU-Net's minimum batch size
        assert predicted_gb(estimate["estimate_per_sample"], 2, 3) <= target
        if estimate["estimate_per_sample"] > 1.5 * estimate["plain_unet_feature_map_elements"]:
            assert voxels[preset] < voxels["stock"], (preset, planned["patch_size"], stock["patch_size"])
    assert voxels["stdnet"] < voxels["stock"] and voxels["mti-net"] < voxels["stock"], voxels


@pytest.mark.parametrize("size", ["L"])  # M: the next test
def test_network_planner_on_nnunets_residual_encoder_presets(phantom, size, monkeypatch, capsys):
    """``nnunet-liver plan --preset stdnet --resenc L``: nnU-Net's ResEnc L planning (ResidualEncoderUNet, its
    reference values and 24 GB target) with STD-Net's estimate, calibrated against that ResidualEncoderUNet;
    the plans reuse nnU-Net's preprocessed data (the command says there is nothing to preprocess), and STD-Net
    builds its residual encoder from them."""
    import warnings

    from nnunet_liver_ext.cli import main
    from nnunet_liver_ext.trainer_plans.planners import RESENC_PLANNERS, network_planner

    assert network_planner(PRESETS["stdnet"], size) is network_planner(PRESETS["stdnet"], size)  # one class per pair
    for var, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(phantom["root"] / folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["plan", "-d", str(DATASET_ID), "--preset", "stdnet", "--resenc", size]) == 0
    # the preset's own target: nnU-Net's planner does not warn of a non-standard gpu_memory_target_in_gb
    assert not [w for w in caught if "gpu_memory_target" in str(w.message)]
    name = f"nnUNetResEncUNet{size}Plans_STDNet"
    out = capsys.readouterr().out
    assert f"Train with: nnUNetv2_train {DATASET_ID} 3d_fullres FOLD -tr nnUNetTrainerSTDNet -p {name}" in out
    assert f"3d_fullres reads the preprocessed data in {phantom['pre'] / 'nnUNetPlans_3d_fullres'}, which is " \
           f"already there: nothing to preprocess for it" in out and "nnUNetv2_preprocess" not in out
    plans = load_plans(phantom, name)
    planned = plans["configurations"]["3d_fullres"]
    arch = planned["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet") and "n_blocks_per_stage" in arch["arch_kwargs"]
    assert planned["data_identifier"] == "nnUNetPlans_3d_fullres"
    estimate = planned["vram_estimate"]
    reference = RESENC_PLANNERS[size](DATASET_ID)
    assert estimate["gpu_memory_target_gb"] == {"M": 8, "L": 24}[size]
    assert estimate["reference"] == {"elements": reference.UNet_reference_val_3d, "batch_size": 2,
                                     "gb": reference.UNet_reference_val_corresp_GB}
    dims = len(planned["patch_size"])
    resenc_reference = (reference.UNet_reference_val_3d, 2, reference.UNet_reference_val_corresp_GB)
    assert estimate["predicted_gb"] == pytest.approx(
        predicted_gb(estimate["estimate_per_sample"], planned["batch_size"], dims, resenc_reference), rel=1e-3)
    assert estimate["plain_unet_feature_map_elements"] == int(unet_estimate(planned))
    # calibrated against the ResidualEncoderUNet of these plans, not the plain U-Net
    assert estimate["calibration"]["unet_bytes_per_element"] != pytest.approx(
        load_plans(phantom, "nnUNetPlans_STDNet")["configurations"]["3d_fullres"]["vram_estimate"]["calibration"][
            "unet_bytes_per_element"], rel=1e-3)
    # nnU-Net loads the plans and the trainer builds its network from them (training on ResEnc plans:
    # tests/test_resenc_plans.py)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(plans).get_configuration("3d_fullres")
    network = build_network(trainer_of("stdnet"), phantom["dataset_json"], plans["configurations"]["3d_fullres"], 3, 3)
    assert type(network).__name__ == estimate["network"] and configuration.batch_size == planned["batch_size"]
    assert type(network.encoder).__name__ == "ResidualEncoder"


def unet_estimate(configuration: dict) -> float:
    """nnU-Net's own estimate (the U-Net of the plans) at the configuration's patch."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    arch = configuration["architecture"]
    return ExperimentPlanner.static_estimate_VRAM_usage(configuration["patch_size"], 3, 3, arch["network_class_name"],
                                                        arch["arch_kwargs"], arch["_kw_requires_import"])


@pytest.mark.slow  # 16 s; the ResEnc-L planning test above keeps the residual-encoder presets in the fast suite
def test_a_small_target_on_resenc_gives_stdnet_less_than_nnunets_resenc(phantom):
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncM

    from nnunet_liver_ext.trainer_plans.planners import network_planner

    target = 0.04
    stock = _plan(phantom, nnUNetPlannerResEncM, target, "nnUNetResEncUNetMPlans_small")
    ours = _plan(phantom, network_planner(PRESETS["stdnet"], "M"), target, "nnUNetResEncUNetMPlans_STDNet_small")
    assert np.prod(ours["patch_size"]) * ours["batch_size"] < np.prod(stock["patch_size"]) * stock["batch_size"]


def test_dyntransnet_with_no_room_for_two_stages_is_refused(phantom):
    with pytest.raises(UserError) as refused:
        _plan(phantom, PRESETS["dyntransnet"], 0.001, "nnUNetPlans_refused")
    message = str(refused.value)
    assert "DynTransNet needs n_stages >= 2" in message and "at patch size [" in message, message
    assert not (phantom["pre"] / "nnUNetPlans_refused.json").exists()


def test_a_one_stage_configuration_is_refused_naming_it(phantom):
    """STD-Net builds with one stage, but then has no decoder and so no segmentation output: what nnU-Net's search
    reaches shrinking the patch is refused, not planned."""
    with pytest.MonkeyPatch.context() as env:
        for var, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
            env.setenv(var, str(phantom["root"] / folder))
        planner = PRESETS["stdnet"](DATASET_ID)
    one_stage = configuration((16, 32, 32), n_stages=1)
    one_stage["architecture"]["arch_kwargs"].update(strides=[[1, 1, 1]], n_conv_per_stage_decoder=[])
    with pytest.raises(UserError, match=r"n_stages 1.*leaves one stage"):
        planner.build_checked(one_stage, 3, 3)


def test_a_vram_target_no_patch_fits_is_refused_naming_the_target(phantom):
    """STD-Net's per-case parts keep its estimate above a tiny target at any patch: nnU-Net's search shrinks the
    patch to one stage and then to an empty axis (a ZeroDivisionError inside nnU-Net before)."""
    with pytest.raises(UserError) as refused:
        _plan(phantom, PRESETS["stdnet"], 1e-5, "nnUNetPlans_refused")
    message = str(refused.value)
    assert "VRAM target 1e-05 GB" in message and "at patch size [" in message, message
    assert not (phantom["pre"] / "nnUNetPlans_refused.json").exists()


def test_a_variant_plans_under_its_own_name_and_another_spacing_gets_its_own_data(phantom):
    """A variant's plans must not replace the main trainer's (same default name before); plans at a spacing
    other than nnU-Net's must not preprocess into nnU-Net's own 3d_fullres folder."""
    with pytest.MonkeyPatch.context() as env:
        for var, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
            env.setenv(var, str(phantom["root"] / folder))
        variant = PRESETS["stdnet"](DATASET_ID, trainer="nnUNetTrainerSTDNet_noWeightSharing")
    assert variant.plans_identifier == "nnUNetPlans_STDNet_noWeightSharing"
    assert PRESETS["stdnet"].suffix_for(trainer_of("stdnet")) == "STDNet"  # the main trainer's: nnUNetPlans_STDNet
    assert variant.generate_data_identifier("3d_fullres") == "nnUNetPlans_3d_fullres"
    variant.overwrite_target_spacing, variant.plans_identifier = [1.0, 1.0, 1.0], "P1mm"  # as __init__ sets them
    assert variant.generate_data_identifier("3d_fullres") == "P1mm_3d_fullres"


def test_preprocess_leaves_the_data_shared_with_nnunets_plans_alone_and_refuses_conflicting_plans(
        phantom, monkeypatch, capsys, tmp_path):
    """``plan --preset stdnet --preprocess`` on a dataset whose nnU-Net 3d_fullres data is complete: nnU-Net's
    preprocessing would delete that folder (under any stock training reading it) and make the same data again, so it
    is left alone; an interrupted folder counts as missing. Other plans that claim the folder with another spacing
    (nnU-Net's -overwrite_target_spacing without a plans name of its own) are a UserError naming them."""
    from nnunet_liver_ext.cli import main
    from nnunet_liver_ext.trainer_plans.cli import _data_folder_complete

    for var, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(phantom["root"] / folder))
    shared = phantom["pre"] / "nnUNetPlans_3d_fullres"
    before = {f.name: f.stat().st_ino for f in shared.iterdir()}
    custom = load_plans(phantom, "nnUNetPlans")
    custom["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    conflicting = phantom["pre"] / "nnUNetPlans_custom.json"
    conflicting.write_text(json.dumps(custom))
    try:
        assert main(["plan", "-d", str(DATASET_ID), "--preset", "stdnet", "--preprocess", "-np", "1"]) == 1
    finally:
        conflicting.unlink()
    assert re.search(r"nnUNetPlans_STDNet 3d_fullres reads .*nnUNetPlans_3d_fullres, which nnUNetPlans_custom.json "
                     r"writes with other preprocessing \(spacing: \[2.0, 2.0, 2.0\] there", capsys.readouterr().err)
    assert main(["plan", "-d", str(DATASET_ID), "--preset", "stdnet", "--preprocess", "-np", "1"]) == 0
    assert "already complete: not preprocessed again" in capsys.readouterr().out
    assert {f.name: f.stat().st_ino for f in shared.iterdir()} == before  # not one file written again
    # a configuration these plans do not have: nnU-Net's preprocessing printed "Skipping" and succeeded
    assert main(["plan", "-d", str(DATASET_ID), "--preset", "stdnet", "--preprocess", "-c", "3d_lowres"]) == 1
    assert "-c 3d_lowres: nnUNetPlans_STDNet has no such configuration (it has 2d, 3d_fullres" in \
        capsys.readouterr().err

    # -c 3d_cascade_fullres: nnU-Net preprocesses it into the folder it inherits from 3d_fullres
    from nnunet_liver_ext.trainer_plans.cli import _data_identifier
    cascade = load_plans(phantom, "nnUNetPlans_STDNet")
    cascade["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert _data_identifier(cascade, "nnUNetPlans_STDNet", "3d_cascade_fullres") == "nnUNetPlans_3d_fullres"

    partial = tmp_path / "nnUNetPlans_3d_fullres"
    partial.mkdir()
    for f in shared.glob("*.pkl"):
        (partial / f.name).write_bytes(f.read_bytes())
    assert _data_folder_complete(partial, phantom["pre"].name)
    next(partial.glob("*.pkl")).unlink()
    assert not _data_folder_complete(partial, phantom["pre"].name)


def test_mamba_head_size_that_does_not_divide_the_width_is_refused(phantom):
    base = trainer_of("mamba-codebook")
    # mamba_ssm's default head size 64 does not divide 2 x 48 (the width of a 48-feature bottleneck)
    variant = type("nnUNetTrainerMambaCodebook_headdim64", (base,), {
        "network_kwargs": {**base.network_kwargs, "headdim": 64, "stage_features": (12, 24, 48)}})
    with pytest.raises(UserError) as refused:
        _plan(phantom, functools.partial(PRESETS["mamba-codebook"], trainer=variant), 8, "nnUNetPlans_refused")
    message = str(refused.value)
    assert "must be divisible by headdim (64)" in message and "at patch size [" in message, message


@pytest.mark.parametrize("preset", ["stdnet", "mti-net"])
def test_channels_that_do_not_split_into_the_phases_are_refused_when_the_network_is_built(preset):
    """What the planners build at every patch they try: 3 channels named as 2 phases stop the build with the
    reason (4 channels would be 2 phases of 2 channels, tests/test_channels_per_phase.py)."""
    dataset_json = dict(unit_dataset_json(3), phases=["arterial", "portal_venous"],
                        enhancement={"a": [100.0, 150.0], "b": [90.0, 90.0]})
    with pytest.raises(ValueError, match=r"3 image channels cannot be split into the 2 phases"):
        build_network(trainer_of(preset), dataset_json, configuration((16, 32, 32)), 3, 3, "meta")
    two_by_two = dict(dataset_json, channel_names={str(i): "MR" for i in range(4)})
    network = build_network(trainer_of(preset), two_by_two, configuration((16, 32, 32)), 4, 3, "meta")
    assert (network.num_phases, network.channels_per_phase) == (2, 2)


def test_the_calibration_patch_halves_the_axis_with_the_most_bottleneck_voxels_down_to_two():
    """Guards against the calibration patch shrinking the wrong axis or below a bottleneck of 2 voxels, where the
    per-sample parts of a network weigh more and the calibration factor drifts."""
    from nnunet_liver_ext.trainer_plans.memory import calibration_patch

    isotropic = dict(strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, kernel_sizes=[[3, 3, 3]] * 6)  # total stride 32
    assert calibration_patch((128, 128, 128), isotropic) == (64, 64, 64)
    anisotropic = dict(strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                       kernel_sizes=[[3, 3, 3]] * 6)  # total stride (8, 32, 32)
    assert calibration_patch((40, 224, 192), anisotropic) == (16, 96, 96)
