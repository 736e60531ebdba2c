"""User errors in `nnunet-liver` commands: one or two lines (what is wrong, the command that fixes it),
exit status 1, no traceback. Run through the installed console script in subprocesses, as a user
meets them. Nothing here trains: the checks run on folder layouts, before nnU-Net loads anything."""
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.cli import main
from nnunet_liver_ext.paths import TRAINERS_DIR

BIN = Path(sys.executable).parent
MODEL = "nnUNetTrainer_tiny__nnUNetPlans__3d_fullres"


def nnunet_liver(*args, env=None, cwd=None, timeout=300):
    proc = subprocess.run([str(BIN / "nnunet-liver"), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def assert_user_error(rc, out, *expected):
    assert rc == 1, out
    assert "Traceback" not in out, out
    assert "error:" in out, out
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    assert len(out.strip().splitlines()) <= 3, out  # the message and its fix, nothing else


def _env(root: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"), nnUNet_results=str(root / "res"))
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture
def tree(tmp_path):
    """Dataset501_Demo: a raw dataset.json, no fingerprint, and a stock tiny model of which only fold 0
    finished (fold 1 has a checkpoint_latest.pth only). Enough for every check before loading."""
    (tmp_path / "raw" / "Dataset501_Demo").mkdir(parents=True)
    (tmp_path / "raw" / "Dataset501_Demo" / "dataset.json").write_text("{}")
    (tmp_path / "pre").mkdir()
    model = tmp_path / "res" / "Dataset501_Demo" / MODEL
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (model / "fold_1").mkdir()
    (model / "fold_1" / "checkpoint_latest.pth").write_bytes(b"")
    (tmp_path / "images").mkdir()
    return tmp_path


def predict(tree, *extra, env=None):
    return nnunet_liver("predict", "-i", tree / "images", "-o", tree / "pred", "-d", "501", "-c", "3d_fullres",
                        *extra, env=env or _env(tree))


# --- predict ---------------------------------------------------------------------------------

def test_predict_folds_not_trained_names_the_trained_folds(tree):
    rc, out = predict(tree, "-tr", "nnUNetTrainer_tiny")  # the README's form: no -f, so folds 0-4
    assert_user_error(rc, out, "fold 1, 2, 3, 4", "not trained", "-f 0",
                      "nnUNetv2_train 501 3d_fullres FOLD -tr nnUNetTrainer_tiny -p nnUNetPlans",
                      "fold 1 stopped before the end")
    assert "checkpoint_latest.pth as it stands" not in out  # folds 2-4 have no checkpoint at all
    rc, out = predict(tree, "-tr", "nnUNetTrainer_tiny", "-f", "1")
    assert_user_error(rc, out, "fold 1 stopped before the end",
                      "or predict with the unfinished model as it stands: -chk checkpoint_latest.pth")


def test_predict_unknown_dataset_lists_the_datasets_there(tree):
    rc, out = nnunet_liver("predict", "-i", tree / "images", "-o", tree / "pred", "-d", "502", "-c", "3d_fullres",
                           env=_env(tree))
    assert_user_error(rc, out, "no dataset with id 502", "501 (Dataset501_Demo)")
    rc, out = nnunet_liver("predict", "-i", tree / "images", "-o", tree / "pred", "-d", "Demo", "-c", "3d_fullres",
                           env=_env(tree))
    assert_user_error(rc, out, "neither an id", "501 (Dataset501_Demo)")


def test_predict_other_configuration_names_the_trained_one(tree):
    rc, out = nnunet_liver("predict", "-i", tree / "images", "-o", tree / "pred", "-d", "501", "-c", "2d",
                           "-tr", "nnUNetTrainer_tiny", env=_env(tree))
    assert_user_error(rc, out, "trained as " + MODEL, "-p nnUNetPlans -c 3d_fullres")


def test_predict_trainer_typo_suggests_the_closest_names(tree):
    rc, out = predict(tree, "-tr", "nnUNetTrainerSTDNet_tny")
    assert_user_error(rc, out, "no trainer named nnUNetTrainerSTDNet_tny", "did you mean nnUNetTrainerSTDNet_tiny")


def test_predict_untrained_trainer_says_how_to_train_it(tree):
    rc, out = predict(tree, "-tr", "nnUNetTrainerSTDNet_tiny")
    assert_user_error(rc, out, "nnUNetTrainerSTDNet_tiny is not trained for Dataset501_Demo", MODEL,
                      "nnUNetv2_train 501 3d_fullres FOLD -tr nnUNetTrainerSTDNet_tiny -p nnUNetPlans")


def test_predict_missing_input_folder_and_unset_environment(tree):
    rc, out = nnunet_liver("predict", "-i", tree / "nope", "-o", tree / "pred", "-d", "501", "-c", "3d_fullres",
                           env=_env(tree))
    assert_user_error(rc, out, "input folder", "does not exist")
    rc, out = predict(tree, env=_env(tree, nnUNet_raw=None, nnUNet_preprocessed=None, nnUNet_results=None))
    assert_user_error(rc, out, "none of nnU-Net's folder variables", "nnunet-liver env --check")


def test_predict_output_that_is_a_file(tree, capsys, monkeypatch):
    """-o naming an existing file ended in os.makedirs' FileExistsError traceback, after the model was found."""
    for key, value in _env(tree).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    (tree / "pred.txt").write_text("notes")
    assert main(["predict", "-i", str(tree / "images"), "-o", str(tree / "pred.txt"), "-d", "501", "-c",
                 "3d_fullres", "-device", "cpu"]) == 1
    assert f"-o {tree / 'pred.txt'} is a file, not a folder" in capsys.readouterr().err
    assert (tree / "pred.txt").read_text() == "notes"


def test_predict_on_cuda_without_a_gpu(tree):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, out = predict(tree, "-tr", "nnUNetTrainer_tiny", "-f", "0")  # -device cuda is the default
    assert_user_error(rc, out, "no CUDA GPU", "-device cpu")


def test_predict_cascade_without_the_previous_stage_says_to_predict_it_first(tree):
    cascade = tree / "res" / "Dataset501_Demo" / "nnUNetTrainer_tiny__nnUNetPlans__3d_cascade_fullres"
    (cascade / "fold_0").mkdir(parents=True)
    (cascade / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (cascade / "plans.json").write_text(json.dumps({"configurations": {
        "3d_fullres": {"patch_size": [8, 8, 8]},
        "3d_lowres": {"inherits_from": "3d_fullres", "next_stage": "3d_cascade_fullres"},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}))
    rc, out = nnunet_liver("predict", "-i", tree / "images", "-o", tree / "pred", "-d", "501",
                           "-c", "3d_cascade_fullres", "-tr", "nnUNetTrainer_tiny", "-f", "0", "-device", "cpu",
                           env=_env(tree))
    assert_user_error(rc, out, "3d_cascade_fullres is a stage of nnU-Net's cascade", "3d_lowres stage's segmentation",
                      "-c 3d_lowres -tr nnUNetTrainer_tiny -p nnUNetPlans first, then this command with "
                      "-prev_stage_predictions FOLDER")


# --- plan --------------------------------------------------------------------------------------

def test_plan_without_fingerprint_gives_the_fingerprint_command(tree):
    rc, out = nnunet_liver("plan", "-d", "501", env=_env(tree))
    assert_user_error(rc, out, "Dataset501_Demo has no fingerprint", "nnUNetv2_extract_fingerprint -d 501",
                      "nnUNetv2_plan_and_preprocess -d 501")


def test_plan_resenc_is_for_the_network_presets(tree):
    rc, out = nnunet_liver("plan", "-d", "501", "--preset", "cpu-demo", "--resenc", "L", env=_env(tree))
    assert_user_error(rc, out, "['cpu-demo'] are no network presets", "nnUNetv2_plan_experiment -d 501 -pl "
                      "nnUNetPlannerResEncL", "nnunet-liver plan -d 501 --preset stdnet --resenc L")


def test_plan_unknown_dataset(tree):
    rc, out = nnunet_liver("plan", "-d", "7", env=_env(tree))
    assert_user_error(rc, out, "no dataset with id 7", "501 (Dataset501_Demo)")
    # a name is checked too (it went on to wrong advice, or nnU-Net's traceback on an id two names share)
    rc, out = nnunet_liver("plan", "-d", "Dataset999_Nope", env=_env(tree))
    assert_user_error(rc, out, "no dataset Dataset999_Nope", "501 (Dataset501_Demo)")
    (tree / "pre" / "Dataset501_Other").mkdir(parents=True)
    rc, out = nnunet_liver("plan", "-d", "Dataset501_Demo", env=_env(tree))
    assert_user_error(rc, out, "dataset id 501 of Dataset501_Demo is also Dataset501_Other", "one name per id")
    rc, out = nnunet_liver("plan", "-d", "7", env=_env(tree, nnUNet_raw=str(tree / "gone"), nnUNet_preprocessed=None,
                                                       nnUNet_results=None))
    assert_user_error(rc, out, f"nnUNet_raw={tree / 'gone'} (no such folder)", "env --check")


@pytest.mark.parametrize("option, message", [
    (["--gpu-memory-target", "-4"], "--gpu-memory-target -4: the VRAM target must be a positive number of GB"),
    (["--gpu-memory-target", "0"], "--gpu-memory-target 0: the VRAM target must be a positive number of GB"),
    (["--gpu-memory-target", "nan"], "--gpu-memory-target nan: the VRAM target must be a positive number of GB"),
    (["--preprocess", "-np", "0"], "-np 0: preprocessing needs at least one process"),
    (["--preprocess", "-c", "3d_lowress"], "-c 3d_lowress: nnU-Net's configurations are 2d, 3d_fullres, 3d_lowres"),
])
def test_plan_options_out_of_range_are_refused_before_planning(tree, capsys, monkeypatch, option, message):
    """A negative target planned forever, 0 ended in nnU-Net's NaN traceback, -np 0 in a traceback after the plans
    were written, a misspelt -c in nnU-Net's "Skipping" and exit 0 with nothing preprocessed."""
    for key, value in _env(tree).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    assert main(["plan", "-d", "501", "--preset", "stdnet", *option]) == 1
    err = capsys.readouterr().err
    assert message in err and "fingerprint" not in err, err  # refused before the inputs are even looked at


# --- env, trainers -------------------------------------------------------------------------------

def test_env_check(tree):
    env = _env(tree, nnUNet_extTrainer=str(TRAINERS_DIR))
    rc, out = nnunet_liver("env", "--check", env=env)
    assert rc == 0 and "All set" in out and "MISSING" not in out, out
    rc, out = nnunet_liver("env", "--check", env=_env(tree, nnUNet_results=str(tree / "absent"),
                                                      nnUNet_preprocessed=None))
    assert rc == 1 and "Traceback" not in out, out
    assert "MISSING nnUNet_preprocessed" in out and "not set" in out
    assert "MISSING nnUNet_results" in out and f'mkdir -p "{tree / "absent"}"' in out
    assert f"export nnUNet_extTrainer={TRAINERS_DIR}" in out and "shell profile" in out
    rc, out = nnunet_liver("env", "--check", env=_env(tree, nnUNet_extTrainer="/elsewhere"))
    assert rc == 1 and f'export nnUNet_extTrainer="/elsewhere{os.pathsep}{TRAINERS_DIR}"' in out, out
    # plain `env` stays one eval-able line, which keeps the folders the variable lists already
    rc, out = nnunet_liver("env", env=_env(tree, nnUNet_extTrainer=None))
    assert rc == 0 and out.strip() == f"export nnUNet_extTrainer={TRAINERS_DIR}"
    rc, out = nnunet_liver("env", env=_env(tree, nnUNet_extTrainer="/opt/my trainers"))
    exported = subprocess.run(["bash", "-c", f'{out.strip()}; printf %s "$nnUNet_extTrainer"'], capture_output=True,
                              text=True, check=True).stdout
    assert exported == f"/opt/my trainers{os.pathsep}{TRAINERS_DIR}", out
    rc, out = nnunet_liver("env", env=_env(tree, nnUNet_extTrainer=f"/a{os.pathsep}{TRAINERS_DIR}"))
    assert out.strip() == f"export nnUNet_extTrainer=/a{os.pathsep}{TRAINERS_DIR}"  # already there: unchanged


def test_a_folder_variable_that_names_a_file(tree, monkeypatch):
    """`mkdir -p FILE` fails: a variable pointing at a file gets a fix that works."""
    from nnunet_liver_ext.errors import UserError, env_folder
    from nnunet_liver_ext.paths import check_environment

    afile = tree / "afile"
    afile.write_text("")
    check = next(c for c in check_environment(_env(tree, nnUNet_raw=str(afile))) if c.variable == "nnUNet_raw")
    assert not check.ok and check.state == f"{afile} (a file, not a folder)"
    assert f"mkdir -p \"{afile}\"" not in check.profile_line and "mkdir -p \"$nnUNet_raw\"" in check.profile_line
    monkeypatch.setenv("nnUNet_raw", str(afile))
    with pytest.raises(UserError, match="is a file, not a folder") as refused:
        env_folder("nnUNet_raw")
    assert "mkdir" not in str(refused.value)


def test_trainers_typo():
    rc, out = nnunet_liver("trainers", "nnunettrainerstdnet")
    assert_user_error(rc, out, "no trainer named nnunettrainerstdnet", "did you mean nnUNetTrainerSTDNet")


# --- convert: files given relative to the source folder ------------------------------------------

def test_convert_finds_classes_in_the_source_folder_and_test_patients_convert(tmp_path):
    """The README's form `convert tcga-lihc SRC --classes classes.csv`, run from another folder, on a
    phantom TCGA source with a held-out patient (`phantom tcga-dicom --test`)."""
    src = tmp_path / "TCGA-LIHC"
    rc, out = nnunet_liver("phantom", "tcga-dicom", "-o", src, "-n", "2", "--test", "1", "--shape", "16", "40", "40",
                           "--no-progress")
    assert rc == 0, out
    work = tmp_path / "elsewhere"
    work.mkdir()
    rc, out = nnunet_liver("convert", "tcga-lihc", src, "-d", "77", "--raw", tmp_path / "raw", "--phases", "sequence",
                           "--classes", "nope.csv", "--no-progress", cwd=work)
    assert_user_error(rc, out, f"neither {work / 'nope.csv'} (current folder) nor {src / 'nope.csv'} (source folder)")
    rc, out = nnunet_liver("convert", "tcga-lihc", src, "-d", "77", "--raw", tmp_path / "raw", "--phases", "sequence",
                           "--classes", "classes.csv", "--no-progress", cwd=work)
    assert rc == 0 and "Traceback" not in out, out
    dataset = tmp_path / "raw" / "Dataset077_TCGALIHC"
    classes = json.loads((dataset / "dataset.json").read_text())["characterization"]
    assert set(classes["cases"]) == {"TCGA-PH-0000", "TCGA-PH-0001"}
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [f"TCGA-PH-0002_000{k}.nii.gz" for k in range(3)]
    # the held-out truth lies on the grid of the converted image, so evaluate can compare them
    truth = sitk.ReadImage(str(tmp_path / "TCGA-LIHC_test_truth" / "labelsTs" / "TCGA-PH-0002.nii.gz"))
    image = sitk.ReadImage(str(dataset / "imagesTs" / "TCGA-PH-0002_0001.nii.gz"))
    assert truth.GetSize() == image.GetSize()
    np.testing.assert_allclose(truth.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(truth.GetOrigin(), image.GetOrigin(), atol=1e-3)
    targets = json.loads((tmp_path / "TCGA-LIHC_test_truth" / "test_targets.json").read_text())
    assert targets["characterization"]["classes"] == classes["classes"]
    # evaluate takes the truth folder and test_targets.json as they are
    labels = tmp_path / "TCGA-LIHC_test_truth" / "labelsTs"
    assert main(["evaluate", str(labels), str(labels), "--dataset-json", str(labels.parent / "test_targets.json"),
                 "-o", str(tmp_path / "eval"), "-np", "1", "--quiet", "--no-plots"]) == 0


def test_convert_missing_source_folder(tmp_path):
    rc, out = nnunet_liver("convert", "msd", tmp_path / "nope", "-d", "78", "--raw", tmp_path / "raw")
    assert_user_error(rc, out, "source folder", "does not exist")


# --- benchmark: the like-for-like baseline, and what the report says it read ---------------------

CASES = ("case_a", "case_b", "case_c")


def _label(i: int) -> sitk.Image:
    arr = np.zeros((6, 16, 16), np.uint8)
    arr[1:5, 3:13, 3:13] = 1
    arr[2:4, 5 + i:9 + i, 5:9] = 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.5))
    return img


@pytest.fixture
def bench(tmp_path):
    """Dataset601_Bench: ground truth, one fold's split and the STD-Net tiny validation predictions."""
    pre = tmp_path / "pre" / "Dataset601_Bench"
    (pre / "gt_segmentations").mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumor": 2},
                                                  "file_ending": ".nii.gz"}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": [], "val": list(CASES[:2])},
                                                       {"train": [], "val": [CASES[2]]}]))
    for i, case in enumerate(CASES):
        sitk.WriteImage(_label(i), str(pre / "gt_segmentations" / f"{case}.nii.gz"))
    (tmp_path / "raw").mkdir()
    add_predictions(tmp_path, "nnUNetTrainerSTDNet_tiny", fold=0)
    return tmp_path


