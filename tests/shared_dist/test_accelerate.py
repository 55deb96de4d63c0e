"""shared_dist under a real `accelerate launch` with two CPU processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, accelerate_launch
from tests.shared_dist.helpers import reference

pytestmark = pytest.mark.distributed


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
    ref_params, _ = reference([3, 5], "local")
    for rec in records:
        for got, want in zip(rec["grads"], ref_params):
            torch.testing.assert_close(torch.tensor(got), want.flatten(), rtol=1e-5, atol=1e-6)


CYCLE = """
import sys
import shared_dist
class Cycle:
    def __del__(self):
        with open(sys.argv[1], "w") as f:
            f.write(str(sys.is_finalizing()))
c = Cycle()
c.self = c
del c
"""


@pytest.mark.timeout(120)
def test_cyclic_garbage_is_freed_before_interpreter_finalization(tmp_path):
    # The accelerate launch above aborted at exit in 14 of 60 runs while its DDP module was freed
    # during finalization; shared_dist collects such garbage at exit, while the interpreter is alive.
    out = tmp_path / "finalizing.txt"
    subprocess.run([sys.executable, "-c", CYCLE, str(out)], check=True, timeout=100)
    assert out.read_text() == "False"  # without the exit collection: "True"
