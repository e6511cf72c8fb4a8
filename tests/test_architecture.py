"""The package layout: no import cycles among the project's modules (lazy imports included), arrows that point
down, the methods behind one registry, and a method added as README says."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("utils", "losses")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere (inside functions too): ``from a.b import c`` names a.b.c
    when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): project_imports(p, known) - {module_name(p)} for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert "utils.generation.generate" in graph and "utils.data.dataset_io" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_utils_is_organised_by_concern():
    """Only shared foundations sit at the top of utils/; everything else lives in a subpackage."""
    top = sorted(p.name for p in (ROOT / "utils").glob("*.py"))
    assert top == ["__init__.py", "cli.py", "config.py", "distributed.py", "files.py", "images.py", "locks.py",
                   "precision.py", "seeding.py"]
    for package in ("data", "methods", "generation", "evaluation"):
        assert (ROOT / "utils" / package / "__init__.py").is_file()


# --- the package rules of the method packages ------------------------------------------------------------------
ENTRY_SCRIPTS = {"trainer", "evaluate", "inferer", "study"}
METHOD_PACKAGES = ("flow_matching", "ddpm", "spade", "med_dt_fm")


def imports_of(path: Path) -> set[str]:
    """Every module name ``path`` imports (inside functions too), project or not: ``from a import b`` gives a
    and a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def library_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def test_the_rule_finder_sees_an_import_inside_a_function(tmp_path):
    code = tmp_path / "x.py"
    code.write_text("def f():\n    from utils.methods import load_module\n    import trainer\n")
    assert {"utils.methods", "utils.methods.load_module", "trainer"} <= imports_of(code)


def test_library_code_never_imports_an_entry_script():
    for path in library_files():
        assert not imports_of(path) & ENTRY_SCRIPTS, f"{path.relative_to(ROOT)} imports an entry script"


def test_generation_and_evaluation_sit_below_the_methods():
    for package in ("generation", "evaluation", "data"):
        for path in (ROOT / "utils" / package).rglob("*.py"):
            bad = {m for m in imports_of(path) if m == "utils.methods" or m.startswith("utils.methods.")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_a_method_package_is_reached_only_through_the_registry():
    """Outside utils/methods/ (and tests), nothing names a method package's modules: the registry loads them."""
    outside = [p for p in ROOT.glob("*.py")] + [p for p in (ROOT / "bench").rglob("*.py")]
    outside += [p for p in library_files() if "methods" not in p.relative_to(ROOT).parts]
    for path in outside:
        for name in imports_of(path):
            parts = name.split(".")
            assert not (parts[:2] == ["utils", "methods"] and len(parts) > 2 and parts[2] in METHOD_PACKAGES), \
                f"{path.relative_to(ROOT)} imports {name}"
    # and inside utils/methods/, one package never reaches into another
    for package in METHOD_PACKAGES:
        for path in (ROOT / "utils" / "methods" / package).glob("*.py"):
            for name in imports_of(path):
                parts = name.split(".")
                if parts[:2] == ["utils", "methods"] and len(parts) > 2 and parts[2] in METHOD_PACKAGES:
                    assert parts[2] == package, f"{path.relative_to(ROOT)} imports {name}"


def test_every_registered_method_has_a_config_class_and_a_module_class():
    from utils.config import RunConfig
    from utils.methods import METHODS, config_class, method_class
    from utils.methods.base import SynthesisMethod

    assert set(METHODS) == set(METHOD_PACKAGES)
    for name in METHODS:
        cfg = config_class(name)
        assert issubclass(cfg, RunConfig) and cfg.SAMPLERS, name
        assert issubclass(method_class(name), SynthesisMethod), name


def test_the_shared_config_knows_no_method():
    """utils/config.py names no method and none of a method's sections: each method's config owns those."""
    text = (ROOT / "utils" / "config.py").read_text()
    for section in ("prior_args", "contrastive_args", "ddpm_args", "spade_args", "med_dt_fm_args", "ukan_args"):
        assert section not in text, section
    assert len(text.splitlines()) < 440  # framework-wide keys only: 420 before four speed keys (issue 26)


# --- adding a method: one package, one registry line, one YAML ---------------------------------------------------
TOY = ("toy_method.config:ToyRunConfig", "toy_method.module:ToyModule")


@pytest.fixture
def toy_registered(monkeypatch):
    from utils import methods

    monkeypatch.setitem(methods.METHODS, "toy", TOY)  # the one registry line


def test_a_section_of_another_method_is_refused_naming_its_owner(toy_registered, tmp_path):
    from utils.config import ConfigError, config_to_dict
    from utils.methods import load_config

    toy = tmp_path / "toy.yaml"
    toy.write_text("run_name: x\nmethod: toy\nprior_args:\n  alpha: 0.3\n")
    with pytest.raises(ConfigError, match="prior_args belongs to method flow_matching, not to method toy"):
        load_config(toy)
    with pytest.raises(ConfigError, match="toy_args belongs to method toy, not to method flow_matching"):
        load_config("configs/tiny.yaml", ["toy_args.noise_scale=0.5"])
    toy.write_text("run_name: x\nmethod: toy\n")
    cfg = load_config(toy)
    assert cfg.toy_args.noise_scale == 0.1 and cfg.sampling_args.sampler == "one_pass"
    assert "prior_args" not in config_to_dict(cfg) and not hasattr(cfg, "prior_args")


def test_a_toy_method_added_as_readme_says_trains_and_generates(toy_registered, tiny_data, tmp_path):
    from conftest import tiny_overrides

    import inferer
    import trainer

    args = ["--config_path", "tests/toy_method/toy.yaml"]
    for item in tiny_overrides(tmp_path, **{"data_args.path": tiny_data}):
        args += ["--set", item]
    assert trainer.main(args) == 0
    run = tmp_path / "runs" / "toy"
    assert (run / "last.ckpt").is_file() and list((run / "samples").glob("epoch*.png"))
    out = tmp_path / "samples"
    assert inferer.main(["--checkpoint", str(run), "--num_samples", "3", "--sampler", "one_pass",
                         "--output_dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["method"], manifest["sampler"], manifest["nfe_per_image"]) == ("toy", "one_pass", 1)
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (3, 1, 32, 32) and 0 <= images.min() and images.max() <= 1 and images.std() > 0
