"""Run a function on N local processes with a real process group — for tests.

``launch(fn, world_size=2)`` starts ``world_size`` processes, initialises
``torch.distributed`` (gloo by default) in each, calls ``fn(*args)`` and returns the
per-rank results in rank order. It never hangs: a rank that fails, dies or runs past
``timeout`` seconds ends the whole group and raises in the caller with every failing
rank's traceback.

The ranks are forked from the caller where that is safe (Linux, one torch thread per rank,
CUDA not initialised in the caller), so they start with the caller's imports instead of
importing torch, transformers or diffusers again (6 s of CPU per rank for sentence-transformers
on a 2-core machine), as accelerate's ``debug_launcher`` does; otherwise, or with
``start_method="spawn"``, they are fresh interpreters and ``fn`` must be importable by name.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["free_port", "launch"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    pg_timeout: float,
    threads: int,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import multiprocessing

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # N processes share a few cores
    if "fork" in multiprocessing.get_all_start_methods():
        # a rank's own children (DataLoader workers) fork, as under torchrun / accelerate launch; a
        # spawned rank would spawn them, each importing torch and the caller's modules again (40 s
        # for 3 ranks x 2 workers of a sentence-transformers trainer, 2.5 s forked)
        multiprocessing.set_start_method("fork", force=True)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
        )
        out = fn(*args)
        # Pickled by value here (not through shared memory) so results outlive the worker.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _fork_is_safe(threads: int) -> bool:
    """Whether a process forked from this one may run torch on ``threads`` threads: on Linux only (macOS
    offers fork, but its system libraries are not fork-safe: spawn is its default), with one thread (GNU
    libgomp is not fork-safe: a child with more hangs if this process ran a multi-threaded op) and CUDA
    not initialised here."""
    import torch

    return sys.platform.startswith("linux") and threads == 1 and not torch.cuda.is_initialized()


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    *,
    timeout: float = 120.0,
    backend: str = "gloo",
    pg_timeout: float | None = None,
    threads: int = 1,
    env: dict[str, str] | None = None,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` processes; return the results in rank order.

    Args:
        fn: module-level function; it runs after ``init_process_group``.
        world_size: number of processes (>= 1).
        timeout: seconds for the whole run before every process is killed.
        backend: ``"gloo"`` on CPU.
        pg_timeout: the process group's own collective timeout (default: ``timeout``).
        threads: torch intra-op threads per process.
        env: extra environment variables for the workers.
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; default ``"fork"`` where it is safe
            (see the module docstring), else ``"spawn"``. A forked rank with more than one thread hangs
            in OpenMP if the caller has run a multi-threaded op (GNU libgomp is not fork-safe).
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    methods = mp.get_all_start_methods()
    if start_method is None:
        start_method = "fork" if _fork_is_safe(threads) else "spawn"
    elif start_method not in methods:
        raise ValueError(f"start_method must be one of {methods} on this platform, got {start_method!r}")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    worker_args = (
        world_size,
        port,
        backend,
        pg_timeout or timeout,
        threads,
        dict(env or {}),
        fn,
        args,
        results,
    )
    # not daemonic, so a rank can start dataloader workers; _collect ends every rank
    procs = [ctx.Process(target=_worker, args=(r, *worker_args), daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    done = _collect(procs, results, timeout)
    failures = {r: msg for r, (ok, msg) in sorted(done.items()) if not ok}
    missing = [r for r in range(world_size) if r not in done]
    if failures:
        text = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in failures.items())
        extra = f" (ranks {missing} killed while waiting)" if missing else ""
        raise RuntimeError(f"{len(failures)} of {world_size} ranks failed{extra}:\n{text}")
    if missing:
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s")
    return [pickle.loads(done[r][1]) for r in range(world_size)]


def _collect(procs: list, results, timeout: float) -> dict[int, tuple[bool, Any]]:
    """Each rank's (ok, payload) as it reports, until all did, ``timeout`` passed, or 5 s after a
    failure (so the others' errors show too); then every process still alive is ended."""
    done: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    grace: float | None = None
    try:
        while len(done) < len(procs):
            now = time.monotonic()
            if now > deadline or (grace is not None and now > grace):
                break
            try:
                rank, ok, payload = results.get(timeout=0.2)
                done[rank] = (ok, payload)
                if not ok and grace is None:
                    grace = time.monotonic() + 5.0
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in done and p.exitcode is not None:
                        done[r] = (False, f"process exited with code {p.exitcode} before reporting")
                        grace = grace or time.monotonic() + 5.0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return done
