"""The package layout: one `photoz` namespace, rooms that import only what docs/architecture.md allows
(the layering itself: import-linter's contracts in pyproject.toml, run by `make lint`)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("model", "formats", "service", "pipeline", "training")
SOURCES = [p for folder in (*ROOMS, "photoz", "tests", "benchmarks", "integrations")
           for p in (ROOT / folder).rglob("*.py")]


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_rooms_are_imported_through_the_photoz_namespace(path):
    """`import model` would work from a checkout (the folder is there) and nowhere else."""
    bare = [name for name in _imports(path) if name.split(".")[0] in ROOMS]
    assert not bare, f"{path.relative_to(ROOT)} imports {bare}: use photoz.<room>"


def test_integrations_do_not_import_training_code():
    """The RAIL stages run bundles, as the service does (a separate distribution: outside import-linter's
    photoz graph, whose contracts in pyproject.toml cover the rooms)."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "integrations").rglob("*.py")
                 if any(name.split(".")[:2] == ["photoz", "training"] for name in _imports(p))]
    assert not offenders, f"photoz.training imported from {offenders}"


def test_the_numpy_only_contract_lists_every_module_of_photoz_model_but_its_network():
    """import-linter checks the modules it is given: a new module of photoz.model must join the torch-free
    contract (or move to photoz.model.network)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [numpy_only] = [c for c in contracts if "numpy-only" in c["name"]]
    modules = {f"photoz.model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem != "__init__"}
    assert set(numpy_only["source_modules"]) == modules
    assert {"torch", "photoz.model.network"} <= set(numpy_only["forbidden_modules"])


LONG_MODULE_REASON = "# over 400 lines: "


def _code_files():
    for folder in (*ROOMS, "photoz", "integrations"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_functions_are_at_most_60_lines():
    long = [f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for p in _code_files() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, "split these functions: " + "; ".join(long)


def test_modules_are_at_most_400_lines_or_say_why():
    """A longer module starts with a one-line reason (``# over 400 lines: ...``)."""
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _code_files()
            if (n := len(p.read_text().splitlines())) > 400 and not p.read_text().startswith(LONG_MODULE_REASON)]
    assert not long, "split these modules or give the reason on their first line: " + "; ".join(long)


def test_no_module_imports_another_modules_private_names():
    """``from photoz.x import _name`` couples to what its module may change freely: make it public or keep it."""
    private = [f"{p.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
               for p in [*_code_files(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
               and node.module.split(".")[0] in ("photoz", "tests", "benchmarks", "rail")
               for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, f"private names imported: {private}"
