"""The input check of ``nnunet-liver predict`` (inference/inputs.py) on real files, one defect per case,
each next to a good case; the outputs bookkeeping of inference/batch.py and the CSV's dropped rows.

The same check through the console command with a trained model is in test_predict_bad_inputs.py;
with every trainer of the package in test_predict_inputs_every_trainer.py.
"""
import gzip
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.inference.batch import STAGING_PREFIX, remove_abandoned_staging, remove_case_outputs
from nnunet_liver_ext.inference.inputs import channel_count, check_input_folder

DATASET_JSON = {"channel_names": {"0": "CT", "1": "CT", "2": "CT"}, "file_ending": ".nii.gz",
                "phases": ["arterial", "portal_venous", "delayed"], "labels": {"background": 0, "liver": 1, "tumor": 2}}


def image(array=None, spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), dtype=np.float32) -> sitk.Image:
    array = np.random.default_rng(0).normal(0, 50, (6, 10, 12)).astype(dtype) if array is None else array
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    return result


def write_case(folder, case, images):
    for k, img in enumerate(images):
        sitk.WriteImage(img, str(folder / f"{case}_{k:04d}.nii.gz"), True)


def good_case(folder, case):
    write_case(folder, case, [image() for _ in range(3)])


def problems(check, case):
    [found] = [c for c in check.cases if c.case == case]
    return found.problems


def only_problem(check, case, file_name):
    """The one problem of ``case``, which must name ``file_name``; the good case has none."""
    assert [c.case for c in check.good] == ["good"], [str(p) for c in check.bad for p in c.problems]
    found = problems(check, case)
    assert len(found) == 1, [str(p) for p in found]
    assert os.path.basename(found[0].path) == file_name and f"case {case}: " in str(found[0])
    return found[0]


@pytest.fixture
def folder(tmp_path):
    good_case(tmp_path, "good")
    return tmp_path


def test_a_missing_channel_is_named_with_its_phase(folder):
    write_case(folder, "bad", [image(), image()])
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0002.nii.gz")
    assert "is missing" in problem.message and "delayed" in problem.message


def test_a_case_with_more_phases_than_the_model_takes(folder):
    write_case(folder, "bad", [image() for _ in range(4)])
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0003.nii.gz")
    assert "takes 3 channel" in problem.message


def test_a_truncated_gzip_is_unreadable(folder):
    good_case(folder, "bad")
    path = folder / "bad_0001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header is intact, the voxels are cut
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0001.nii.gz")
    assert "cannot be read" in problem.message


def test_a_file_that_is_not_an_image_is_unreadable(folder):
    good_case(folder, "bad")
    with gzip.open(folder / "bad_0000.nii.gz", "wb") as f:
        f.write(b"this is not a NIfTI header" * 20)
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0000.nii.gz")
    assert "cannot be read" in problem.message


@pytest.mark.parametrize("change, expected", [
    (dict(array=np.zeros((6, 10, 13), np.float32)), "size (13, 10, 6) instead of (12, 10, 6)"),
    (dict(spacing=(0.8, 0.8, 3.0)), "spacing"),
    (dict(origin=(0.0, 5.0, 0.0)), "origin"),
], ids=["size", "spacing", "origin"])
def test_a_phase_on_another_grid(folder, change, expected):
    write_case(folder, "bad", [image(), image(), image(**change)])
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0002.nii.gz")
    assert "is not on the grid of bad_0000.nii.gz" in problem.message and expected in problem.message


def test_a_phase_with_another_direction(folder):
    turned = image()
    turned.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    write_case(folder, "bad", [image(), turned, image()])
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0001.nii.gz")
    assert "direction" in problem.message


def test_geometry_within_nnunets_tolerance_passes(folder):
    write_case(folder, "close", [image(), image(origin=(0.0, 1e-7, 0.0)), image(spacing=(0.8, 0.8, 2.5 + 1e-7))])
    check = check_input_folder(str(folder), DATASET_JSON)
    assert [c.case for c in check.good] == ["close", "good"]


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_voxels(folder, value, word):
    array = sitk.GetArrayFromImage(image())
    array[2, 3, 4] = value
    array[1, 1, 1] = value
    write_case(folder, "bad", [image(), image(array), image()])
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0001.nii.gz")
    assert f"has 2 {word} voxels" in problem.message


def test_float64_beyond_float32_counts_as_infinite(folder):
    """nnU-Net's reader casts to float32: 1e300 becomes inf there."""
    array = sitk.GetArrayFromImage(image()).astype(np.float64)
    array[0, 0, 0] = 1e300
    write_case(folder, "bad", [image(), image(array), image()])
    problem = only_problem(check_input_folder(str(folder), DATASET_JSON), "bad", "bad_0001.nii.gz")
    assert "1 infinite voxel" in problem.message


