"""The benchmark and evaluate commands end to end on a real nnU-Net results tree built from
NIfTI files: two trainers, five folds, CASE.json files for one of them, a missing case."""
import csv
import json
import os
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.cli import main

DATASET = "Dataset987_BenchPhantom"
CONFIG = "3d_fullres"
SPACING_XYZ = (0.8, 0.8, 2.5)  # SimpleITK order; arrays are (z, y, x)
SHAPE_ZYX = (20, 64, 64)
CLASSES = ["hcc", "metastasis", "cyst"]
PHASES = ["arterial", "portal_venous", "delayed"]
TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSTDNet")
MISSING = ("nnUNetTrainerSTDNet", 2)  # (trainer, fold) whose first validation case is deleted
N_CASES = 10


def _ball(center_mm, radius_mm):
    z, y, x = np.indices(SHAPE_ZYX).astype(float)
    sz, sy, sx = SPACING_XYZ[::-1]
    return ((z * sz - center_mm[0]) ** 2 + (y * sy - center_mm[1]) ** 2 + (x * sx - center_mm[2]) ** 2) <= radius_mm ** 2


def _ground_truth(i: int) -> np.ndarray:
    seg = np.zeros(SHAPE_ZYX, np.uint8)
    seg[_ball((25, 25.6, 25.6), 23.0)] = 1
    # lesions of about 5, 12 and 22 mm diameter: one per size stratum
    seg[_ball((25 + (i % 3), 14, 14), 2.6)] = 2
    seg[_ball((22, 33, 16 + i % 2), 6.2)] = 2
    if i % 2 == 0:
        seg[_ball((26, 28, 34), 11.0)] = 2
    return seg


def _perturb(gt: np.ndarray, trainer: str, i: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * TRAINERS.index(trainer) + i)
    pred = gt.copy()
    liver = gt > 0
    shift = (0, 1, 2) if trainer == "nnUNetTrainer" else (0, 0, 1)
    pred[(pred == 1)] = 0
    pred[np.roll(liver, shift, axis=(0, 1, 2)) & (gt != 2)] = 1
    tumor = gt == 2
    if trainer == "nnUNetTrainer":
        # the baseline loses the small lesion and blurs boundaries more
        from scipy.ndimage import binary_erosion
        tumor = binary_erosion(tumor, iterations=1 + i % 2)
    else:
        noise = rng.random(SHAPE_ZYX) < 0.02
        tumor = tumor ^ (noise & tumor)
    pred[(pred == 2) & ~tumor] = 1
    pred[tumor] = 2
    if i == 3:
        pred[2:4, 50:54, 50:54] = 2  # a false-positive component
    return pred


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin((-12.0, 30.0, 7.5))
    sitk.WriteImage(image, str(path))


def _case_json(case: str, i: int, truth_index: int, truth_curve) -> dict:
    rng = np.random.default_rng(i)
    logits = rng.normal(size=3) + 2.0 * np.eye(3)[truth_index if i % 4 else (truth_index + 1) % 3]
    probs = np.exp(logits) / np.exp(logits).sum()
    k = int(np.argmax(probs))
    return dict(case=case, classes=CLASSES, probabilities=probs.tolist(), predicted_class=CLASSES[k],
                predicted_index=k, lesion_voxels=123, phases=PHASES,
                enhancement_curve=(np.asarray(truth_curve) + rng.normal(0, 5, 3)).tolist())


