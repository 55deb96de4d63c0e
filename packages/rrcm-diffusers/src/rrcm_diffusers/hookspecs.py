"""The hook specifications of rrcm-diffusers: what a plugin may implement (pluggy only, as
pluggy's own example and pytest's ``hookspec`` module; plugins import ``hookimpl`` from here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

PROJECT = "rrcm_diffusers"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rrcm_register_backbones() -> dict[str, Callable[..., nn.Module]]:
    """Return ``{name: factory}`` of backbones this plugin provides."""
