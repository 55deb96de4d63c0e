"""What every benchmark prints: the machine it ran on, and timings of ours and the baseline taken
interleaved (each round runs every variant once, in an order that rotates from round to round, so
a burst of load lands on all of them), repeated, reported as median and spread."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

# CPU flags that change what torch's kernels can do (fp32 GEMM width, bf16 and int8 paths)
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine() -> str:
    """One line: CPU model, cores this process may use, the flags above, torch and its threads."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = (
        f"machine: {model}, {cores} cores, flags {' '.join(f for f in _FLAGS if f in flags) or '?'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` measurements of every variant (each callable returns one timing), interleaved."""
    names, out = list(variants), {name: [] for name in variants}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            out[name].append(variants[name]())
    return out


def median_time(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call of ``fn``: the median of ``iters`` calls, each started together on every rank
    (a barrier), then the max over ranks, since the slowest rank sets the pace of a collective."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    samples = []
    for _ in range(iters):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(samples)])
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def spread(samples: Sequence[float], fmt: str = ".3f") -> str:
    """``median [min, max]``."""
    return f"{statistics.median(samples):{fmt}} [{min(samples):{fmt}}, {max(samples):{fmt}}]"


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Round-by-round ratios: the two sides of each ratio were measured in the same round."""
    return [a / b for a, b in zip(num, den)]


def classifier_kwargs(config: str | os.PathLike) -> tuple[dict, tuple[int, ...]]:
    """``RRCMModel`` keyword arguments for a fresh 10-class classifier (no projector) of an experiment
    config's model, and the image shape (C, H, W), read from the config's own test split as the experiment
    does: no second list of shapes. Weights do not change the cost of fixed-n CERTIFY."""
    from rrcm_diffusers.data import load_dataset
    from rrcm_diffusers.experiment import load_config

    cfg = load_config(config)
    shape = tuple(load_dataset(cfg.dataset, "test", cfg.data_dir)[0].shape[1:])
    kw = {
        **cfg.model,
        "image_size": shape[-1],
        "in_channels": shape[0],
        "projection_dim": 0,
        "num_classes": 10,
    }
    return kw, shape
