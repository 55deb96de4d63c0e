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
from tests.helpers import REPO, run_python
from tests.rrcm.helpers import tiny_model

N0, N, SIGMA = 20, 300, 0.25
SEQUENTIAL_RADII = [0.0, 0.25, 0.5]  # at σ 0.25: thresholds 1/2, Φ(1), Φ(2)
TIMING = (
    "seconds",
    "ms_per_noise_sample",
    "wall_s",
    "run",
)  # "run": the run record's hash, not the certificate


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


def _w_certify(pipe_dir, out, count, batch_size, kill_after_rounds=0, radii=None):
    import signal

    import torch.distributed as dist

    import rrcm_diffusers.dataset_certification as dc

    if kill_after_rounds:
        dc.ROUND_SECONDS = 0.0  # one image per rank per round: the kill lands between known rounds
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
        radii=radii,
    )
    return _strip(records)


def _w_certify_each(pipe_dir, runs: list[tuple]) -> list:
    return [
        _w_certify(pipe_dir, out, count, batch_size, radii=radii) for out, count, batch_size, radii in runs
    ]


@pytest.fixture(scope="module")
def runs(pipe_dir, tmp_path_factory):
    """``runs(world, count, batch_size)``: (per-rank records, folder); one launch per world size."""
    seq = tuple(SEQUENTIAL_RADII)
    cases = {2: [(7, 50, None), (7, 40, seq)], 3: [(7, 30, None), (2, 7, None), (7, 30, seq)]}
    done = {}
    for world, settings in cases.items():
        folders = [tmp_path_factory.mktemp(f"w{world}") for _ in settings]
        args = [
            (folder, count, batch, radii and list(radii))
            for folder, (count, batch, radii) in zip(folders, settings)
        ]
        per_rank = launch(_w_certify_each, world, (pipe_dir, args), timeout=180)
        for i, ((count, batch, radii), folder) in enumerate(zip(settings, folders)):
            done[world, count, batch, radii] = ([rank[i] for rank in per_rank], folder)
    return lambda *case: done[case]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,count,batch_size",
    [(2, 7, 50), (3, 7, 30), (3, 2, 7)],
    ids=["2 procs, 4+3 images", "3 procs, 3+2+2 images", "3 procs, 1+1+0 images"],
)
def test_certificates_do_not_depend_on_processes_or_batch_size(world, count, batch_size, runs, reference):
    results, folder = runs(world, count, batch_size, None)
    assert all(r == reference[:count] for r in results)  # every rank returns the merged records
    written = read_records(folder)  # in the order the rounds finished
    assert _strip([written[i] for i in sorted(written)]) == reference[:count]


@pytest.fixture(scope="module")
def sequential_reference(pipe_dir, tmp_path_factory):
    """One process, batch size 64, certified sequentially on SEQUENTIAL_RADII."""
    images, labels = _images()
    out = tmp_path_factory.mktemp("one-sequential")
    records = certify_dataset(load_pipeline(pipe_dir), images, labels, SIGMA, out, n0=N0, n=N, batch_size=64,
                              radii=SEQUENTIAL_RADII, progress=False)  # fmt: skip
    assert len({r["samples"] for r in records}) > 1  # the images did stop at different looks
    return _strip(records)


@pytest.mark.distributed
@pytest.mark.parametrize("world,batch_size", [(2, 40), (3, 30)])
def test_sequential_certificates_and_samples_do_not_depend_on_processes(
    world, batch_size, runs, sequential_reference
):
    """Per-image cost now varies (each image stops at its own look); the images are handed out from a
    shared queue, and every certificate, samples used included, is the one process's, to the bit."""
    results, folder = runs(world, 7, batch_size, tuple(SEQUENTIAL_RADII))
    assert all(r == sequential_reference for r in results)
    written = read_records(folder)
    assert _strip([written[i] for i in sorted(written)]) == sequential_reference


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
    one = run_python([*cli, "--out", str(tmp_path / "one")], env=env, timeout=200)  # no new interpreter
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


# ------------------------------------------------------------------ #31: bad input, before and after the claim

CLAIM_CASES = {  # refused BEFORE run.json is written: the corrected command then runs
    "n 0": (dict(n=0), "n must be a positive integer, got 0"),
    "n0 -1": (dict(n0=-1), "n0 must be a positive integer"),
    "sigma negative": (dict(sigma=-0.5), "sigma must be a finite number > 0"),
    "sigma True": (dict(sigma=True), "sigma must be a finite number > 0"),
    "alpha 1": (dict(alpha=1.0), r"alpha must be in \(0, 1\)"),
    "batch_size 0": (dict(batch_size=0), "batch_size must be a positive integer"),
    "seed -1": (dict(seed=-1), "seed must be an integer >= 0"),
    "the wrong dataset (CIFAR-shaped images)": (
        dict(images=torch.rand(3, 3, 32, 32)),
        r"images must have shape \(N, 1, 28, 28\)|sample must have shape",
    ),
    "images in [0, 255]": (dict(images=_images(3)[0] * 255), r"images must lie in \[0, 1\]"),
}


