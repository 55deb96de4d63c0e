"""The benchmark scripts run end to end at tiny sizes and print what RESULTS.md quotes: the machine
they ran on, then medians with their spread over interleaved rounds."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, run_python

CERTIFY = ["--rounds", "2", "--n", "100", "--images", "1", "--batch", "100"]
# batch 8 is past --max-uncached: the uncached loss's memory there is extrapolated from 4 and 6 (batch 4 is
# the smallest with an STS pair in the '+STS' row); one thread: the 11 (loss, batch) processes are forked from
# the script, not started afresh (165 -> 117 s); mini-batch 4, not 2, and batches 4-8, not 4-12 (122 s at
# 2, 4-12; 2-6 at 4 took 72 s)
CACHED = ["--cached", "4", "6", "8", "--max-uncached", "6", "--rounds", "1", "--iters", "1", "--mini-batch", "4",
          "--threads", "1"]  # fmt: skip
CASES = {  # id: (script, arguments, what its output must say)
    "gather": ("bench_gather.py", ["--rounds", "2", "--iters", "2"], "worst median ratio ours / torch"),
    "certify-mnist": ("bench_certify.py", CERTIFY, "overhead"),
    # the CIFAR-10 config: 3x32x32 images through the ViT and the DDS UNet
    "certify-cifar10": (
        "bench_certify.py",
        [*CERTIFY, "--config", "examples/rrcm/configs/cifar10_cpu.yaml"],
        "images (3, 32, 32)",
    ),
    # every config's pipe.certify at two batch sizes: the certificates must not depend on the batch
    "certify-batch": (
        "bench_certify_batch.py",
        ["--rounds", "1", "--n", "100", "--images", "1", "--batch-sizes", "100", "32"],
        "certificates identical",
    ),
    "cbb": ("bench_cbb.py", ["--rounds", "2", "--iters", "1", "--batch", "4"], "CBB / MNRL"),
    # the cached loss's table: every (loss, batch) in a fresh process, memory and time
    "cbb-cached": (
        "bench_cbb.py",
        CACHED,
        "not run",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_benchmark_prints_the_machine_and_spreads(case):
    script, args, expect = CASES[case]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = run_python([str(REPO / "benchmarks" / script), *args], timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "machine: " in run.stdout and "cores, flags" in run.stdout, run.stdout
    assert expect in run.stdout and " [" in run.stdout, run.stdout  # median [min, max]


@pytest.mark.slow
def test_sequential_certification_benchmark_runs_on_a_saved_pipeline(tmp_path, data_dir):
    from rrcm_diffusers import RRCMPipeline
    from tests.rrcm.helpers import tiny_model

    RRCMPipeline(model=tiny_model(num_classes=10, projection_dim=0)).save_pretrained(tmp_path / "pipe")
    args_bench = ["--pipeline", str(tmp_path / "pipe"), "--data-dir", str(data_dir), "--sigma", "0.5",
                  "--num-images", "10", "--n", "300", "--n0", "20", "--out", str(tmp_path / "seq")]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1"}
    bench = [str(REPO / "benchmarks/bench_certify_sequential.py"), *args_bench]
    run = first = run_python(bench, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "machine: " in run.stdout and "ratio fixed / sequential" in run.stdout and "McNemar" in run.stdout
    assert "where the samples go" in run.stdout
    # the ceiling reads those certificates (per-image p_A) and simulates both rules at n_max 300 and 1,000
    args = ["--certificates", str(tmp_path / "seq-n300.json"), "--sigma", "0.5", "--n0", "20", "--n-max", "300",
            "1000", "--reps", "2"]  # fmt: skip
    run = run_python([str(REPO / "benchmarks/sequential_ceiling.py"), *args], timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("ceiling    forward passes") == 2 and "n_max 1,000" in run.stdout
    assert "n_max 300 paired with the fixed run's own votes" in run.stdout  # the bridge, at the measured n
    assert "images fixed-n certified that the rule did not" in run.stdout
    # the fixed arm reused from that file gives the same table; --skip-fixed runs the sequential arm alone
    again = run_python([*bench[:-2], "--fixed-from", str(tmp_path / "seq")], timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    table = lambda out: [line.split("wall")[0] for line in out.splitlines() if "forward passes" in line]  # noqa: E731
    fixed_row = lambda out: next(line for line in out.splitlines() if line.startswith("  fixed "))  # noqa: E731
    assert table(again.stdout) == table(first.stdout)
    assert fixed_row(again.stdout) == fixed_row(first.stdout)  # its recorded wall time too
    alone = run_python([*bench[:-2], "--skip-fixed"], timeout=600, env=env)
    assert alone.returncode == 0 and "fixed n (not run) draws 3,200 forward passes" in alone.stdout, (
        alone.stderr
    )


def test_gemm_peak_stops_growing_the_matrix_once_a_product_takes_its_budget(monkeypatch):
    """A dtype without hardware support (bf16 on an AVX2-only CPU: one 2048² product took 57 s) must not
    make the certification benchmark spend minutes measuring its peak: the size stops doubling."""
    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from bench_certify import gemm_peak

    gflops, size = gemm_peak(torch.float32, budget_s=0.0)  # every product is over a zero budget
    assert size == 256 and gflops > 0
    assert gemm_peak(torch.float32, max_size=512, budget_s=60.0)[1] == 512  # a generous one: up to the cap
