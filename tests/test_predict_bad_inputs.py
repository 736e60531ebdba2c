"""Bad input at inference, through the real ``nnunet-liver predict`` with a tiny STD-Net trained by
``nnUNetv2_train`` on phantom cases (issue 14 item 5). ``-m slow``: the training takes minutes; the
fast suite has the check's matrix on files (test_predict_inputs.py, with the command on a folder of
bad cases only) and the prediction path for every trainer (test_predict_inputs_every_trainer.py).

One input folder holds two good cases and one case per defect: a missing channel file, an extra
phase, a truncated ``.nii.gz``, a file that is not an image, a phase of another size, a phase
shifted by 5 mm (origin), a NaN-filled phase; plus stale outputs of a bad case from an earlier
run. The command must name every bad case and its file, predict the good ones, exit 1 with the
list of failed cases, and leave nothing in the output folder for the failed ones.

Then the failure nnU-Net itself meets (a file that went bad after the check): nnU-Net's parallel
run stops, the cases are predicted one by one, and only the bad one is lost, with no partial file.
And the same folder split between two ``-num_parts 2`` calls that run at the same time.
"""
import gzip
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_helpers import BIN, assert_same_geometry, nnunet_env, run, train, write_tiny_phantom_dataset

DATASET_ID = 913
PLANS = "nnUNetPlans_CPUDemo"
TRAINER = "nnUNetTrainerSTDNet_tiny"
GOOD = ["good_a", "good_b"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    env = nnunet_env(root)
    # five training cases: the fewest nnU-Net's five-fold split takes
    dataset = write_tiny_phantom_dataset(root, DATASET_ID, "BadInputs", n_train=5, n_test=2, seed=4)
    # the demo's path (fingerprint, then the CPU-demo plans alone): one planning and preprocessing pass
    run(["nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID), "-np", "1"], env, root)
    run(["nnunet-liver", "plan", "-d", str(DATASET_ID), "--preset", "cpu-demo", "--preprocess", "-np", "1"], env, root)
    train(DATASET_ID, 0, TRAINER, PLANS, env, root)
    model = root / "res" / dataset.name / f"{TRAINER}__{PLANS}__3d_fullres"
    return {"root": root, "env": env, "dataset": dataset, "model": model}


def _copy_case(source_files, folder, case, skip=()):
    out = []
    for k, src in enumerate(source_files):
        dst = folder / f"{case}_{k:04d}.nii.gz"
        if k not in skip:
            shutil.copy(src, dst)
        out.append(dst)
    return out


def _rewrite(path, change):
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(change(image), str(path), True)


def _nan_filled(image):
    result = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(image).shape, np.nan, np.float32))
    result.CopyInformation(image)
    return result


def _shifted(image):
    image.SetOrigin(tuple(o + d for o, d in zip(image.GetOrigin(), (5.0, 0.0, 0.0))))
    return image


# case -> (the file the error must name, words the message must hold)
DEFECTS = {
    "missing_channel": ("missing_channel_0002.nii.gz", "is missing"),
    "extra_phase": ("extra_phase_0003.nii.gz", "takes 3 channel"),
    "truncated": ("truncated_0001.nii.gz", "cannot be read"),
    "not_an_image": ("not_an_image_0000.nii.gz", "cannot be read"),
    "other_size": ("other_size_0001.nii.gz", "is not on the grid of other_size_0000.nii.gz"),
    "shifted_origin": ("shifted_origin_0002.nii.gz", "origin"),
    "nan_filled": ("nan_filled_0001.nii.gz", "NaN voxels"),
}


def build_bad_input_folder(dataset, folder):
    """Two good cases and one case per defect, all made from the dataset's held-out images."""
    folder.mkdir()
    held_out = sorted({p.name[:-len("_0000.nii.gz")] for p in (dataset / "imagesTs").glob("*_0000.nii.gz")})
    sources = [[dataset / "imagesTs" / f"{case}_{k:04d}.nii.gz" for k in range(3)] for case in held_out]
    for name, files in zip(GOOD, sources):
        _copy_case(files, folder, name)
    first = sources[0]
    _copy_case(first, folder, "missing_channel", skip=(2,))
    _copy_case(first, folder, "extra_phase")
    shutil.copy(first[2], folder / "extra_phase_0003.nii.gz")
    truncated = _copy_case(first, folder, "truncated")[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = _copy_case(first, folder, "not_an_image")[0]
    with gzip.open(garbage, "wb") as f:
        f.write(os.urandom(4096))
    other = _copy_case(first, folder, "other_size")[1]
    _rewrite(other, lambda image: image[:-4, :, :])  # 4 voxels fewer along x
    _rewrite(_copy_case(first, folder, "shifted_origin")[2], _shifted)
    _rewrite(_copy_case(first, folder, "nan_filled")[1], _nan_filled)
    return folder


def predict(workspace, folder, out, *extra):
    cmd = [str(BIN / "nnunet-liver"), "predict", "-i", str(folder), "-o", str(out), "-d", str(DATASET_ID),
           "-c", "3d_fullres", "-p", PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
           "--disable_tta", "--disable_progress_bar", *extra]
    return subprocess.run(cmd, env=workspace["env"], cwd=workspace["root"], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_parts_run_at_the_same_time_into_one_folder(workspace):
    """``-num_parts 2 -part_id 0|1``, both at once into one -o (as on two GPUs): every good case is
    predicted by exactly one part, each part reports the other's bad cases never, and the folder's table
    holds the rows of both parts."""
    folder = build_bad_input_folder(workspace["dataset"], workspace["root"] / "parts_inputs")
    out = workspace["root"] / "pred_parts"
    cases = sorted({p.name[:-len("_0000.nii.gz")] for p in folder.glob("*_0000.nii.gz")})
    cmds = [[str(BIN / "nnunet-liver"), "predict", "-i", str(folder), "-o", str(out), "-d", str(DATASET_ID),
             "-c", "3d_fullres", "-p", PLANS, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
             "--disable_tta", "--disable_progress_bar", "-num_parts", "2", "-part_id", str(part)] for part in (0, 1)]
    procs = [subprocess.Popen(cmd, env=workspace["env"], cwd=workspace["root"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    logs = [proc.communicate(timeout=900) for proc in procs]
    for part, ((stdout, stderr), proc) in enumerate(zip(logs, procs)):
        mine = cases[part::2]
        assert f"part {part} of 2: {len(mine)} of the {len(cases)} cases" in stdout, stdout[-2000:]
        named = {line.split("case ")[1].split(":")[0] for line in stderr.splitlines() if "input error: case" in line}
        assert named == set(mine) - set(GOOD), stderr[-3000:]
        assert proc.returncode == (1 if named else 0)
    for case in GOOD:
        assert json.loads((out / f"{case}.json").read_text())["case"] == case
    rows = (out / "characterization.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == GOOD


@pytest.mark.slow  # the training fixture alone takes 1.5-2 minutes on 2 cores
def test_bad_input_matrix_through_nnunet_liver_predict(workspace):
    folder = build_bad_input_folder(workspace["dataset"], workspace["root"] / "bad_inputs")
    out = workspace["root"] / "pred_bad_inputs"
    out.mkdir()
    # an earlier run's outputs of a case that is bad now, and its row in the table
    (out / "missing_channel.nii.gz").write_bytes((folder / "good_a_0000.nii.gz").read_bytes())
    (out / "missing_channel.json").write_text("{}")
    (out / "characterization.csv").write_text("case,predicted_class\nmissing_channel,HCC\n")

    proc = predict(workspace, folder, out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    for case, (file_name, words) in DEFECTS.items():
        lines = [line for line in proc.stderr.splitlines() if line.startswith(f"nnunet-liver predict: input error: "
                                                                              f"case {case}: ")]
        assert lines, f"no input error for {case}:\n{proc.stderr[-3000:]}"
        assert any(str(folder / file_name) in line and words in line for line in lines), lines
    summary = proc.stderr[proc.stderr.index("nnunet-liver predict: error:"):]
    assert f"{len(DEFECTS)} of {len(DEFECTS) + len(GOOD)} case(s) were not predicted" in summary
    for case in DEFECTS:
        assert f"  {case}: " in summary
    assert "Traceback" not in log

    for case in GOOD:  # predicted, on their input's grid, with CASE.json
        assert_same_geometry(out / f"{case}.nii.gz", folder / f"{case}_0000.nii.gz")
        assert json.loads((out / f"{case}.json").read_text())["case"] == case
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if any(name.startswith(case) for case in DEFECTS)], left
    assert not [name for name in left if name.startswith(".nnunet-liver-partial")], left
    rows = (out / "characterization.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == GOOD


@pytest.mark.slow
def test_a_case_that_fails_inside_nnunet_costs_that_case_alone(workspace, monkeypatch):
    """A file that passed the check and went bad before nnU-Net read it (a real failure in nnU-Net's
    preprocessing worker, in the middle of its run): the others are predicted, nothing partial stays."""
    import torch

    from nnunet_liver_ext.inference.batch import predict_cases
    from nnunet_liver_ext.inference.characterization import CharacterizationPredictor
    from nnunet_liver_ext.inference.inputs import check_input_folder

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, workspace["env"][key])
    torch.set_num_threads(1)
    folder = workspace["root"] / "went_bad"
    folder.mkdir()
    sources = sorted((workspace["dataset"] / "imagesTs").glob("*_0000.nii.gz"))
    for name, first in zip(["a_first", "c_last"], sources):
        _copy_case([str(first).replace("_0000", f"_000{k}") for k in range(3)], folder, name)
    _copy_case([str(sources[0]).replace("_0000", f"_000{k}") for k in range(3)], folder, "b_went_bad")
    dataset_json = json.loads((workspace["model"] / "dataset.json").read_text())
    check = check_input_folder(str(folder), dataset_json)
    assert len(check.good) == 3
    bad = folder / "b_went_bad_0001.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(2000))  # after the check: nnU-Net's reader meets it
    out = workspace["root"] / "pred_went_bad"
    out.mkdir()
    (out / "b_went_bad.nii.gz").write_bytes(b"stale")

    predictor = CharacterizationPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                          perform_everything_on_device=False, device=torch.device("cpu"),
                                          allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(workspace["model"]), [0], "checkpoint_final.pth")
    result = predict_cases(predictor, check.good, str(out), num_processes_preprocessing=1,
                           num_processes_segmentation_export=1)
    assert result.batch_error is not None  # nnU-Net's run did stop
    assert result.predicted == ["a_first", "c_last"]
    assert list(result.failed) == ["b_went_bad"] and "prediction failed" in result.failed["b_went_bad"]
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name.startswith("b_went_bad") or name.startswith(".nnunet-liver")], left
    for case in result.predicted:
        assert_same_geometry(out / f"{case}.nii.gz", folder / f"{case}_0000.nii.gz")
        assert (out / f"{case}.json").is_file()


@pytest.mark.slow
def test_a_failure_of_every_case_is_the_runs_and_keeps_earlier_outputs(workspace, monkeypatch):
    """A device failure (here the network raising CUDA's error on every forward) fails every case: the run
    is reported as failed, and the output folder keeps an earlier run's files of these cases untouched."""
    import torch

    from nnunet_liver_ext.inference.batch import predict_cases
    from nnunet_liver_ext.inference.characterization import CharacterizationPredictor
    from nnunet_liver_ext.inference.inputs import check_input_folder

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, workspace["env"][key])
    torch.set_num_threads(1)
    folder = workspace["dataset"] / "imagesTs"
    check = check_input_folder(str(folder), json.loads((workspace["model"] / "dataset.json").read_text()))
    out = workspace["root"] / "pred_run_failed"
    out.mkdir()
    earlier = {}
    for case in check.good:
        for suffix in (".nii.gz", ".json"):
            (out / f"{case.case}{suffix}").write_text(f"an earlier run of {case.case}")
            earlier[f"{case.case}{suffix}"] = f"an earlier run of {case.case}"

    predictor = CharacterizationPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                          perform_everything_on_device=False, device=torch.device("cpu"),
                                          allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(workspace["model"]), [0], "checkpoint_final.pth")

    def device_failure(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(predictor.network, "forward", device_failure)
    result = predict_cases(predictor, check.good, str(out), num_processes_preprocessing=1,
                           num_processes_segmentation_export=1)
    assert result.run_failed and not result.predicted and len(result.failed) == len(check.good) == 2
    assert all("illegal memory access" in why for why in result.failed.values())
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier


@pytest.mark.slow
def test_misregistration_robustness_script(workspace, tmp_path):
    """benchmarks/misregistration_robustness.py on the tiny model: at scale 0 the phases are copied
    unchanged and the Dice change is exactly 0; at scale 1 every motion is within the bounds, the
    portal venous phase is never moved, and the JSON has one row per (case, scale, repeat)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "misregistration_robustness.py")
    dataset = workspace["dataset"]
    out = tmp_path / "robustness.json"
    proc = subprocess.run([str(BIN / "python"), script, "-i", str(dataset / "imagesTs"), "-r", str(dataset / "labelsTs"),
                           "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS, "-tr", TRAINER, "-f", "0",
                           "--disable_tta", "--scales", "0", "1", "--repeats", "2", "--seed", "5",
                           "--work", str(tmp_path / "work"), "-o", str(out)],
                          env=workspace["env"], cwd=workspace["root"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert len(cases) == 2 and len(result["rows"]) == 2 * 2 * 2
    phases = json.loads((dataset / "dataset.json").read_text())["phases"]
    reference = phases.index("portal_venous")
    for row in result["rows"]:
        motion = row["motion"]
        assert motion[reference]["angle_deg"] == 0 and motion[reference]["translation_mm"] == [0, 0, 0]
        for m in motion:
            assert abs(m["angle_deg"]) <= 7 * row["scale"] + 1e-9
            assert np.linalg.norm(m["translation_mm"]) <= 5 * row["scale"] + 1e-9
        if row["scale"] == 0:
            assert row["dice"] == result["unperturbed"][row["case"]]
            assert row["agreement_with_unperturbed"] == {"liver_region": 1.0, "tumor": 1.0}
    moved = [m for row in result["rows"] if row["scale"] == 1 for k, m in enumerate(row["motion"]) if k != reference]
    assert all(m["angle_deg"] != 0 for m in moved)
    zero = next(s for s in result["summary"] if s["scale"] == 0)
    assert zero["liver_region"]["delta_mean"] == 0 and zero["tumor"]["delta_mean"] == 0
    assert "| 5 mm / 7° | liver_region |" in proc.stdout
