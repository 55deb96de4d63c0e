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
entry-point group ``conan_st.plugins`` (``from conan_st.hookspecs import hookimpl``).
``CONAN_ST_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-ins (the same switch pytest has for
its plugins).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import pluggy
from accelerate.utils import str_to_bool

from . import builtin_plugins, hookspecs
from .hookspecs import PROJECT, hookimpl  # noqa: F401 - hookimpl: the import plugins of 0.1.0 use

ENTRY_POINT_GROUP = "conan_st.plugins"
BUILTIN_PLUGINS = {"builtin": builtin_plugins}  # under their entry points' names: loaded once


# Copied from rrcm_diffusers.hooks.build_plugin_manager with RRCM->CONAN_ST
def build_plugin_manager() -> pluggy.PluginManager:
    """A new manager: the hook specs, the built-in plugins, and (unless
    ``CONAN_ST_DISABLE_PLUGIN_AUTOLOAD=1``) every plugin of the entry-point group."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, plugin in BUILTIN_PLUGINS.items():
        pm.register(plugin, name=name)
    switch = "CONAN_ST_DISABLE_PLUGIN_AUTOLOAD"
    value = os.environ.get(switch) or "0"
    try:
        disabled = bool(str_to_bool(value))  # accelerate's truth values (to_bool= is newer than 1.0)
    except ValueError:
        raise ValueError(f"{switch} must be 1/0, true/false, yes/no or on/off, got {value!r}") from None
    if not disabled:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process's manager, built on first use (``get_plugin_manager.cache_clear()`` rebuilds it)."""
    return build_plugin_manager()


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
