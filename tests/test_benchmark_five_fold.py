"""The benchmark end to end on a real five-fold run: stock nnU-Net and STD-Net trained with
``nnUNetv2_train`` (tiny schedule, CPU) on phantom cases, then ``nnunet-liver benchmark``; and nnU-Net's own
``nnUNetv2_find_best_configuration`` on STD-Net's folds and on both trainers (their ensemble scored too), with the
inference commands it writes."""
import csv
import json

import matplotlib.image as mpimg
import pytest

from nnunet_helpers import (assert_same_geometry, nnunet_env, plan_and_preprocess_cpu_demo, predict_held_out, run,
                            train, write_tiny_phantom_dataset)

DATASET_ID = 912
PLANS = "nnUNetPlans_CPUDemo"
BASELINE, METHOD = "nnUNetTrainer_tiny", "nnUNetTrainerSTDNet_tiny"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def five_folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("five_fold")
    env = nnunet_env(root)
    dataset = write_tiny_phantom_dataset(root, DATASET_ID, "FiveFold", n_train=10, n_test=2, seed=5)
    plan_and_preprocess_cpu_demo(DATASET_ID, env, root)
    for trainer in (BASELINE, METHOD):
        for fold in range(5):  # --npz: the validation probabilities nnU-Net's ensembling needs
            train(DATASET_ID, fold, trainer, PLANS, env, root, extra=["--npz"])
    return {"root": root, "env": env, "dataset": dataset}


@pytest.fixture(scope="module")
def benchmark_out(five_folds):
    out = five_folds["root"] / "benchmark"
    run(["nnunet-liver", "benchmark", "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS, "-tr", BASELINE,
         METHOD, "--baseline", BASELINE, "-o", str(out), "-np", "1", "--quiet"], five_folds["env"], five_folds["root"])
    return out


def test_report_covers_both_trainers_all_folds_and_every_case(benchmark_out):
    report = (benchmark_out / "report.md").read_text()
    assert f"{BASELINE} (baseline)" in report and METHOD in report
    rows = list(csv.DictReader(open(benchmark_out / "per_case_metrics.csv", newline="")))
    for trainer in (BASELINE, METHOD):
        mine = [r for r in rows if r["trainer"] == trainer]
        assert len(mine) == 10, f"{trainer}: {len(mine)} cases"  # every case once, out of fold
        assert {r["fold"] for r in mine} == {"0", "1", "2", "3", "4"}
    assert "## Characterization" in report
    summary = json.loads((benchmark_out / "summary.json").read_text())
    assert summary  # machine-readable twin of the report


def test_plots_exist_are_labelled_and_not_blank(benchmark_out):
    report = (benchmark_out / "report.md").read_text()
    for name in ("violin_dice.png", "violin_hd95.png", f"confusion_{METHOD}.png"):
        path = benchmark_out / "plots" / name
        assert path.is_file() and path.stat().st_size > 5000, path
        image = mpimg.imread(path)
        assert image[..., :3].std() > 0.02, f"{path} looks blank"
        assert f"plots/{name}" in report


def test_find_best_configuration_and_the_inference_it_writes(five_folds):
    """nnU-Net's own steps after five folds, on the method's trainer: nnUNetv2_find_best_configuration
    (cross-validation summary, postprocessing decision, inference instructions), then the commands it writes,
    as a user copies them: nnUNetv2_predict with the five folds and nnUNetv2_apply_postprocessing."""
    root, env, dataset = five_folds["root"], five_folds["env"], five_folds["dataset"]
    run(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS, "-tr", METHOD,
         "-f", "0", "1", "2", "3", "4", "-np", "1"], env, root)
    commands = _run_inference_instructions(five_folds, "best")
    assert [c[0] for c in commands] == ["nnUNetv2_predict", "nnUNetv2_apply_postprocessing"], commands
    assert METHOD in commands[0] and PLANS in commands[0], commands


