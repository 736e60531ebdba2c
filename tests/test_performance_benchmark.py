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


def test_a_call_saving_after_each_trainer_lists_its_command_once_and_a_cut_off_call_resumes(tmp_path, monkeypatch):
    """The timing step saves each trainer as it finishes (a GPU call may reach the device's limit); the next call
    skips a trainer whose asked figures are all there, and measures one that lacks any (or failed)."""
    import argparse

    (tmp_path / "parts").mkdir()
    plans = {"configurations": {"3d_fullres": {"patch_size": [8, 16, 16], "batch_size": 2}}}
    monkeypatch.setattr(performance, "common_plans", lambda: plans)  # the timing part records patch and batch
    meta = {"command": "timing --modes compiled", "call": "host:1:0"}
    performance.save_part(tmp_path, "timing", meta, {"nnUNetTrainer": {"compiled": {"s_per_iteration": 0.5}}})
    performance.save_part(tmp_path, "timing", meta, {"nnUNetTrainerSTDNet": {"compiled": {"error": "OOM"}}})
    part = json.loads((tmp_path / "parts" / "timing.json").read_text())
    assert part["meta"]["commands"] == ["timing --modes compiled"]
    args = argparse.Namespace(modes=["eager", "compiled"], device="cuda", amp_iterations=0, own_plans=False)
    done = part["results"]
    assert not performance.already_measured(done["nnUNetTrainer"], "nnUNetTrainer", args)  # no eager figure
    args.modes = ["compiled"]
    assert performance.already_measured(done["nnUNetTrainer"], "nnUNetTrainer", args)
    assert not performance.already_measured(done["nnUNetTrainerSTDNet"], "nnUNetTrainerSTDNet", args)
    args.amp_iterations = 200
    assert not performance.already_measured(done["nnUNetTrainer"], "nnUNetTrainer", args)
    args.device, args.modes, args.amp_iterations = "cpu", ["eager", "compiled"], 0  # compiled does not run there
    assert performance.already_measured({"eager": {"s_per_iteration": 1.0}}, "nnUNetTrainer", args)


def test_report_says_when_a_ratio_compares_two_machines_and_names_an_amp_error():
    results = {"meta": {"timing": {"commands": ["a", "b"]}}, "trainers": {
        "nnUNetTrainer": {"timing": {"eager": {"s_per_iteration": 0.1}, "measured_on": "H100 (boot 1)"}},
        "nnUNetTrainerSTDNet": {"timing": {"eager": {"s_per_iteration": 0.2}, "measured_on": "H100 (boot 2)",
                                           "amp_check": {"ok": False, "iterations": 200, "amp": None,
                                                         "compiled": None, "error": "BackendCompilerFailed: x"}}}}}
    table = performance.report_table(results)
    assert "Produced by `a`, then `b`" in table
    assert "`nnUNetTrainerSTDNet`'s timing figures come from another machine start (H100 (boot 2))" in table
    assert "| error: BackendCompilerFailed: x |" in table


@pytest.mark.slow
def test_small_cpu_run_measures_every_trainer(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "performance.py"), "all", "--small",
                           "--modes", "eager", "compiled", "--amp-iterations", "2", "--own-plans", "--out", str(out),
                           "--work", str(tmp_path / "work")],
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
        # the step by part: the network's parts found, the profiled step's FLOPs those of the flops step
        profile, train_flops = r["profile"], r["flops"]["train_flops_by_part"]
        # DynTransNet's parts are stem and stages, not an "encoder"
        assert {"decoder", "optimizer"} <= set(profile["parts"]), (name, list(profile["parts"]))
        assert profile["parts"].get("other", {"share": 0})["share"] < 0.2, (name, profile["parts"].get("other"))
        assert "decoder" in train_flops and len(train_flops) >= 2, name
    table = (out / "performance.md").read_text()
    assert "## Against issue 13's targets" in table and "## Where the training step's time goes" in table
    main_table = table.split("## ")[0].split("Each network at its own planner's plans")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == TRAINERS
    assert rows[0].split(" | ")[4] == "1"  # stock's eager ratio to itself
    assert "CPU" in table.splitlines()[0]
    # --own-plans (the GPU run's first call): each method at its own planner's plans, stock not
    own = {name: r["timing"].get("own_plans") for name, r in results["trainers"].items()}
    assert own.pop("nnUNetTrainer") is None
    for name, o in own.items():
        assert o["plans"].startswith("nnUNetPlans_") and o["s_per_iteration"] > 0 and o["predicted_gb"] > 0, name
    assert "Each network at its own planner's plans" in table
    # which scan a Mamba figure was measured with, for the Mamba network only
    assert [name for name, r in results["trainers"].items() if "mamba_scan" in r["timing"]] == \
        ["nnUNetTrainerMambaCodebook"]
    assert "Mamba2 scan of `nnUNetTrainerMambaCodebook`: torch (chunked SSD in PyTorch; CPU input)." in table


