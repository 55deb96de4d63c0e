"""Plugin hooks of conan-st (pluggy), discovered through the ``conan_st.plugins`` entry points.

Two extension points:

* ``conan_search_backends()`` → ``{name: factory}``; ``factory()`` returns an object with
  ``search(queries, corpus, top_k) -> (scores, indices)`` over L2-normalised float32
  tensors (exact inner-product top-k). Built in: ``"torch"`` (always) and ``"faiss"`` (when
  faiss is installed).
* ``conan_negative_filters()`` → ``{name: factory}``; ``factory(**kwargs)`` returns
  ``filter(candidate_scores, positive_scores) -> keep_mask`` over (Q, k) and (Q,) tensors.
  Built in: ``"positive_ratio"`` (NV-Retriever: drop candidates scoring above a fraction of the
  positive's score).

A package registers its own by exposing a module with ``@hookimpl`` functions under the
entry-point group ``conan_st.plugins``. ``CONAN_ST_DISABLE_PLUGIN_AUTOLOAD=1`` loads only
the built-ins (the same switch pytest has for its plugins).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "conan_st"
ENTRY_POINT_GROUP = "conan_st.plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class ConanSpec:
    @hookspec
    def conan_search_backends(self) -> dict[str, Callable[[], Any]]:
        """Return ``{name: factory}`` of nearest-neighbour search backends."""

    @hookspec
    def conan_negative_filters(self) -> dict[str, Callable[..., Any]]:
        """Return ``{name: factory}`` of hard-negative filters."""


_manager: pluggy.PluginManager | None = None


def get_plugin_manager(reload: bool = False) -> pluggy.PluginManager:
    global _manager
    if _manager is None or reload:
        from . import builtin_plugins

        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(ConanSpec)
        pm.register(builtin_plugins, name="builtin")  # same name as its entry point
        if os.environ.get("CONAN_ST_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in ("1", "true", "yes"):
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


def _collect(results: list[dict[str, Any]], what: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for table in results:
        for name, factory in (table or {}).items():
            if name in found and found[name] is not factory:
                raise ValueError(f"two plugins register a {what} named {name!r}")
            found[name] = factory
    return found


def search_backends() -> dict[str, Callable[[], Any]]:
    return _collect(get_plugin_manager().hook.conan_search_backends(), "search backend")


def negative_filters() -> dict[str, Callable[..., Any]]:
    return _collect(get_plugin_manager().hook.conan_negative_filters(), "negative filter")


def get_search_backend(name: str | None = None) -> Any:
    """A backend by name; ``None`` picks faiss when installed, else torch."""
    table = search_backends()
    if name is None:
        name = "faiss" if "faiss" in table else "torch"
    if name not in table:
        raise ValueError(f"search backend must be one of {sorted(table)}, got {name!r}")
    return table[name]()


def get_negative_filter(name: str, **kwargs) -> Any:
    table = negative_filters()
    if name not in table:
        raise ValueError(f"negative filter must be one of {sorted(table)}, got {name!r}")
    return table[name](**kwargs)
