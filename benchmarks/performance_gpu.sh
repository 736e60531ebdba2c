#!/usr/bin/env bash
# Runs benchmarks/performance.py on the GPU machine (../shared/GPU.md), after GPU.md's step 2 (SimpleITK) in
# an earlier call; carry .whl/rest. Usage there: bash benchmarks/performance_gpu.sh STEP... [options]
# (the calls of a full run are listed in performance.py's docstring). Installs .whl/rest when nnU-Net is not
# importable yet, keeps nnU-Net's folders and the results in $TMPDIR between calls, and copies all results so
# far to $OUT.
source "$(dirname "$0")/gpu_env.sh"
# a run spread over sessions: a fresh machine starts from the parts an earlier session returned and committed
if [ ! -d "$TMPDIR/performance/parts" ] && [ -d benchmarks/results/performance_gpu/parts ]; then
  mkdir -p "$TMPDIR/performance" && cp -r benchmarks/results/performance_gpu/parts "$TMPDIR/performance/"
fi
status=0
within_call_limit python3 benchmarks/performance.py "$@" --out "$TMPDIR/performance" --work "$TMPDIR/performance_work" \
  || status=$?  # 124: stopped at the call's limit; every step that finished saved its part
if [ -n "${OUT:-}" ] && [ -d "$TMPDIR/performance" ]; then
  cp -r "$TMPDIR/performance/." "$OUT/"
fi
exit $status
