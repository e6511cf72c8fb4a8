"""setup.sh's torchvision hook: PyPI's CUDA torchvision beside a CPU torch (its compiled ops cannot load)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fresh interpreter in which torchvision's ops library cannot load, as beside a CPU build of torch; any hook a
# .pth installed at start-up is removed first, so the case without it is the bare one.
SIMULATION = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_BeforeTorchvision"]
import torch

def refuse(path):
    raise OSError(f"cannot load {path}: libtorch_cuda.so not found")

torch.ops.load_library = refuse
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIMULATION + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_torchvision_does_not_import_without_its_ops():
    done = run("import torchvision")
    assert done.returncode != 0 and "torchvision::nms" in done.stderr


def test_the_hook_lets_torchvision_import_without_its_ops():
    done = run(
        "from utils.install import torchvision_cpu\n"
        "torchvision_cpu.install()\n"
        "import torchvision, torchvision.extension\n"
        "from torchvision.models.vgg import cfgs, make_layers\n"
        "import torchvision.transforms.v2.functional as TF\n"
        "assert not torchvision.extension._has_ops()\n"
        "assert TF.gaussian_blur(torch.ones(1, 1, 8, 8), [3, 3], [1.0, 1.0]).allclose(torch.ones(1, 1, 8, 8))\n"
        "try:\n"
        "    torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)\n"
        "except (RuntimeError, NotImplementedError):\n"
        "    print('nms has no kernel')\n"
    )
    assert done.returncode == 0, done.stderr
    assert "nms has no kernel" in done.stdout


def test_the_hook_defines_nothing_when_the_ops_load():
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys\n"
         "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_BeforeTorchvision']\n"
         "from utils.install import torchvision_cpu\n"
         "torchvision_cpu.ops_library_loads = lambda package_dir: True\n"
         "torchvision_cpu.define_missing_schemas()\n"
         "print(len(torchvision_cpu._libraries))\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
