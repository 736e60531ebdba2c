#!/usr/bin/env bash
# Misregistration robustness of STD-Net on the phantom, CPU-sized (issue 14 item 4).
#
# The demo's recipe (scripts/demo.sh: CPU-demo plans, the 2d configuration, fold 0) with 16 held-out
# cases instead of 8, then benchmarks/misregistration_robustness.py on the held-out cases: every
# phase but the portal venous one is moved by a random rigid transform (up to 5 mm, 7 degrees) and
# the Dice change against the unperturbed prediction is reported.
#
#   bash benchmarks/misregistration_robustness_cpu.sh [SCHEDULE]     (default: demo)
#
# SCHEDULE is the trainer's short schedule (`demo` 40 x 50 iterations, `short` 20 x 50, ...).
# Work files go to $MISREG_WORK (default /tmp/misregistration_work); figures to
# benchmarks/results/misregistration/ (robustness.json, the script's printout run.log, the training log).
# Re-running skips the steps whose
# output exists (the phantom, the trained checkpoint) and repeats the robustness measurement.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
schedule=${1:-demo}
work=${MISREG_WORK:-/tmp/misregistration_work}
results=${MISREG_RESULTS:-$repo/benchmarks/results/misregistration}
mkdir -p "$work" "$results"
source "$repo/.venv/bin/activate"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed" \
  nnUNet_results="$work/nnUNet_results" PYTHONUNBUFFERED=1 nnUNet_def_n_proc=1 nnUNet_compile=f
eval "$(nnunet-liver env)"
id=520
trainer=nnUNetTrainerSTDNet_$schedule
plans=nnUNetPlans_CPUDemo
config=2d
dataset="$nnUNet_raw/Dataset${id}_LiverPhantomMisreg"
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

if [ ! -f "$dataset/dataset.json" ]; then
  step "phantom: the demo's 64 training cases and 16 held-out cases"
  nnunet-liver phantom nnunet-raw -d $id --name LiverPhantomMisreg -n 64 --test 16 --shape 24 48 48 \
    --lesions 1 3 --lesion-size 15 35 --contrast 2 --low-contrast-fraction 0 --noise 8 --seed 1 --no-progress
fi
checkpoint="$nnUNet_results/Dataset${id}_LiverPhantomMisreg/${trainer}__${plans}__${config}/fold_0/checkpoint_final.pth"
if [ ! -f "$checkpoint" ]; then
  step "nnUNetv2_extract_fingerprint, CPU-demo plans, nnU-Net's preprocessing ($config)"
  nnUNetv2_extract_fingerprint -d $id -np 2 --verify_dataset_integrity > "$work/fingerprint.log" 2>&1 \
    || { tail -30 "$work/fingerprint.log"; exit 1; }
  nnunet-liver plan -d $id --preset cpu-demo --preprocess -c $config -np 2 > "$work/plan_cpu.log" 2>&1 \
    || { tail -30 "$work/plan_cpu.log"; exit 1; }
  step "nnUNetv2_train $id $config 0 -tr $trainer -p $plans -device cpu"
  nnUNet_n_proc_DA=0 nnUNetv2_train $id $config 0 -tr $trainer -p $plans -device cpu > "$work/train.log" 2>&1 \
    || { tail -30 "$work/train.log"; exit 1; }
  grep -E "Mean Validation|Characterization on|Pseudo dice" "$work/train.log" | tail -3
  cp "$work/train.log" "$results/train_${trainer}.log"
fi

step "misregistration robustness on the 16 held-out cases"
python "$repo/benchmarks/misregistration_robustness.py" -i "$dataset/imagesTs" -r "$dataset/labelsTs" \
  -d $id -c $config -p $plans -tr $trainer -f 0 -device cpu --max-mm 5 --max-deg 7 --scales 0.5 1 \
  --repeats 3 --seed 0 --work "$work/robustness" -o "$results/robustness.json" 2>&1 | tee "$results/run.log"
step "done"