def add_predictions(root: Path, trainer: str, fold: int):
    val = root / "res" / "Dataset601_Bench" / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{fold}" / "validation"
    val.mkdir(parents=True, exist_ok=True)
    split = json.loads((root / "pre" / "Dataset601_Bench" / "splits_final.json").read_text())[fold]["val"]
    for case in split:
        sitk.WriteImage(_label(CASES.index(case) + (trainer == "nnUNetTrainer_tiny")), str(val / f"{case}.nii.gz"))


def test_benchmark_refuses_a_baseline_without_predictions(bench):
    rc, out = nnunet_liver("benchmark", "-d", "601", "-c", "3d_fullres", "-tr", "nnUNetTrainerSTDNet_tiny", "-f", "0",
                           "-o", bench / "out", env=_env(bench))
    # paired with stock nnU-Net on the same (tiny) schedule, not with nnUNetTrainer
    assert_user_error(rc, out, "baseline nnUNetTrainer_tiny has no results folder",
                      "nnUNetv2_train 601 3d_fullres 0 -tr nnUNetTrainer_tiny -p nnUNetPlans", "--baseline none")
    assert not (bench / "out" / "report.md").exists()


def test_benchmark_trainer_typo(bench):
    add_predictions(bench, "nnUNetTrainer_tiny", fold=0)
    rc, out = nnunet_liver("benchmark", "-d", "601", "-c", "3d_fullres", "-tr", "nnUNetTrainerSTDNet_tny",
                           "--baseline", "nnUNetTrainer_tiny", "-f", "0", "-o", bench / "out", env=_env(bench))
    assert_user_error(rc, out, "no results folder for nnUNetTrainerSTDNet_tny",
                      "did you mean nnUNetTrainerSTDNet_tiny")


