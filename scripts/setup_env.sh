#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the package
# with its test extras. Sourced by demo.sh and test.sh, so each of them works on a fresh clone.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The stamp skips the (slow) resolver when nothing that decides the install changed.
stamp="$venv/.nnunet_liver_ext_installed"
want=$(cat "$repo/setup.py" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing nnunet-liver-ext and its dependencies (nnU-Net 2.8, PyTorch) into $venv ..."
  log="$venv/install.log"
  { "$venv/bin/python" -m pip install --upgrade "pip>=24" "setuptools>=64" wheel &&
    "$venv/bin/python" -m pip install -e "$repo[dev]"; } > "$log" 2>&1 \
    || { tail -n 40 "$log"; echo "install failed; full log: $log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export nnUNet_extTrainer="$repo/nnunet_liver_ext/trainers"
