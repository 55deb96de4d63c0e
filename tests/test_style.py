"""The layout rules the code review asked for, checked so they stay true (see ../shared/style.md)."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

SOURCES = sorted((REPO / "packages").glob("*/src/*/**/*.py"))
MAX_LINES = 60  # lines of code per function: no docstring, comment or blank line counts
MAX_STEPS_LINES = 80  # a flat function of numbered steps (`# 1.`, `# 2.`, ...) reads fine up to this


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


def _code_and_steps(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> tuple[int, int]:
    """(lines of code, numbered step comments at the body's own indentation) of a function."""
    start = node.lineno + _docstring_lines(node)  # the def line counts; the docstring does not
    body = source[start - 1 : node.end_lineno]
    code = [line for line in body if line.strip() and not line.strip().startswith("#")]
    indent = " " * node.body[0].col_offset
    steps = [line for line in body if re.match(rf"^{indent}# \d+\. ", line)]
    return len(code), len(steps)


def test_no_function_is_longer_than_60_lines_of_code():
    """A long function is split, except a flat list of numbered steps (pretrain, certify_dataset),
    which may run to 80 lines: pushing such steps into helpers or dict bags reads worse."""
    long = []
    for path in SOURCES:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, steps = _code_and_steps(node, source.splitlines())
                if lines > (MAX_STEPS_LINES if steps >= 2 else MAX_LINES):
                    long.append(
                        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines, {steps} steps)"
                    )
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_length_rule_counts_code_and_allows_numbered_steps():
    def lengths(text: str) -> tuple[int, int]:
        node = ast.parse(text).body[0]
        return _code_and_steps(node, text.splitlines())

    flat = 'def f():\n    """Doc.\n\n    More."""\n    # 1. a\n    x = 1\n\n    # 2. b\n    return x\n'
    assert lengths(flat) == (3, 2)  # def, x = 1, return x; two steps
    nested = "def g():\n    for i in range(2):\n        # 1. not a step of g\n        pass\n"
    assert lengths(nested) == (3, 0)


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
