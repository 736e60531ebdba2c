"""Converters against what real machines and real downloads do besides broken files: a worker process killed by
the system (the out-of-memory killer on a big volume) and case folders that are symlinks (a batch on another
disk), including a symlink loop."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_liver_ext.dataset_conversion import common, lits
from nnunet_liver_ext.dataset_conversion.common import ConversionFailed, ConversionOptions

STALL_DIR = "NNUNET_LIVER_TEST_STALL_DIR"


def _image(array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.7, 2.5))
    return image


def _write_lits_case(folder: Path, i: int) -> None:
    label = np.zeros((12, 48, 48), np.uint8)
    label[3:9, 8:40, 6:40] = 1
    label[5:7, 14:19, 10:15] = 2
    volume = (np.random.default_rng(i).normal(0, 30, label.shape) + 100 * label).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(volume), str(folder / f"volume-{i}.nii"))
    sitk.WriteImage(_image(label), str(folder / f"segmentation-{i}.nii"))


def _stalling_worker(task, out_dir, options):
    """The real LiTS worker, except that case lits_1 announces its process id and then waits: the test kills that
    process, as the out-of-memory killer kills the worker holding the biggest volume."""
    if task.case_id == "lits_1":
        # after lits_0 is done, so that the run leaves a finished case to resume from
        deadline = time.monotonic() + 30
        while not (Path(out_dir) / ".done" / "lits_0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        marker = Path(os.environ[STALL_DIR]) / "lits_1.pid"
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        os.replace(marker.with_suffix(".tmp"), marker)
        time.sleep(60)
    return common.convert_single_image_case(task, out_dir, options)


def test_a_killed_worker_fails_the_conversion_naming_its_case_and_the_rerun_resumes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i in range(3):
        _write_lits_case(src, i)
    raw = tmp_path / "raw"
    monkeypatch.setenv(STALL_DIR, str(tmp_path))  # spawned workers inherit the environment
    options = ConversionOptions(str(raw), 12, "LiTS", num_workers=2, progress=False)
    tasks = lits.discover(src)
    make_json = common.single_phase_dataset_json("LiTS", "CT", "portal_venous", options, "")
    outcome: dict = {}

    def convert():
        try:
            common.run_conversion("lits", tasks, _stalling_worker, options, make_json)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    # a thread, so that a conversion that hangs after the kill fails the test instead of hanging it
    thread = threading.Thread(target=convert, daemon=True)
    thread.start()
    marker = tmp_path / "lits_1.pid"
    deadline = time.monotonic() + 60
    while not marker.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"case lits_1 never started: {outcome}"
    os.kill(int(marker.read_text()), signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the conversion still runs 20 s after its worker was killed (it hangs)"
    assert time.monotonic() - killed_at < 10
    error = outcome.get("error")
    assert isinstance(error, ConversionFailed), repr(error)
    lost = [e for e in error.errors if e.case_id == "lits_1"]
    assert lost and "died" in str(lost[0]) and "volume-1.nii" in str(lost[0]), str(error)
    assert "re-run the same command to resume" in str(error)
    assert not (raw / "Dataset012_LiTS").exists()
    partial = raw / ".Dataset012_LiTS.partial"
    done = sorted(p.name for p in (partial / ".done").iterdir())
    assert "lits_0.json" in done and "lits_1.json" not in done
    first_mtime = (partial / "imagesTr" / "lits_0_0000.nii.gz").stat().st_mtime_ns
    out = lits.convert(src, options)
    assert (out / "imagesTr" / "lits_0_0000.nii.gz").stat().st_mtime_ns == first_mtime  # resumed, not redone
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"lits_{i}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset012_LiTS"]


def test_lits_batch_folder_symlinked_from_another_disk_is_converted(tmp_path):
    src = tmp_path / "LiTS"
    _write_lits_case(src / "Training Batch 1", 0)
    _write_lits_case(src / "Training Batch 1", 1)
    elsewhere = tmp_path / "other_disk" / "Training Batch 2"
    _write_lits_case(elsewhere, 2)
    _write_lits_case(elsewhere, 3)
    (src / "Training Batch 2").symlink_to(elsewhere, target_is_directory=True)
    # a link back up the tree: read once, neither a loop nor duplicate cases
    (src / "Training Batch 1" / "loop").symlink_to(src, target_is_directory=True)
    out = lits.convert(src, ConversionOptions(str(tmp_path / "raw"), 13, "LiTS", progress=False))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"lits_{i}.nii.gz" for i in range(4)]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 4


def test_lits_case_file_that_is_a_dangling_link_is_an_error_naming_it(tmp_path):
    src = tmp_path / "LiTS"
    _write_lits_case(src, 0)
    _write_lits_case(tmp_path / "gone", 1)
    (src / "volume-1.nii").symlink_to(tmp_path / "gone" / "volume-1.nii")
    (src / "segmentation-1.nii").symlink_to(tmp_path / "gone" / "segmentation-1.nii")
    shutil.rmtree(tmp_path / "gone")  # the disk the links point to is not mounted
    with pytest.raises(ConversionFailed, match=r"case 'lits_1', file .*volume-1.nii: file does not exist"):
        lits.convert(src, ConversionOptions(str(tmp_path / "raw"), 14, "LiTS", progress=False))
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_walk_follows_folder_links_once_and_names_an_unreadable_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.txt").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.txt").write_text("y")
    (tmp_path / "a" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a", target_is_directory=True)
    files = [p.relative_to(tmp_path / "a").as_posix() for p in common.source_files(tmp_path / "a")]
    assert files == ["b/x.txt", "linked/y.txt"]
    if os.geteuid() == 0:
        pytest.skip("root reads folders without read permission")
    locked = tmp_path / "a" / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(common.ConversionError, match="locked: cannot read this folder"):
            common.source_files(tmp_path / "a")
    finally:
        locked.chmod(0o755)


def test_tcga_series_folder_symlinked_into_a_patient_is_read(tmp_path):
    phantom = pytest.importorskip("nnunet_liver_ext.phantom")
    from nnunet_liver_ext.dataset_conversion import tcga_lihc

    config = phantom.PhantomConfig(modality="CT", shape=(12, 48, 48), n_lesions_range=(1, 1))
    src = phantom.write_tcga_dicom(tmp_path / "tcga", phantom.generate_cases(1, config, 21, progress=False))
    patient = next(p for p in src.iterdir() if p.is_dir() and p.name != "masks")
    before = sorted(s.description for s in tcga_lihc.scan_patient(patient, patient.name))
    series = sorted({p.parent for p in patient.rglob("*.dcm")})[0]
    moved = tmp_path / "other_disk" / series.name
    moved.parent.mkdir()
    shutil.move(series, moved)
    series.symlink_to(moved, target_is_directory=True)
    (series.parent / "loop").symlink_to(patient, target_is_directory=True)  # read once, not forever
    assert sorted(s.description for s in tcga_lihc.scan_patient(patient, patient.name)) == before


def test_a_phase_map_section_for_a_patient_in_another_letter_case_is_an_error(tmp_path):
    """A per-patient --phase-map section is looked up by the exact folder name: 'tcga-ph-0000' never applied, so the
    series it meant to fix kept their guessed phases."""
    phantom = pytest.importorskip("nnunet_liver_ext.phantom")
    from nnunet_liver_ext.dataset_conversion import tcga_lihc

    config = phantom.PhantomConfig(modality="CT", shape=(12, 48, 48), n_lesions_range=(1, 1))
    src = phantom.write_tcga_dicom(tmp_path / "tcga", phantom.generate_cases(1, config, 22, progress=False))
    mapping = tmp_path / "map.json"
    options = ConversionOptions(str(tmp_path / "raw"), 77, "T", phase_map=str(mapping), progress=False)
    mapping.write_text(json.dumps({"tcga-ph-0000": {"AP 5mm": "arterial"}}))
    with pytest.raises(ConversionFailed, match=r"'tcga-ph-0000' \(the folder is 'TCGA-PH-0000'\) differ from the "
                                               r"patient folder only in letter case") as refused:
        tcga_lihc.discover(src, options)
    assert str(mapping) in str(refused.value)
    mapping.write_text(json.dumps({"TCGA-PH-0099": {"AP 5mm": "arterial"}}))  # a patient not downloaded
    with pytest.warns(UserWarning, match="'TCGA-PH-0099' name no patient folder"):
        assert [t.case_id for t in tcga_lihc.discover(src, options)] == ["TCGA-PH-0000"]


def test_phase_map_entries_that_decide_nothing_are_reported(tmp_path):
    """A misspelt --phase-map key matches no series and the series keeps the phase its description suggests:
    a global entry no converted case used is a warning after the conversion, a patient's entry that matches
    none of its series a note in that case's report; entries that did decide are recorded per case."""
    phantom = pytest.importorskip("nnunet_liver_ext.phantom")
    from nnunet_liver_ext.dataset_conversion import tcga_lihc

    config = phantom.PhantomConfig(modality="CT", shape=(12, 48, 48), n_lesions_range=(1, 1))
    src = phantom.write_tcga_dicom(tmp_path / "tcga", phantom.generate_cases(1, config, 23, progress=False))
    truth = json.loads((src / "phantom_truth.json").read_text())["TCGA-PH-0000"]["series_description"]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({f"  {truth['arterial'].upper()} ": "arterial", "ARTERAIL 5mm": "arterial",
                                   "TCGA-PH-0000": {"PV thin": "portal_venous", truth["delayed"]: "ignore"}}))
    options = ConversionOptions(str(tmp_path / "raw"), 78, "T", phase_map=str(mapping), progress=False,
                                phase_subset=("arterial", "portal_venous"))
    with pytest.warns(UserWarning) as caught:
        out = tcga_lihc.convert(src, options)
    messages = [str(w.message) for w in caught if "global entr" in str(w.message)]
    assert len(messages) == 1 and "global entry 'ARTERAIL 5mm' matched no series of the converted cases" \
        in messages[0] and str(mapping) in messages[0], messages
    case = json.loads((out / "conversion_report.json").read_text())["cases"][0]
    assert case["registration"]["phase_map_entries_used"] == [f"  {truth['arterial'].upper()} "]
    assert case["registration"]["series"]["arterial"]["identified_by"] == "mapping file"
    assert [w for w in case["warnings"] if "--phase-map entry" in w] == [
        f"--phase-map entry 'PV thin' of this patient's section matches no series used (descriptions: "
        f"{sorted(truth.values())}); not used"]
