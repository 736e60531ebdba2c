"""Running nnU-Net's (and our) console scripts in subprocesses, as a user would."""
import os
import subprocess
import sys
from pathlib import Path

from nnunet_liver_ext.paths import TRAINERS_DIR
from nnunet_liver_ext.phantom import PhantomConfig, generate_cases, write_nnunet_raw

BIN = Path(sys.executable).parent
#: the plans `nnunet-liver plan --preset cpu-demo` writes
CPU_DEMO_PLANS = "nnUNetPlans_CPUDemo"


def nnunet_env(root: Path) -> dict:
    """nnU-Net's folders under ``root`` and settings for a 2-core machine (no pools of
    torch-importing worker processes)."""
    return dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                nnUNet_results=str(root / "res"), nnUNet_extTrainer=str(TRAINERS_DIR),
                nnUNet_def_n_proc="1", nnUNet_compile="f")


def run(cmd, env, cwd, **extra_env) -> str:
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=dict(env, **extra_env), cwd=cwd, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def plan_and_preprocess_cpu_demo(dataset_id: int, env, cwd) -> None:
    """nnU-Net's own planning/preprocessing with the integrity check, then the CPU-demo plans."""
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
         "--verify_dataset_integrity"], env, cwd)
    run(["nnunet-liver", "plan", "-d", str(dataset_id), "--preset", "cpu-demo", "--preprocess", "-np", "1"], env, cwd)


def train(dataset_id: int, fold, trainer: str, plans: str, env, cwd, configuration: str = "3d_fullres",
          extra=()) -> str:
    # nnUNet_n_proc_DA=0: in-process data loading (the planner needs >= 1, training does not)
    return run(["nnUNetv2_train", str(dataset_id), configuration, str(fold), "-tr", trainer, "-p", plans,
                "-device", "cpu", *extra], env, cwd, nnUNet_n_proc_DA="0")


def write_tiny_phantom_dataset(root: Path, dataset_id: int, name: str, n_train: int, n_test: int, seed: int) -> Path:
    """Tiny 3-phase CT phantom cases (24x64x64), each with 1-2 visible lesions, into root/raw."""
    config = PhantomConfig(shape=(24, 64, 64), n_lesions_range=(1, 2), lesion_diameter_range_mm=(10, 24),
                           p_no_lesion=0.0)
    cases = generate_cases(n_train + n_test, config, seed=seed, progress=False)
    return write_nnunet_raw(root / "raw", dataset_id, name, cases[:n_train], cases[n_train:])


def tiny_trained_workspace(root: Path, dataset_id: int, name: str, trainer: str, n_train: int, n_test: int,
                           seed: int, dataset_json_update: dict = None, edit_raw=None) -> dict:
    """The end-to-end tests' workspace: tiny phantom cases (dataset.json updated with ``dataset_json_update``,
    then ``edit_raw(raw dataset folder)`` if given), nnU-Net's planning and the CPU-demo plans, fold 0 of
    ``trainer`` trained on the CPU. Returns root, env, dataset (its raw folder), model (the results folder) and
    train_log."""
    import json

    env = nnunet_env(root)
    dataset = write_tiny_phantom_dataset(root, dataset_id, name, n_train=n_train, n_test=n_test, seed=seed)
    if dataset_json_update:
        dataset_json = json.loads((dataset / "dataset.json").read_text())
        dataset_json.update(dataset_json_update)
        (dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    if edit_raw is not None:
        edit_raw(dataset)
    plan_and_preprocess_cpu_demo(dataset_id, env, root)
    log = train(dataset_id, 0, trainer, CPU_DEMO_PLANS, env, root)
    model = root / "res" / dataset.name / f"{trainer}__{CPU_DEMO_PLANS}__3d_fullres"
    return {"root": root, "env": env, "dataset": dataset, "model": model, "train_log": log}


def assert_same_geometry(prediction: Path, reference: Path, labels=(0, 1, 2)) -> None:
    """A written segmentation lies on its input image's grid and holds only known labels."""
    import numpy as np
    import SimpleITK as sitk

    pred, ref = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(reference))
    assert pred.GetSize() == ref.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(pred.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= set(labels)


def predict_held_out(command: str, workspace: dict, dataset_id: int, trainer: str, plans: str, folds=("0",),
                     configuration: str = "3d_fullres", out=None, extra=()):
    """``nnUNetv2_predict`` or ``nnunet-liver predict`` (same options, ``extra`` appended) on the dataset's
    imagesTs with ``folds`` on the CPU, into ``out`` (default root/pred_COMMAND); every segmentation is
    checked against its input's geometry. Returns the output folder and the case ids."""
    images = workspace["dataset"] / "imagesTs"
    out = out or workspace["root"] / f"pred_{command}"
    args = ["-i", str(images), "-o", str(out), "-d", str(dataset_id), "-c", configuration, "-p", plans,
            "-tr", trainer, "-f", *folds, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", *map(str, extra)]
    run([command, *(["predict"] if command == "nnunet-liver" else []), *args], workspace["env"], workspace["root"])
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    assert cases
    for case in cases:
        assert_same_geometry(out / f"{case}.nii.gz", images / f"{case}_0000.nii.gz")
    return out, cases
