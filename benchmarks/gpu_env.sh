# Sourced by the benchmarks' GPU runners (gpu_run.sh, performance_gpu.sh) on the GPU machine
# (../shared/GPU.md), after GPU.md's step 2 (SimpleITK) in an earlier call: installs .whl/rest into
# $TMPDIR/site when it was carried along and nnU-Net is not importable yet, and makes the package
# importable from the working tree.
set -euo pipefail
export TMPDIR=${TMPDIR:-$(dirname "$(mktemp -u)")}
if [ -d .whl/rest ] && ! PYTHONPATH=$TMPDIR/site python3 -c "import nnunetv2" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$TMPDIR/site" .whl/rest/*.whl
fi
# setup.py maps these top-level folders into the package; without an install, links do the same
ln -sfn ../dataset_conversion nnunet_liver_ext/dataset_conversion
ln -sfn ../trainer_plans nnunet_liver_ext/trainer_plans
export PYTHONPATH=$TMPDIR/site:$PWD PYTHONUNBUFFERED=1 nnUNet_extTrainer=$PWD/nnunet_liver_ext/trainers
# A device call ends at its time limit (600 s unless the call asks for less) and returns only what is under
# $OUT by then: the runners stop their work a little earlier, so that they still copy what finished. The
# limit counts from the call's start ($SECONDS: the runner's shell), the install above included.
within_call_limit() {
  local left=$(( ${GPU_CALL_SECONDS:-570} - SECONDS ))
  if [ "$left" -lt 1 ]; then return 124; fi
  if command -v timeout >/dev/null; then timeout --signal=TERM --kill-after=10 "$left" "$@"
  else "$@"; fi
}
