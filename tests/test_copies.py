"""Code copied between the packages is marked ``# Copied from <module>.<name> [with A->B, ...]`` on the
line above the copy, as in diffusers (each package installs alone, so one cannot import the other's).
This test fails when a copy drifts from its original: fix both, or drop the mark on purpose."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^(\s*)# Copied from ([\w.]+)(?: with (.+))?$")


def _marks() -> list[tuple[Path, int, re.Match]]:
    found = []
    for path in sorted(REPO.glob("packages/*/src/**/*.py")):
        for i, line in enumerate(path.read_text().splitlines()):
            if m := MARK.match(line):
                found.append((path, i, m))
    return found


def _block(lines: list[str], start: int) -> str:
    """The def/class starting at ``lines[start]``: every following line that is blank or indented deeper."""
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    return "\n".join(lines[start:end]).rstrip()


def _original(target: str, replacements: str | None) -> str:
    module, name = target.rsplit(".", 1)
    source = inspect.getsource(getattr(importlib.import_module(module), name)).rstrip()
    for pair in filter(None, (p.strip() for p in (replacements or "").split(","))):
        old, new = pair.split("->")
        source = source.replace(old.strip(), new.strip())
    return source


def test_every_marked_copy_matches_its_original():
    marks = _marks()
    assert {m.group(2) for _, _, m in marks} >= {
        "rrcm_diffusers.hooks.build_plugin_manager",
        "rrcm_diffusers.data.default_data_dir",
    }
    for path, i, m in marks:
        copy = _block(path.read_text().splitlines(), i + 1)
        assert copy == _original(m.group(2), m.group(3)), (
            f"{path.relative_to(REPO)}:{i + 1} drifted from {m.group(2)}"
        )


def test_a_drifted_copy_is_caught():
    text = inspect.getsource(importlib.import_module("conan_st.hooks"))
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if "# Copied from rrcm_diffusers.hooks" in line)
    drifted = [*lines[: i + 1], *(line.replace("add_hookspecs", "add_hookspec") for line in lines[i + 1 :])]
    m = MARK.match(lines[i])
    assert _block(drifted, i + 1) != _original(m.group(2), m.group(3))
