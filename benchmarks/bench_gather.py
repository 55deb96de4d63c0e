"""Forward+backward time of shared_dist.gather vs torch.distributed.nn.functional.all_gather.

2 gloo processes on this machine, same tensors for both. Every round times torch, ours at equal
sizes and ours with uneven sizes (rank 1 holds half the rows; torch's all_gather cannot run it),
each as the median of ``--iters`` calls (max over ranks), interleaved in a rotating order;
``--rounds`` rounds. Prints median [min, max] over rounds, the ratio ours / torch per round
(target <= 1.05 at equal sizes) and uneven / equal (target <= 1.2), and the collectives each
call issues once the sizes have been seen.

    python benchmarks/bench_gather.py [--world 2] [--iters 30] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

import torch
import torch.distributed as dist
from _common import interleave, machine, median_time, ratios, spread

SIZES = [(64, 256), (256, 768), (1024, 768), (4096, 1024)]


def _count_calls(calls: dict) -> None:
    """Count the collectives shared_dist issues (its module-level aliases of torch's)."""
    from shared_dist import operations as ops

    def counted(fn):
        def inner(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)

        return inner

    for name in (
        "_all_gather_single",
        "_all_gather_coalesced",
        "_reduce_scatter_single",
        "_all_to_all_single",
    ):
        setattr(ops, name, counted(getattr(ops, name)))


def _measure(b: int, d: int, iters: int, rounds: int, calls: dict) -> dict:
    from torch.distributed.nn.functional import all_gather as torch_all_gather

    import shared_dist

    x = torch.randn(b, d, requires_grad=True)
    x_uneven = torch.randn(b if dist.get_rank() == 0 else b // 2, d, requires_grad=True)
    w = torch.randn(d)

    def ours(t=x):
        (shared_dist.gather(t) @ w).square().mean().backward()

    def theirs():
        (torch.cat(torch_all_gather(x)) @ w).square().mean().backward()

    def uneven():
        ours(x_uneven)

    for fn in (theirs, ours, uneven):  # warm-up; also sets gather's size bound
        for _ in range(3):
            fn()
    collectives = []
    for fn in (ours, uneven):
        calls["n"] = 0
        fn()
        collectives.append(calls["n"])
    times = interleave(
        {
            name: (lambda fn=fn: 1e3 * median_time(fn, iters))
            for name, fn in (("torch", theirs), ("ours", ours), ("uneven", uneven))
        },
        rounds,
    )
    return dict(B=b, D=d, collectives=collectives, threads=torch.get_num_threads(), **times)


def _worker(iters: int, rounds: int) -> list[dict]:
    warnings.filterwarnings("ignore")
    # one process per core share: oversubscribed threads make every timing noisy
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // dist.get_world_size()))
    calls = {"n": 0}
    _count_calls(calls)
    return [_measure(b, d, iters, rounds, calls) for b, d in SIZES]


def main() -> None:
    from shared_dist.testing import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = launch(_worker, args.world, (args.iters, args.rounds), timeout=1800)[0]
    print(machine())
    print(
        f"gather fwd+bwd, {args.world} gloo processes of {rows[0]['threads']} thread(s), float32; ms per call: median of {args.iters} calls"
        f" (max over ranks), then median [min, max] over {args.rounds} interleaved rounds"
    )
    print(
        f"{'B x D':>12} {'torch ms':>24} {'ours ms':>24} {'ours / torch':>20} {'uneven / ours':>20}"
        "  collectives fwd+bwd (equal / uneven)"
    )
    worst, worst_uneven = 0.0, 0.0
    for r in rows:
        ratio, uneven = ratios(r["ours"], r["torch"]), ratios(r["uneven"], r["ours"])
        worst, worst_uneven = (
            max(worst, statistics.median(ratio)),
            max(worst_uneven, statistics.median(uneven)),
        )
        print(
            f"{r['B']:>5} x {r['D']:<5} {spread(r['torch']):>24} {spread(r['ours']):>24} {spread(ratio, '.2f'):>20}"
            f" {spread(uneven, '.2f'):>20}  {r['collectives'][0]} / {r['collectives'][1]}"
        )
    print(f"worst median ratio ours / torch at equal sizes: {worst:.2f} (target <= 1.05)")
    print(f"worst median ratio uneven / equal: {worst_uneven:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
