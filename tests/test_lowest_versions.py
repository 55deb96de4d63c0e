"""The lowest versions each package declares, installed as a user's pip would install them.

One fresh virtual environment per package, outside the source tree: torch 2.13.0 (the CPU build on
this machine's disk: torch's lowest declared release, 2.5, has no CPU wheel on the public index and
would pull a multi-GB CUDA build), then the package's wheel (scripts/build_release.sh, built once per
run) with the lowest declared version of diffusers and accelerate (rrcm-diffusers), sentence-transformers,
transformers and accelerate (conan-st) pinned. Imports and the README's code block must run there as written. When a bound is raised or
lowered in a pyproject.toml, LOWEST (tests/helpers.py) must follow, and this test says whether it holds."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import LOWEST, REPO, run_ok
from tests.readme_snippets import run_conan_block, run_script, write_script


@pytest.mark.parametrize("package", list(LOWEST))
def test_lowest_lists_the_declared_lower_bounds(package):
    text = (REPO / "packages" / package / "pyproject.toml").read_text()
    for name, version in LOWEST[package].items():
        short = ".".join(version.split(".")[:2]) if version.endswith(".0") else version
        assert f'"{name}>={short}' in text or f'"{name}>={version}' in text, (package, name, version)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("package", list(LOWEST))
def test_the_readme_block_runs_at_the_lowest_declared_versions(package, tmp_path, user_venvs):
    # a new venv with torch 2.13.0 (the CPU build), the built wheels by name (dist/ only), then the pins
    # from the registry: `helpers.install_lowest`, started with the other tests' installs (conftest.py)
    venv = user_venvs[package].result()
    pins = [f"{name}=={version}" for name, version in LOWEST[package].items()]
    versions = run_ok([str(venv / "bin/python"), "-m", "pip", "freeze"], timeout=120).lower()
    for pin in pins:
        assert pin.lower() in versions, (pin, versions)

    where = tmp_path / "user"
    where.mkdir()
    python = str(venv / "bin/python")
    if package == "rrcm-diffusers":
        (res,) = run_script(write_script("rrcm", where / "rrcm_block.py"), where, python)
        assert res["steps"] == res["total_steps"] and res["reloaded_weights_equal"]
        assert res["reloaded_radii"] == res["saved_radii"]
    else:
        results = run_conan_block(where, python, tmp_path / "hub")
        assert sorted(r["global_step"] for r in results) == [15, 15]
        # mteb is the [mteb] extra: training ran without it, and evaluation says how to get it
        probe = "import conan_st.evaluation"
        proc = subprocess.run([python, "-c", probe], cwd=where, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "pip install 'conan-st[mteb]'" in proc.stderr, proc.stderr[-2000:]
