"""The README's multi-node line, on this machine: two ``accelerate launch`` "machines" of one process
each (``--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1``) pretrain as one machine
with two processes does, to the bit; killing one machine makes the other fail with a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from shared_dist.testing import free_port
from tests.helpers import REPO, accelerate_launch

CONFIG = REPO / "examples/rrcm/configs/mnist_quick.yaml"


def _machine(rank: int, port: int, out, steps: int, env: dict) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "examples/rrcm/pretrain.py"), "--config", str(CONFIG), "--out", str(out), "--steps", str(steps),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_machine(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts workers in their own sessions)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        _kill_machine(int(child))
    os.kill(pid, signal.SIGKILL)


def _env(data_dir) -> dict:
    return {
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "RRCM_DATA_DIR": str(data_dir),
        "SHARED_DIST_TIMEOUT": "20",
    }


def _weights(out):
    return load_file(str(out / "online" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_machines_train_as_one_machine_with_two_processes(tmp_path, data_dir):
    env = _env(data_dir)
    one = accelerate_launch(  # sets ACCELERATE_USE_CPU, OMP_NUM_THREADS and PYTHONPATH itself

        REPO / "examples/rrcm/pretrain.py", "--config", str(CONFIG), "--out", str(tmp_path / "one"),
        "--steps", "6", timeout=600, env={k: env[k] for k in ("RRCM_DATA_DIR", "SHARED_DIST_TIMEOUT")},
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    machines = [_machine(r, port, tmp_path / "two", 6, env) for r in (0, 1)]
    for m in machines:
        _, err = m.communicate(timeout=600)
        assert m.returncode == 0, err[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_killing_one_machine_makes_the_other_fail_with_a_message(tmp_path, data_dir):
    out = tmp_path / "run"
    port = free_port()
    machines = [_machine(r, port, out, 100_000, _env(data_dir)) for r in (0, 1)]
    deadline = time.monotonic() + 300
    while not (out / "log.jsonl").is_file():  # training has started on both
        assert time.monotonic() < deadline and machines[0].poll() is None, machines[0].stderr.read()[-3000:]
        time.sleep(0.5)
    _kill_machine(machines[1].pid)
    t0 = time.monotonic()
    _, err = machines[0].communicate(timeout=240)
    waited = time.monotonic() - t0
    assert machines[0].returncode != 0
    # whichever collective rank 0 was in (shared-dist's, or DDP's own all-reduce) fails, and says so
    assert "DistributedOperationError" in err or "Connection" in err, err[-3000:]
    assert waited < 120, waited  # SHARED_DIST_TIMEOUT=20 plus the launcher's shutdown
