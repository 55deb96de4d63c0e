"""Writes that a kill cannot leave half done."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path.tmp``, then rename it over ``path``: readers see the old file or
    the new one, never a cut one (``os.replace`` is atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
