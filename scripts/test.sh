#!/usr/bin/env bash
# The test command of the README: sets up .venv if needed, then runs the fast test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the heavy ones).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/scripts/setup_env.sh"
cd "$repo"
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec python -m pytest "$@"
