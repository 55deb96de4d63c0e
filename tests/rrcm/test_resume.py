"""rRCM pretraining killed with SIGKILL and resumed gives the uninterrupted run, to the bit (CPU):
the same weights, the same log. Checkpoints are written whole or not at all."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from rrcm_diffusers.training import PretrainConfig, pretrain
from tests.helpers import run_in_new_process
from tests.rrcm.helpers import tiny_model

STEPS = 9  # 64 images in batches of 16: 4 steps per epoch, so the run crosses two epoch borders


def _pretrain(out: str, kill_at: int, kill_in_save: bool, data_dir: str) -> None:
    """The pretraining command, in a process of its own: 9 steps of the tiny model on 64 images, saving
    every 2; with ``kill_at``, kill -9 itself in the middle of step ``kill_at`` (``kill_in_save``: while
    checkpoint ``kill_at`` is half written). The same call again resumes."""
    import os
    import signal

    import rrcm_diffusers.checkpointing as checkpointing
    import rrcm_diffusers.training as training
    from rrcm_diffusers.data import load_mnist

    if kill_at:
        calls, real_update = [0], training.update_ema

        def update_then_maybe_die(*args, **kwargs):
            real_update(*args, **kwargs)
            calls[0] += 1
            if calls[0] == kill_at:  # kill -9 in the middle of step kill_at
                os.kill(os.getpid(), signal.SIGKILL)

        training.update_ema = update_then_maybe_die
        if kill_in_save:  # die while a checkpoint is half written
            real_save = checkpointing.save_optimizer

            def save_then_die(optimizer, path):
                if path.parent.name == f"checkpoint-{kill_at}.tmp":
                    os.kill(os.getpid(), signal.SIGKILL)
                real_save(optimizer, path)

            checkpointing.save_optimizer = save_then_die
            training.update_ema = real_update
    x, _ = load_mnist("train", data_dir)
    cfg = PretrainConfig(steps=STEPS, batch_size=16, warmup_steps=2, checkpoint_every=2, log_every=1)
    pretrain(tiny_model(), x[:64], cfg, Accelerator(cpu=True), out, progress=False)


def _job(out, kill_at: int, data_dir, kill_in_save: bool = False) -> int:
    return run_in_new_process(_pretrain, str(out), kill_at, kill_in_save, str(data_dir))


def _final(out):
    return load_file(str(out / f"checkpoint-{STEPS}" / "online" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    """The run every killed-and-resumed run must equal, trained once for all of them."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _job(out, 0, data_dir) == 0
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "kill_at,in_save", [(5, False), pytest.param(7, False, marks=pytest.mark.slow), (6, True)]
)
def test_killed_pretraining_resumes_bit_exactly(kill_at, in_save, uninterrupted, tmp_path, data_dir):
    ref, run = uninterrupted, tmp_path / "killed"
    assert _job(run, kill_at, data_dir, kill_in_save=in_save) == -9
    if in_save:  # the half-written checkpoint is a .tmp folder, never taken for a checkpoint
        assert (run / f"checkpoint-{kill_at}.tmp").is_dir() and not (run / f"checkpoint-{kill_at}").exists()
    assert not (run / f"checkpoint-{STEPS}").exists()
    assert _job(run, 0, data_dir) == 0  # the same command again resumes
    a, b = _final(ref), _final(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "log.jsonl").read_text() == (ref / "log.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice


def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, data_dir):
    from rrcm_diffusers.data import load_mnist

    x, _ = load_mnist("train", data_dir)
    cfg = PretrainConfig(steps=4, batch_size=16, warmup_steps=0, checkpoint_every=2, log_every=1)
    pretrain(tiny_model(), x[:64], cfg, Accelerator(cpu=True), tmp_path, progress=False)
    (tmp_path / "checkpoint-4" / "optimizer.safetensors").write_bytes(b"truncated")
    longer = PretrainConfig(steps=6, batch_size=16, warmup_steps=0, checkpoint_every=2, log_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, hist = pretrain(tiny_model(), x[:64], longer, Accelerator(cpu=True), tmp_path, progress=False)
    assert any("skipping checkpoint" in str(w.message) and "checkpoint-4" in str(w.message) for w in caught)
    assert [h["step"] for h in hist] == [3, 4, 5, 6]  # resumed from checkpoint-2
