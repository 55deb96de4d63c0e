"""Forward+backward time of shared_dist.gather vs torch.distributed.nn.functional.all_gather.

One run, 2 gloo processes on this machine, same tensors for both. Prints per-size
medians and the ratio ours / torch (target <= 1.10 at equal sizes), the uneven case
(rank 1 holds half the rows; torch's all_gather cannot run it, so it is compared with
ours at equal sizes), and the collectives each call issues.

    python benchmarks/bench_gather.py [--world 2] [--iters 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.distributed as dist

SIZES = [(64, 256), (256, 768), (1024, 768), (4096, 1024)]


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    # the slowest rank sets the pace of a collective: take the max over ranks
    t = torch.tensor([statistics.median(samples)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _worker(iters: int) -> list[dict]:
    from torch.distributed.nn.functional import all_gather as torch_all_gather

    import shared_dist
    from shared_dist import operations as ops

    warnings.filterwarnings("ignore")
    rank = dist.get_rank()
    calls = {"n": 0}

    def counted(fn):
        def inner(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)

        return inner

    ops._all_gather_single = counted(ops._all_gather_single)
    ops._reduce_scatter_single = counted(ops._reduce_scatter_single)

    rows = []
    for b, d in SIZES:
        x = torch.randn(b, d, requires_grad=True)
        x_uneven = torch.randn(b if rank == 0 else b // 2, d, requires_grad=True)
        w = torch.randn(d)

        def ours(t=x, w=w):
            (shared_dist.gather(t) @ w).square().mean().backward()

        def theirs(t=x, w=w):
            (torch.cat(torch_all_gather(t)) @ w).square().mean().backward()

        t_theirs = _time(theirs, iters)
        t_ours = _time(ours, iters)
        t_uneven = _time(lambda xu=x_uneven: ours(xu), iters)
        calls["n"] = 0
        ours()
        n_equal = calls["n"]
        calls["n"] = 0
        ours(x_uneven)
        n_uneven = calls["n"]
        rows.append(
            dict(
                B=b,
                D=d,
                torch_ms=t_theirs * 1e3,
                ours_ms=t_ours * 1e3,
                uneven_ms=t_uneven * 1e3,
                coll_equal=n_equal,
                coll_uneven=n_uneven,
            )
        )
    return rows


def main() -> None:
    from shared_dist.testing import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    rows = launch(_worker, args.world, (args.iters,), timeout=900)[0]
    print(f"gather fwd+bwd, {args.world} gloo processes, float32, median of {args.iters} (max over ranks)")
    print(
        f"{'B x D':>12} {'torch ms':>9} {'ours ms':>9} {'ratio':>6} {'uneven ms':>10} {'uneven/eq':>9}  collectives (eq / uneven)"
    )
    for r in rows:
        print(
            f"{r['B']:>5} x {r['D']:<5} {r['torch_ms']:9.3f} {r['ours_ms']:9.3f} {r['ours_ms'] / r['torch_ms']:6.2f}"
            f" {r['uneven_ms']:10.3f} {r['uneven_ms'] / r['ours_ms']:9.2f}  {r['coll_equal']} / {r['coll_uneven']}"
        )
    worst = max(r["ours_ms"] / r["torch_ms"] for r in rows)
    print(f"worst ratio ours/torch at equal sizes: {worst:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
