#!/usr/bin/env bash
# Like for like on the CPU: stock nnU-Net (nnUNetTrainer_<schedule>, its PlainConvUNet) against the
# Mamba-codebook U-Net (nnUNetTrainerMambaCodebook_<schedule>) on the same phantom, the same CPU-demo
# plans (nnUNetPlans_CPUDemo), the same schedule and fold 0. Each model predicts the same held-out
# cases (nnunet-liver predict, no TTA) and `nnunet-liver evaluate` scores them; the summary gives
# liver-region and tumor Dice per trainer and the seconds-per-iteration ratio (nnU-Net's "Epoch time"
# per epoch, divided by the train iterations of the schedule; every epoch also runs the schedule's
# validation iterations, the same for both).
#   bash benchmarks/mamba_codebook_vs_nnunet_cpu.sh [SCHEDULE] [RUN_NAME]
# SCHEDULE: a row of training.schedules.SCHEDULES (default demo; the committed results ran when the demo
# schedule was 8 x 20 iterations, it is now 40 x 50).
# Size of the phantom: MC_CASES (24) training and MC_TEST (8) held-out cases, 24x80x80, 3 CT phases.
# Results: benchmarks/results/mamba_codebook_vs_nnunet_cpu/RUN_NAME/ (summary.txt, summary.json,
# training logs, per-case metrics); the work folder demo_work_mamba_codebook_vs_nnunet_RUN_NAME/ is
# git-ignored scratch.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
schedule=${1:-demo}
name=${2:-$schedule}
source "$repo/scripts/setup_env.sh"
work="$repo/demo_work_mamba_codebook_vs_nnunet_$name"
out="$repo/benchmarks/results/mamba_codebook_vs_nnunet_cpu/$name"
rm -rf "$work" && mkdir -p "$work" "$out"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed" \
  nnUNet_results="$work/nnUNet_results" PYTHONUNBUFFERED=1 nnUNet_def_n_proc=1 nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1} \
  nnUNet_compile=f
eval "$(nnunet-liver env)"
id=${MC_DATASET_ID:-934}
plans=nnUNetPlans_CPUDemo
trainers="nnUNetTrainer_$schedule nnUNetTrainerMambaCodebook_$schedule"
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start )) s] $*"; }

step "phantom: ${MC_CASES:-24} training + ${MC_TEST:-8} held-out cases"
nnunet-liver phantom nnunet-raw -d $id --name MambaCodebookVsNNUNet -n "${MC_CASES:-24}" --test "${MC_TEST:-8}" \
  --shape 24 80 80 --lesions 1 2 --lesion-size 10 30 --seed 7 --no-progress
dataset="$(echo "$nnUNet_raw"/Dataset${id}_*)"
step "nnUNetv2_plan_and_preprocess + CPU-demo plans"
nnUNetv2_plan_and_preprocess -d $id -c 3d_fullres -np 1 -npfp 1 --verify_dataset_integrity > "$work/plan.log" 2>&1 \
  || { tail -30 "$work/plan.log"; exit 1; }
nnunet-liver plan -d $id --preset cpu-demo --preprocess -np 1 > "$work/plan_cpu.log" 2>&1 \
  || { tail -30 "$work/plan_cpu.log"; exit 1; }

for trainer in $trainers; do
  step "nnUNetv2_train $id 3d_fullres 0 -tr $trainer -p $plans -device cpu"
  t0=$(date +%s)
  nnUNetv2_train $id 3d_fullres 0 -tr "$trainer" -p $plans -device cpu > "$work/train_$trainer.log" 2>&1 \
    || { tail -40 "$work/train_$trainer.log"; exit 1; }
  echo "$(( $(date +%s) - t0 ))" > "$work/train_seconds_$trainer"
  step "predict + evaluate $trainer"
  nnunet-liver predict -i "$dataset/imagesTs" -o "$work/pred_$trainer" -d $id -c 3d_fullres -p $plans -tr "$trainer" \
    -f 0 -device cpu -npp 1 -nps 1 --disable_tta > "$work/predict_$trainer.log" 2>&1 \
    || { tail -30 "$work/predict_$trainer.log"; exit 1; }
  nnunet-liver evaluate "$work/pred_$trainer" "$dataset/labelsTs" -o "$work/eval_$trainer" \
    --dataset-json "$dataset/dataset.json" -np 1 --quiet --no-plots > "$work/eval_$trainer.log" 2>&1 \
    || { tail -30 "$work/eval_$trainer.log"; exit 1; }
  fold="$(echo "$work"/nnUNet_results/*/"${trainer}__${plans}__3d_fullres"/fold_0)"
  cp "$fold"/training_log_*.txt "$out/training_log_$trainer.txt"
  cp "$work/eval_$trainer/per_case_metrics.csv" "$out/per_case_metrics_$trainer.csv"
done

python - "$work" "$out" "$schedule" $trainers <<'EOF'
import csv, json, re, statistics, sys, os
from nnunet_liver_ext.training.schedules import SCHEDULES
work, out, schedule, *trainers = sys.argv[1:]
epochs, iterations, val_iterations = SCHEDULES[schedule]
result = {"schedule": schedule, "epochs": epochs, "train_iterations_per_epoch": iterations,
          "val_iterations_per_epoch": val_iterations, "cpu_cores": os.cpu_count(), "trainers": {}}
for trainer in trainers:
    log = open(f"{out}/training_log_{trainer}.txt").read()
    epoch_times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    rows = list(csv.DictReader(open(f"{out}/per_case_metrics_{trainer}.csv")))
    def mean(column):
        values = [float(r[column]) for r in rows if r.get(column) not in (None, "", "nan")]
        return statistics.mean(values) if values else float("nan")
    result["trainers"][trainer] = {
        "held_out_cases": len(rows), "dice_liver_region": round(mean("liver_region_dice"), 4),
        "dice_tumor": round(mean("tumor_dice"), 4),
        "median_epoch_seconds": round(statistics.median(epoch_times), 2),
        "seconds_per_iteration": round(statistics.median(epoch_times) / iterations, 3),
        "train_wall_seconds": int(open(f"{work}/train_seconds_{trainer}").read())}
base, ours = (result["trainers"][t] for t in trainers)
result["seconds_per_iteration_ratio"] = round(ours["seconds_per_iteration"] / base["seconds_per_iteration"], 2)
json.dump(result, open(f"{out}/summary.json", "w"), indent=2)
lines = [f"schedule {schedule}: {epochs} epochs x {iterations} train (+{val_iterations} val) iterations, fold 0, "
         f"CPU-demo plans, {result['cpu_cores']} CPU cores (shared machine)"]
for trainer, r in result["trainers"].items():
    lines.append(f"{trainer}: held-out {r['held_out_cases']} cases, Dice liver region {{1,2}} {r['dice_liver_region']:.3f}, "
                 f"Dice tumor {r['dice_tumor']:.3f}, {r['seconds_per_iteration']:.2f} s/iteration "
                 f"(median epoch {r['median_epoch_seconds']} s), training wall {r['train_wall_seconds']} s")
lines.append(f"seconds per iteration, {trainers[1]} / {trainers[0]}: {result['seconds_per_iteration_ratio']}")
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
step "done: $out"
