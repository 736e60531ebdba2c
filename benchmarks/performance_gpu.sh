#!/usr/bin/env bash
# Runs benchmarks/performance.py on the GPU machine (../shared/GPU.md), after GPU.md's step 2 (SimpleITK) in
# an earlier call; carry .whl/rest. Usage there: bash benchmarks/performance_gpu.sh STEP... [options]
# (the calls of a full run are listed in performance.py's docstring). Installs .whl/rest when nnU-Net is not
# importable yet, keeps nnU-Net's folders and the results in $TMPDIR between calls, and copies all results so
# far to $OUT.
set -euo pipefail
export TMPDIR=${TMPDIR:-$(dirname "$(mktemp -u)")}
if [ -d .whl/rest ] && ! PYTHONPATH=$TMPDIR/site python3 -c "import nnunetv2" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$TMPDIR/site" .whl/rest/*.whl
fi
# setup.py maps these top-level folders into the package; without an install, links do the same
ln -sfn ../dataset_conversion nnunet_liver_ext/dataset_conversion
ln -sfn ../trainer_plans nnunet_liver_ext/trainer_plans
export PYTHONPATH=$TMPDIR/site:$PWD PYTHONUNBUFFERED=1 nnUNet_extTrainer=$PWD/nnunet_liver_ext/trainers
status=0
python3 benchmarks/performance.py "$@" --out "$TMPDIR/performance" --work "$TMPDIR/performance_work" || status=$?
if [ -n "${OUT:-}" ] && [ -d "$TMPDIR/performance" ]; then
  cp -r "$TMPDIR/performance/." "$OUT/"
fi
exit $status
