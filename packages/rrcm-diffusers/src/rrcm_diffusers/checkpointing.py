"""Checkpoints of the rRCM trainer (as accelerate keeps ``checkpointing.py`` apart from its loop).

``out/checkpoint-<step>/``: one folder per model (diffusers ``save_pretrained``, with checksums),
the optimizer as safetensors + JSON, every rank's generator state and ``trainer_state.json`` (step,
schedule, world size) — no pickle anywhere. A checkpoint is written into ``checkpoint-<step>.tmp``
and renamed when whole, so a kill leaves no folder that looks complete; resume takes the newest one
that loads and skips a damaged one with a warning (a damaged FILE only: any other error is raised).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import shared_dist

from ._atomic import write_text_atomic
from .modeling_rrcm import DamagedWeightsError, RRCMModel

STATE = "trainer_state.json"
RNG = "rng_states.safetensors"
# what a damaged or half-copied checkpoint raises when read; a code bug raises something else
DAMAGED = (OSError, json.JSONDecodeError, SafetensorError, DamagedWeightsError)


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (everything else)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(
        json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    )


def read_optimizer(path: Path) -> dict[str, Any]:
    """The optimizer state dict :func:`save_optimizer` wrote at ``path``."""
    meta = json.loads(path.with_suffix(".json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, v in load_file(str(path.with_suffix(".safetensors"))).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    optimizer.load_state_dict(read_optimizer(path))


def checkpoints(out: str | Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders, newest first; other names (``checkpoint-8.bak``, a
    ``checkpoint-8.tmp`` left by a killed save) are not checkpoints of this trainer."""
    found = [p for p in Path(out).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step."""
    found = checkpoints(out)
    return found[0] if found else None


def save_checkpoint(
    out: Path,
    step: int,
    accelerator: Accelerator,
    models: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator | None,
) -> None:
    """``out/checkpoint-<step>``, written whole or not at all. ``models``: saved by folder name;
    ``generator``: every rank's state is kept, so a resumed run draws the same noise."""
    states = shared_dist.gather_object(generator.get_state()) if generator is not None else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
        if tmp.exists():  # our own leftover from a killed save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, model in models.items():
            accelerator.unwrap_model(model).save_pretrained(tmp / name)
        save_optimizer(optimizer, tmp / "optimizer")
        if states is not None:
            save_file({f"rank{r}": s for r, s in enumerate(states)}, str(tmp / RNG))
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": accelerator.num_processes}
        (tmp / STATE).write_text(json.dumps(state))
        if final.exists():  # a checkpoint of this step from before a resume: replaced whole
            old = out / f"checkpoint-{step}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()


def load_newest_checkpoint(
    out: Path, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[Path, dict] | None:
    """Load ``models`` (by folder name), ``optimizer`` and ``scheduler`` from the newest checkpoint in
    ``out`` that reads whole; returns it and its state, or None. A damaged one is skipped with a
    warning; everything is read before anything is loaded, so a skipped one changes nothing."""
    for ckpt in checkpoints(out):
        try:
            weights = {name: RRCMModel.from_pretrained(ckpt / name).state_dict() for name in models}
            state = json.loads((ckpt / STATE).read_text())
            optimizer_state = read_optimizer(ckpt / "optimizer")
        except DAMAGED as err:
            warnings.warn(f"skipping checkpoint {ckpt}: it does not load ({err})", stacklevel=3)
            continue
        for name, model in models.items():
            model.load_state_dict(weights[name])
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        return ckpt, state
    return None


def trim_log(out: Path, step: int) -> None:
    """Drop the records of ``out/log.jsonl`` past ``step`` (written after the checkpoint a run resumes from)."""
    log = out / "log.jsonl"
    if log.is_file():
        keep = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        write_text_atomic(log, "".join(line + "\n" for line in keep))


def restore_generator(
    gen: torch.Generator, ckpt: Path, state: dict, accelerator: Accelerator, seed: int
) -> None:
    """This rank's generator as it was at the checkpoint, so the noise after resume is the same."""
    rng = ckpt / RNG
    if rng.is_file() and state.get("world_size") == accelerator.num_processes:
        gen.set_state(load_file(str(rng))[f"rank{accelerator.process_index}"])
    else:  # an older checkpoint, or another number of processes: resumes, but not bit-exactly
        warnings.warn(
            f"{ckpt} holds no generator state for this run; the noise after resume differs", stacklevel=3
        )
        gen.manual_seed(seed * 1000 + accelerator.process_index + state["step"])
