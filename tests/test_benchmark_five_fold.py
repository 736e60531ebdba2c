"""The benchmark end to end on a real five-fold run: stock nnU-Net and STD-Net trained with
``nnUNetv2_train`` (tiny schedule, CPU) on phantom cases, then ``nnunet-liver benchmark``."""
import csv
import json

import matplotlib.image as mpimg
import pytest

from nnunet_helpers import nnunet_env, plan_and_preprocess_cpu_demo, run, train, write_tiny_phantom_dataset

DATASET_ID = 912
PLANS = "nnUNetPlans_CPUDemo"
BASELINE, METHOD = "nnUNetTrainer_tiny", "nnUNetTrainerSTDNet_tiny"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def benchmark_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("five_fold")
    env = nnunet_env(root)
    write_tiny_phantom_dataset(root, DATASET_ID, "FiveFold", n_train=10, n_test=0, seed=5)
    plan_and_preprocess_cpu_demo(DATASET_ID, env, root)
    for trainer in (BASELINE, METHOD):
        for fold in range(5):
            train(DATASET_ID, fold, trainer, PLANS, env, root)
    out = root / "benchmark"
    run(["nnunet-liver", "benchmark", "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS, "-tr", BASELINE,
         METHOD, "--baseline", BASELINE, "-o", str(out), "-np", "1", "--quiet"], env, root)
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
