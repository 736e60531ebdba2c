"""MTI-Net end to end through stock nnU-Net's console scripts on tiny phantom 4-phase dynamic MRI (CPU).

nnUNetv2_plan_and_preprocess -> nnunet-liver plan (CPU-demo plans) -> nnUNetv2_train -tr
nnUNetTrainerMTINet_tiny -> nnUNetv2_predict and nnunet-liver predict (CASE.json with class and curve);
then the checkpoint is rebuilt the way nnU-Net's predictor does it. The trainer's own mechanics (the
alternating generator / discriminator steps, the checkpoint round trip, DDP) are in test_mti_net_trainer.py.

Marked slow: about 110 s of CPU (six console-script processes, each importing torch and nnU-Net, and
sliding-window inference of a 4-phase network), over the ~90 s budget of the fast suite.
"""
import json
import os

import numpy as np
import pytest
import torch

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw
from nnunet_helpers import nnunet_env, predict_held_out, run, train

DATASET_ID = 940
PLANS = "nnUNetPlans_CPUDemo"
TRAINER = "nnUNetTrainerMTINet_tiny"
PHASES = ["pre", "arterial", "portal_venous", "delay"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    config = PhantomConfig(modality="MRI", shape=(12, 48, 48), n_lesions_range=(1, 2),
                           lesion_diameter_range_mm=(12, 24), p_no_lesion=0.0, slice_spacing_range=(2.0, 2.5),
                           inplane_spacing_range=(0.9, 1.0), lesion_classes=("HCC", "hemangioma"))
    cases = generate_cases(6, config, seed=5, progress=False)
    dataset = write_nnunet_raw(root / "raw", DATASET_ID, "MTINetE2E", cases[:5], cases[5:])
    # nnU-Net's fingerprint, default plans and integrity check; only the CPU-demo plans get preprocessed
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-np", "1", "-npfp", "1", "--no_pp",
         "--verify_dataset_integrity"], env, root)
    run(["nnunet-liver", "plan", "-d", str(DATASET_ID), "--preset", "cpu-demo", "--preprocess", "-np", "1"], env, root)
    log = train(DATASET_ID, 0, TRAINER, PLANS, env, root)
    model = root / "res" / dataset.name / f"{TRAINER}__{PLANS}__3d_fullres"
    return {"root": root, "env": env, "dataset": dataset, "model": model, "train_log": log}


def test_dataset_is_four_phase_dynamic_mri_with_curves_and_classes(workspace):
    dataset_json = json.loads((workspace["dataset"] / "dataset.json").read_text())
    assert dataset_json["phases"] == PHASES
    assert set(dataset_json["channel_names"].values()) == {"T1"}
    assert all(len(curve) == 4 for curve in dataset_json["enhancement"].values())
    assert dataset_json["characterization"]["classes"] == ["HCC", "hemangioma"]


def test_training_logs_every_loss_term_and_writes_validation_case_jsons_with_curves(workspace):
    log = workspace["train_log"]
    terms = [line for line in log.splitlines() if "train terms (weighted):" in line]
    assert terms, log[-3000:]
    for term in ("seg_loss", "cls_loss", "curve_loss", "tim_loss", "adv_loss", "disc_loss"):
        assert term in terms[-1], terms[-1]
    fold = workspace["model"] / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    val_cases = json.loads((workspace["root"] / "pre" / workspace["dataset"].name / "splits_final.json")
                           .read_text())[0]["val"]
    for case in val_cases:
        result = json.loads((fold / "validation" / f"{case}.json").read_text())
        assert result["phases"] == PHASES and len(result["enhancement_curve"]) == 4
        assert abs(sum(result["probabilities"]) - 1) < 1e-5


@pytest.mark.parametrize("command", ["nnUNetv2_predict", "nnunet-liver"])
def test_prediction_with_stock_and_characterization_predictor(workspace, command):
    out, cases = predict_held_out(command, workspace, DATASET_ID, TRAINER, PLANS)
    assert len(cases) == 1
    stats = json.loads((workspace["model"] / "plans.json").read_text())["nnunet_liver_ext"]["enhancement_stats"]
    for case in cases:
        assert (out / f"{case}.json").is_file() == (command == "nnunet-liver")
        if command == "nnunet-liver":
            result = json.loads((out / f"{case}.json").read_text())
            assert result["classes"] == ["HCC", "hemangioma"] and result["predicted_class"] in result["classes"]
            curve = result["enhancement_curve"]
            assert result["phases"] == PHASES and len(curve) == 4 and all(np.isfinite(curve))
            # written back in source units (mean, std of the training curves), not standardised
            assert all(abs(v - stats[0]) < 10 * stats[1] for v in curve) and np.mean(curve) > stats[1] / 10
    if command == "nnunet-liver":
        header = (out / "characterization.csv").read_text().splitlines()[0]
        assert all(f"curve_{p}" in header for p in PHASES)


def test_checkpoint_holds_the_discriminator_and_stock_rebuild_loads_it_strictly(workspace):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    os.environ.setdefault("nnUNet_extTrainer", str(TRAINERS_DIR))
    model = workspace["model"]
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    for prefix in ("discriminator.", "mdief.", "transformer.", "curve_head.", "cls_head."):
        assert any(k.startswith(prefix) for k in weights), prefix
    # the discriminator's Adam is the last optimizer of the HybridOptimizer state
    assert len(checkpoint["optimizer_state"]["hybrid"]) == 3
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    network = recursive_find_trainer_class_by_name(TRAINER).build_network_architecture(
        plans, plans.get_configuration("3d_fullres"), 4, 3, enable_deep_supervision=False)
    network.load_state_dict(weights, strict=True)
    out = network.eval()(torch.zeros(1, 4, *plans.get_configuration("3d_fullres").patch_size), heads=True)
    assert out.curve.shape == (1, 4) and out.cls_logits.shape == (1, 2)
