"""Both packages' plugin layout is cycle-free, as pluggy's example and pytest lay it out: the hook
specs import only pluggy, the built-in plugins import only the specs' marker, and the manager is
built by a function (tests rebuild it; no module global is reloaded)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = {
    "rrcm_diffusers": (REPO / "packages/rrcm-diffusers/src/rrcm_diffusers", "backbones.py"),
    "conan_st": (REPO / "packages/conan-st/src/conan_st", "builtin_plugins.py"),
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


@pytest.mark.parametrize("package", list(PACKAGES))
def test_hookspecs_import_only_pluggy_and_plugins_only_the_specs(package):
    folder, builtin = PACKAGES[package]
    assert _imports(folder / "hookspecs.py") <= {"__future__", "collections.abc", "typing", "pluggy", "torch"}
    own = {m for m in _imports(folder / builtin) if m.startswith(".")}
    assert own == {".hookspecs"}, own  # not .hooks: no cycle through the manager


@pytest.mark.parametrize("package", list(PACKAGES))
def test_manager_is_built_fresh_and_cached_once(package):
    import importlib

    hooks = importlib.import_module(f"{package}.hooks")
    a, b = hooks.build_plugin_manager(), hooks.build_plugin_manager()
    assert (
        a is not b
        and a.get_plugins()
        and {p.__name__ for p in a.get_plugins()} == {p.__name__ for p in b.get_plugins()}
    )
    assert hooks.get_plugin_manager() is hooks.get_plugin_manager()


@pytest.mark.parametrize(
    "package,switch",
    [("rrcm_diffusers", "RRCM_DISABLE_PLUGIN_AUTOLOAD"), ("conan_st", "CONAN_ST_DISABLE_PLUGIN_AUTOLOAD")],
)
def test_the_autoload_switch_takes_accelerates_truth_values_and_names_itself(package, switch, monkeypatch):
    import importlib

    hooks = importlib.import_module(f"{package}.hooks")
    for value in ("1", "yes", "on", "0", "false", ""):  # empty: unset, so autoload stays on
        monkeypatch.setenv(switch, value)
        hooks.build_plugin_manager()
    monkeypatch.setenv(switch, "maybe")
    with pytest.raises(ValueError, match=f"{switch} must be 1/0, true/false, yes/no or on/off, got 'maybe'"):
        hooks.build_plugin_manager()
