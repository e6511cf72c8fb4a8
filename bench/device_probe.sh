#!/usr/bin/env bash
# The prepared GPU window (bench/device_probe.py): the training and sampling speed ablation of the seed network,
# its numerics and a GroupNorm gradient check, written to $OUT (probe.json, profile.txt, inductor_cache.bin).
#   OUT=/tmp/probe bash bench/device_probe.sh [extra device_probe.py args]
# Run it as one device call with a timeout of about 540 s; no variant starts after --budget (330 s), and
# probe.json is rewritten after each, so a killed run still returns what it measured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
exec timeout 500 "$PY" bench/device_probe.py --out "${OUT:-probe_out}" "$@"