def test_integer_images_and_2d_cases_pass(tmp_path):
    ints = [image(np.random.default_rng(k).integers(-1000, 1000, (6, 10, 12)).astype(np.int16)) for k in range(3)]
    write_case(tmp_path, "ints", ints)
    flat = sitk.GetImageFromArray(np.ones((10, 12), np.float32))
    write_case(tmp_path, "flat", [flat, flat, flat])
    check = check_input_folder(str(tmp_path), DATASET_JSON)
    assert [c.case for c in check.good] == ["flat", "ints"] and not check.bad


def test_a_4d_file_and_a_vector_image_are_refused(folder):
    four_d = sitk.JoinSeries([image(), image()])
    vector = sitk.Compose([image(), image()])
    write_case(folder, "fourd", [four_d, image(), image()])
    write_case(folder, "vector", [image(), vector, image()])
    check = check_input_folder(str(folder), DATASET_JSON)
    assert "4-D image" in problems(check, "fourd")[0].message
    assert "2 components per voxel" in problems(check, "vector")[0].message
    assert sorted(c.case for c in check.bad) == ["fourd", "vector"]


def test_several_defects_of_one_case_are_all_reported(folder):
    array = sitk.GetArrayFromImage(image())
    array[0, 0, 0] = np.nan
    write_case(folder, "bad", [image(array), image(origin=(9.0, 0.0, 0.0))])
    found = problems(check_input_folder(str(folder), DATASET_JSON), "bad")
    names = sorted(os.path.basename(p.path) for p in found)
    assert names == ["bad_0000.nii.gz", "bad_0001.nii.gz", "bad_0002.nii.gz"]


def test_stray_files_and_other_endings_are_not_cases(folder):
    shutil.copy(folder / "good_0000.nii.gz", folder / "notes.nii.gz")
    (folder / "readme.txt").write_text("not an image")
    check = check_input_folder(str(folder), DATASET_JSON)
    assert [c.case for c in check.cases] == ["good"] and [os.path.basename(p) for p in check.stray_files] == \
        ["notes.nii.gz"]


def test_the_previous_stage_segmentation_must_exist(folder, tmp_path_factory):
    previous = tmp_path_factory.mktemp("previous_stage")
    good_case(folder, "other")
    sitk.WriteImage(image(np.zeros((6, 10, 12), np.uint8)), str(previous / "good.nii.gz"))
    check = check_input_folder(str(folder), DATASET_JSON, prev_stage_folder=str(previous))
    assert [c.case for c in check.good] == ["good"]
    assert os.path.basename(problems(check, "other")[0].path) == "other.nii.gz"


def test_channel_count_reads_nnunet_v2_and_v1_keys():
    assert channel_count(DATASET_JSON) == 3 and channel_count({"modality": {"0": "CT"}}) == 1
    with pytest.raises(ValueError, match="channel_names"):
        channel_count({"file_ending": ".nii.gz"})


def test_removing_a_failed_cases_outputs_leaves_the_others(tmp_path):
    for name in ("bad.nii.gz", "bad.json", "bad.npz", "bad.pkl", "badder.nii.gz", "good.nii.gz"):
        (tmp_path / name).write_text("x")
    removed = remove_case_outputs(str(tmp_path), "bad", ".nii.gz")
    assert sorted(os.path.basename(p) for p in removed) == ["bad.json", "bad.nii.gz", "bad.npz", "bad.pkl"]
    assert sorted(os.listdir(tmp_path)) == ["badder.nii.gz", "good.nii.gz"]


def test_staging_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f"{STAGING_PREFIX}{dead_pid}-abc").mkdir()
        (tmp_path / f"{STAGING_PREFIX}{live.pid}-def").mkdir()
        remove_abandoned_staging(str(tmp_path))
        assert os.listdir(tmp_path) == [f"{STAGING_PREFIX}{live.pid}-def"]
    finally:
        live.kill()
        live.wait()


def test_csv_drops_the_rows_of_failed_cases_and_keeps_the_others(tmp_path):
    from nnunet_liver_ext.inference.characterization import CaseCharacterization, write_characterization_csv

    def result(case):
        return CaseCharacterization(case, ["A", "B"], [0.7, 0.3], True, 12, None, None, "predicted_lesion_voxels")

    path = str(tmp_path / "characterization.csv")
    write_characterization_csv(path, [result("a"), result("b"), result("c")])
    write_characterization_csv(path, [result("a")], drop=["b"])
    assert [line.split(",")[0] for line in open(path).read().split()[1:]] == ["a", "c"]
    write_characterization_csv(path, [], drop=["c"])  # nothing predicted this time: the rows go all the same
    lines = open(path).read().split()
    assert lines[0].startswith("case,predicted_class,prob_A") and [r.split(",")[0] for r in lines[1:]] == ["a"]


