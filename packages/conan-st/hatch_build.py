"""Resolve the ``shared-dist`` dependency for this monorepo.

Built from a checkout (the sibling folder ``../shared-dist`` exists), the wheel
depends on that folder by path, so ``pip install ./packages/<this package>`` alone
brings shared-dist along. With ``SHARED_DIST_BY_NAME=1`` (releases, and editable
dev installs where shared-dist is already installed editable), or from an sdist with
no sibling, it depends on ``shared-dist`` by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from hatchling.metadata.plugin.interface import MetadataHookInterface

SHARED_DIST_RANGE = "shared-dist>=0.1,<0.2"


class MonorepoDependencyHook(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict) -> None:
        sibling = Path(self.root).resolve().parent / "shared-dist"
        by_name = os.environ.get("SHARED_DIST_BY_NAME", "").lower() in ("1", "true", "yes")
        if sibling.is_dir() and not by_name:
            shared = f"shared-dist @ {sibling.as_uri()}"
        else:
            shared = SHARED_DIST_RANGE
        metadata["dependencies"] = [shared, *self.config.get("dependencies", [])]
