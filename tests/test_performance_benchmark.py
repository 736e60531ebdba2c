"""benchmarks/performance.py: the one-run performance benchmark (stock nnU-Net and every method's main trainer).

- slow: the whole script at its small CPU size (phantom, nnU-Net's fingerprint and plans, every network's
  VRAM-aware plans, FLOPs, timed train steps on one shared batch, memory against the estimate, sliding-window
  inference, the AMP check, the report): every trainer has every figure, finite, and the Markdown table
  has one row per trainer with stock at ratio 1;
- fast: results of a later call (e.g. the compiled timings of a GPU run split over calls) join those of an
  earlier one instead of replacing them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import performance  # noqa: E402

TRAINERS = list(performance.TRAINERS)


def test_a_later_call_adds_to_the_results_of_an_earlier_one(tmp_path):
    (tmp_path / "parts").mkdir()
    first = {"nnUNetTrainer": {"eager": {"s_per_iteration": 1.0}}, "nnUNetTrainerSTDNet": {"eager": {"s": 2.0}}}
    performance.save_part(tmp_path, "flops", {"command": "first"}, first)
    performance.save_part(tmp_path, "flops", {"command": "second"},
                          {"nnUNetTrainer": {"compiled": {"s_per_iteration": 0.5}}})
    part = json.loads((tmp_path / "parts" / "flops.json").read_text())
    assert part["results"]["nnUNetTrainer"] == {"eager": {"s_per_iteration": 1.0}, "compiled": {"s_per_iteration": 0.5}}
    assert part["results"]["nnUNetTrainerSTDNet"] == {"eager": {"s": 2.0}}
    assert part["meta"]["commands"] == ["first", "second"]


@pytest.mark.slow
def test_small_cpu_run_measures_every_trainer(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "performance.py"), "all", "--small",
                           "--modes", "eager", "compiled", "--amp-iterations", "2", "--out", str(out), "--work", str(tmp_path / "work")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "performance.json").read_text())
    assert list(results["trainers"]) == TRAINERS
    for name, r in results["trainers"].items():
        assert r["flops"]["parameters"] > 0 and r["flops"]["forward_flops"] > 0, name
        eager = r["timing"]["eager"]
        assert eager["s_per_iteration"] > 0 and eager["losses_finite"], (name, eager)
        assert "does not compile on the CPU" in r["timing"]["compiled"]["skipped"], name
        memory = r["timing"]["memory"]
        assert memory["estimate_per_sample"] > 0 and memory["saved_activation_bytes_bf16"] > 0, (name, memory)
        assert r["inference"]["seconds"] > 0 and r["inference"]["finite"], name
        assert r["inference"]["output_shape"][1:] == r["inference"]["case_shape"][1:]
        assert r["timing"]["amp_check"]["ok"] and r["timing"]["amp_check"]["iterations"] == 2, name
    # the estimate predicts the bytes each network saves, in stock's bytes per element
    base = results["trainers"]["nnUNetTrainer"]["timing"]["memory"]
    per_element = base["saved_activation_bytes_bf16"] / base["estimate_per_sample"]
    for name, r in results["trainers"].items():
        memory = r["timing"]["memory"]
        assert memory["saved_activation_bytes_bf16"] / (memory["estimate_per_sample"] * per_element) == \
            pytest.approx(1, abs=0.15), name
    table = (out / "performance.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == TRAINERS
    assert rows[0].split(" | ")[4] == "1"  # stock's eager ratio to itself
    assert "CPU" in table.splitlines()[0]
