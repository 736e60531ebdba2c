#!/usr/bin/env bash
# DynTransNet against stock nnU-Net, like for like on this machine's CPU: the same phantom cases, the
# same CPU-demo plans (nnunet-liver plan --preset cpu-demo), the same schedule, fold 0, the same
# prediction settings. Stock nnUNetTrainer_<SCHEDULE> (its PlainConvUNet, Dice+CE, SGD) and
# nnUNetTrainerDynTransNet_<SCHEDULE> are trained one after the other, both predict the held-out
# cases with nnUNetv2_predict (no test-time mirroring, for time), and nnunet-liver evaluate scores them.
# Reported: held-out liver (region {1,2}) and tumor Dice of both, nnU-Net's mean epoch time and
# seconds per training iteration (epoch time / training iterations: it includes the validation
# iterations, the same number for both) and their ratio, wall time of each training.
#   bash benchmarks/dyntransnet_vs_nnunet_cpu.sh [SCHEDULE (demo)] [RUN_NAME (SCHEDULE)]
# Sizes: CASES (20 training cases), TEST (6 held-out), SHAPE ("24 64 64"), DATASET_ID (924).
# REPORT_ONLY=1 skips the runs and rebuilds summary.json / report.md from an existing work folder.
# Results go to benchmarks/results/dyntransnet_vs_nnunet_cpu/RUN_NAME/ (summary.json, report.md, the
# two training logs and evaluations); the work folder (data, checkpoints) stays out of git.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
schedule=${1:-demo}
name=${2:-$schedule}
work=${WORK:-$repo/demo_work_dyntransnet_vs_nnunet_$name}
out=$repo/benchmarks/results/dyntransnet_vs_nnunet_cpu/$name
id=${DATASET_ID:-924}
plans=nnUNetPlans_CPUDemo
trainers=("nnUNetTrainer_$schedule" "nnUNetTrainerDynTransNet_$schedule")
sizes="CASES=${CASES:-20} TEST=${TEST:-6} SHAPE=\"${SHAPE:-24 64 64}\""
source "$repo/scripts/setup_env.sh"
source "$repo/.venv/bin/activate"
start=$(date +%s)
if [ "${REPORT_ONLY:-0}" != 1 ]; then
rm -rf "$work" && mkdir -p "$work" "$out"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed" \
  nnUNet_results="$work/nnUNet_results"
# a small machine: no pools of torch-importing worker processes, no compilation
export PYTHONUNBUFFERED=1 nnUNet_def_n_proc=1 nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1} nnUNet_compile=f
eval "$(nnunet-liver env)"
step() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

step "phantom: ${CASES:-20} training + ${TEST:-6} held-out cases, shape ${SHAPE:-24 64 64}"
# shellcheck disable=SC2086
nnunet-liver phantom nnunet-raw -d "$id" --name DynTransNetVsNnunet -n "${CASES:-20}" --test "${TEST:-6}" \
  --shape ${SHAPE:-24 64 64} --lesions 1 2 --lesion-size 10 24 --seed 1 --no-progress
dataset="$(echo "$nnUNet_raw"/Dataset"${id}"_*)"
step "nnUNetv2_plan_and_preprocess + CPU-demo plans"
nnUNetv2_plan_and_preprocess -d "$id" -c 3d_fullres -np 1 -npfp 1 --verify_dataset_integrity > "$work/plan.log" 2>&1 \
  || { tail -30 "$work/plan.log"; exit 1; }
nnunet-liver plan -d "$id" --preset cpu-demo --preprocess -np 1 > "$work/plan_cpu.log" 2>&1 \
  || { tail -30 "$work/plan_cpu.log"; exit 1; }