def test_targets_name_the_part_that_puts_a_target_out_of_reach():
    """The verdicts come from the figures: STD-Net at 1.9x stock's step time with 1.6x its FLOPs misses the
    1.5x step target for its FLOPs (the encoder's, once per phase) and meets the FLOP/s target (0.84x)."""
    def part(forward, backward):
        return {"forward": forward, "backward": backward}

    results = {"meta": {}, "trainers": {
        "nnUNetTrainer": {"flops": {"train_flops_by_part": {"encoder": part(600, 1000), "decoder": part(1300, 2700)}},
                          "timing": {"eager": {"s_per_iteration": 0.08, "peak_memory_gb": 5.0},
                                     "memory": {"predicted_gb": 5.2}},
                          "inference": {"seconds": 0.1}},
        "nnUNetTrainerSTDNet": {"flops": {"train_flops_by_part": {
            "encoder": part(1800, 3000), "temporal": part(10, 20), "decoder": part(1300, 2700)}},
            "timing": {"eager": {"s_per_iteration": 0.152, "peak_memory_gb": 10.0}, "memory": {"predicted_gb": 7.0}},
            "inference": {"seconds": 0.15}}}}
    text = "\n".join(performance.targets_section(results))
    flop_ratio = (4800 + 30 + 4000) / 5600
    assert f"| `nnUNetTrainerSTDNet` | {8830 / 1e9:.3g} | {flop_ratio:.3g} | 1.9 |" in text
    assert "`nnUNetTrainerSTDNet` step eager: 1.90x stock, target <= 1.5: NOT met. Out of reach at stock's FLOP/s: " \
           f"its training FLOPs are {flop_ratio:.2f}x stock's (encoder" in text
    assert f"`nnUNetTrainerSTDNet` FLOP/s eager: {flop_ratio / 1.9:.2f}x stock, target >= 0.8: met." in text
    assert "`nnUNetTrainerSTDNet` inference: 1.50x stock, target <= 2.0: met." in text
    assert "`nnUNetTrainerSTDNet` memory: 1.43x the estimate, target within +-20%: NOT met. Stock's peak is 0.96x " \
           "nnU-Net's own estimate; against that, 1.49x: NOT met." in text


def test_pointwise_conv_speed_script_compares_both_forms_on_the_same_inputs(tmp_path):
    """benchmarks/pointwise_conv_speed.py at its CPU size: a row per case with both timings and their ratio, after
    the check that the product equals the convolution; JSON and Markdown written."""
    import pointwise_conv_speed

    assert pointwise_conv_speed.main(["--small", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pointwise_conv.json").read_text())
    assert [r["case"] for r in result["rows"]] == [c[0] for c in pointwise_conv_speed.SMALL_CASES]
    for row in result["rows"]:
        assert row["relative_error"] < 1e-4 and row["product_over_convolution"] > 0
        assert all(row[form][k] > 0 for form in ("convolution", "product") for k in ("forward_ms", "backward_ms"))
    assert "| PhaseFusion score | 6x32x8x24x24 | 1 |" in (tmp_path / "pointwise_conv.md").read_text()
