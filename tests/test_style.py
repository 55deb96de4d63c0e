"""The layout rules the code review asked for, checked so they stay true (see ../shared/style.md)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from tests.helpers import REPO

SOURCES = sorted((REPO / "packages").glob("*/src/*/**/*.py"))
MAX_LINES = 60  # per function, not counting its docstring


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    is_doc = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    return first.end_lineno - first.lineno + 1 if is_doc else 0


def test_the_sources_are_found():
    assert {p.parts[-3] for p in SOURCES} >= {"src"} and len(SOURCES) > 30


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """The package's own modules this file imports at module level (function-local imports are
    how a cycle hides, so they count too)."""
    package = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    parts = package.split(".")
    own = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = (
                parts[: len(parts) - node.level]
                if path.name != "__init__.py"
                else parts[: len(parts) - node.level + 1]
            )
            target = ".".join(base + ([node.module] if node.module else []))
            own.add(target)
            own.update(f"{target}.{a.name}" for a in node.names)
    return own


@pytest.mark.parametrize(
    "package",
    sorted({p.parents[0] for p in SOURCES if p.name == "__init__.py" and p.parent.parent.name == "src"}),
    ids=lambda p: p.name,
)
def test_no_import_cycle_inside_a_package(package: Path):
    modules = {
        ".".join(p.relative_to(package.parent).with_suffix("").parts): p for p in package.rglob("*.py")
    }
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    graph = {
        m: {t for t in _module_imports(p, package) if t in modules and t != m} for m, p in modules.items()
    }
    # the package's __init__ re-exports everything; a cycle through it is the normal layout
    graph = {m: deps - {package.name} for m, deps in graph.items() if m != package.name}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle in {package.name}: {' -> '.join(err.args[1])}")


def test_the_loss_and_the_sampler_do_not_import_the_miner():
    root = REPO / "packages/conan-st/src/conan_st"
    for path in (root / "losses/cross_gpu_balancing.py", root / "sampler.py", root / "model_card.py"):
        assert "conan_st.mining" not in _module_imports(path, root), f"{path.name} imports conan_st.mining"
