"""Plugin hooks of rrcm-diffusers (pluggy), discovered through entry points.

A package registers backbones by exposing a module with a ``hookimpl`` in the
``rrcm_diffusers.backbones`` entry-point group::

    # my_pkg/rrcm_plugin.py
    from rrcm_diffusers.hookspecs import hookimpl

    @hookimpl
    def rrcm_register_backbones():
        return {"my-convnet": MyConvNet}   # MyConvNet(**backbone_kwargs) -> nn.Module

    # pyproject.toml
    [project.entry-points."rrcm_diffusers.backbones"]
    my-pkg = "my_pkg.rrcm_plugin"

A backbone is an ``nn.Module`` built as ``cls(image_size=..., in_channels=..., **kwargs)``
with an ``out_dim`` attribute and ``forward(x, t_emb_input) -> (B, out_dim)`` where ``x`` is
the c_in-scaled noisy image (B, C, H, W) and ``t_emb_input`` the time condition c_noise (B,).
The built-in ``vit`` and ``resnet`` are registered the same way (entry point ``vit``). Set
``RRCM_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-in backbones (e.g. in tests).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pluggy
from accelerate.utils import str_to_bool
from torch import nn

from . import backbones, hookspecs
from .hookspecs import PROJECT, hookimpl  # noqa: F401 - hookimpl: the import plugins of 0.1.0 use

ENTRY_POINT_GROUP = "rrcm_diffusers.backbones"
BUILTIN_PLUGINS = {"vit": backbones}  # under their entry points' names: loaded once


def build_plugin_manager() -> pluggy.PluginManager:
    """A new manager: the hook specs, the built-in plugins, and (unless
    ``RRCM_DISABLE_PLUGIN_AUTOLOAD=1``) every plugin of the entry-point group."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, plugin in BUILTIN_PLUGINS.items():
        pm.register(plugin, name=name)
    switch = "RRCM_DISABLE_PLUGIN_AUTOLOAD"
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


def available_backbones() -> dict[str, Callable[..., nn.Module]]:
    found: dict[str, Callable[..., nn.Module]] = {}
    for table in get_plugin_manager().hook.rrcm_register_backbones():
        for name, factory in table.items():
            if name in found and found[name] is not factory:
                raise ValueError(f"two plugins register a backbone named {name!r}")
            found[name] = factory
    return found


def build_backbone(name: str, **kwargs) -> nn.Module:
    table = available_backbones()
    if name not in table:
        raise ValueError(f"backbone must be one of {sorted(table)}, got {name!r}")
    return table[name](**kwargs)
