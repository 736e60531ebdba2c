"""DynTransNet end to end through stock nnU-Net's console scripts, on tiny phantom cases, on the CPU.

nnUNetv2_plan_and_preprocess -> nnunet-liver plan (CPU-demo plans) -> nnUNetv2_train -tr
nnUNetTrainerDynTransNet_tiny -> nnUNetv2_predict and nnunet-liver predict (segmentations only, no
CASE.json: DynTransNet has no case head); then the checkpoint is rebuilt and reloaded the way nnU-Net's
predictor does it.
"""
import json
import os

import pytest
import torch

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_helpers import CPU_DEMO_PLANS as PLANS
from nnunet_helpers import predict_held_out, tiny_trained_workspace

DATASET_ID = 920
TRAINER = "nnUNetTrainerDynTransNet_tiny"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_trained_workspace(tmp_path_factory.mktemp("nnunet"), DATASET_ID, "DynTransNetE2E", TRAINER,
                                  n_train=5, n_test=1, seed=4)


def test_training_writes_checkpoint_and_validation_without_case_outputs(workspace):
    fold = workspace["model"] / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    splits = json.loads((workspace["root"] / "pre" / workspace["dataset"].name / "splits_final.json").read_text())
    for case in splits[0]["val"]:
        assert (fold / "validation" / f"{case}.nii.gz").is_file()
        assert not (fold / "validation" / f"{case}.json").exists()
    assert (fold / "validation" / "summary.json").is_file()
    assert not (fold / "validation" / "characterization.csv").exists()
    log = workspace["train_log"]
    assert "Optimizer: AdamW (lr 0.001" in log and "gradient clipping at 1.0" in log
    plans = json.loads((workspace["model"] / "plans.json").read_text())
    assert plans["nnunet_liver_ext"]["case_heads"] == []


@pytest.mark.parametrize("command", ["nnUNetv2_predict", "nnunet-liver"])
def test_prediction_with_stock_and_package_predictor(workspace, command):
    out, cases = predict_held_out(command, workspace, DATASET_ID, TRAINER, PLANS)
    for case in cases:
        assert not (out / f"{case}.json").exists()
    assert not (out / "characterization.csv").exists()


def test_predicting_over_a_characterized_folder_leaves_no_stale_characterization(workspace):
    """The folder of an earlier run with case heads: DynTransNet's segmentations replace its cases, so their
    CASE.json files and table rows go (they described the old segmentations); another case's row stays."""
    images = workspace["dataset"] / "imagesTs"
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    out = workspace["root"] / "pred_over_characterized"
    out.mkdir()
    for case in cases:
        (out / f"{case}.json").write_text("{}")
    (out / "characterization.csv").write_text("case,predicted_class\n" + "".join(f"{c},HCC\n" for c in cases)
                                              + "other_case,cyst\n")
    predict_held_out("nnunet-liver", workspace, DATASET_ID, TRAINER, PLANS, out=out)
    assert not [case for case in cases if (out / f"{case}.json").exists()]
    assert (out / "characterization.csv").read_text().split() == ["case,predicted_class", "other_case,cyst"]


def test_checkpoint_rebuilds_and_reloads(workspace):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS_DIR))
    model = workspace["model"]
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    weights = checkpoint["network_weights"]
    assert any(".attn.delta." in k for k in weights) and any(k.startswith("decoder.fusions.") for k in weights)
    assert not any("cls_head" in k for k in weights)
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    configuration = plans.get_configuration("3d_fullres")
    trainer_class = recursive_find_trainer_class_by_name(TRAINER)
    network = trainer_class.build_network_architecture(plans, configuration, 3, 3, enable_deep_supervision=False)
    network.load_state_dict(weights, strict=True)
    assert tuple(network.features) == tuple(configuration.network_arch_init_kwargs["features_per_stage"])
    with torch.no_grad():
        out = network.eval()(torch.zeros(1, 3, *configuration.patch_size))
    assert out.shape == (1, 3, *configuration.patch_size)
