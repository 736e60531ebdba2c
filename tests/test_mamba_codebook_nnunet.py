"""The Mamba-codebook U-Net end to end through stock nnU-Net's console scripts, on tiny phantom cases, on
the CPU.

nnUNetv2_plan_and_preprocess -> nnunet-liver plan (CPU-demo plans) -> nnUNetv2_train -tr
nnUNetTrainerMambaCodebook_tiny -> nnUNetv2_predict and nnunet-liver predict; then the checkpoint is
rebuilt and reloaded the way nnU-Net's predictor does it.
"""
import json
import os

import pytest
import torch

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_helpers import CPU_DEMO_PLANS as PLANS
from nnunet_helpers import predict_held_out, tiny_trained_workspace

DATASET_ID = 930
TRAINER = "nnUNetTrainerMambaCodebook_tiny"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_trained_workspace(tmp_path_factory.mktemp("nnunet"), DATASET_ID, "MambaCodebookE2E", TRAINER,
                                  n_train=6, n_test=2, seed=5)


def test_training_logs_losses_backend_and_codebook_usage(workspace):
    fold = workspace["model"] / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = workspace["train_log"]
    assert "Inclusion loss: on, weight 0.6, liver / tumor label output channels (1, 2)" in log
    assert "GFR Mamba2 block backend: torch (chunked SSD in PyTorch; CPU input)" in log
    terms = next(line for line in log.splitlines() if "train terms (weighted):" in line)
    assert "vq_loss" in terms and "inc_loss" in terms and "cls_loss" not in terms
    usage = next(line for line in log.splitlines() if "codebook usage: perplexity" in line)
    assert "of 64 codes" in usage
    assert "AdamW" in log and "'gfr.', 'codebook.'" in log
    splits = json.loads((workspace["root"] / "pre" / workspace["dataset"].name / "splits_final.json").read_text())
    for case in splits[0]["val"]:
        assert (fold / "validation" / f"{case}.nii.gz").is_file()
        assert not (fold / "validation" / f"{case}.json").exists()  # segmentation only


@pytest.mark.parametrize("command", ["nnUNetv2_predict", "nnunet-liver"])
def test_prediction_with_stock_and_package_predictor(workspace, command):
    out, cases = predict_held_out(command, workspace, DATASET_ID, TRAINER, PLANS)
    for case in cases:
        assert not (out / f"{case}.json").exists()


def test_checkpoint_rebuilds_and_reloads(workspace):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS_DIR))
    model = workspace["model"]
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    weights = checkpoint["network_weights"]
    for key in ("codebook.codes", "codebook.initialized", "gfr.mixer.A_log", "gfr.mixer.in_proj.weight",
                "mce.0.fuse.0.weight"):
        assert key in weights, key
    assert bool(weights["codebook.initialized"])
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    assert plans.plans["nnunet_liver_ext"]["case_heads"] == []
    trainer_class = recursive_find_trainer_class_by_name(TRAINER)
    network = trainer_class.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 3, 3,
                                                       enable_deep_supervision=False)
    network.load_state_dict(weights, strict=True)
    patch = plans.get_configuration("3d_fullres").patch_size
    with torch.no_grad():
        out = network.eval()(torch.zeros(1, 3, *patch))
    assert out.shape == (1, 3, *patch)