@pytest.mark.parametrize("case", list(CLAIM_CASES))
def test_a_refused_argument_leaves_no_record_behind(case, pipe_dir, tmp_path):
    change, match = CLAIM_CASES[case]
    images, labels = _images(3)
    args = {**dict(images=images, labels=labels, sigma=SIGMA, n0=N0, n=N, progress=False), **change}
    pipe = load_pipeline(pipe_dir)
    with pytest.raises(ValueError, match=match):
        certify_dataset(pipe, out=tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    records = certify_dataset(pipe, images, labels, SIGMA, tmp_path / "out", n0=N0, n=N, progress=False)
    assert len(records) == 3  # the corrected command is not refused as "another config"


def _finished(pipe_dir, out):
    images, labels = _images(3)
    pipe = load_pipeline(pipe_dir)
    certify_dataset(pipe, images, labels, SIGMA, out, n0=N0, n=N, progress=False)
    return lambda: certify_dataset(pipe, images, labels, SIGMA, out, n0=N0, n=N, progress=False)


def _conflicting_line(out):
    lines = (out / "certificates.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["radius"] += 1.0  # the same image, another certificate
    (out / "certificates.jsonl").write_text("\n".join([*lines, json.dumps(record)]) + "\n")


def _damaged_middle_line(out):
    lines = (out / "certificates.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-7]
    (out / "certificates.jsonl").write_text("\n".join(lines) + "\n")


def _relabelled(out):
    run = json.loads((out / "run.json").read_text())
    run["alpha"] = 0.01  # the old certificates were made at α = 0.001
    (out / "run.json").write_text(json.dumps(run))


RECORD_CASES = {
    "a conflicting second line": (
        _conflicting_line,
        r"certificates.jsonl, line 4: a second, different certificate for image 1",
    ),
    "a damaged line in the middle": (
        _damaged_middle_line,
        r"certificates.jsonl, line 2: not a certificate record",
    ),
    "a line without an index": (
        lambda out: (out / "certificates.jsonl").write_text('{"radius": 1.0}\n'),
        r"certificates.jsonl, line 1: not a certificate record",
    ),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_records_changed_outside_the_program_are_refused_with_file_and_line(case, pipe_dir, tmp_path):
    edit, match = RECORD_CASES[case]
    again = _finished(pipe_dir, tmp_path)
    edit(tmp_path)
    before = (tmp_path / "certificates.jsonl").read_bytes()
    with pytest.raises(ValueError, match=match):
        again()
    assert (tmp_path / "certificates.jsonl").read_bytes() == before  # nothing cut or appended


def test_a_hand_edited_run_record_does_not_relabel_old_certificates(pipe_dir, tmp_path):
    _finished(pipe_dir, tmp_path)
    _relabelled(tmp_path)
    images, labels = _images(3)
    with pytest.raises(ValueError, match=r"line 1: made under another run record than .*run.json"):
        certify_dataset(
            load_pipeline(pipe_dir), images, labels, SIGMA, tmp_path, n0=N0, n=N, alpha=0.01, progress=False
        )


def test_an_identical_repeated_line_is_harmless(pipe_dir, tmp_path):
    first = _strip(_finished(pipe_dir, tmp_path)())
    text = (tmp_path / "certificates.jsonl").read_text()
    (tmp_path / "certificates.jsonl").write_text(text + text.splitlines()[0] + "\n")  # a replayed append
    assert _strip(_finished(pipe_dir, tmp_path)()) == first


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-images", "0"], "--num-images: expected a positive integer, got 0"),
        (["--num-images", "-3"], "--num-images: expected a positive integer, got -3"),
        (["--per-class", "0"], "--per-class: expected a positive integer, got 0"),
        (["--n", "1e5"], "--n: expected a positive integer, got '1e5'"),
        (["--sigma", "-0.5"], "--sigma: expected a finite number > 0"),
        (["--sigma", "nan"], "--sigma: expected a finite number > 0"),
        (["--alpha", "1"], r"--alpha: expected a number in \(0, 1\)"),
        (["--dataset", "mnsit"], "--dataset: invalid choice"),
        (["--radii", "0", "0.5", "--futility", "1"], r"--futility: expected a number in \(0, 1\)"),
        (["--futility", "0.2"], "--futility applies only to sequential certification: give --radii"),
    ],
)
def test_cli_counts_and_values_are_checked_before_anything_runs(flags, message, tmp_path, capsys):
    from rrcm_diffusers.dataset_certification import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--pipeline", str(tmp_path), "--out", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
