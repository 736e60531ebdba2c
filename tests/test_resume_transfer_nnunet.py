"""``nnUNetv2_train ... --c`` and ``nnUNetv2_train ... -pretrained_weights`` through nnU-Net's console
scripts, on tiny 3-phase CT phantom cases, on the CPU, in-process data loading (``nnUNet_n_proc_DA=0``).

Resume: a probe trainer (MTI-Net, written to a folder added to ``nnUNet_extTrainer``: 2 epochs of 2
iterations, a checkpoint every epoch, the same seed in every process, one CPU thread) trains once
without interruption, and once killed after epoch 0 (``os._exit`` right after nnU-Net wrote
``checkpoint_latest.pth``) and continued with ``--c``. The continued run starts at epoch 1, and its
``checkpoint_final.pth`` equals the uninterrupted one: network (the discriminator included),
optimizer states (the discriminator's Adam included) and logged losses, within 1e-6 (measured: 0).
That holds because the checkpoint carries the random generators and nnU-Net's in-process loader
draws from them (measured without them: epoch-1 loss 5.668 instead of 5.694, weights up to 4e-3
apart); with augmentation worker processes (nnU-Net's default) a resumed run is a valid
continuation but not the same draws.

Pretrained transfer, the STD-Net paper's setting: a single-phase CT model (stock ``nnUNetTrainer_tiny``
on the portal venous phase alone, planned with the multiphase dataset's plans through nnU-Net's
``nnUNetv2_move_plans_between_datasets``) is the ``-pretrained_weights`` of a 3-phase
``nnUNetTrainerSTDNet_tiny``: the report names the loaded and skipped keys and the trained STD-Net's
encoder is still the single-phase one after its two steps.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_helpers import BIN, nnunet_env, plan_and_preprocess_cpu_demo, run, train, write_tiny_phantom_dataset

MULTIPHASE_ID = 950
SINGLE_PHASE_ID = 951
PLANS = "nnUNetPlans_CPUDemo"
PROBE = "nnUNetTrainerMTINet_resumeProbe"
EXIT_CODE = 3
ATOL = 1e-6
# nine console-script processes, each importing torch and nnU-Net, and two planning/preprocessing runs
pytestmark = pytest.mark.slow

PROBE_MODULE = '''"""MTI-Net for tests/test_resume_transfer_nnunet.py: 2 epochs x 2 iterations, a checkpoint every epoch,
the same seed in every process, and a way to die right after an epoch's checkpoint."""
import os
import random

import numpy as np
import torch

from nnunet_liver_ext.trainers.nnUNetTrainerMTINet import nnUNetTrainerMTINet


class nnUNetTrainerMTINet_resumeProbe(nnUNetTrainerMTINet):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        # one thread (nnUNetv2_train -device cpu sets as many as there are cores): with two, the float results of
        # separate processes were seen to differ in the last bits, which Adam then amplifies
        torch.set_num_threads(1)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 2, 1
        self.save_every = 1

    def on_epoch_end(self):
        super().on_epoch_end()  # writes checkpoint_latest.pth, then counts the epoch
        if os.environ.get("RESUME_PROBE_EXIT_BEFORE_EPOCH") == str(self.current_epoch):
            os._exit(%d)  # as if the job were killed

    def perform_actual_validation(self, save_probabilities=False):
        self.print_to_log_file("resume probe: final validation skipped (the test compares checkpoints)")
