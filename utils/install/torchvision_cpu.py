"""Lets PyPI's torchvision import beside a CPU build of torch.

PyPI's Linux torchvision wheels are CUDA builds. Beside the CPU torch wheel that setup.sh takes on a machine
without an NVIDIA GPU, torchvision's compiled ops (``_C.so``, linked against libtorch_cuda) cannot load, and
torchvision 0.28 then fails at import: it registers fake kernels for ``torchvision::nms`` and ``qnms``, ops that
do not exist. Its pure-Python parts (models, transforms), all that COMET, torchmetrics and torch-fidelity use,
need none of the compiled ops.

setup.sh copies this file into the virtual environment's site-packages, with a ``.pth`` line that calls
:func:`install` at interpreter start-up, only after it saw ``import torchvision`` fail. Nothing happens until
something imports torchvision; then, if torchvision's ops library cannot load, the two op schemas are defined
without kernels (``torchvision.ops.nms`` still raises when called) and the import goes through.

Standard library and torch only: the file runs from site-packages, outside the repository.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# The ops torchvision registers fake kernels for unconditionally at import (torchvision/_meta_registrations.py).
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []  # a torch.library.Library unregisters its definitions when collected


def ops_library_loads(package_dir: Path) -> bool:
    """Whether torchvision's compiled ops library in ``package_dir`` loads (it registers the real ops)."""
    import torch

    for lib in sorted(package_dir.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except OSError:
            return False
    return False


def define_missing_schemas() -> None:
    """Define :data:`SCHEMAS` in the ``torchvision`` namespace unless torchvision's own ops library loads."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or ops_library_loads(Path(spec.submodule_search_locations[0])):
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        lib.define(schema)
    _libraries.append(lib)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`define_missing_schemas` once, as torchvision is first imported; finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_schemas()
        return None


def install() -> None:
    """Arrange for :func:`define_missing_schemas` to run before torchvision's first import."""
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