def test_find_best_configuration_ensembles_the_method_with_stock_nnunet(five_folds):
    """nnU-Net's model selection over two trainers: each alone and their ensemble (the averaged validation
    probabilities of --npz) are scored on the five folds, and whichever wins, the commands it writes run as a
    user copies them (for an ensemble: both predictions with probabilities, nnUNetv2_ensemble, postprocessing)."""
    root, env, dataset = five_folds["root"], five_folds["env"], five_folds["dataset"]
    run(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS, "-tr", BASELINE,
         METHOD, "-f", "0", "1", "2", "3", "4", "-np", "1"], env, root)
    results = root / "res" / dataset.name
    scored = json.loads((results / "inference_information.json").read_text())["all_results"]
    ensembles = [key for key in scored if key.startswith("ensemble___")]
    assert len(scored) == 3 and len(ensembles) == 1, scored
    assert BASELINE in ensembles[0] and METHOD in ensembles[0]
    assert (results / "ensembles" / ensembles[0] / "summary.json").is_file()
    commands = _run_inference_instructions(five_folds, "ensemble_or_best")
    assert commands[-1][0] == "nnUNetv2_apply_postprocessing", commands
    if len([c for c in commands if c[0] == "nnUNetv2_predict"]) == 2:
        assert [c[0] for c in commands] == ["nnUNetv2_predict", "nnUNetv2_predict", "nnUNetv2_ensemble",
                                            "nnUNetv2_apply_postprocessing"], commands


def _run_inference_instructions(five_folds, name: str) -> list:
    """The commands of nnU-Net's inference_instructions.txt, run on the test images into root/NAME (and NAME_pp,
    NAME_model_1, ...) on the CPU; every output segmentation is checked against its image. Returns them."""
    root, env, dataset = five_folds["root"], five_folds["env"], five_folds["dataset"]
    instructions = (root / "res" / dataset.name / "inference_instructions.txt").read_text()
    commands = [line.split() for line in instructions.splitlines() if line.startswith("nnUNetv2_")]
    folders = {"INPUT_FOLDER": str(dataset / "imagesTs"), "OUTPUT_FOLDER": str(root / name),
               "OUTPUT_FOLDER_PP": str(root / f"{name}_pp"),
               **{f"OUTPUT_FOLDER_MODEL_{k}": str(root / f"{name}_model_{k}") for k in (1, 2)}}
    for command in commands:
        command = [folders.get(arg, arg) for arg in command]
        if "-np" in command:
            command[command.index("-np") + 1] = "1"
        if command[0] == "nnUNetv2_predict":
            command += ["-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
        run(command, env, root)
    images = sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == 2
    for image in images:
        case = image.name[:-len("_0000.nii.gz")]
        for folder in (name, f"{name}_pp"):
            assert_same_geometry(root / folder / f"{case}.nii.gz", image)
    return commands


def test_a_trained_method_travels_as_an_nnunet_model_zip(five_folds, tmp_path):
    """The nnU-Net way to share a model, on the method's five folds: nnUNetv2_export_model_to_zip, then
    nnUNetv2_install_pretrained_model_from_zip into another nnUNet_results (the recipient's, which has the
    package installed but never trained), then nnUNetv2_predict from there."""
    root, env, dataset = five_folds["root"], five_folds["env"], five_folds["dataset"]
    archive = tmp_path / "stdnet.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(archive), "-c", "3d_fullres", "-tr",
         METHOD, "-p", PLANS, "-f", "0", "1", "2", "3", "4"], env, root)
    recipient = dict(env, nnUNet_results=str(tmp_path / "recipient_results"))
    run(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], recipient, root)
    model = tmp_path / "recipient_results" / dataset.name / f"{METHOD}__{PLANS}__3d_fullres"
    assert sorted(p.name for p in model.glob("fold_*/checkpoint_final.pth")) == ["checkpoint_final.pth"] * 5
    predict_held_out("nnUNetv2_predict", {"dataset": dataset, "root": tmp_path, "env": recipient}, DATASET_ID, METHOD,
                     PLANS, folds=("0", "1", "2", "3", "4"))
