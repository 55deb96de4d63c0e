"""The README's main job, quick version, as a new user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def run_job(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "examples/main_job.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_missing_data_is_named(tmp_path):
    proc = run_job("--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nowhere"), timeout=120)
    assert proc.returncode == 2
    assert "data missing under" in proc.stderr and "mnist-train-5k.csv.gz" in proc.stderr


def test_every_file_the_job_reads_is_checked_first(tmp_path, data_dir):
    # a copy of the data folder (links) with the test labels and the CMRC qrels missing: the job
    # must say so at once, not after the whole rRCM stage
    for f in data_dir.rglob("*"):
        if f.is_file() and f.name not in ("t10k-labels-idx1-ubyte.gz", "test.tsv"):
            (tmp_path / "data" / f.relative_to(data_dir)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / f.relative_to(data_dir)).symlink_to(f)
    proc = run_job("--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "data"), timeout=120)
    assert proc.returncode == 2
    assert "t10k-labels-idx1-ubyte.gz" in proc.stderr and "qrels/test.tsv" in proc.stderr


def test_overwrite_never_deletes_a_folder_the_job_did_not_write(tmp_path, data_dir):
    thesis = tmp_path / "mine" / "thesis" / "chapter1.tex"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("years of work")
    proc = run_job("--out", str(tmp_path / "mine"), "--overwrite", "--data-dir", str(data_dir), timeout=120)
    assert proc.returncode == 2 and "was not written by the main job" in proc.stderr
    assert thesis.read_text() == "years of work"
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_job("--out", str(afile), "--data-dir", str(data_dir), timeout=120)
    assert proc.returncode == 2 and "--out must name a folder" in proc.stderr and afile.read_text() == "x"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_main_job_writes_the_report_and_never_overwrites(tmp_path, data_dir):
    out = tmp_path / "report"
    # a new interpreter, not tests/helpers.run_python: the README's main command must find every import and
    # path of its own (the forkserver's modules and sys.path would hide a missing one; 5-12 s more)
    proc = run_job("--out", str(out), "--quick", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "certified accuracy" in summary and "| rRCM | 0.5 |" in summary and "| Cohen | 0.5 |" in summary
    assert "| scratch+consistency | 0.5 |" in summary
    assert "| before |" in summary and "| after |" in summary
    results = json.loads((out / "results.json").read_text())
    assert {"rrcm", "conan", "wall_time_s"} <= set(results)
    # conan-st's 20 steps of 16 (two passes over 160 queries, 64 tokens) improve both held-out metrics over
    # the base model (measured on a 2-core AVX2 CPU: nDCG@10 +0.113, STS +0.085 on 200 queries; this was
    # tests/conan/test_quality.py, a second MiniLM run of its own), and the mining rule ran every 5 steps
    before, after = results["conan"]["before"], results["conan"]["after"]
    assert after["CMRC2018Local"] > before["CMRC2018Local"] + 0.05, (before, after)
    assert after["STSBzhLocal"] > before["STSBzhLocal"] + 0.02, (before, after)
    assert len(results["conan"]["dhnm_checks"]) == 4
    assert (out / "certified_accuracy.png").stat().st_size > 10_000
    assert (out / "rrcm/rrcm-sigma0.5/pipeline/model_index.json").is_file()
    card = (out / "conan/model/README.md").read_text()
    assert "2408.15710" in card  # the model card cites the Conan paper through the loss
    again = run_job("--out", str(out), "--quick", "--data-dir", str(data_dir), timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / ".main_job").is_file()  # the marker that lets --overwrite replace this folder
