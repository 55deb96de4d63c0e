"""Resume from the newest checkpoint that was written whole.

transformers writes ``checkpoint-<step>`` in place, file by file, and ``trainer_state.json``
last (it carries the mining store of :class:`~conan_st.DynamicHardNegativeMiningCallback`).
A run killed while saving leaves a folder that ``resume_from_checkpoint=True`` picks and then
fails on (or, with the state file present but cut short, cannot parse). This helper is the
drop-in replacement that skips such folders with a warning::

    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

from safetensors import safe_open

__all__ = ["last_complete_checkpoint", "write_text_atomic"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` whole or not at all: a kill mid-write leaves the previous file, never a cut one."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on one filesystem


def _problem(folder: Path, step: int) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is complete."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (the run stopped while saving)"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"trainer_state.json is cut short or damaged ({err})"
    if state.get("global_step") != step:
        return f"trainer_state.json is for step {state.get('global_step')}, not {step}"
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for path in weights:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as err:  # safetensors raises several types for a bad header
            return f"{path.name} is damaged ({err})"
    return _rng_problem(folder)


def _rng_problem(folder: Path) -> str | None:
    """Every rank writes its own ``rng_state_<rank>.pth`` with no barrier before rank 0 writes
    ``trainer_state.json``, so a kill can leave a folder that looks whole but lacks another rank's
    RNG state: the resumed run would not be the uninterrupted one. Checked for this job's ranks
    (``WORLD_SIZE``), when the folder was written by several processes."""
    if not (folder / "rng_state_0.pth").is_file():
        return None  # one process (rng_state.pth), or no RNG state saved at all (save_only_model)
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"the environment variable WORLD_SIZE must be a positive integer, got {raw!r}")
    world = int(raw)
    for rank in range(world):
        path = folder / f"rng_state_{rank}.pth"
        if not path.is_file():
            return f"no {path.name} (rank {rank} had not saved its RNG state when the run stopped)"
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no index
            return f"{path.name} is cut short or damaged"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``output_dir/checkpoint-<step>`` written whole, or None when there is none.

    Incomplete or damaged checkpoints are skipped with a warning that says why; they are
    never deleted (the next save of that step writes over them).
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
        reverse=True,
    )
    for step, folder in found:
        problem = _problem(folder, step)
        if problem is None:
            return str(folder)
        warnings.warn(f"skipping checkpoint {folder}: {problem}", stacklevel=2)
    return None
