"""Certifying a test set across processes (``rrcm_diffusers.dataset_certification``): the
certificates do not depend on the number of processes or the batch size, to the bit; a run killed
mid-way (even mid-append) resumes, on another number of processes, to the same report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rrcm_diffusers import RRCMPipeline
from rrcm_diffusers.dataset_certification import certify_dataset, load_pipeline, read_records, report_row
from shared_dist.testing import launch
from tests.helpers import REPO
from tests.rrcm.helpers import tiny_model

N0, N, SIGMA = 20, 300, 0.25
TIMING = ("seconds", "ms_per_noise_sample", "wall_s")


def _images(count: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(count, 1, 28, 28, generator=g), torch.arange(count) % 3


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    RRCMPipeline(model=tiny_model().for_classification(3)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(pipe_dir, tmp_path_factory):
    """One process, batch size 64."""
    images, labels = _images()
    out = tmp_path_factory.mktemp("one")
    records = certify_dataset(load_pipeline(pipe_dir), images, labels, SIGMA, out, n0=N0, n=N, batch_size=64)
    radii = [r["radius"] for r in records]
    assert len(set(radii)) > 2 and 0 < sum(r["prediction"] >= 0 for r in records) < len(records)  # varied
    return _strip(records)


def _w_certify(pipe_dir, out, count, batch_size, kill_after_rounds=0):
    import signal

    import torch.distributed as dist

    import rrcm_diffusers.dataset_certification as dc

    if kill_after_rounds and dist.get_rank() == 0:
        real_append, rounds = dc._append, [0]

        def append_then_die(folder, records):
            real_append(folder, records)
            rounds[0] += 1
            if rounds[0] == kill_after_rounds:  # kill -9 in the middle of the next append
                with open(folder / dc.RECORDS, "a") as f:
                    f.write('{"index": 6, "label"')
                os.kill(os.getpid(), signal.SIGKILL)

        dc._append = append_then_die
    images, labels = _images(count)
    torch.set_num_threads(1)
    records = dc.certify_dataset(
        dc.load_pipeline(pipe_dir),
        images,
        labels,
        SIGMA,
        out,
        n0=N0,
        n=N,
        batch_size=batch_size,
        progress=False,
    )
    return _strip(records)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,count,batch_size",
    [(2, 7, 50), (3, 7, 30), (3, 2, 7)],
    ids=["2 procs, 4+3 images", "3 procs, 3+2+2 images", "3 procs, 1+1+0 images"],
)
def test_certificates_do_not_depend_on_processes_or_batch_size(
    world, count, batch_size, pipe_dir, reference, tmp_path
):
    results = launch(_w_certify, world, (pipe_dir, tmp_path, count, batch_size), timeout=120)
    assert all(r == reference[:count] for r in results)  # every rank returns the merged records
    written = read_records(tmp_path)  # in the order the rounds finished
    assert _strip([written[i] for i in sorted(written)]) == reference[:count]


@pytest.mark.distributed
def test_a_killed_run_resumes_on_another_number_of_processes_to_the_same_report(
    pipe_dir, reference, tmp_path
):
    with pytest.raises((RuntimeError, TimeoutError)):  # rank 0 died; the group is ended
        launch(_w_certify, 2, (pipe_dir, tmp_path, 7, 50, 2), timeout=120, env={"SHARED_DIST_TIMEOUT": "5"})
    lines = (tmp_path / "certificates.jsonl").read_bytes()
    assert lines.count(b"\n") == 4 and not lines.endswith(b"\n")  # two rounds of two, and a cut line
    assert sorted(read_records(tmp_path)) == [0, 1, 2, 3]  # the cut line is dropped (and cut off)
    assert (tmp_path / "certificates.jsonl").read_bytes().endswith(b"\n")
    results = launch(_w_certify, 3, (pipe_dir, tmp_path, 7, 64), timeout=120)
    assert all(r == reference for r in results)
    records = read_records(tmp_path)
    assert (
        sorted(records) == list(range(7)) and (tmp_path / "certificates.jsonl").read_text().count("\n") == 7
    )
    resumed = report_row([records[i] for i in range(7)], "rrcm", SIGMA, N0, N, 0.001)
    one = report_row([{**r, "seconds": 0.0} for r in reference], "rrcm", SIGMA, N0, N, 0.001)
    assert {k: v for k, v in resumed.items() if k not in TIMING} == {
        k: v for k, v in one.items() if k not in TIMING
    }


def test_a_folder_of_another_run_is_refused(pipe_dir, tmp_path):
    images, labels = _images(3)
    pipe = load_pipeline(pipe_dir)
    certify_dataset(pipe, images, labels, SIGMA, tmp_path, n0=N0, n=N, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['n', 'sigma'\]"):
        certify_dataset(pipe, images, labels, 0.5, tmp_path, n0=N0, n=N + 1, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['images_sha256'\]"):
        certify_dataset(pipe, images.flip(-1), labels, SIGMA, tmp_path, n0=N0, n=N, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "certificates.jsonl").write_text("mine\n")
    with pytest.raises(
        ValueError, match=r"holds results with no record of the config that made them \(run\.json missing\)"
    ):
        certify_dataset(pipe, images, labels, SIGMA, tmp_path / "other", n0=N0, n=N, progress=False)
    assert (tmp_path / "other" / "certificates.jsonl").read_text() == "mine\n"  # untouched


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_cli_under_accelerate_launch_writes_the_report_of_one_process(pipe_dir, tmp_path, data_dir):
    cli = [
        "-m", "rrcm_diffusers.dataset_certification", "--pipeline", str(pipe_dir), "--dataset", "mnist",
        "--data-dir", str(data_dir), "--num-images", "5", "--sigma", "0.25", "--n0", "20", "--n", "200",
        "--batch-size", "64",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *cli, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         *cli, "--out", str(tmp_path / "two")],
        env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    rows = [json.loads((tmp_path / d / "report" / "results.json").read_text())[0] for d in ("one", "two")]
    assert [r["processes"] for r in rows] == [1, 2] and rows[1]["devices"].startswith("cpu")
    assert {k: v for k, v in rows[0].items() if k not in (*TIMING, "processes")} == {
        k: v for k, v in rows[1].items() if k not in (*TIMING, "processes")
    }
    assert "2 processes on cpu" in (tmp_path / "two" / "report" / "report.md").read_text()
    assert (tmp_path / "two" / "report" / "certified_accuracy.png").is_file()
