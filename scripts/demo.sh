#!/usr/bin/env bash
# The README demo: phantom multiphase CT -> nnU-Net raw -> nnUNetv2_plan_and_preprocess -> STD-Net
# trained for a short schedule on the CPU -> prediction of held-out cases -> Dice and
# characterization accuracy. Everything goes to demo_work/ (git-ignored); a re-run starts fresh.
# Sized for a 2-core CPU (about 10 minutes). Overrides: DEMO_CASES (32), DEMO_TEST (8),
# DEMO_TRAINER (nnUNetTrainerSTDNet_demo), DEMO_DEVICE (cpu), DEMO_WORK (demo_work/).
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
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-1} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-1} nnUNet_compile=f
eval "$(nnunet-liver env)"
device=${DEMO_DEVICE:-cpu}
id=500
trainer=${DEMO_TRAINER:-nnUNetTrainerSTDNet_demo}
n_test=${DEMO_TEST:-8}
plans=nnUNetPlans_CPUDemo
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }

step "1/6 phantom: ${DEMO_CASES:-32} training + $n_test test cases, 3 CT phases, 24x80x80"
nnunet-liver phantom nnunet-raw -d $id --name LiverPhantomDemo -n "${DEMO_CASES:-32}" --test "$n_test" \
  --shape 24 80 80 --lesions 1 2 --lesion-size 10 30 --seed 1 --no-progress
dataset="$nnUNet_raw/Dataset${id}_LiverPhantomDemo"

step "2/6 nnUNetv2_plan_and_preprocess (fingerprint, default plans, integrity check)"
nnUNetv2_plan_and_preprocess -d $id -c 3d_fullres -np 2 -npfp 2 --verify_dataset_integrity > "$work/plan.log" 2>&1 \
  || { tail -30 "$work/plan.log"; exit 1; }

step "3/6 CPU-sized plans through nnU-Net's planning API ($plans)"
nnunet-liver plan -d $id --preset cpu-demo --preprocess -np 2 > "$work/plan_cpu.log" 2>&1 \
  || { tail -30 "$work/plan_cpu.log"; exit 1; }

step "4/6 nnUNetv2_train $id 3d_fullres 0 -tr $trainer -p $plans -device $device"
nnUNetv2_train $id 3d_fullres 0 -tr $trainer -p $plans -device "$device" 2>&1 | tee "$work/train.log" \
  | grep --line-buffered -E "Epoch [0-9]+$|train_loss|train terms|Pseudo dice|Mean Validation|Characterization on"

step "5/6 nnunet-liver predict (nnUNetv2_predict options) on the $n_test held-out cases"
nnunet-liver predict -i "$dataset/imagesTs" -o "$work/predictions" -d $id -c 3d_fullres -p $plans -tr $trainer \
  -f 0 -device "$device" -npp 1 -nps 1 --disable_tta > "$work/predict.log" 2>&1 || { tail -30 "$work/predict.log"; exit 1; }

step "6/6 evaluation against the held-out truth"
python - "$dataset" "$work/eval_targets.json" <<'EOF'
import json, sys
dataset, out = sys.argv[1], sys.argv[2]
targets = json.load(open(f"{dataset}/dataset.json"))
targets.update(json.load(open(f"{dataset}/test_targets.json")))  # test-case classes and curves
json.dump(targets, open(out, "w"))
EOF
nnunet-liver evaluate "$work/predictions" "$dataset/labelsTs" -o "$work/evaluation" \
  --dataset-json "$work/eval_targets.json" -np 1 --quiet
python "$repo/scripts/print_evaluation.py" "$work/evaluation"
step "done: report $work/evaluation/report.md, predictions $work/predictions (CASE.nii.gz + CASE.json)"
