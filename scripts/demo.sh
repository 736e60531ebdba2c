#!/usr/bin/env bash
# The README demo: phantom multiphase CT -> nnU-Net raw -> nnU-Net's fingerprint -> CPU-sized plans ->
# STD-Net trained with nnUNetv2_train on the CPU (2d configuration) -> prediction of held-out cases ->
# Dice and characterization against the held-out truth. Everything goes to demo_work/ (git-ignored);
# a re-run starts fresh. Sized for a 2-core CPU (under 10 minutes with the install). Overrides:
# DEMO_CASES (64), DEMO_TEST (8), DEMO_SHAPE ("24 48 48"), DEMO_TRAINER (nnUNetTrainerSTDNet_demo),
# DEMO_DEVICE (cpu), DEMO_WORK (demo_work/). README "On a CPU" spells the commands out.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/scripts/setup_env.sh"
work=${DEMO_WORK:-$repo/demo_work}
# a re-run starts fresh, but deletes a DEMO_WORK folder only if an earlier demo made it
if [ -n "${DEMO_WORK:-}" ] && [ -n "$(ls -A "$work" 2>/dev/null)" ] && [ ! -e "$work/.nnunet_liver_demo" ]; then
  echo "DEMO_WORK=$work exists and was not made by this demo; refusing to delete it" >&2; exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.nnunet_liver_demo"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed" \
  nnUNet_results="$work/nnUNet_results"
# a small machine: no pools of torch-importing worker processes
export PYTHONUNBUFFERED=1
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-1} nnUNet_compile=f
eval "$(nnunet-liver env)"
device=${DEMO_DEVICE:-cpu}
id=500
trainer=${DEMO_TRAINER:-nnUNetTrainerSTDNet_demo}
n_train=${DEMO_CASES:-64}
n_test=${DEMO_TEST:-8}
shape=${DEMO_SHAPE:-24 48 48}
config=2d
plans=nnUNetPlans_CPUDemo
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

step "1/6 phantom: $n_train training + $n_test held-out cases, 3 CT phases, $shape voxels, lesions 15-35 mm at twice the default contrast"
nnunet-liver phantom nnunet-raw -d $id --name LiverPhantomDemo -n $n_train --test $n_test --shape $shape \
  --lesions 1 3 --lesion-size 15 35 --contrast 2 --low-contrast-fraction 0 --noise 8 --seed 1 --no-progress
dataset="$nnUNet_raw/Dataset${id}_LiverPhantomDemo"

step "2/6 nnUNetv2_extract_fingerprint (and nnU-Net's dataset integrity check)"
nnUNetv2_extract_fingerprint -d $id -np 2 --verify_dataset_integrity > "$work/fingerprint.log" 2>&1 \
  || { tail -30 "$work/fingerprint.log"; exit 1; }

step "3/6 CPU-sized plans through nnU-Net's planning API, nnU-Net's preprocessing ($plans, $config)"
nnunet-liver plan -d $id --preset cpu-demo --preprocess -c $config -np 2 > "$work/plan_cpu.log" 2>&1 \
  || { tail -30 "$work/plan_cpu.log"; exit 1; }

step "4/6 nnUNetv2_train $id $config 0 -tr $trainer -p $plans -device $device"
# augmentation in the training process: on 2 cores a worker only competes with torch's two threads (7.0 vs
# 7.6 s per 50 iterations); only for training, nnU-Net's planner sets torch's threads to this number
nnUNet_n_proc_DA=0 nnUNetv2_train $id $config 0 -tr $trainer -p $plans -device "$device" 2>&1 | tee "$work/train.log" \
  | grep --line-buffered -E "Epoch [0-9]+$|train_loss|train terms|Pseudo dice|Mean Validation|Characterization on"

step "5/6 nnunet-liver predict (nnUNetv2_predict options) on the $n_test held-out cases"
nnunet-liver predict -i "$dataset/imagesTs" -o "$work/predictions" -d $id -c $config -p $plans -tr $trainer \
  -f 0 -device "$device" -npp 1 -nps 1 > "$work/predict.log" 2>&1 || { tail -30 "$work/predict.log"; exit 1; }

step "6/6 evaluation against the held-out truth"
nnunet-liver evaluate "$work/predictions" "$dataset/labelsTs" -o "$work/evaluation" \
  --dataset-json "$dataset/test_targets.json" -np 1 --quiet
python "$repo/scripts/print_evaluation.py" "$work/evaluation"
step "done: report $work/evaluation/report.md, predictions $work/predictions (CASE.nii.gz + CASE.json)"
