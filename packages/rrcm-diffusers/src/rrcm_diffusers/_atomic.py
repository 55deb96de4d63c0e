"""Files a kill cannot leave half done, and the record of the config that made a folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write`` the file at ``path.tmp``, then rename it over ``path``: readers see the old file or
    the new one, never a cut one (``os.replace`` is atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def claim_folder(
    record: Path,
    key: dict[str, Any],
    has_results: bool,
    write: bool = True,
    hint: str = "choose another output folder",
) -> None:
    """Check, or write, the config a folder's results are made with, BEFORE they are made.

    Results (and checkpoints) are reused only under the config that made them: another config
    is an error naming the keys that differ, and results with no record (an unknown config) are
    refused too. Nothing is deleted: ``hint`` tells the user what to do instead. ``write``: this
    process writes the record (the main one).
    """
    want = json.loads(json.dumps(key, sort_keys=True, default=str))
    if record.is_file():
        have = json.loads(record.read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            details = "; ".join(_differences(have, want))
            raise ValueError(
                f"{record.parent} holds results made with another config (differs in {diff}: {details}); {hint}"
            )
    elif has_results:
        raise ValueError(
            f"{record.parent} holds results with no record of the config that made them ({record.name} "
            f"missing); {hint}"
        )
    elif write:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps(want, indent=2, sort_keys=True))


def _differences(have: Any, want: Any, path: str = "") -> list[str]:
    """``key: A there, B now`` for each differing leaf (nested dicts are walked), so a long config
    names the one setting that changed instead of printing both configs whole."""
    if isinstance(have, dict) and isinstance(want, dict):
        return [
            line
            for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)
            for line in _differences(have.get(k), want.get(k), f"{path}.{k}" if path else k)
        ]
    return [f"{path}: {have!r} there, {want!r} now"]