for trainer in "${trainers[@]}"; do
  step "nnUNetv2_train $id 3d_fullres 0 -tr $trainer -p $plans -device cpu"
  t0=$(date +%s)
  nnUNetv2_train "$id" 3d_fullres 0 -tr "$trainer" -p "$plans" -device cpu > "$work/train_$trainer.log" 2>&1 \
    || { tail -40 "$work/train_$trainer.log"; exit 1; }
  echo $(( $(date +%s) - t0 )) > "$work/train_seconds_$trainer"
  step "nnUNetv2_predict (held-out cases) with $trainer"
  nnUNetv2_predict -i "$dataset/imagesTs" -o "$work/pred_$trainer" -d "$id" -c 3d_fullres -p "$plans" -tr "$trainer" \
    -f 0 -device cpu -npp 1 -nps 1 --disable_tta > "$work/predict_$trainer.log" 2>&1 \
    || { tail -30 "$work/predict_$trainer.log"; exit 1; }
  nnunet-liver evaluate "$work/pred_$trainer" "$dataset/labelsTs" -o "$work/eval_$trainer" \
    --dataset-json "$dataset/dataset.json" -np 1 --quiet --no-plots
  fold="$(echo "$nnUNet_results"/Dataset"${id}"_*/"${trainer}__${plans}__3d_fullres"/fold_0)"
  cp "$fold"/training_log_*.txt "$out/training_log_$trainer.txt"
  mkdir -p "$out/eval_$trainer"
  for file in report.md summary.json per_case_metrics.csv; do cp "$work/eval_$trainer/$file" "$out/eval_$trainer/"; done
done
echo $(( $(date +%s) - start )) > "$work/total_seconds"
fi

echo "=== summary"
python - "$work" "$out" "$schedule" "$(nproc)" "$(cat "$work/total_seconds")" "$sizes" "${trainers[@]}" <<'EOF'
import csv, json, re, statistics, sys
from nnunet_liver_ext.training.schedules import SCHEDULES

work, out, schedule, cores, wall, sizes = sys.argv[1:7]
trainers = sys.argv[7:]
epochs, iterations, val_iterations = SCHEDULES[schedule]
rows = {}
for trainer in trainers:
    cases = list(csv.DictReader(open(f"{work}/eval_{trainer}/per_case_metrics.csv")))
    mean = lambda col: statistics.mean(float(r[col]) for r in cases if r[col] not in ("", "nan"))  # noqa: E731
    log = open(f"{out}/training_log_{trainer}.txt").read()
    epoch_times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    rows[trainer] = {
        "held_out_cases": len(cases),
        "dice_liver_region_mean": mean("liver_region_dice"), "dice_tumor_mean": mean("tumor_dice"),
        "epoch_times_s": epoch_times, "mean_epoch_time_s": statistics.mean(epoch_times),
        "seconds_per_iteration": statistics.mean(epoch_times) / iterations,
        "train_wall_s": int(open(f"{work}/train_seconds_{trainer}").read()),
        "final_ema_pseudo_dice": [float(v) for v in re.findall(r"Yayy! New best EMA pseudo Dice: ([0-9.]+)", log)][-1:]}
base, dtn = (rows[t] for t in trainers)
summary = {"schedule": schedule, "epochs": epochs, "iterations_per_epoch": iterations,
           "validation_iterations_per_epoch": val_iterations, "cpu_cores": int(cores), "total_wall_s": int(wall),
           "trainers": rows,
           "ratio_seconds_per_iteration_dyntransnet_over_nnunet": dtn["seconds_per_iteration"] / base["seconds_per_iteration"],
           "command": f"{sizes} bash benchmarks/dyntransnet_vs_nnunet_cpu.sh {schedule}"}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
lines = [f"# DynTransNet vs stock nnU-Net on the CPU ({schedule}: {epochs} x {iterations} iterations, fold 0)", "",
         f"`{summary['command']}`; {base['held_out_cases']} held-out phantom cases, CPU-demo plans, {cores} CPU "
         f"cores shared with other work (timings are indicative), prediction without mirroring; "
         f"total wall time {wall} s.", "",
         "| trainer | liver Dice (region {1,2}) | tumor Dice (label 2) | mean epoch time (s) | s / iteration | training wall (s) |",
         "|---|---|---|---|---|---|"]
for trainer, r in rows.items():
    lines.append(f"| {trainer} | {r['dice_liver_region_mean']:.3f} | {r['dice_tumor_mean']:.3f} | "
                 f"{r['mean_epoch_time_s']:.1f} | {r['seconds_per_iteration']:.2f} | {r['train_wall_s']} |")
lines += ["", f"seconds per iteration, DynTransNet / nnU-Net: "
              f"{summary['ratio_seconds_per_iteration_dyntransnet_over_nnunet']:.2f}", ""]
open(f"{out}/report.md", "w").write("\n".join(lines))
print("\n".join(lines))
EOF
