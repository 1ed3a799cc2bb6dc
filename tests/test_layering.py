"""The library's layering: every module imports only from its own layer or the ones below (no upward
import), never the repository's Ray layers, and Ray only where it talks to a cluster, inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "dmoerm"
LAYERS = [  # bottom first; a module may import from its own layer and the layers below
    {"", "configtools", "names", "storage", "checkpoint", "losses", "significance", "progress", "runlog",
     "redact", "device"},
    {"data"},
    {"modeling"},
    {"training", "labeling", "promotion", "evaluation", "generation", "uncertainty"},
    {"bundle", "config", "ensemble"},
    {"stages", "tracking", "mlflow_model", "mlflow_entry"},
    {"registry", "pipeline", "submit"},
    {"serving", "client", "cli", "studies"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return "" if rel.name == "__init__" and rel.parent == Path(".") else rel.parts[0]


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import of the file, inside functions too."""
    top = {id(n) for n in tree.body}  # type: ignore[attr-defined]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dmoerm":
                out += [(f"dmoerm.{a.name}", id(node) in top) for a in node.names]
            else:
                out.append((node.module, id(node) in top))
    return out


def test_every_module_has_a_layer():
    assert {_part(p) for p in MODULES} <= set(RANK), {_part(p) for p in MODULES} - set(RANK)


@pytest.mark.parametrize("path", MODULES, ids=[p.relative_to(PACKAGE).as_posix() for p in MODULES])
def test_no_upward_import(path):
    mine = RANK[_part(path)]
    for name, _ in _imports(ast.parse(path.read_text())):
        root = name.split(".")[0]
        assert root not in ("jobs", "tuning", "serve"), f"{path.name} imports the Ray layer {name}"
        if root == "dmoerm" and name != "dmoerm":
            other = name.split(".")[1]
            assert RANK.get(other, 0) <= mine, f"{path.name} (layer {mine}) imports {name} (layer {RANK[other]})"
        if root == "ray":
            assert path.name == "submit.py", f"{path.name} imports {name}: the library is Ray-free"


def test_ray_is_imported_lazily_and_the_cli_needs_none_of_it():
    tree = ast.parse((PACKAGE / "submit.py").read_text())
    assert all(not top for name, top in _imports(tree) if name.startswith("ray"))
    code = "import sys, dmoerm.cli, dmoerm.submit, dmoerm.pipeline; print(sorted(m for m in sys.modules if m == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
