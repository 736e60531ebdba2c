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
    # An existing dataset is an error (exit code 2), not a silent overwrite.
    assert main(["phantom", "nnunet-raw", "-d", "12", "--name", "Cli", "-n", "1", *SMALL]) == 2


def test_bad_arguments_give_a_clear_error(tmp_path, capsys):
    assert main(["phantom", "lits", "-o", str(tmp_path), "--phases", "arterial", "delayed", *SMALL]) == 2
    assert "portal_venous" in capsys.readouterr().err
    assert main(["phantom", "atlas", "-o", str(tmp_path), "--modality", "CT", "-n", "1", *SMALL]) == 2
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
                 "--test-truth", str(tmp_path / "t2" / "truth"), *SMALL]) == 2


def test_a_dataset_id_taken_by_another_name_is_refused_before_any_case_is_generated(tmp_path, capsys, monkeypatch):
    """nnU-Net cannot use an id two dataset folders share ("More than one dataset name found"); the check runs
    before the cases are generated (minutes at the default size), as do those of the id and an existing target."""
    (tmp_path / "Dataset510_A").mkdir()
    monkeypatch.setattr(phantom_cli, "_cases", lambda *a: pytest.fail("generated before the target was checked"))
    assert main(["phantom", "nnunet-raw", "-d", "510", "--name", "B", "--raw", str(tmp_path), *SMALL]) == 2
    assert "dataset id 510 is taken" in capsys.readouterr().err and "Dataset510_A" in str(list(tmp_path.iterdir()))
    assert not (tmp_path / "Dataset510_B").exists()
    assert main(["phantom", "nnunet-raw", "-d", "1000", "--name", "B", "--raw", str(tmp_path), *SMALL]) == 2
    assert main(["phantom", "nnunet-raw", "-d", "510", "--name", "A", "--raw", str(tmp_path), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [(["--prefix", "x/y"], "case id prefix"), (["--seed", "-1"], "seed")])
def test_a_prefix_that_is_no_file_name_and_a_negative_seed_are_refused(tmp_path, capsys, option, message):
    assert main(["phantom", "lits", "-o", str(tmp_path / "out"), "-n", "1", *option, *SMALL]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_layout_is_not_written_over_another_and_a_failed_one_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Two runs into one folder used to mix (stale volumes; a DICOM series with slices of both runs)."""
    out = tmp_path / "msd"
    assert main(["phantom", "msd", "-o", str(out), "-n", "2", *SMALL]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["phantom", "msd", "-o", str(out), "-n", "1", "--seed", "9", *SMALL]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    def fail(*args, **kwargs):
        raise ValueError("disk full")
    monkeypatch.setattr("nnunet_liver_ext.phantom.writers.write_lits", fail)
    assert main(["phantom", "lits", "-o", str(tmp_path / "lits"), "-n", "1", *SMALL]) == 2
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
