"""The README's map, checked: imports go one way, `cli → flows → tasks → pixelmill`, and the
pure library imports no orchestrator (Prefect, Ray) and nothing of the rooms above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each room, and the top-level names its modules must not import (anywhere in them, also
# inside a function).
RULES = {
    "pixelmill": {"prefect", "prefect_ray", "prefect_gcp", "ray", "flows", "tasks", "cli"},
    "tasks": {"flows", "cli"},
    "flows": {"cli"},
}


def imported(path: Path) -> set[str]:
    """The top-level names of every module `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(
    path.relative_to(ROOT) for room in RULES for path in (ROOT / room).rglob("*.py")),
    ids=str)
def test_a_room_imports_only_the_rooms_below_it(path):
    banned = RULES[path.parts[0]] & imported(ROOT / path)
    assert not banned, f"{path} imports {sorted(banned)}: see the README's map"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from prefect import flow\n    import ray.util\n")
    assert imported(module) == {"prefect", "ray"}
