#!/usr/bin/env bash
# Builds mamba-ssm's pure-Python wheel into .whl/rest (git-ignored), without its CUDA extensions: the Triton
# kernels of Mamba2 need none. The GPU runners install .whl/rest there (benchmarks/gpu_env.sh,
# ../shared/GPU.md step 3); benchmarks/mamba_ssm_parity.py says how to use it on the CPU. Needs the
# package index (mamba-ssm is published as a source archive only) and the repo's torch (no build isolation).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl/rest
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip wheel -q --no-deps --no-build-isolation \
  -w .whl/rest "mamba-ssm${MAMBA_SSM_VERSION:+==$MAMBA_SSM_VERSION}"
ls -la .whl/rest/mamba_ssm-*.whl
