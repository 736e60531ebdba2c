"""`nnunet-liver phantom` end to end, and nnU-Net's own integrity check on the raw output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import argparse

import pytest

from nnunet_liver_ext import cli as package_cli
from nnunet_liver_ext.phantom import cli as phantom_cli

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--shape", "16", "48", "48", "--no-progress"]


def main(argv):
    """`nnunet-liver` with only the phantom subcommands, so these tests do not depend on the
    other subsystems' modules; test_registered_in_the_package_cli checks the real wiring."""
    parser = argparse.ArgumentParser(prog="nnunet-liver")
    phantom_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_registered_in_the_package_cli():
    assert "nnunet_liver_ext.phantom.cli" in package_cli.SUBCOMMAND_MODULES


def test_help_lists_every_layout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["phantom", "nnunet-raw", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--dataset-id", "--name", "--test", "--modality", "--phases", "--shape", "--seed",
                   "--lesion-size", "--contrast", "--noise", "--motion-mm", "--motion-deg", "--raw"):
        assert option in out
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    out = capsys.readouterr().out
    for layout in ("nnunet-raw", "lits", "msd", "atlas", "tcga-dicom", "dynamic-mri", "preview"):
        assert layout in out


def test_nnunet_raw_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert main(["phantom", "nnunet-raw", "-d", "12", "--name", "Cli", "-n", "2", "--test", "1",
                 "--seed", "3", "--motion-mm", "1", "--contrast", "0.8", *SMALL]) == 0
    root = tmp_path / "Dataset012_Cli"
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["phases"] == ["arterial", "portal_venous", "delayed"]
    config = dataset["phantom"]["configs"][0]
    assert config["motion_mm"] == 1.0 and config["contrast"] == 0.8 and config["shape"] == [16, 48, 48]
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == [f"phantom_002_{k:04d}.nii.gz" for k in range(3)]
    # An existing dataset is a user error (exit status 1), not a silent overwrite.
    assert main(["phantom", "nnunet-raw", "-d", "12", "--name", "Cli", "-n", "1", *SMALL]) == 1


def test_bad_arguments_give_a_clear_error(tmp_path, capsys):
    assert main(["phantom", "lits", "-o", str(tmp_path), "--phases", "arterial", "delayed", *SMALL]) == 1
    assert "portal_venous" in capsys.readouterr().err
    assert main(["phantom", "atlas", "-o", str(tmp_path), "--modality", "CT", "-n", "1", *SMALL]) == 1
    assert "MRI" in capsys.readouterr().err


@pytest.mark.parametrize("layout, expected", [
    ("lits", "volume-0.nii"), ("msd", "Task03_Liver/dataset.json"), ("atlas", "train/imagesTr/im0.nii.gz"),
    ("tcga-dicom", "classes.csv"), ("dynamic-mri", "labels.csv"),
])
def test_source_layouts_from_the_cli(tmp_path, layout, expected):
    assert main(["phantom", layout, "-o", str(tmp_path), "-n", "1", *SMALL]) == 0
    assert (tmp_path / expected).is_file()


