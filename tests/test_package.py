"""pyproject.toml's package: each console script names a function a script can call, and an editable install
gives working commands without touching the repository."""

import importlib
import inspect
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_console_script_is_a_function_called_without_arguments(name):
    module, _, attr = SCRIPTS[name].partition(":")
    target = getattr(importlib.import_module(module), attr)
    assert callable(target)
    inspect.signature(target).bind()  # the generated script calls it with none, its return value the exit status


@pytest.mark.slow
def test_an_editable_install_gives_working_console_scripts(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1", reason="an offline editable build needs setuptools >= 70.1")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    # the new environment sees this one's packages (pip, setuptools, torch), so nothing is downloaded
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (site / "_parent.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    before = {p.name for p in ROOT.iterdir()}
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "-e", str(ROOT)]
    done = subprocess.run(pip, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in ROOT.iterdir()} - before == set()  # no egg-info or build/ beside the code
    for name in SCRIPTS:
        done = subprocess.run([str(env / "bin" / name), "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {name}")