def test_benchmark_report_pairs_the_schedule_baseline_and_counts_folds_and_cases(bench, monkeypatch):
    add_predictions(bench, "nnUNetTrainer_tiny", fold=0)
    for key, value in _env(bench).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    out = bench / "out"
    assert main(["benchmark", "-d", "601", "-c", "3d_fullres", "-tr", "nnUNetTrainerSTDNet_tiny", "-f", "0",
                 "-o", str(out), "-np", "1", "--quiet", "--no-plots"]) == 0
    report = (out / "report.md").read_text()
    title = report.splitlines()[0]
    assert title == "# Benchmark, 1 fold (0), 2 cases: Dataset601_Bench, 3d_fullres, nnUNetPlans", title
    assert "Five-fold" not in report and "pooled over" not in report
    assert "Baseline for the paired tests: **nnUNetTrainer_tiny** (stock nnU-Net on the same schedule as " \
           "nnUNetTrainerSTDNet_tiny)" in report
    assert "nnUNetTrainerSTDNet_tiny vs nnUNetTrainer_tiny" in report
    # --baseline none: no paired tests, and the explicit choice is honoured
    assert main(["benchmark", "-d", "601", "-c", "3d_fullres", "-tr", "nnUNetTrainerSTDNet_tiny", "-f", "0",
                 "--baseline", "none", "-o", str(bench / "out2"), "-np", "1", "--quiet", "--no-plots"]) == 0
    report = (bench / "out2" / "report.md").read_text()
    assert "(baseline)" not in report and " vs " not in report
    # two folds read: the title says so and the pooled section names the count
    add_predictions(bench, "nnUNetTrainer_tiny", fold=1)
    add_predictions(bench, "nnUNetTrainerSTDNet_tiny", fold=1)
    assert main(["benchmark", "-d", "601", "-c", "3d_fullres", "-tr", "nnUNetTrainerSTDNet_tiny", "-f", "0", "1",
                 "-o", str(bench / "out3"), "-np", "1", "--quiet", "--no-plots"]) == 0
    report = (bench / "out3" / "report.md").read_text()
    assert report.splitlines()[0].startswith("# Benchmark, 2 folds (0, 1), 3 cases:")
    assert "## Segmentation, pooled over 2 folds" in report


