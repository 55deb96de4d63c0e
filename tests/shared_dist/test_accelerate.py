"""shared_dist under a real `accelerate launch` with two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.shared_dist.test_gather import _reference

pytestmark = pytest.mark.distributed

# `accelerate launch --cpu --num_processes 2` silently runs ONE process on a CPU-only
# machine; --multi_gpu with ACCELERATE_USE_CPU starts two gloo ranks.
LAUNCH = [
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def accelerate_launch(
    script: Path, *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes running ``script``; output captured, never hangs."""
    env = dict(
        os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {})
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *LAUNCH,
        "--main_process_port",
        "0",
        str(script),
        *args,
    ]
    return subprocess.run(
        cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.timeout(300)
def test_both_ranks_run_and_gradients_match(tmp_path):
    proc = accelerate_launch(REPO / "tests/shared_dist/accelerate_script.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = sorted(
        (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in records] == [0, 1], "both ranks must have run"
    assert all(r["num_processes"] == 2 for r in records)
    assert all(r["offsets"] == [0, 3, 8] for r in records)
    ref_params, _ = _reference([3, 5], "local")
    for rec in records:
        for got, want in zip(rec["grads"], ref_params):
            torch.testing.assert_close(torch.tensor(got), want.flatten(), rtol=1e-5, atol=1e-6)
