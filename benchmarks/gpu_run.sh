#!/usr/bin/env bash
# Runs benchmarks/gpu_stdnet_vs_nnunet.py on the GPU machine (../shared/GPU.md), after GPU.md's
# step 2 (SimpleITK) in an earlier call. Usage there: bash benchmarks/gpu_run.sh STEP... [options]
# Installs .whl/rest when it was carried along, and copies the outputs to $OUT.
set -euo pipefail
export TMPDIR=${TMPDIR:-$(dirname "$(mktemp -u)")}
if [ -d .whl/rest ] && ! PYTHONPATH=$TMPDIR/site python3 -c "import nnunetv2" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$TMPDIR/site" .whl/rest/*.whl
fi
# setup.py maps these top-level folders into the package; without an install, links do the same
ln -sfn ../dataset_conversion nnunet_liver_ext/dataset_conversion
ln -sfn ../trainer_plans nnunet_liver_ext/trainer_plans
export PYTHONPATH=$TMPDIR/site:$PWD PYTHONUNBUFFERED=1 nnUNet_raw=$TMPDIR/r nnUNet_preprocessed=$TMPDIR/p \
  nnUNet_results=$TMPDIR/res nnUNet_extTrainer=$PWD/nnunet_liver_ext/trainers
mkdir -p "$TMPDIR/gpu_out"
status=0
python3 benchmarks/gpu_stdnet_vs_nnunet.py "$@" --out "$TMPDIR/gpu_out" || status=$?
if [ -n "${OUT:-}" ]; then
  for f in timing.json gpu_summary.json train_nnUNetTrainer_short.log train_nnUNetTrainerSTDNet_short.log; do
    [ -f "$TMPDIR/gpu_out/$f" ] && cp "$TMPDIR/gpu_out/$f" "$OUT/"
  done
  [ -f "$TMPDIR/gpu_out/benchmark/report.md" ] && cp "$TMPDIR/gpu_out/benchmark/report.md" "$OUT/"
  [ -f "$TMPDIR/gpu_out/benchmark/per_case_metrics.csv" ] && cp "$TMPDIR/gpu_out/benchmark/per_case_metrics.csv" "$OUT/"
fi
exit $status