def unloadable_model(root, dataset_name: str, plans: dict = None):
    """A model folder ``nnunet-liver predict`` finds under root/res, whose checkpoint nnU-Net could not load (an
    empty file): a command that gets past its checks would fail, so these tests see the checks alone."""
    import json

    model = root / "res" / dataset_name / "nnUNetTrainerSTDNet_tiny__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (model / "dataset.json").write_text(json.dumps(DATASET_JSON))
    if plans is not None:
        (model / "plans.json").write_text(json.dumps(plans))
    for name in ("raw", "pre"):
        (root / name).mkdir(exist_ok=True)
    return model


def predict_command(root, dataset_id: int, images, out, *extra):
    """``nnunet-liver predict`` through its console script with nnU-Net's folders under root, fold 0 on the CPU."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"))
    return subprocess.run([str(Path(sys.executable).parent / "nnunet-liver"), "predict", "-i", str(images), "-o",
                           str(out), "-d", str(dataset_id), "-c", "3d_fullres", "-tr", "nnUNetTrainerSTDNet_tiny",
                           "-f", "0", "-device", "cpu", *extra], env=env, capture_output=True, text=True, timeout=300)


def test_the_command_on_bad_cases_only_names_them_and_stops_before_loading_the_model(tmp_path):
    """``nnunet-liver predict`` through its console script on a folder where every case is bad: each
    case and file named, stale outputs and table rows removed, status 1, and the model never loaded
    (the checkpoint here is an empty file nnU-Net could not read; the check comes first)."""
    unloadable_model(tmp_path, "Dataset914_Bad")
    images = tmp_path / "images"
    images.mkdir()
    write_case(images, "missing", [image(), image()])
    array = sitk.GetArrayFromImage(image())
    array[:] = np.nan
    write_case(images, "nan", [image(), image(array), image()])
    out = tmp_path / "pred"
    out.mkdir()
    for name in ("missing.nii.gz", "missing.json", "nan.nii.gz", "keep.nii.gz"):
        (out / name).write_text("an earlier run")
    (out / "characterization.csv").write_text("case,predicted_class\nkeep,A\nmissing,B\nnan,A\n")
    proc = predict_command(tmp_path, 914, images, out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"case missing: {images / 'missing_0002.nii.gz'}: is missing" in proc.stderr
    assert f"case nan: {images / 'nan_0001.nii.gz'}: has " in proc.stderr and "NaN voxels" in proc.stderr
    assert "2 of 2 case(s) were not predicted" in proc.stderr
    assert sorted(os.listdir(out)) == ["characterization.csv", "keep.nii.gz"]
    assert (out / "characterization.csv").read_text().split() == ["case,predicted_class", "keep,A"]


def _write_rows_in_a_process(path, first, count):
    from nnunet_liver_ext.inference.characterization import CaseCharacterization, write_characterization_csv

    for k in range(first, first + count):
        write_characterization_csv(path, [CaseCharacterization(f"case_{k:03d}", ["A", "B"], [0.7, 0.3], True, 12,
                                                               None, None, "predicted_lesion_voxels")])


def test_csv_writers_that_run_at_the_same_time_keep_each_others_rows(tmp_path, monkeypatch):
    """What two ``-part_id`` runs into one folder do at their ends: each reads the table, adds its rows and
    writes it back. Without the lock, a row written between another writer's read and write is lost; a
    pause before each write (a large table, a slow file system) makes that window wide."""
    import multiprocessing
    import time

    from nnunet_liver_ext.inference import characterization

    write_rows = characterization._write_rows

    def slow_write_rows(*args):
        time.sleep(0.02)
        write_rows(*args)

    monkeypatch.setattr(characterization, "_write_rows", slow_write_rows)  # the forked writers inherit it
    path = str(tmp_path / "characterization.csv")
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_rows_in_a_process, args=(path, 100 * w, 15)) for w in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    rows = open(path).read().split()[1:]
    assert sorted(r.split(",")[0] for r in rows) == [f"case_{100 * w + k:03d}" for w in range(3) for k in range(15)]
    assert sorted(os.listdir(tmp_path)) == ["characterization.csv"]  # the lock lies elsewhere


def test_the_parts_are_nnunets_split_of_the_sorted_cases(tmp_path):
    """``-num_parts 3 -part_id 1`` checks (and would predict) the cases nnUNetv2_predict's part 1 of 3 takes;
    all bad here, so the command names exactly those and stops before loading the model."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    unloadable_model(tmp_path, "Dataset915_Parts")
    images = tmp_path / "images"
    images.mkdir()
    for case in ("c", "a", "e", "b", "g", "d", "f"):
        write_case(images, case, [image(), image()])  # a channel missing: bad
    expected = [os.path.basename(files[0])[:-len("_0000.nii.gz")] for files in
                create_lists_from_splitted_dataset_folder(str(images), ".nii.gz")[1::3]]
    proc = predict_command(tmp_path, 915, images, tmp_path / "pred", "-num_parts", "3", "-part_id", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "part 1 of 3: 2 of the 7 cases" in proc.stdout
    named = [line.split("case ")[1].split(":")[0] for line in proc.stderr.splitlines() if "input error: case" in line]
    assert expected == ["b", "e"] and sorted(set(named)) == expected
    bad = predict_command(tmp_path, 915, images, tmp_path / "pred", "-num_parts", "2", "-part_id", "2")
    assert bad.returncode == 1 and "the parts are numbered 0 to num_parts - 1" in bad.stderr


@pytest.mark.parametrize("extra, words", [
    (["-prev_stage_predictions", "somewhere"], "is no stage of nnU-Net's cascade"),
    (["-step_size", "0"], "-step_size 0.0: the sliding window's step is a fraction of the patch"),
])
def test_options_that_would_fail_every_case_are_refused_first(tmp_path, extra, words):
    """nnU-Net would fail inside every case; the command says why before loading the model."""
    unloadable_model(tmp_path, "Dataset916_Options", plans={"configurations": {"3d_fullres": {"patch_size": [8] * 3}}})
    images = tmp_path / "images"
    images.mkdir()
    good_case(images, "a")
    proc = predict_command(tmp_path, 916, images, tmp_path / "pred", *extra)
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "pred").exists()


