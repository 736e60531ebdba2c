"""The GPU machine's shell runners (benchmarks/performance_gpu.sh, benchmarks/gpu_run.sh) on the CPU, the way
the device tool runs them: in a copy of the working tree (tracked and untracked, not ignored, files), with
``$OUT`` and ``$TMPDIR`` set, ``python3`` the interpreter that has nnU-Net. The Python scripts behind them have
their own tests; this one checks the plumbing (gpu_env.sh's links and import path, the call's time limit,
what is copied to ``$OUT``), so that a GPU session's scarce minutes are not what finds a slip there.
Slow: each runner prepares a phantom dataset with nnU-Net's fingerprint, plans and preprocessing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def working_tree_copy(destination: Path) -> Path:
    """What the device tool sends: the working tree's tracked files and the untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def run_runner(tmp_path: Path, script: str, *args: str, seconds: int = 570) -> subprocess.CompletedProcess:
    tree = working_tree_copy(tmp_path / "tree")
    out, temporary = tmp_path / "OUT", tmp_path / "TMPDIR"
    out.mkdir()
    temporary.mkdir()
    # the venv's bin first: its python3 has nnU-Net, as the GPU machine's has after GPU.md's install
    env = dict(os.environ, OUT=str(out), TMPDIR=str(temporary), GPU_CALL_SECONDS=str(seconds),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "PYTHONPATH"):
        env.pop(name, None)
    return subprocess.run(["bash", f"benchmarks/{script}", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_performance_runner_returns_its_parts_and_table(tmp_path):
    proc = run_runner(tmp_path, "performance_gpu.sh", "data", "flops", "report", "--small",
                      "--trainers", "nnUNetTrainer", "nnUNetTrainerSTDNet", "-np", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "OUT"
    assert {"performance.json", "performance.md", "parts"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "performance.json").read_text())
    assert "nnUNetTrainerSTDNet" in json.dumps(results)
    # the package came from the copy (gpu_env.sh's PYTHONPATH and links), not from this checkout's install
    assert (tmp_path / "tree" / "nnunet_liver_ext" / "trainer_plans").is_symlink()
    assert (tmp_path / "TMPDIR" / "performance_work").is_dir()


STDNET_RUN = ("data", "timing", "--device", "cpu", "--cases", "5", "--shape", "16", "48", "48", "--iterations", "1",
              "-np", "1", "--schedule", "tiny")


def test_stdnet_runner_returns_its_timing(tmp_path):
    proc = run_runner(tmp_path, "gpu_run.sh", *STDNET_RUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timing = json.loads((tmp_path / "OUT" / "timing.json").read_text())
    assert {"nnUNetTrainer_tiny", "nnUNetTrainerSTDNet_tiny"} <= set(timing)


def test_the_call_limit_stops_a_runner_before_the_device_call_ends(tmp_path):
    """gpu_env.sh stops the work before the device call's own limit, with timeout's status 124, and the
    runner goes on to copy what finished (here nothing: the limit falls inside the data step)."""
    proc = run_runner(tmp_path, "gpu_run.sh", *STDNET_RUN, seconds=5)
    assert proc.returncode == 124, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "OUT" / "timing.json").exists()
