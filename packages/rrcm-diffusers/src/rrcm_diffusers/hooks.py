"""Plugin hooks of rrcm-diffusers (pluggy), discovered through entry points.

A package registers backbones by exposing a module with a ``hookimpl`` in the
``rrcm_diffusers.backbones`` entry-point group::

    # my_pkg/rrcm_plugin.py
    from rrcm_diffusers.hooks import hookimpl

    @hookimpl
    def rrcm_register_backbones():
        return {"my-convnet": MyConvNet}   # MyConvNet(**backbone_kwargs) -> nn.Module

    # pyproject.toml
    [project.entry-points."rrcm_diffusers.backbones"]
    my-pkg = "my_pkg.rrcm_plugin"

A backbone is an ``nn.Module`` built as ``cls(image_size=..., in_channels=..., **kwargs)``
with an ``out_dim`` attribute and ``forward(x, t_emb_input) -> (B, out_dim)`` where ``x`` is
the c_in-scaled noisy image (B, C, H, W) and ``t_emb_input`` the time condition c_noise (B,).
The built-in ViT is registered the same way (entry point ``vit``). Set
``RRCM_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-in backbones (e.g. in tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pluggy
from torch import nn

PROJECT = "rrcm_diffusers"
ENTRY_POINT_GROUP = "rrcm_diffusers.backbones"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BackboneSpec:
    @hookspec
    def rrcm_register_backbones(self) -> dict[str, Callable[..., nn.Module]]:
        """Return ``{name: factory}`` of backbones this plugin provides."""


_manager: pluggy.PluginManager | None = None


def get_plugin_manager(reload: bool = False) -> pluggy.PluginManager:
    global _manager
    if _manager is None or reload:
        from . import backbones

        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(BackboneSpec)
        pm.register(backbones, name="vit")  # same name as its entry point: loaded once
        if os.environ.get("RRCM_DISABLE_PLUGIN_AUTOLOAD", "").lower() not in ("1", "true", "yes"):
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


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
