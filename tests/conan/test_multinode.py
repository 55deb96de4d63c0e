"""The README's multi-node line for conan-st: its code block (one epoch) on two ``accelerate launch``
"machines" of one process each trains as on one machine with two processes, to the bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared_dist.testing import free_port
from tests.readme_snippets import ONE_EPOCH, hub_cache, result_records, run_script, write_script


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_machines_train_the_readme_block_as_one_machine_with_two_processes(tmp_path):
    # one epoch (5 steps) in both layouts: the layouts are the subject; 3 epochs took 91 s here
    script = write_script("conan", tmp_path / "conan_block.py", swap=ONE_EPOCH)
    env = {"HF_HUB_CACHE": str(hub_cache(tmp_path / "hub")), "OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    one = sorted(
        run_script(script, cwd=tmp_path / "one", processes=2, timeout=600, env=env), key=lambda r: r["rank"]
    )
    port = free_port()
    machines = []
    for rank in (0, 1):
        cwd = tmp_path / f"machine{rank}"  # each "machine" has its own disk
        cwd.mkdir()
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        ]  # fmt: skip
        full_env = {
            **os.environ, **env, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": "", "SHARED_DIST_TIMEOUT": "60",
        }  # fmt: skip
        machines.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    two = []
    for m in machines:
        out, err = m.communicate(timeout=600)
        assert m.returncode == 0, err[-3000:]
        two += result_records(out)
    two.sort(key=lambda r: r["rank"])
    assert [r["rank"] for r in two] == [0, 1] and all(r["world_size"] == 2 for r in two)
    assert [r["global_step"] for r in two] == [r["global_step"] for r in one] == [5, 5]
    # DDP kept the replicas equal, and the two layouts trained the same model, to the bit
    assert len({r["weights_sha256"] for r in one + two}) == 1
    assert one[0]["weights"] != one[0]["base_weights"]
