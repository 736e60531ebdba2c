"""nnU-Net's cascade end to end with the multiphase methods, through nnU-Net's and our console scripts.

nnU-Net plans a cascade (3d_lowres, then 3d_cascade_fullres fed with the low-resolution segmentation)
where the full-resolution patch sees little of the median image, as on LiTS. Here a small VRAM target
makes the network planners plan one for the tiny phantom: ``nnunet-liver plan --gpu-memory-target 0.1``
-> five 3d_lowres folds (their validation writes the next stage's input) -> the 3d_cascade_fullres fold
-> prediction of both stages with ``nnUNetv2_predict`` and ``nnunet-liver predict``.
The in-process tests of every trainer are tests/test_cascade.py.
"""
import json

import pytest
import torch

from nnunet_helpers import nnunet_env, predict_held_out, run, train, write_tiny_phantom_dataset

pytestmark = pytest.mark.slow

DATASET_ID = 925
PHASES = 3  # the phantom's arterial, portal venous and delayed CT
FOREGROUND_LABELS = 2  # liver, tumor: the previous stage's one-hot channels
METHODS = {"stdnet": ("nnUNetTrainerSTDNet_tiny", "nnUNetPlans_STDNet"),
           "mti-net": ("nnUNetTrainerMTINet_tiny", "nnUNetPlans_MTINet")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    env = nnunet_env(root)
    dataset = write_tiny_phantom_dataset(root, DATASET_ID, "CascadeE2E", n_train=6, n_test=2, seed=3)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-np", "1", "-npfp", "1", "--no_pp",
         "--verify_dataset_integrity"], env, root)
    plan_log = run(["nnunet-liver", "plan", "-d", str(DATASET_ID), "--preset", *METHODS, "--gpu-memory-target", "0.1",
                    "--preprocess", "-c", "3d_lowres", "3d_fullres", "-np", "1"], env, root)
    return {"root": root, "env": env, "dataset": dataset, "plan_log": plan_log}


@pytest.fixture(scope="module", params=list(METHODS))
def cascade(request, workspace):
    trainer, plans = METHODS[request.param]
    root, env = workspace["root"], workspace["env"]
    for fold in range(5):
        train(DATASET_ID, fold, trainer, plans, env, root, configuration="3d_lowres")
    log = train(DATASET_ID, 0, trainer, plans, env, root, configuration="3d_cascade_fullres")
    results = root / "res" / workspace["dataset"].name
    return dict(workspace, trainer=trainer, plans=plans, log=log,
                lowres=results / f"{trainer}__{plans}__3d_lowres",
                model=results / f"{trainer}__{plans}__3d_cascade_fullres")


def test_the_network_planners_plan_nnunets_cascade_and_say_how_to_train_it(workspace):
    for trainer, plans in METHODS.values():
        configurations = json.loads((workspace["root"] / "pre" / workspace["dataset"].name / f"{plans}.json")
                                    .read_text())["configurations"]
        assert configurations["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
        assert configurations["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
        assert f"These plans also have nnU-Net's cascade: nnUNetv2_train {DATASET_ID} 3d_lowres FOLD -tr " \
               f"{trainer.removesuffix('_tiny')} -p {plans} for all five folds" in workspace["plan_log"]


def test_the_cascade_trains_on_the_low_resolution_segmentations_with_every_phase(cascade):
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (cascade["dataset"] / "imagesTr").glob("*_0000.nii.gz"))
    next_stage = cascade["lowres"] / "predicted_next_stage" / "3d_cascade_fullres"
    assert sorted(p.name.split(".")[0] for p in next_stage.iterdir() if p.suffix == ".b2nd") == cases
    assert "Cascade: the 3d_lowres stage's segmentation (2 one-hot channels after the images) is encoded together " \
           "with every phase image" in cascade["log"]
    fold = cascade["model"] / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    # the shared encoder sees one phase image and the previous stage's segmentation; the phases stay three
    assert weights["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1 + FOREGROUND_LABELS
    if "phase_fusions.0.phase_bias" in weights:
        assert weights["phase_fusions.0.phase_bias"].shape == (PHASES,)
    else:
        mixed = weights["phase_concat.0.conv.weight"]
        assert mixed.shape[1] == PHASES * mixed.shape[0]
    val_cases = json.loads((cascade["root"] / "pre" / cascade["dataset"].name / "splits_final.json")
                           .read_text())[0]["val"]
    for case in val_cases:  # the validation's CASE.json, predicted from images and the previous stage
        result = json.loads((fold / "validation" / f"{case}.json").read_text())
        assert abs(sum(result["probabilities"]) - 1) < 1e-5


@pytest.mark.parametrize("command", ["nnUNetv2_predict", "nnunet-liver"])
def test_both_stages_predict_with_stock_and_characterization_predictor(cascade, command):
    name = cascade["trainer"]
    lowres, _ = predict_held_out(command, cascade, DATASET_ID, name, cascade["plans"], configuration="3d_lowres",
                                 out=cascade["root"] / f"pred_{name}_{command}_lowres")
    out, cases = predict_held_out(command, cascade, DATASET_ID, name, cascade["plans"],
                                  configuration="3d_cascade_fullres", out=cascade["root"] / f"pred_{name}_{command}",
                                  extra=["-prev_stage_predictions", lowres])
    for case in cases:
        assert (out / f"{case}.json").is_file() == (command == "nnunet-liver")
