#!/usr/bin/env bash
# Does STD-Net's characterization learn inside a real nnU-Net training? The README demo's pipeline
# (scripts/demo.sh: phantom -> nnUNetv2_plan_and_preprocess -> CPU-sized plans -> nnUNetv2_train ->
# nnunet-liver predict -> nnunet-liver evaluate) with more cases and a longer schedule on the CPU
# of this 2-core machine: `short` (20 x 50 iterations, about 40 minutes), or pass
# nnUNetTrainerSTDNet_5epochs (5 x 250, about 55) or nnUNetTrainerSTDNet_10epochs (10 x 250, about 92).
# Results (held-out and fold-0 validation evaluations, training log, class predictions) go to
# benchmarks/results/cpu_stdnet_characterization/RUN_NAME/.
#   bash benchmarks/cpu_stdnet_characterization.sh [TRAINER] [RUN_NAME]
# REPORT_ONLY=1 skips the run and rebuilds the results folder from an existing work folder.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
trainer=${1:-nnUNetTrainerSTDNet_short}
name=${2:-$trainer}
work="$repo/demo_work_cpu_characterization_$name"
out="$repo/benchmarks/results/cpu_stdnet_characterization/$name"
start=$(date +%s)
if [ "${REPORT_ONLY:-0}" != 1 ]; then
  DEMO_CASES=${DEMO_CASES:-48} DEMO_TEST=${DEMO_TEST:-16} DEMO_TRAINER=$trainer DEMO_WORK="$work" \
    bash "$repo/scripts/demo.sh" 2>&1 | tee "$work.log"
else
  source "$repo/scripts/setup_env.sh"
fi
mkdir -p "$out/fold0_validation"
# the demo's configuration (3d_fullres when the committed runs were made, 2d since commit bb05e85)
fold="$(echo "$work"/nnUNet_results/*/"${trainer}__nnUNetPlans_CPUDemo__"*/fold_0)"
cp "$fold"/training_log_*.txt "$out/training_log.txt"
cp "$fold/validation/characterization.csv" "$out/fold0_validation_characterization.csv"
cp "$work/predictions/characterization.csv" "$out/test_characterization.csv"
# the fold-0 validation cases (out-of-fold predictions written at the end of training), scored
# against their own labels only
raw="$(echo "$work"/nnUNet_raw/Dataset500_*)"
rm -rf "$work/fold0_validation_labels" && mkdir "$work/fold0_validation_labels"
for prediction in "$fold"/validation/*.nii.gz; do
  ln -s "$raw/labelsTr/$(basename "$prediction")" "$work/fold0_validation_labels/"
done
nnunet-liver evaluate "$fold/validation" "$work/fold0_validation_labels" --dataset-json "$raw/dataset.json" \
  -o "$work/fold0_validation_evaluation" -np 1 --quiet --no-plots
# the evaluations' results, without their metrics caches (local absolute paths)
for file in report.md summary.json per_case_metrics.csv; do
  cp "$work/evaluation/$file" "$out/"
  cp "$work/fold0_validation_evaluation/$file" "$out/fold0_validation/"
done
wall_time=$(grep "^wall time" "$out/summary.txt" 2>/dev/null || true)  # kept by REPORT_ONLY
[ "${REPORT_ONLY:-0}" = 1 ] || wall_time="wall time $(( $(date +%s) - start )) s, trainer $trainer, $(nproc) CPU cores"
grep -E "^(held-out cases|Dice |characterization \()" "$work.log" > "$out/summary.txt"
python "$repo/scripts/print_evaluation.py" "$out/fold0_validation" "fold-0 validation" >> "$out/summary.txt"
[ -z "$wall_time" ] || echo "$wall_time" >> "$out/summary.txt"
cat "$out/summary.txt"
