#!/usr/bin/env bash
# Runs benchmarks/gpu_stdnet_vs_nnunet.py on the GPU machine (../shared/GPU.md), after GPU.md's
# step 2 (SimpleITK) in an earlier call. Usage there: bash benchmarks/gpu_run.sh STEP... [options]
# Installs .whl/rest when it was carried along, and copies the outputs to $OUT.
source "$(dirname "$0")/gpu_env.sh"
export nnUNet_raw=$TMPDIR/r nnUNet_preprocessed=$TMPDIR/p nnUNet_results=$TMPDIR/res
mkdir -p "$TMPDIR/gpu_out"
status=0
# 124: stopped at the call's limit (see gpu_env.sh); what finished is copied below all the same
within_call_limit python3 benchmarks/gpu_stdnet_vs_nnunet.py "$@" --out "$TMPDIR/gpu_out" || status=$?
if [ -n "${OUT:-}" ]; then
  for f in "$TMPDIR"/gpu_out/{timing.json,gpu_summary.json} "$TMPDIR"/gpu_out/train_*.log; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  [ -f "$TMPDIR/gpu_out/benchmark/report.md" ] && cp "$TMPDIR/gpu_out/benchmark/report.md" "$OUT/"
  [ -f "$TMPDIR/gpu_out/benchmark/per_case_metrics.csv" ] && cp "$TMPDIR/gpu_out/benchmark/per_case_metrics.csv" "$OUT/"
fi
exit $status