@pytest.fixture(scope="module")
def nnunet_tree(tmp_path_factory):
    """$nnUNet_preprocessed and $nnUNet_results as a five-fold training leaves them."""
    root = tmp_path_factory.mktemp("nnunet")
    pre, res, raw = root / "preprocessed" / DATASET, root / "results" / DATASET, root / "raw"
    (pre / "gt_segmentations").mkdir(parents=True)
    raw.mkdir()
    cases = [f"bench_{i:03d}" for i in range(N_CASES)]
    splits = [{"train": [c for c in cases if c not in cases[2 * k:2 * k + 2]], "val": cases[2 * k:2 * k + 2]}
              for k in range(5)]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    enhancement = {c: [60.0 + 10 * (i % 3), 90.0 - 5 * i, 70.0 + i] for i, c in enumerate(cases)}
    dataset_json = dict(channel_names={"0": "CT", "1": "CT", "2": "CT"}, labels={"background": 0, "liver": 1, "tumor": 2},
                        numTraining=N_CASES, file_ending=".nii.gz", phases=PHASES,
                        characterization={"classes": CLASSES, "cases": {c: i % 3 for i, c in enumerate(cases)}},
                        enhancement=enhancement)
    (pre / "dataset.json").write_text(json.dumps(dataset_json))
    for i, c in enumerate(cases):
        _write(_ground_truth(i), pre / "gt_segmentations" / f"{c}.nii.gz")
    for trainer in TRAINERS:
        tdir = res / f"{trainer}__nnUNetPlans__{CONFIG}"
        tdir.mkdir(parents=True)
        (tdir / "dataset.json").write_text(json.dumps(dataset_json))
        for k, split in enumerate(splits):
            val = tdir / f"fold_{k}" / "validation"
            val.mkdir(parents=True)
            for c in split["val"]:
                i = cases.index(c)
                if (trainer, k) == MISSING and c == split["val"][0]:
                    continue
                _write(_perturb(_ground_truth(i), trainer, i), val / f"{c}.nii.gz")
                if trainer == "nnUNetTrainerSTDNet":
                    (val / f"{c}.json").write_text(json.dumps(_case_json(c, i, i % 3, enhancement[c])))
    return dict(root=root, pre=pre, res=res, raw=raw, cases=cases, splits=splits)


@pytest.fixture()
def nnunet_env(nnunet_tree, monkeypatch):
    folders = dict(nnUNet_raw=nnunet_tree["raw"], nnUNet_preprocessed=nnunet_tree["pre"].parent,
                   nnUNet_results=nnunet_tree["res"].parent)
    for name, path in folders.items():
        # nnU-Net 2.8 reads these lazily (nnunetv2.paths._EnvPath), so setting them here is enough
        monkeypatch.setenv(name, str(path))
    return nnunet_tree


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_png_drawn(path: Path):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img[..., :3].std() > 0.02, f"{path} looks blank"