def test_evaluate_single_folder_does_not_claim_folds(bench):
    val = bench / "res" / "Dataset601_Bench" / "nnUNetTrainerSTDNet_tiny__nnUNetPlans__3d_fullres" / "fold_0" / \
        "validation"
    out = bench / "eval"
    assert main(["evaluate", str(val), str(bench / "pre" / "Dataset601_Bench" / "gt_segmentations"), "-o", str(out),
                 "-np", "1", "--quiet", "--no-plots"]) == 0
    report = (out / "report.md").read_text()
    assert report.splitlines()[0] == "# Evaluation of validation: 2 cases"
    assert "pooled over" not in report and "fold" not in report.split("## Segmentation")[1].split("\n")[0]


@pytest.mark.parametrize("damage, message", [
    ("truncated", "the voxel data are damaged, the file is truncated or corrupt"),
    ("flipped", "direction of"),
    ("shifted", "origin of"),
    ("label 3", "contains label values [3] outside LiTS' labels (0 background, 1 liver, 2 tumor), assumed without a "
                "dataset.json: give yours with --dataset-json"),
])
def test_evaluate_refuses_a_damaged_or_misaligned_prediction_naming_it(bench, capsys, damage, message):
    """A killed export leaves a truncated .nii.gz that SimpleITK reads as zeros from the cut on; a segmentation on
    another grid (flipped or shifted against the reference) matches voxel by voxel only by accident; a label value
    the labels lack counts as background. All used to be scored."""
    gt = bench / "pre" / "Dataset601_Bench" / "gt_segmentations"
    # case_b: a label map of some size, so that a cut-off copy still has its header
    noise = np.random.default_rng(0).integers(0, 3, (20, 64, 64)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(gt / "case_b.nii.gz"))
    pred = bench / "pred"
    shutil.copytree(gt, pred)
    target = pred / "case_b.nii.gz"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: int(target.stat().st_size * 0.6)])
    elif damage == "label 3":  # e.g. an ignore label: without a dataset.json it was scored as background
        image = sitk.ReadImage(str(target))
        image[0, 0, 0] = 3
        sitk.WriteImage(image, str(target))
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(target))).shape == noise.shape  # SimpleITK reads it
    else:
        image = sitk.ReadImage(str(target))
        if damage == "flipped":
            image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))  # the same voxels, mirrored in space
        else:
            image.SetOrigin([o + 20.0 for o in image.GetOrigin()])
        sitk.WriteImage(image, str(target))
    assert main(["evaluate", str(pred), str(gt), "-o", str(bench / "eval"), "-np", "1", "--quiet", "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert "case case_b" in err and str(target) in err and message in err, err
    assert "Traceback" not in err


# --- real bugs keep their traceback ----------------------------------------------------------------

def test_a_bug_is_not_turned_into_a_user_error(monkeypatch):
    from nnunet_liver_ext import cli

    def broken(args):
        raise KeyError("a bug")

    real = cli.build_parser

    def parser_with_a_bug():
        parser = real()
        parser._subparsers._group_actions[0].choices["env"].set_defaults(func=broken)
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_with_a_bug)
    with pytest.raises(KeyError):
        cli.main(["env"])
