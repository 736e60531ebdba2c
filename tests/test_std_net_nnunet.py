"""STD-Net end to end through stock nnU-Net's console scripts, on tiny phantom cases, on the CPU.

nnUNetv2_plan_and_preprocess -> nnunet-liver plan (CPU-demo plans) -> nnUNetv2_train -tr
nnUNetTrainerSTDNet_tiny -> nnUNetv2_predict and nnunet-liver predict; then the checkpoint is
rebuilt and reloaded the way nnU-Net's predictor does it.
"""
import json
import os
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_helpers import CPU_DEMO_PLANS as PLANS
from nnunet_helpers import predict_held_out, run, tiny_trained_workspace, train

DATASET_ID = 911
TRAINER = "nnUNetTrainerSTDNet_tiny"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tiny_trained_workspace(tmp_path_factory.mktemp("nnunet"), DATASET_ID, "STDNetE2E", TRAINER,
                                  n_train=6, n_test=2, seed=3)


def test_training_writes_checkpoint_validation_and_case_jsons(workspace):
    fold = workspace["model"] / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    splits = json.loads((workspace["root"] / "pre" / workspace["dataset"].name / "splits_final.json").read_text())
    val_cases = splits[0]["val"]
    classes = json.loads((workspace["dataset"] / "dataset.json").read_text())["characterization"]["classes"]
    for case in val_cases:
        assert (fold / "validation" / f"{case}.nii.gz").is_file()
        result = json.loads((fold / "validation" / f"{case}.json").read_text())
        assert result["case"] == case and result["classes"] == classes
        assert abs(sum(result["probabilities"]) - 1) < 1e-5
        assert result["predicted_class"] == classes[result["predicted_index"]]
        assert result["lesion_voxels"] == _tumor_voxels(fold / "validation" / f"{case}.nii.gz")
        assert result["lesion_detected"] == (result["lesion_voxels"] > 0)
    assert (fold / "validation" / "characterization.csv").is_file()
    assert "Characterization on validation: accuracy" in workspace["train_log"]
    assert "train terms (weighted): seg_loss" in workspace["train_log"]


def test_validation_only_rewrites_the_same_validation(workspace):
    """``nnUNetv2_train ... --val --val_best --npz``: nnU-Net loads the final checkpoint, then the best one,
    and validates again; the trainer writes the same CASE.json files and CSV as at the end of training
    (the tiny schedule's one epoch makes the best checkpoint the final one's network)."""
    validation = workspace["model"] / "fold_0" / "validation"
    before = {p.name: p.read_bytes() for p in validation.glob("*") if p.suffix in (".json", ".csv")}
    train(DATASET_ID, 0, TRAINER, PLANS, workspace["env"], workspace["root"], extra=["--val", "--val_best", "--npz"])
    after = {p.name: p.read_bytes() for p in validation.glob("*") if p.suffix in (".json", ".csv")}
    assert after.keys() == before.keys() and "summary.json" in after and "characterization.csv" in after
    for name in before:
        assert after[name] == before[name], name
    assert len(list(validation.glob("*.npz"))) == len(list(validation.glob("*.nii.gz"))) > 0


def _tumor_voxels(segmentation: Path) -> int:
    return int((sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation))) == 2).sum())


@pytest.mark.parametrize("command", ["nnUNetv2_predict", "nnunet-liver"])
def test_prediction_with_stock_and_characterization_predictor(workspace, command):
    out, cases = predict_held_out(command, workspace, DATASET_ID, TRAINER, PLANS)
    for case in cases:
        has_json = (out / f"{case}.json").is_file()
        assert has_json == (command == "nnunet-liver")
        if has_json:  # the count describes the segmentation written beside it
            result = json.loads((out / f"{case}.json").read_text())
            assert result["lesion_voxels"] == _tumor_voxels(out / f"{case}.nii.gz")
            assert result["lesion_detected"] == (result["lesion_voxels"] > 0)
    if command == "nnunet-liver":
        rows = (out / "characterization.csv").read_text().strip().splitlines()
        assert rows[0].startswith("case,predicted_class,prob_") and len(rows) == len(cases) + 1


def test_checkpoint_rebuilds_and_reloads_with_its_heads(workspace):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS_DIR))
    model = workspace["model"]
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert any(k.startswith("cls_head.") for k in checkpoint["network_weights"])
    assert any(k.startswith("temporal.layers.") for k in checkpoint["network_weights"])
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    trainer_class = recursive_find_trainer_class_by_name(TRAINER)
    network = trainer_class.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 3, 3,
                                                       enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    patch = plans.get_configuration("3d_fullres").patch_size
    out = network.eval()(torch.zeros(1, 3, *patch), heads=True)
    assert out.cls_logits.shape == (1, len(plans.plans["nnunet_liver_ext"]["case_classes"]))


TRAIN_STEP_PROBE = """
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(sys.argv[1], "3d_fullres", 0, sys.argv[2], sys.argv[3], device=torch.device("cpu"))
trainer.initialize()
loader, _ = trainer.get_dataloaders()
seen = []
forward = trainer.network.forward
def recording_forward(x, heads=False, lesion_mask=None):
    seen.append(lesion_mask)
    return forward(x, heads=heads, lesion_mask=lesion_mask)
trainer.network.forward = recording_forward
batch = next(loader)
trainer.train_step(batch)
mask, target = seen[0], batch["target"][0]
assert mask is not None and mask.shape == target.shape, (None if mask is None else mask.shape, target.shape)
assert torch.equal(mask, (target == trainer.tumor_label).float()) and mask.sum() > 0
print("reference lesion mask passed:", int(mask.sum().item()), "voxels")
"""


def test_train_step_guides_the_heads_with_the_reference_lesion_mask(workspace):
    """Through nnU-Net's own trainer construction, data loader and augmentation: the batch's tumor
    mask reaches the network as ``lesion_mask``."""
    out = run(["python", "-c", TRAIN_STEP_PROBE, str(DATASET_ID), TRAINER, PLANS], workspace["env"],
              workspace["root"], nnUNet_n_proc_DA="0")
    assert "reference lesion mask passed:" in out
