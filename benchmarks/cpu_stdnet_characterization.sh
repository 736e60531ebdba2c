#!/usr/bin/env bash
# Does STD-Net's characterization learn inside a real nnU-Net training? The README demo's pipeline
# (scripts/demo.sh: phantom -> nnUNetv2_plan_and_preprocess -> CPU-sized plans -> nnUNetv2_train ->
# nnunet-liver predict -> nnunet-liver evaluate) with more cases and the `short` schedule
# (20 x 50 iterations; pass nnUNetTrainerSTDNet_5epochs for 5 x 250) on the CPU of this 2-core
# machine: about 40 (55) minutes.
# Results (report, summary, per-case metrics, training log, class predictions) go to
# benchmarks/results/cpu_stdnet_characterization/RUN_NAME/.
#   bash benchmarks/cpu_stdnet_characterization.sh [TRAINER] [RUN_NAME]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
trainer=${1:-nnUNetTrainerSTDNet_short}
name=${2:-$trainer}
work="$repo/demo_work_cpu_characterization_$name"
out="$repo/benchmarks/results/cpu_stdnet_characterization/$name"
start=$(date +%s)
DEMO_CASES=${DEMO_CASES:-48} DEMO_TEST=${DEMO_TEST:-16} DEMO_TRAINER=$trainer DEMO_WORK="$work" \
  bash "$repo/scripts/demo.sh" 2>&1 | tee "$work.log"
mkdir -p "$out"
cp "$work/evaluation/report.md" "$work/evaluation/summary.json" "$work/evaluation/per_case_metrics.csv" "$out/"
fold="$(echo "$work"/nnUNet_results/*/"${trainer}__nnUNetPlans_CPUDemo__3d_fullres"/fold_0)"
cp "$fold"/training_log_*.txt "$out/training_log.txt"
cp "$fold/validation/characterization.csv" "$out/fold0_validation_characterization.csv"
cp "$work/predictions/characterization.csv" "$out/test_characterization.csv"
grep -E "^(held-out cases|Dice |characterization \()" "$work.log" > "$out/summary.txt"
echo "wall time $(( $(date +%s) - start )) s, trainer $trainer, $(nproc) CPU cores" >> "$out/summary.txt"
cat "$out/summary.txt"
