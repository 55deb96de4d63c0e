"""The packages as a user gets them: built by scripts/build_release.sh, installed (not editable)
into a fresh virtual environment from the built wheels, with their dependencies from the
registry; then the README's code blocks run with that copy, outside the source tree (the conan-st block
with the cached loss its comment offers)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from tests.helpers import RELEASE, run_ok
from tests.readme_snippets import (
    CACHED_LOSS,
    DATA,
    ONE_EPOCH,
    hub_cache,
    run_conan_block,
    run_script,
    write_script,
)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_wheels_install_and_run_outside_the_source_tree(tmp_path, release_dist, user_venvs):
    dist = release_dist  # scripts/build_release.sh's checks passed
    assert len(list(dist.glob("*.whl"))) == len(list(dist.glob("*.tar.gz"))) == len(RELEASE)

    # a new venv with torch 2.13.0 (the CPU build, as scripts/setup.sh), our three from dist/ only, by name,
    # then what they need from the registry: `helpers.install_release`, started beside the other installs
    venv = user_venvs["release"].result()
    run_ok([str(venv / "bin/python"), "-m", "pip", "check"], timeout=120)
    installed = run_ok([str(venv / "bin/python"), "-m", "pip", "freeze"], timeout=120).lower()
    assert "nvidia-" not in installed, installed  # what the README promises: no CUDA stack on a CPU machine
    probe_torch = "import torch; print(torch.version.cuda)"
    assert run_ok([str(venv / "bin/python"), "-c", probe_torch], timeout=300).strip() == "None"
    assert "matplotlib" not in installed and "mteb" not in installed  # extras stay extras

    where = tmp_path / "user"  # no source tree on sys.path: cwd elsewhere, PYTHONPATH empty
    where.mkdir()
    probe = (
        "import json, importlib.metadata as m, shared_dist, rrcm_diffusers, conan_st\n"
        "print(json.dumps({mod.__name__: [mod.__file__, mod.__version__, m.version(dist)] for mod, dist in "
        "[(shared_dist, 'shared-dist'), (rrcm_diffusers, 'rrcm-diffusers'), (conan_st, 'conan-st')]}))"
    )
    found = json.loads(
        run_ok(
            [str(venv / "bin/python"), "-c", probe],
            cwd=where,
            timeout=300,
            env={**os.environ, "PYTHONPATH": ""},
        )
    )
    for name, (file, version, dist_version) in found.items():
        assert Path(file).is_relative_to(venv) and "site-packages" in file, (name, file)
        assert version == dist_version, name

    python = str(venv / "bin/python")
    (res,) = run_script(write_script("rrcm", where / "rrcm_block.py"), where, python)
    assert res["steps"] == res["total_steps"] and res["reloaded_weights_equal"]
    assert res["reloaded_radii"] == res["saved_radii"]
    # conan-st's page example (moved here from test_readme.py: MiniLM training takes 25 s): no DDP,
    # so no drop_last: 20 pairs in full batches of 4, 3 epochs
    (res,) = run_script(
        write_script("conan-package", where / "conan_package_block.py"),
        where,
        python,
        env={"HF_HUB_CACHE": str(hub_cache(tmp_path / "hub"))},
    )
    assert res["world_size"] == 1 and res["global_step"] == 15 and res["weights"] != res["base_weights"]
    # the CLIs from wheels without extras: no matplotlib ([plot]) and no mteb ([mteb]) in this venv
    bin_dir, env = venv / "bin", {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    for script in ("rrcm-certify", "rrcm-experiment", "conan-experiment"):
        assert f"usage: {script}" in run_ok(
            [str(bin_dir / script), "--help"], cwd=where, timeout=300, env=env
        )
    assert "usage: conan-evaluate" in run_ok(
        [str(bin_dir / "conan-evaluate"), "--help"], cwd=where, timeout=300, env=env
    )
    proc = subprocess.run(  # help works without the extra; evaluating says how to get it
        [str(bin_dir / "conan-evaluate"), "some-model"], cwd=where, capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "pip install 'conan-st[mteb]'" in proc.stderr, proc.stderr[-2000:]
    certify = [str(bin_dir / "rrcm-certify"), "--pipeline", str(where / "my-rrcm"), "--out", str(where / "cert"),
               "--data-dir", str(DATA), "--num-images", "3", "--n0", "10", "--n", "50", "--no-progress"]  # fmt: skip
    proc = subprocess.run(certify, cwd=where, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install 'rrcm-diffusers[plot]'" in proc.stderr  # one notice, and the tables are there
    assert (where / "cert/report/report.md").is_file() and not (
        where / "cert/report/certified_accuracy.png"
    ).exists()
    proc = subprocess.run(
        [python, "-c", "import conan_st.evaluation"], cwd=where, capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "pip install 'conan-st[mteb]'" in proc.stderr, proc.stderr[-2000:]

    # the README's conan block with the cached loss its comment offers (the block as written runs in the
    # fast suite and at the lowest versions, 3 epochs), on two CPU processes under accelerate launch, for
    # one epoch: 5 steps of 4 pairs (3 epochs took 75 s; the epochs after the first check the sampler, not
    # the loss)
    results = run_conan_block(where, python, tmp_path / "hub", swap={**CACHED_LOSS, **ONE_EPOCH})
    results.sort(key=lambda r: r["rank"])
    assert [r["global_step"] for r in results] == [5, 5] and results[0]["epochs"] == 1
    assert results[0]["weights"] == results[1]["weights"] != results[0]["base_weights"]


# The examples on the package pages (their index pages), as written, from the wheels (moved here from the
# fast suite's test_readme.py, 16.5 and 10.2 s there: each starts its own processes, and these need nothing
# but the installed package); conan-st's trains MiniLM and runs in the test above.
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rrcm_package_readme_example_pretrains_finetunes_and_certifies(tmp_path, user_venvs):
    """rrcm-diffusers' page example, as written: no data of ours."""
    python = str(user_venvs["release"].result() / "bin/python")
    (res,) = run_script(write_script("rrcm-package", tmp_path / "rrcm_package_block.py"), tmp_path, python)
    assert res["pretrain_steps"] == 10
    assert {"model_index.json", "model", "README.md"} <= set(res["final"])
    # four certificates at n = 1,000: a class or -1, radius 0 for an abstention, below the n-cap
    cap = 0.5 * statistics.NormalDist().inv_cdf(0.001 ** (1 / 1000))
    assert len(res["predictions"]) == 4 and res["samples"] is None  # fixed n: no per-image counts
    for c, r in zip(res["predictions"], res["radii"]):
        assert (c == -1 and r == 0) or (0 <= c < 10 and 0 < r <= cap + 1e-9)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_shared_dist_package_readme_example_on_two_processes(tmp_path, user_venvs):
    """shared-dist's page example, as written, on two CPU processes with 3 and 4 rows."""
    python = str(user_venvs["release"].result() / "bin/python")
    script = write_script("shared-dist-package", tmp_path / "shared_dist_block.py")
    results = sorted(run_script(script, tmp_path, python, processes=2, timeout=100), key=lambda r: r["rank"])
    assert [r["rows"] for r in results] == [7, 7]
    assert [r["slice"] for r in results] == [[0, 3], [3, 7]]
    assert all(r["key_grad"] > 0 for r in results)
