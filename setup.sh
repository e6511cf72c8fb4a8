#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
# Idempotent: a second run only installs what requirements.txt gained since.
# Needs only the package registries; downloads no weights or data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup.sh: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "setup.sh: .venv is up to date"
  exit 0
fi
echo "setup.sh: installing requirements.txt into .venv (first time: several minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
echo "$want" >"$stamp"
echo "setup.sh: done"
