#!/usr/bin/env bash
# Runs benchmarks/mamba_ssm_parity.py on the GPU machine (../shared/GPU.md), after GPU.md's step 2 (SimpleITK)
# in an earlier call; carry .whl/rest with mamba-ssm's wheel in it (bash benchmarks/mamba_ssm_wheel.sh here).
# Its own process, so a failure here does not stop what the same call runs next. Results: $OUT/mamba_ssm_parity_gpu/.
source "$(dirname "$0")/gpu_env.sh"
within_call_limit python3 benchmarks/mamba_ssm_parity.py --device cuda --out "${OUT:-$TMPDIR}/mamba_ssm_parity_gpu"