def test_preview_png(tmp_path):
    out = tmp_path / "case.png"
    assert main(["phantom", "preview", "-o", str(out), "--shape", "24", "96", "96", "--seed", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


@pytest.mark.slow
def test_raw_output_passes_nnunet_verify_dataset_integrity(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "results"))
    assert main(["phantom", "nnunet-raw", "-d", "981", "--name", "PhantomVerify", "-n", "4", "--test", "1",
                 "--shape", "24", "64", "64", "--raw", env["nnUNet_raw"], "--no-progress"]) == 0
    script = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    # -npfp 1: the fingerprint step otherwise starts 8 workers on a 2-core machine.
    proc = subprocess.run([str(script), "-d", "981", "--verify_dataset_integrity", "-c", "3d_fullres",
                           "-np", "1", "-npfp", "1"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plans = json.loads((tmp_path / "pre" / "Dataset981_PhantomVerify" / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"] * 3
    preprocessed = tmp_path / "pre" / "Dataset981_PhantomVerify" / "nnUNetPlans_3d_fullres"
    assert sorted(p.name for p in preprocessed.glob("*_seg.b2nd")) == [f"phantom_{i:03d}_seg.b2nd" for i in range(4)]


def test_tcga_dicom_test_patients_have_no_mask_and_their_truth_apart(tmp_path):
    out = tmp_path / "tcga"
    assert main(["phantom", "tcga-dicom", "-o", str(out), "-n", "2", "--test", "2", "--seed", "4", *SMALL]) == 0
    patients = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "masks")
    assert patients == [f"TCGA-PH-{i:04d}" for i in range(4)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["TCGA-PH-0000.nii.gz", "TCGA-PH-0001.nii.gz"]
    rows = (out / "classes.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == patients[:2]  # held-out classes are truth, not input
    assert set(json.loads((out / "phantom_truth.json").read_text())) == set(patients[:2])
    truth = tmp_path / "tcga_test_truth"
    assert sorted(p.name for p in (truth / "labelsTs").iterdir()) == ["TCGA-PH-0002.nii.gz", "TCGA-PH-0003.nii.gz"]
    held_out = json.loads((truth / "phantom_truth.json").read_text())
    assert set(held_out) == {"TCGA-PH-0002", "TCGA-PH-0003"}
    targets = json.loads((truth / "test_targets.json").read_text())
    assert targets["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    for pid, index in targets["characterization"]["cases"].items():
        assert targets["characterization"]["classes"][index] == held_out[pid]["class"]
    assert set(targets["characterization"]["cases"]) | set(targets["not_scored"]) == \
        {pid for pid, t in held_out.items() if t["class"] is not None}
    # a truth folder inside the source folder would be read as a patient: refused
    assert main(["phantom", "tcga-dicom", "-o", str(tmp_path / "t2"), "-n", "1", "--test", "1",
                 "--test-truth", str(tmp_path / "t2" / "truth"), *SMALL]) == 1


def test_a_dataset_id_taken_by_another_name_is_refused_before_any_case_is_generated(tmp_path, capsys, monkeypatch):
    """nnU-Net cannot use an id two dataset folders share ("More than one dataset name found"); the check runs
    before the cases are generated (minutes at the default size), as do those of the id and an existing target."""
    (tmp_path / "Dataset510_A").mkdir()
    monkeypatch.setattr(phantom_cli, "_cases", lambda *a: pytest.fail("generated before the target was checked"))
    assert main(["phantom", "nnunet-raw", "-d", "510", "--name", "B", "--raw", str(tmp_path), *SMALL]) == 1
    assert "dataset id 510 is taken" in capsys.readouterr().err and "Dataset510_A" in str(list(tmp_path.iterdir()))
    assert not (tmp_path / "Dataset510_B").exists()
    assert main(["phantom", "nnunet-raw", "-d", "1000", "--name", "B", "--raw", str(tmp_path), *SMALL]) == 1
    assert main(["phantom", "nnunet-raw", "-d", "510", "--name", "A", "--raw", str(tmp_path), *SMALL]) == 1
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [(["--prefix", "x/y"], "case id prefix"), (["--seed", "-1"], "seed")])
def test_a_prefix_that_is_no_file_name_and_a_negative_seed_are_refused(tmp_path, capsys, option, message):
    assert main(["phantom", "lits", "-o", str(tmp_path / "out"), "-n", "1", *option, *SMALL]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_layout_is_not_written_over_another_and_a_failed_one_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Two runs into one folder used to mix (stale volumes; a DICOM series with slices of both runs)."""
    out = tmp_path / "msd"
    assert main(["phantom", "msd", "-o", str(out), "-n", "2", *SMALL]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["phantom", "msd", "-o", str(out), "-n", "1", "--seed", "9", *SMALL]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    def fail(*args, **kwargs):
        raise ValueError("disk full")
    monkeypatch.setattr("nnunet_liver_ext.phantom.writers.write_lits", fail)
    assert main(["phantom", "lits", "-o", str(tmp_path / "lits"), "-n", "1", *SMALL]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msd"]  # no folder, no hidden temporary one


def test_dicom_uids_differ_between_phantoms_of_other_seeds(tmp_path):
    """A converter or PACS that sees two phantom datasets must not merge their series: UIDs follow the content."""
    import pydicom

    uids = []
    for seed in (0, 7):
        out = tmp_path / f"seed{seed}"
        assert main(["phantom", "tcga-dicom", "-o", str(out), "-n", "1", "--seed", str(seed), *SMALL]) == 0
        first = pydicom.dcmread(sorted(out.rglob("*.dcm"))[0], stop_before_pixels=True)
        uids.append((first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID))
    assert all(a != b for a, b in zip(*uids)), uids


def test_a_user_error_exits_1_like_every_nnunet_liver_command_and_a_malformed_command_line_2(tmp_path, capsys):
    """Through the package's real entry point: a phantom user error used to exit 2, argparse's status for a
    malformed command line, while every other nnunet-liver command exits 1 for one."""
    assert package_cli.main(["phantom", "atlas", "-o", str(tmp_path / "a"), "--modality", "CT", "-n", "1",
                             *SMALL]) == 1
    err = capsys.readouterr().err
    assert "nnunet-liver phantom atlas: error:" in err and "MRI" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        package_cli.main(["phantom", "lits", "-n", "1"])  # no -o
    assert exit_info.value.code == 2


def _nnunet_folders(tmp_path, monkeypatch):
    folders = {var: tmp_path / var for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(var, str(folder))
    return folders


def test_a_dataset_id_taken_in_preprocessed_or_results_is_refused_even_with_overwrite(tmp_path, capsys, monkeypatch):
    """nnU-Net looks an id up in its three folders: a raw Dataset303_New beside a trained Dataset303_Trained failed
    later with "More than one dataset name found for dataset id". --overwrite replaces the raw folder of its own
    name only, so it cannot clear that either, and another dataset's data stays."""
    folders = _nnunet_folders(tmp_path, monkeypatch)
    trained = folders["nnUNet_results"] / "Dataset303_Trained" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    trained.mkdir(parents=True)
    (folders["nnUNet_preprocessed"] / "Dataset304_Old").mkdir()
    (folders["nnUNet_raw"] / "Dataset304_New").mkdir()
    (folders["nnUNet_raw"] / "Dataset305_Free").mkdir()
    monkeypatch.setattr(phantom_cli, "_cases", lambda *a, **k: pytest.fail("generated before the id was checked"))
    refused = ((["-d", "303", "--name", "New"], "Dataset303_Trained", "nnUNet_results"),
               (["-d", "304", "--name", "New", "--overwrite"], "Dataset304_Old", "nnUNet_preprocessed"))
    for argv, other, where in refused:
        assert main(["phantom", "nnunet-raw", *argv, *SMALL]) == 1
        err = capsys.readouterr().err
        assert f"is taken by {other} (in {where}=" in err, err
        assert "fix: choose another id (-d 306 is free)" in err, err
    assert sorted(p.name for p in folders["nnUNet_raw"].iterdir()) == ["Dataset304_New", "Dataset305_Free"]
    assert trained.is_dir() and (folders["nnUNet_preprocessed"] / "Dataset304_Old").is_dir()
    # a raw folder that is not $nnUNet_raw goes with other folder variables: these say nothing about it
    monkeypatch.undo()
    monkeypatch.setenv("nnUNet_results", str(folders["nnUNet_results"]))
    monkeypatch.setenv("nnUNet_raw", str(folders["nnUNet_raw"]))
    assert main(["phantom", "nnunet-raw", "-d", "303", "--name", "New", "-n", "1", "--raw", str(tmp_path / "other"),
                 *SMALL]) == 0


def test_write_nnunet_raw_refuses_an_id_taken_in_results(tmp_path, monkeypatch):
    from nnunet_liver_ext.phantom.writers import check_raw_target

    folders = _nnunet_folders(tmp_path, monkeypatch)
    (folders["nnUNet_results"] / "Dataset021_Trained").mkdir()
    with pytest.raises(FileExistsError, match="Dataset021_Trained"):
        check_raw_target(folders["nnUNet_raw"], 21, "Other", overwrite=True)
    # the same name is one dataset: its raw folder may be made again
    assert check_raw_target(folders["nnUNet_raw"], 21, "Trained") == folders["nnUNet_raw"] / "Dataset021_Trained"


def test_tcga_test_truth_goes_into_a_new_or_empty_folder_only_and_appears_complete(tmp_path, capsys, monkeypatch):
    """The truth folder was written in place: stale labels of an earlier run stayed beside the new ones, an
    existing test_targets.json in --test-truth was replaced, and a failed run left a half truth folder."""
    stale = tmp_path / "src_test_truth" / "labelsTs"
    stale.mkdir(parents=True)
    (stale / "TCGA-PH-0009.nii.gz").write_bytes(b"an earlier run")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "test_targets.json").write_text('{"precious": true}')
    with monkeypatch.context() as patch:
        patch.setattr(phantom_cli, "_cases", lambda *a, **k: pytest.fail("generated before the truth was checked"))
        assert main(["phantom", "tcga-dicom", "-o", str(tmp_path / "src"), "-n", "1", "--test", "1", *SMALL]) == 1
        err = capsys.readouterr().err
        assert f"test truth folder {tmp_path / 'src_test_truth'} exists and is not empty (labelsTs)" in err, err
        assert "--test-truth" in err
        assert main(["phantom", "tcga-dicom", "-o", str(tmp_path / "src"), "-n", "1", "--test", "1",
                     "--test-truth", str(keep), *SMALL]) == 1
        assert "test truth folder" in capsys.readouterr().err
    assert (keep / "test_targets.json").read_text() == '{"precious": true}'
    assert [p.name for p in stale.iterdir()] == ["TCGA-PH-0009.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "src_test_truth"]

    from nnunet_liver_ext.phantom import writers

    original = writers.write_tcga_dicom

    def fails_after_writing(*args, **kwargs):
        original(*args, **kwargs)
        raise ValueError("disk full")
    empty = tmp_path / "truth"
    empty.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(writers, "write_tcga_dicom", fails_after_writing)
        assert main(["phantom", "tcga-dicom", "-o", str(tmp_path / "src"), "-n", "1", "--test", "1",
                     "--test-truth", str(empty), *SMALL]) == 1
    assert list(empty.iterdir()) == []  # a failed run leaves no half truth folder, and no temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "src_test_truth", "truth"]
    assert main(["phantom", "tcga-dicom", "-o", str(tmp_path / "src"), "-n", "1", "--test", "1",
                 "--test-truth", str(empty), *SMALL]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["labelsTs", "phantom_truth.json", "test_targets.json"]
    assert [p.name for p in (empty / "labelsTs").iterdir()] == ["TCGA-PH-0001.nii.gz"]


def test_output_given_as_dot_a_relative_path_or_a_symlink_to_an_empty_folder(tmp_path, capsys, monkeypatch):
    """`-o .` and `-o LINK` used to generate everything, then crash (EINVAL on rmdir('.'), NotADirectoryError on the
    link) and keep nothing. The built entries now move into the existing folder, which stays what it was (the shell's
    working folder, the link's target)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["phantom", "tcga-dicom", "-o", ".", "-n", "1", "--test", "1", *SMALL]) == 0
    assert (here / "classes.csv").is_file() and not [p for p in here.iterdir() if p.name.startswith(".")]
    # the truth folder beside it is named after the folder, not after '.'
    assert [p.name for p in (tmp_path / "here_test_truth" / "labelsTs").iterdir()] == ["TCGA-PH-0001.nii.gz"]
    assert "wrote " + str(here) in capsys.readouterr().out

    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    monkeypatch.chdir(tmp_path)
    assert main(["phantom", "lits", "-o", "link", "-n", "1", *SMALL]) == 0
    assert (tmp_path / "link").is_symlink() and (target / "volume-0.nii").is_file()
    assert main(["phantom", "msd", "-o", "new/../rel", "-n", "1", *SMALL]) == 0
    assert (tmp_path / "rel" / "Task03_Liver" / "dataset.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["phantom", "lits", "-o", "dangling", "-n", "1", *SMALL]) == 1
    assert "symbolic link to" in capsys.readouterr().err
    assert (tmp_path / "dangling").is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_failed_run_removes_the_parent_folders_it_made(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("disk full")
    monkeypatch.setattr("nnunet_liver_ext.phantom.writers.write_lits", fail)
    assert main(["phantom", "lits", "-o", str(tmp_path / "a" / "b" / "lits"), "-n", "1", *SMALL]) == 1
    assert list(tmp_path.iterdir()) == []
