"""The hook specifications of conan-st: what a plugin may implement (pluggy only, as pluggy's
own example and pytest's ``hookspec`` module; plugins import ``hookimpl`` from here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "conan_st"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def conan_search_backends() -> dict[str, Callable[[], Any]]:
    """Return ``{name: factory}`` of nearest-neighbour search backends."""


@hookspec
def conan_negative_filters() -> dict[str, Callable[..., Any]]:
    """Return ``{name: factory}`` of hard-negative filters."""