''' % EXIT_CODE


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    extra = root / "ext_trainers"
    extra.mkdir()
    (extra / f"{PROBE}.py").write_text(PROBE_MODULE)
    env = dict(nnunet_env(root), nnUNet_extTrainer=f"{TRAINERS_DIR}{os.pathsep}{extra}", OMP_NUM_THREADS="1")
    dataset = write_tiny_phantom_dataset(root, MULTIPHASE_ID, "ResumeTransfer", n_train=5, n_test=0, seed=4)
    plan_and_preprocess_cpu_demo(MULTIPHASE_ID, env, root)
    return {"root": root, "env": env, "dataset": dataset}


def _train(workspace, *extra, results=None, check=True, **env):
    environment = dict(workspace["env"], nnUNet_n_proc_DA="0", **env)
    if results is not None:
        environment["nnUNet_results"] = str(results)
    proc = subprocess.run([str(BIN / "nnUNetv2_train"), str(MULTIPHASE_ID), "3d_fullres", "0", "-tr", PROBE,
                           "-p", PLANS, "-device", "cpu", *extra], env=environment, cwd=workspace["root"],
                          capture_output=True, text=True, timeout=1800)
    if check:
        assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _differences(a, b, where=""):
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape:
            return [f"{where}: shape"]
        if a.is_floating_point():
            gap = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            return [] if gap <= ATOL else [f"{where}: max |diff| {gap:.3g}"]
        return [] if torch.equal(a, b) else [f"{where}: differs"]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float):
        return [] if abs(a - b) <= ATOL else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _fold(results, workspace, trainer=PROBE):
    return results / workspace["dataset"].name / f"{trainer}__{PLANS}__3d_fullres" / "fold_0"


def test_resume_with_c_continues_at_the_saved_epoch_and_matches_the_uninterrupted_run(workspace):
    root = workspace["root"]
    uninterrupted, resumed = root / "res_uninterrupted", root / "res_resumed"
    _train(workspace, results=uninterrupted)

    killed = _train(workspace, results=resumed, check=False, RESUME_PROBE_EXIT_BEFORE_EPOCH="1")
    assert killed.returncode == EXIT_CODE, killed.stderr[-3000:]
    fold = _fold(resumed, workspace)
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1

    continued = _train(workspace, "--c", results=resumed)
    log = continued.stdout
    assert ": Epoch 1\n" in log and ": Epoch 0\n" not in log, log[-3000:]

    final_a = torch.load(_fold(uninterrupted, workspace) / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)
    final_b = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("discriminator.") for k in final_b["network_weights"])
    differences = (_differences(final_a["network_weights"], final_b["network_weights"], "network")
                   + _differences(final_a["optimizer_state"], final_b["optimizer_state"], "optimizer")
                   + _differences(final_a["logging"]["train_losses"], final_b["logging"]["train_losses"], "losses"))
    assert not differences, "\n".join(differences[:20])
    # the discriminator's Adam went on counting from the saved state (a fresh one would restart at 0)
    disc_steps = lambda c: [float(s["step"]) for s in c["optimizer_state"]["hybrid"][-1]["state"].values()]  # noqa: E731
    assert disc_steps(final_b) == disc_steps(final_a)
    assert min(disc_steps(final_b)) >= max(disc_steps(latest)) > 0


def _single_phase_dataset(workspace):
    """The multiphase dataset's portal venous phase alone (channel 1), as a one-channel CT dataset."""
    source = workspace["dataset"]
    target = source.parent / f"Dataset{SINGLE_PHASE_ID:03d}_SinglePhase"
    (target / "imagesTr").mkdir(parents=True)
    shutil.copytree(source / "labelsTr", target / "labelsTr")
    for image in sorted((source / "imagesTr").glob("*_0001.nii.gz")):
        shutil.copy(image, target / "imagesTr" / image.name.replace("_0001.nii.gz", "_0000.nii.gz"))
    multiphase = json.loads((source / "dataset.json").read_text())
    (target / "dataset.json").write_text(json.dumps({
        "name": "SinglePhase", "channel_names": {"0": "CT"}, "labels": multiphase["labels"],
        "numTraining": multiphase["numTraining"], "file_ending": multiphase["file_ending"]}))
    return target


def test_pretrained_weights_from_a_single_phase_model_into_multiphase_std_net(workspace):
    env, root = workspace["env"], workspace["root"]
    single = _single_phase_dataset(workspace)
    # nnU-Net's recipe for pretraining: the pretraining dataset gets the target dataset's plans. Its fingerprint
    # step is planning without preprocessing here: nnUNetv2_preprocess (2.8) reads the dataset.json that only
    # the planner copies into nnUNet_preprocessed, so nnUNetv2_extract_fingerprint alone is not enough
    run(["nnUNetv2_plan_and_preprocess", "-d", str(SINGLE_PHASE_ID), "-np", "1", "-npfp", "1", "--no_pp"], env, root)
    run(["nnUNetv2_move_plans_between_datasets", "-s", str(MULTIPHASE_ID), "-t", str(SINGLE_PHASE_ID),
         "-sp", PLANS, "-tp", PLANS], env, root)
    run(["nnUNetv2_preprocess", "-d", str(SINGLE_PHASE_ID), "-plans_name", PLANS, "-c", "3d_fullres", "-np", "1"],
        env, root)
    train(SINGLE_PHASE_ID, 0, "nnUNetTrainer_tiny", PLANS, env, root)
    source = root / "res" / single.name / f"nnUNetTrainer_tiny__{PLANS}__3d_fullres" / "fold_0" / "checkpoint_final.pth"

    out = run(["nnUNetv2_train", str(MULTIPHASE_ID), "3d_fullres", "0", "-tr", "nnUNetTrainerSTDNet_tiny", "-p", PLANS,
               "-device", "cpu", "-pretrained_weights", str(source)], env, root, nnUNet_n_proc_DA="0")
    assert f"Pretrained weights {source} -> STDNet:" in out, out[-3000:]
    summary = [line.strip() for line in out.splitlines() if line.strip().startswith(("encoder:", "cls_head:"))]
    encoder_line = next(line for line in summary if line.startswith("encoder:"))
    loaded, total = encoder_line.split()[1].split("/")
    assert loaded == total and int(total) > 0, summary
    assert any(line.startswith("cls_head: 0/") and "head or segmentation layer" in line for line in summary), summary
    assert "skipped, missing in source" in out and "  temporal.layers.0.linear1.weight" in out

    pretrained = torch.load(source, map_location="cpu", weights_only=False)["network_weights"]
    trained = torch.load(_fold(root / "res", workspace, "nnUNetTrainerSTDNet_tiny") / "checkpoint_final.pth",
                         map_location="cpu", weights_only=False)["network_weights"]
    keys = [k for k in trained if k.startswith("encoder.") and k.endswith("conv.weight")]
    a = torch.cat([pretrained[k].flatten() for k in keys])
    b = torch.cat([trained[k].flatten() for k in keys])
    # two SGD steps later the encoder is still the single-phase one (an independent initialisation gives ~0)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9
