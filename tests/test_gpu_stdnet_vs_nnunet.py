"""benchmarks/gpu_stdnet_vs_nnunet.py (STD-Net against stock nnU-Net, the GPU machine's run4) on the CPU at a
tiny size, every step (phantom and nnUNetv2_plan_and_preprocess, timed train steps of both trainers, both
trained side by side through nnUNetv2_train, nnunet-liver benchmark, the summary), so that the GPU machine's
scarce minutes are not what finds a bug in the script. Slow: two nnU-Net trainings and a benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_step_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_stdnet_vs_nnunet.py"), "data", "timing",
                           "train", "report", "--device", "cpu", "--schedule", "tiny", "--cases", "5", "--shape", "16",
                           "48", "48", "--iterations", "1", "-np", "1", "--out", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_summary.json").read_text())
    timing = summary["timing"]
    for name in ("nnUNetTrainer_tiny", "nnUNetTrainerSTDNet_tiny"):
        assert timing[name]["s_per_iteration"] > 0 and timing[name]["losses_finite"], timing[name]
        assert (out / f"train_{name}.log").is_file()
    assert "nnUNetTrainer_tiny compiled" not in timing  # nnU-Net compiles on CUDA only
    assert timing["setup"]["device"] == "cpu" and timing["setup"]["gpu"] is None
    assert set(summary["ratios_stdnet_over_stock"]) == {"s_per_iteration_ratio_eager"}
    assert summary["ratios_stdnet_over_stock"]["s_per_iteration_ratio_eager"] > 0
    assert (out / "benchmark" / "report.md").is_file()
