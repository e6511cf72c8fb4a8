#!/usr/bin/env bash
# The test command: sets up .venv (first time only), lints, runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
