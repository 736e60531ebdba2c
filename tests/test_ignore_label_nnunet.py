"""nnU-Net's ignore label (sparse annotation) through nnU-Net's console scripts, on the CPU.

The phantom's training labels with their top slices unannotated (the ignore label, as nnU-Net documents it:
``"ignore": 3`` in dataset.json's labels), then nnUNetv2_plan_and_preprocess --verify_dataset_integrity ->
nnunet-liver plan (CPU-demo plans) -> nnUNetv2_train for STD-Net (case heads, CASE.json validation) and
DynTransNet's _paper variant (Dice-only loss) -> nnunet-liver benchmark on fold 0, whose Dice must be nnU-Net's
own (its validation summary.json, computed with the ignore label) -> nnunet-liver predict.
The in-process tests of every trainer: tests/test_ignore_label.py.
"""
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_helpers import CPU_DEMO_PLANS as PLANS
from nnunet_helpers import predict_held_out, run, tiny_trained_workspace, train

pytestmark = pytest.mark.slow

DATASET_ID = 927
STDNET, DYNTRANSNET = "nnUNetTrainerSTDNet_tiny", "nnUNetTrainerDynTransNet_paper_tiny"
IGNORE = 3


def unannotate_top_slices(dataset) -> None:
    """The top third of every training label map becomes the ignore label, lesions and liver included."""
    for path in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(image)
        labels[2 * labels.shape[0] // 3:] = IGNORE
        edited = sitk.GetImageFromArray(labels)
        edited.CopyInformation(image)
        sitk.WriteImage(edited, str(path))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    sparse = {"labels": {"background": 0, "liver": 1, "tumor": 2, "ignore": IGNORE}}
    workspace = tiny_trained_workspace(tmp_path_factory.mktemp("ignore"), DATASET_ID, "SparseE2E", STDNET, n_train=6,
                                       n_test=2, seed=4, dataset_json_update=sparse, edit_raw=unannotate_top_slices)
    workspace["dyntransnet_log"] = train(DATASET_ID, 0, DYNTRANSNET, PLANS, workspace["env"], workspace["root"])
    return workspace


@pytest.fixture(scope="module")
def benchmark_rows(workspace):
    out = workspace["root"] / "benchmark"
    run(["nnunet-liver", "benchmark", "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS, "-tr", STDNET,
         DYNTRANSNET, "--baseline", "none", "-f", "0", "-o", str(out), "-np", "1", "--quiet", "--no-plots"],
        workspace["env"], workspace["root"])
    return list(csv.DictReader(open(out / "per_case_metrics.csv", newline="")))


@pytest.mark.parametrize("trainer", [STDNET, DYNTRANSNET])
def test_training_validates_and_the_benchmark_scores_as_nnunet_does(workspace, benchmark_rows, trainer):
    root, dataset = workspace["root"], workspace["dataset"]
    fold = root / "res" / dataset.name / f"{trainer}__{PLANS}__3d_fullres" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    theirs = {case["prediction_file"].split("/")[-1][:-len(".nii.gz")]: case["metrics"]
              for case in summary["metric_per_case"]}
    assert theirs
    rows = [r for r in benchmark_rows if r["trainer"] == trainer]
    assert sorted(r["case"] for r in rows) == sorted(theirs)
    assert not any(column.startswith("ignore") for column in rows[0])
    for row in rows:
        for column, label in (("liver_label1_dice", "1"), ("tumor_dice", "2")):
            expected = theirs[row["case"]][label]["Dice"]
            ours = float(row[column])
            assert (np.isnan(ours) and np.isnan(expected)) or ours == pytest.approx(expected), (row["case"], column)
    if trainer == STDNET:  # the case heads' validation pass
        for case in theirs:
            assert (fold / "validation" / f"{case}.json").is_file()


def test_prediction_of_a_sparsely_trained_model(workspace):
    out, cases = predict_held_out("nnunet-liver", workspace, DATASET_ID, STDNET, PLANS)
    for case in cases:  # the model predicts classes, never the ignore label
        assert (out / f"{case}.json").is_file()
