from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import DATA, REPO, pip_install, run_ok

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one default for both packages: only the built-in plugins; tests of entry-point loading opt in
os.environ.setdefault("RRCM_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("CONAN_ST_DISABLE_PLUGIN_AUTOLOAD", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one core per worker, so that two workers'
    # OpenMP threads never spin against each other (2 x 2 threads on 2 cores is 5-10x slower)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real data not found at {DATA} (expected ../shared/data beside the repo)")
    return DATA


@pytest.fixture(scope="session")
def torch_venv(tmp_path_factory) -> Path:
    """A new virtual environment outside the source tree with only torch 2.13.0 (the CPU build, as
    scripts/setup.sh installs it); the release and lowest-versions tests copy it (`helpers.new_venv`)."""
    venv = tmp_path_factory.mktemp("torch-venv") / "venv"
    run_ok([sys.executable, "-m", "venv", str(venv)], timeout=120)
    run_ok([*pip_install(venv), "-c", str(REPO / "constraints.txt"), "torch==2.13.0"], timeout=600)
    return venv


class _Installs(dict):
    """key -> Future of a venv's path; a key not started yet is started when asked for."""

    def __init__(self, start):
        super().__init__()
        self._start = start

    def __missing__(self, key: str) -> Future:
        self[key] = self._start(key)
        return self[key]


@pytest.fixture(scope="session")
def user_venvs(request, tmp_path_factory, release_dist, torch_venv) -> Iterator[dict[str, Future]]:
    """The virtual environments of the release test (key ``"release"``) and the lowest-versions tests
    (the package's name), each a copy of ``torch_venv`` outside the source tree; ``.result()`` is its path.

    The first test that asks starts the installs of every one this run selected, side by side, and each
    test waits for its own: pip spends an install resolving and byte-compiling on one core, so the three
    took 110.5 and 121.9 s at once against 184.6 and 210.8 s one after another (measured 2026-12-07, 2
    cores), and the later tests find theirs ready. An install that fails fails the test that asked for it.
    Under pytest-xdist a worker cannot know which tests it will get: each install starts when asked for."""
    from tests.helpers import install_lowest, install_release, new_venv

    root, pool = tmp_path_factory.mktemp("user-venvs"), ThreadPoolExecutor(3)

    def build(key: str) -> Path:
        pip = new_venv(torch_venv, root / key)
        if key == "release":
            install_release(pip, release_dist)
        else:
            install_lowest(pip, release_dist, key)
        return root / key

    installs = _Installs(lambda key: pool.submit(build, key))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        for item in request.session.items:
            if "user_venvs" in item.fixturenames:
                params = item.callspec.params if hasattr(item, "callspec") else {}
                installs[params.get("package", "release")]  # started
    yield installs
    pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def release_dist(tmp_path_factory) -> Path:
    """The six release artifacts, built once per pytest run by scripts/build_release.sh (which also
    checks them: twine --strict, dependencies by name, LICENSE, versions)."""
    dist = tmp_path_factory.mktemp("release") / "dist"
    run_ok(["bash", str(REPO / "scripts/build_release.sh"), str(dist)], cwd=REPO, timeout=600)
    return dist


# The files that take longest in the fast suite (--durations, 2026-12-08: 137 s and 37 s on 2 workers;
# tests/rrcm/test_resume.py was second, 69 s, until its jobs were forked), handed out before all others;
# then every other file that starts processes.
LONGEST_FIRST = ("tests/test_readme.py", "tests/conan/test_correctness.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first. pytest-xdist (``--dist loadfile --no-loadscope-reorder``: scripts/test.sh)
    hands out whole files in collection order, so the longest go out first and the short ones fill the
    gaps at the end (with xdist's own reorder, by number of tests, the 4 README tests went out last and
    one worker ran them alone for the last ~150 s); a stable sort keeps each file's own order (its module
    fixtures rely on it)."""
    launches = {item.path for item in items if item.get_closest_marker("distributed")}
    first = {REPO / name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (first.get(item.path, len(first)), item.path not in launches))