def test_staging_of_another_machine_is_left_alone(tmp_path):
    """-part_id calls on two nodes share the output folder; a pid of another machine says nothing here."""
    from nnunet_liver_ext.inference.batch import staging_owner

    dead = subprocess_dead_pid()
    (tmp_path / f"{STAGING_PREFIX}{dead}@some_other_node-abc").mkdir()
    host = staging_owner().split("@", 1)[1]
    (tmp_path / f"{STAGING_PREFIX}{dead}@{host}-def").mkdir()
    remove_abandoned_staging(str(tmp_path))
    assert os.listdir(tmp_path) == [f"{STAGING_PREFIX}{dead}@some_other_node-abc"]


def subprocess_dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_continue_prediction_takes_a_case_without_its_case_json_for_unfinished(tmp_path):
    """A model with case heads: a segmentation without CASE.json (a heads-less model's run in the same folder)
    is not a finished case; one with both is skipped. Case 'a' is bad, so the command stops at the check,
    naming it: proof that it was not skipped."""
    unloadable_model(tmp_path, "Dataset917_Continue", plans={"configurations": {"3d_fullres": {}},
                                                              "nnunet_liver_ext": {"case_heads": ["cls"]}})
    images = tmp_path / "images"
    images.mkdir()
    write_case(images, "a", [image(), image()])  # a channel missing
    good_case(images, "b")
    out = tmp_path / "pred"
    out.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "b.json"):
        (out / name).write_text("an earlier run")
    proc = predict_command(tmp_path, 917, images, out, "--continue_prediction")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 case(s) already predicted" in proc.stdout and "input error: case a:" in proc.stderr
    assert "1 of 1 case(s) were not predicted" in proc.stderr


def test_continue_prediction_with_probabilities_redoes_a_case_without_its_npz(tmp_path):
    """Guards against --continue_prediction --save_probabilities skipping a case whose probabilities (.npz) an
    earlier run without them never wrote."""
    import argparse

    from nnunet_liver_ext.inference.cli import _cases_to_predict

    images, out = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    out.mkdir()
    for case in ("b", "c"):
        good_case(images, case)
        (out / f"{case}.nii.gz").write_text("an earlier run")
    (out / "c.npz").write_text("an earlier run")
    args = argparse.Namespace(i=str(images), o=str(out), num_parts=1, part_id=0, continue_prediction=True,
                              save_probabilities=True, prev_stage_predictions=None)
    check, skipped = _cases_to_predict(args, DATASET_JSON, writes_case_json=False)
    assert skipped == ["c"] and [c.case for c in check.good] == ["b"]
