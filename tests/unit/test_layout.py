"""The package layout: one `photoz` namespace, rooms that import only what DESIGN.md allows."""
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


@pytest.mark.parametrize("room, forbidden", [("service", "photoz.training"), ("pipeline", "photoz.training"),
                                             ("formats", "photoz.training"), ("formats", "photoz.service"),
                                             ("formats", "photoz.pipeline"), ("model", "photoz.service"),
                                             # the RAIL stages run bundles: the serving side's deployment
                                             ("integrations", "photoz.training")])
def test_rooms_import_only_what_the_design_allows(room, forbidden):
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / room).rglob("*.py")
                 if any(name == forbidden or name.startswith(forbidden + ".") for name in _imports(p))]
    assert not offenders, f"{forbidden} imported from {offenders}"
