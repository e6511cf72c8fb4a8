#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
# Idempotent: a second run only installs what requirements.txt gained since.
# Needs only the package registries; downloads no weights or data.
#
# torch: on a machine without an NVIDIA GPU, a CPU build of torch that pip finds among its local wheels
# (find-links) is taken first when it satisfies requirements.txt: the registry's Linux torch brings several GB
# of CUDA packages, more than a small CI disk holds. Whatever torch is installed is then kept (a constraint),
# so pip resolves torchvision and the rest against it. PyPI's torchvision is a CUDA build whose compiled ops
# cannot load beside a CPU torch; utils/install/torchvision_cpu.py lets its Python parts import anyway.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
HOOK=utils/install/torchvision_cpu.py
if [[ ! -x .venv/bin/python ]]; then
  echo "setup.sh: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt setup.sh "$HOOK" | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "setup.sh: .venv is up to date"
  exit 0
fi
pip=(.venv/bin/python -m pip install --quiet --no-cache-dir)  # no second copy of the wheels on disk
torch_version() { .venv/bin/python -m pip show torch 2>/dev/null | sed -n 's/^Version: //p'; }
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

echo "setup.sh: installing requirements.txt into .venv (first time: several minutes)"
"${pip[@]}" --upgrade pip
if [[ -z $(torch_version) ]] && ! has_gpu &&
   "${pip[@]}" --no-index --no-deps "$(grep -E '^torch([<>=!~ ]|$)' requirements.txt)" 2>/dev/null; then
  echo "setup.sh: no NVIDIA GPU: took torch $(torch_version) from pip's local wheels"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
[[ -n $(torch_version) ]] && echo "torch==$(torch_version)" >"$constraints"
"${pip[@]}" -r requirements.txt -c "$constraints"

if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp "$HOOK" "$site/comet_torchvision_cpu.py"
  echo "import comet_torchvision_cpu; comet_torchvision_cpu.install()" >"$site/comet_torchvision_cpu.pth"
  .venv/bin/python -c "import torchvision" || {
    echo "setup.sh: torchvision $(.venv/bin/python -m pip show torchvision | sed -n 's/^Version: //p') does not" \
         "import beside torch $(torch_version); see $HOOK" >&2
    exit 1
  }
  echo "setup.sh: torchvision's compiled ops cannot load beside this torch; its Python parts import ($HOOK)"
fi
echo "$want" >"$stamp"
echo "setup.sh: done"