@pytest.fixture(scope="module")
def benchmark_run(nnunet_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    mp = pytest.MonkeyPatch()
    for name, path in (("nnUNet_raw", nnunet_tree["raw"]), ("nnUNet_preprocessed", nnunet_tree["pre"].parent),
                       ("nnUNet_results", nnunet_tree["res"].parent)):
        mp.setenv(name, str(path))
    try:
        rc = main(["benchmark", "-d", "987", "-c", CONFIG, "-tr", *TRAINERS, "-o", str(out), "-np", "2", "--quiet"])
    finally:
        mp.undo()
    return rc, out


def test_benchmark_writes_csv_report_and_plots(benchmark_run, nnunet_tree):
    rc, out = benchmark_run
    assert rc == 0
    rows = _read_csv(out / "per_case_metrics.csv")
    assert len(rows) == 2 * N_CASES - 1
    by_trainer = {t: [r for r in rows if r["trainer"] == t] for t in TRAINERS}
    assert len(by_trainer["nnUNetTrainer"]) == N_CASES and len(by_trainer["nnUNetTrainerSTDNet"]) == N_CASES - 1
    assert {r["fold"] for r in rows} == {"0", "1", "2", "3", "4"}
    for col in ("liver_region_dice", "liver_label1_dice", "tumor_hd95_mm", "tumor_assd_mm", "tumor_rvd",
                "liver_region_voe", "lesion_tp", "lesion_fp", "lesion_fn", "char_available"):
        assert col in rows[0], col
    assert all(r["spacing_zyx"] == "2.5x0.8x0.8" for r in rows)
    stdnet = by_trainer["nnUNetTrainerSTDNet"]
    assert all(r["char_available"] == "True" for r in stdnet) and "curve_mae" in stdnet[0]
    assert all(r["char_available"] == "False" for r in by_trainer["nnUNetTrainer"])
    # the better trainer is better on the pooled cases
    mean = lambda t, c: np.mean([float(r[c]) for r in by_trainer[t]])
    assert mean("nnUNetTrainerSTDNet", "tumor_dice") > mean("nnUNetTrainer", "tumor_dice")

    report = (out / "report.md").read_text()
    assert "Baseline for the paired tests: **nnUNetTrainer**" in report
    missing_case = nnunet_tree["splits"][MISSING[1]]["val"][0]
    assert f"{missing_case} (fold {MISSING[1]})" in report
    assert "nnUNetTrainer: not available" in report
    assert "liver (region {1,2}" in report and "liver label 1 only (nnU-Net" in report
    assert re.search(r"p=(0\.\d{4}|<0\.0001) \(n=9\)", report)
    # metrics equal for both trainers on some cases: the test ranks fewer pairs than n, and the cell says so
    assert re.search(r"p=1\.0000 \(n=9, 0 differ\)", report) and re.search(r"\(n=9, 1 differs\)", report)
    assert "Empty-mask policy" in report and "Confusion matrix, nnUNetTrainerSTDNet" in report
    assert "MAE overall" in report and "fold 4" in report

    summary = json.loads((out / "summary.json").read_text())
    w = summary["segmentation"]["tumor"]["dice"]["nnUNetTrainerSTDNet"]["vs_baseline"]
    assert w["n_pairs"] == N_CASES - 1 and 0 < w["p"] < 0.05
    assert summary["characterization"]["nnUNetTrainerSTDNet"]["pooled"]["n_cases"] == N_CASES - 1
    assert "nnUNetTrainer" not in summary["characterization"]
    # every fold's statistics are over that fold's validation cases alone, not the pooled ones
    per_fold = summary["segmentation"]["tumor"]["dice"]["nnUNetTrainer"]["per_fold"]
    assert {f: d["n"] for f, d in per_fold.items()} == \
        {str(f): len(nnunet_tree["splits"][f]["val"]) for f in range(5)}

    plots = out / "plots"
    for name in ("violin_dice.png", "violin_hd95.png", "lesion_dice_by_size.png",
                 "confusion_nnUNetTrainerSTDNet.png", "enhancement_nnUNetTrainerSTDNet.png"):
        _assert_png_drawn(plots / name)
        assert f"plots/{name}" in report
    assert not (plots / "confusion_nnUNetTrainer.png").exists()


def test_liver_label1_matches_nnunet_own_dice(benchmark_run, nnunet_tree):
    """nnU-Net's compute_metrics (what writes summary.json) scores label 1 alone; our
    liver_label1 column must agree with it, our liver_region column must agree on (1, 2)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    _, out = benchmark_run
    rows = {(r["trainer"], r["case"]): r for r in _read_csv(out / "per_case_metrics.csv")}
    trainer = "nnUNetTrainer"
    for case in nnunet_tree["splits"][1]["val"]:
        pred = nnunet_tree["res"] / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_1" / "validation" / f"{case}.nii.gz"
        gt = nnunet_tree["pre"] / "gt_segmentations" / f"{case}.nii.gz"
        theirs = compute_metrics(str(gt), str(pred), SimpleITKIO(), [1, (1, 2), 2])["metrics"]
        ours = rows[(trainer, case)]
        assert float(ours["liver_label1_dice"]) == pytest.approx(theirs[1]["Dice"])
        assert float(ours["liver_region_dice"]) == pytest.approx(theirs[(1, 2)]["Dice"])
        assert float(ours["tumor_iou"]) == pytest.approx(theirs[2]["IoU"])


def test_rerun_is_incremental(nnunet_env, benchmark_run, tmp_path, capsys):
    _, out = benchmark_run
    args = ["benchmark", "-d", DATASET, "-c", CONFIG, "-tr", *TRAINERS, "-o", str(out), "-np", "1", "--quiet",
            "--no-plots"]
    assert main(args) == 0
    assert "(0 computed, 19 cached)" in capsys.readouterr().out
    case = nnunet_env["splits"][0]["val"][0]
    pred = nnunet_env["res"] / f"nnUNetTrainer__nnUNetPlans__{CONFIG}" / "fold_0" / "validation" / f"{case}.nii.gz"
    st = pred.stat()
    os.utime(pred, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert main(args) == 0
    assert "(1 computed, 18 cached)" in capsys.readouterr().out


def test_missing_fold_and_bad_geometry_are_reported(nnunet_env, tmp_path, capsys, monkeypatch):
    import shutil

    # a copy of the results tree where fold 4 of STDNet never finished
    res_copy = tmp_path / "results"
    shutil.copytree(nnunet_env["res"], res_copy / DATASET)
    shutil.rmtree(res_copy / DATASET / f"nnUNetTrainerSTDNet__nnUNetPlans__{CONFIG}" / "fold_4" / "validation")
    monkeypatch.setenv("nnUNet_results", str(res_copy))
    out = tmp_path / "out"
    assert main(["benchmark", "-d", DATASET, "-c", CONFIG, "-tr", *TRAINERS, "-o", str(out), "-np", "1",
                 "--quiet", "--no-plots", "-f", "3", "4"]) == 0
    report = (out / "report.md").read_text()
    assert "fold 4 (no validation folder" in report
    assert "no validation folder" in capsys.readouterr().err
    # the means cover different cases: said next to them
    n3, n4 = (len(nnunet_env["splits"][f]["val"]) for f in (3, 4))
    assert (f"Each trainer's mean covers its own cases, and they differ (nnUNetTrainer: {n3 + n4}, "
            f"nnUNetTrainerSTDNet: {n3}; {n3} in common)") in report
    # and next to the lesion counts (characterization: only STD-Net has it, nothing to compare)
    note = "The trainers' case sets differ (see Segmentation): these counts are over each trainer's own cases."
    assert report.count(note) == 1 and report.index(note) > report.index("## Lesion detection")
    assert json.loads((out / "summary.json").read_text())["cases"] == {
        "per_trainer": {"nnUNetTrainer": n3 + n4, "nnUNetTrainerSTDNet": n3}, "common": n3}

    # a prediction on another grid stops with the case and both files named
    case = nnunet_env["splits"][3]["val"][1]
    bad = res_copy / DATASET / f"nnUNetTrainer__nnUNetPlans__{CONFIG}" / "fold_3" / "validation" / f"{case}.nii.gz"
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    sitk.WriteImage(img, str(bad))
    assert main(["benchmark", "-d", DATASET, "-c", CONFIG, "-tr", *TRAINERS, "-o", str(tmp_path / "out2"),
                 "-np", "1", "--quiet", "--no-plots", "-f", "3"]) == 1
    err = capsys.readouterr().err
    assert f"case {case}" in err and str(bad) in err and "shape" in err


def test_evaluate_folder_pair(nnunet_tree, tmp_path):
    val = nnunet_tree["res"] / f"nnUNetTrainerSTDNet__nnUNetPlans__{CONFIG}" / f"fold_{MISSING[1]}" / "validation"
    out = tmp_path / "eval"
    rc = main(["evaluate", str(val), str(nnunet_tree["pre"] / "gt_segmentations"), "-o", str(out),
               "--dataset-json", str(nnunet_tree["pre"] / "dataset.json"), "-np", "1", "--quiet"])
    assert rc == 0
    rows = _read_csv(out / "per_case_metrics.csv")
    assert len(rows) == 1 and rows[0]["fold"] == ""
    report = (out / "report.md").read_text()
    # every ground truth without a prediction is listed (9 of the 10 cases here)
    assert report.count("bench_") >= N_CASES - 1
    assert "Missing cases" in report
    _assert_png_drawn(out / "plots" / "violin_dice.png")


def test_report_statistics_match_scipy_and_are_reproducible():
    from scipy.stats import wilcoxon

    from nnunet_liver_ext.evaluation import report

    rng = np.random.default_rng(3)
    base = rng.random(12)
    other = base + rng.normal(0.05, 0.05, 12)
    cases = [f"c{i}" for i in range(12)]
    w = report.paired_wilcoxon(dict(zip(cases, other)), dict(zip(cases, base)))
    assert w["n_pairs"] == 12 and w["method"] == "exact"
    assert w["p"] == pytest.approx(wilcoxon(other, base, method="exact").pvalue)
    # ties -> normal approximation; NaN pairs and unpaired cases are left out and counted
    tied = dict(zip(cases, np.round(other, 1)))
    tied["c0"] = float("nan")
    w_tied = report.paired_wilcoxon(dict(tied, extra=0.3), dict(zip(cases, np.round(base, 1))))
    assert w_tied["n_pairs"] == 11 and w_tied["method"] == "normal approximation"
    assert report.paired_wilcoxon({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0})["p"] == 1.0
    # equal pairs (tumor-free for both trainers) are counted, but the test ranks only the pairs that differ
    equal = dict(zip(cases, other), **{f"free{i}": 1.0 for i in range(5)})
    w_equal = report.paired_wilcoxon(equal, dict(zip(cases, base), **{f"free{i}": 1.0 for i in range(5)}))
    assert (w_equal["n_pairs"], w_equal["n_differing"]) == (17, 12)
    assert w_equal["p"] == pytest.approx(wilcoxon(other, base, method="approx").pvalue)

    values = rng.normal(0.8, 0.05, 30)
    lo, hi = report.bootstrap_ci(values)
    assert (lo, hi) == report.bootstrap_ci(values)  # fixed seed
    # about 2 x 1.96 standard errors wide
    assert lo < values.mean() < hi and 3 < (hi - lo) / (values.std() / np.sqrt(30)) < 5
    d = report.describe([0.5, float("nan"), 0.7, ""])
    assert d["n"] == 2 and d["n_undefined"] == 1 and d["mean"] == pytest.approx(0.6)
    # the sample SD (n - 1), as reports of per-case scores give it
    assert report.describe([1.0, 2.0, 3.0, 4.0])["sd"] == pytest.approx(statistics.stdev([1.0, 2.0, 3.0, 4.0]))


def test_the_tumor_label_for_lesion_metrics_goes_by_the_trainers_names():
    """MSD names the tumor "cancer": its lesions are scored too, under the same names the trainers read."""
    from nnunet_liver_ext.evaluation.benchmark import settings_from_dataset_json

    for name in ("tumor", "cancer", "lesion"):
        settings = settings_from_dataset_json({"labels": {"background": 0, "liver": 1, name: 2}})
        assert settings.tumor_labels == (2,) and settings.ignore_label is None
    sparse = settings_from_dataset_json({"labels": {"background": 0, "liver": 1, "tumor": 2, "ignore": 3}})
    assert sparse.ignore_label == 3 and sparse.tumor_labels == (2,)
    assert settings_from_dataset_json({"labels": {"background": 0, "liver": 1}}).tumor_labels is None


def test_evaluation_counts_diagonally_touching_tumor_voxels_as_one_lesion_by_default(tmp_path):
    """The library's default connectivity is evaluate's (--connectivity 3, the 26-neighbourhood): with faces only,
    a lesion whose voxels touch at a corner would count as several lesions in the reference and the prediction."""
    from nnunet_liver_ext.evaluation.benchmark import collect_folder, compute_case

    seg = np.zeros((4, 4, 4), np.uint8)
    seg[1:3, 1:3, 1:3] = 1
    seg[1, 1, 1] = seg[2, 2, 2] = 2  # touching at a corner only
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        _write(seg, tmp_path / folder / "case_0.nii.gz")
    dataset_json = {"labels": {"background": 0, "liver": 1, "tumor": 2}, "file_ending": ".nii.gz"}
    inputs = collect_folder(tmp_path / "pred", tmp_path / "gt", dataset_json)
    row = compute_case(inputs.jobs[0], inputs.settings)["row"]
    assert (row["n_ref_lesions"], row["n_pred_lesions"], row["lesion_tp"]) == (1, 1, 1)


def test_a_fold_listed_twice_is_refused():
    """Its cases would be counted twice: n doubled, every interval too narrow."""
    from nnunet_liver_ext.evaluation.benchmark import collect_benchmark

    with pytest.raises(ValueError, match=r"fold list has duplicates: \[0, 1, 0\]"):
        collect_benchmark("Dataset999_Any", "3d_fullres", ["nnUNetTrainer"], folds=[0, 1, 0])


@pytest.mark.parametrize("overlap", ["two folds", "one fold"])
def test_a_case_in_two_validation_sets_is_refused(nnunet_env, overlap):
    """A hand-edited splits_final.json: the case would count twice in the pooled mean, SD and interval (n=16 of
    15 cases) and the paired test would keep one of its copies."""
    from nnunet_liver_ext.evaluation.benchmark import collect_benchmark

    splits_file = nnunet_env["pre"] / "splits_final.json"
    original = splits_file.read_text()
    splits = json.loads(original)
    case = splits[0]["val"][0]
    splits[1 if overlap == "two folds" else 0]["val"].append(case)
    splits_file.write_text(json.dumps(splits))
    expected = (f"case {case} is in the validation sets of folds 0 and 1" if overlap == "two folds" else
                f"case {case} is listed twice in fold 0's validation set")
    try:
        with pytest.raises(ValueError, match=re.escape(f"{expected} ({splits_file}): the pooled statistics")):
            collect_benchmark(DATASET, CONFIG, list(TRAINERS))
        collect_benchmark(DATASET, CONFIG, list(TRAINERS), folds=(2, 3))  # folds without the case are fine
    finally:
        splits_file.write_text(original)


def test_the_bootstrap_ci_is_95_percent_and_a_pair_undefined_for_the_baseline_is_left_out():
    """Guards against a 90 % interval reported as the 95 % one, and against pairs whose baseline value is NaN
    entering the Wilcoxon test (n_pairs, median difference and p would count an undefined case)."""
    from nnunet_liver_ext.evaluation import report

    values = np.arange(20.0)
    lo, hi = report.bootstrap_ci(values)
    # a 95 % percentile interval of the mean: about 2 x 1.96 standard errors (a 90 % one: 2 x 1.64)
    assert 3.7 < (hi - lo) / (values.std() / np.sqrt(values.size)) < 4.2
    w = report.paired_wilcoxon({"a": 1.0, "b": 2.0, "c": 3.5, "d": 4.0},
                               {"a": 0.5, "b": 1.4, "c": 2.2, "d": float("nan")})
    assert w["n_pairs"] == 3 and w["median_difference"] == pytest.approx(0.6)


def test_collection_adds_a_baseline_not_listed_and_lists_predictions_of_cases_outside_the_split(
        nnunet_env, tmp_path, monkeypatch):
    """Guards against --baseline naming a trainer not in -tr leaving it out (no paired tests), and against a
    prediction of a case outside the fold's validation split going unreported."""
    import shutil

    from nnunet_liver_ext.evaluation.benchmark import collect_benchmark

    res_copy = tmp_path / "results"
    stdnet = f"nnUNetTrainerSTDNet__nnUNetPlans__{CONFIG}"
    for trainer_dir in (stdnet, f"nnUNetTrainer__nnUNetPlans__{CONFIG}"):
        shutil.copytree(nnunet_env["res"] / trainer_dir / "fold_0", res_copy / DATASET / trainer_dir / "fold_0")
    val = res_copy / DATASET / stdnet / "fold_0" / "validation"
    shutil.copy(val / f"{nnunet_env['splits'][0]['val'][0]}.nii.gz", val / "not_in_split.nii.gz")
    monkeypatch.setenv("nnUNet_results", str(res_copy))
    inputs = collect_benchmark(DATASET, CONFIG, ["nnUNetTrainerSTDNet"], baseline="nnUNetTrainer", folds=(0,))
    assert inputs.trainers == ["nnUNetTrainer", "nnUNetTrainerSTDNet"] and inputs.baseline == "nnUNetTrainer"
    assert {j.trainer for j in inputs.jobs} == {"nnUNetTrainer", "nnUNetTrainerSTDNet"}
    assert inputs.completeness.unexpected_files == {"nnUNetTrainerSTDNet": [(0, "not_in_split")]}


def test_a_statistic_of_one_case_shows_no_interval():
    from nnunet_liver_ext.evaluation import report

    cell = report._stat_cell(dict(n=1, n_undefined=0, mean=0.7, sd=float("nan"), ci_low=0.7, ci_high=0.7))
    assert cell == "0.700 ± n/a (n=1)", cell
    two = report._stat_cell(dict(n=2, n_undefined=1, mean=0.7, sd=0.1, ci_low=0.6, ci_high=0.8))
    assert two == "0.700 ± 0.100 [0.600, 0.800] (n=2, NaN 1)", two


def test_lesion_size_plot_marks_a_stratum_without_lesions_instead_of_drawing_a_zero(tmp_path):
    """An empty stratum (NaN in the report) and one whose lesions were all missed (0) used to look the same."""
    from nnunet_liver_ext.evaluation import plots

    nan = float("nan")
    by_size = {"< 10 mm": {"n_lesions": 0, "recall": nan, "lesion_dice": {"mean": nan, "sd": nan}},
               "10-20 mm": {"n_lesions": 2, "recall": 0.0, "lesion_dice": {"mean": 0.0, "sd": 0.0}},
               "> 20 mm": {"n_lesions": 1, "recall": 1.0, "lesion_dice": {"mean": 0.8, "sd": nan}}}
    strata = list(by_size)
    assert plots.size_stratum_bars(by_size, strata) == ([0.0, 0.0, 0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                                                        [True, False, False])
    texts = []
    real_text = plots._pyplot().Axes.text

    def spy(ax, x, y, s, *args, **kwargs):
        texts.append(s)
        return real_text(ax, x, y, s, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots._pyplot().Axes, "text", spy)
        assert plots.lesion_dice_by_size({"lesions": {"A": {"by_size": by_size}}}, tmp_path / "p.png").is_file()
    assert texts == ["no lesions", "no lesions"]  # one mark in each panel
