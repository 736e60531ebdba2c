"""Region-based training of STD-Net through nnU-Net's console scripts, on the CPU.

The phantom's dataset.json rewritten the way nnU-Net documents region-based training (liver region = liver +
tumor, tumor region, ``regions_class_order``), then nnUNetv2_plan_and_preprocess -> nnunet-liver plan
(CPU-demo plans) -> nnUNetv2_train -tr nnUNetTrainerSTDNet_tiny -> nnUNetv2_predict and nnunet-liver predict.
The in-process tests of every trainer are tests/test_region_training.py.
"""
import json

import pytest
import SimpleITK as sitk

from nnunet_helpers import CPU_DEMO_PLANS as PLANS
from nnunet_helpers import predict_held_out, tiny_trained_workspace

pytestmark = pytest.mark.slow

DATASET_ID = 926
TRAINER = "nnUNetTrainerSTDNet_tiny"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    regions = {"labels": {"background": 0, "liver": [1, 2], "tumor": 2}, "regions_class_order": [1, 2]}
    return tiny_trained_workspace(tmp_path_factory.mktemp("regions"), DATASET_ID, "RegionsE2E", TRAINER, n_train=6,
                                  n_test=2, seed=3, dataset_json_update=regions)


def _tumor_voxels(segmentation) -> int:
    return int((sitk.GetArrayFromImage(sitk.ReadImage(str(segmentation))) == 2).sum())


def test_training_reads_the_tumor_region_and_validates_with_case_jsons(workspace):
    plans = json.loads((workspace["model"] / "plans.json").read_text())["nnunet_liver_ext"]
    assert (plans["lesion_channel"], plans["lesion_activation"]) == (1, "sigmoid")
    assert "cls_loss" in workspace["train_log"]
    fold = workspace["model"] / "fold_0"
    val_cases = json.loads((workspace["root"] / "pre" / workspace["dataset"].name / "splits_final.json")
                           .read_text())[0]["val"]
    for case in val_cases:
        result = json.loads((fold / "validation" / f"{case}.json").read_text())
        assert result["lesion_voxels"] == _tumor_voxels(fold / "validation" / f"{case}.nii.gz")
        assert abs(sum(result["probabilities"]) - 1) < 1e-5


@pytest.mark.parametrize("command", ["nnUNetv2_predict", "nnunet-liver"])
def test_prediction_writes_labels_and_case_jsons(workspace, command):
    out, cases = predict_held_out(command, workspace, DATASET_ID, TRAINER, PLANS)
    for case in cases:
        assert (out / f"{case}.json").is_file() == (command == "nnunet-liver")
        if command == "nnunet-liver":  # the count describes the segmentation nnU-Net wrote from the regions
            result = json.loads((out / f"{case}.json").read_text())
            assert result["lesion_voxels"] == _tumor_voxels(out / f"{case}.nii.gz")
