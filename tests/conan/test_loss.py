"""CrossGPUBalancingLoss against plain-torch references, on 1 and several processes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset

from conan_st import CrossGPUBalancingLoss
from shared_dist import DistributedOperationError
from shared_dist.testing import launch


class Encoder(torch.nn.Module):
    """Stands in for the sentence encoder at the embedding level (the loss only stores it)."""

    def __init__(self, seed: int = 0, dim_in: int = 12, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(dim_in, dim)

    def forward(self, x):
        return self.lin(x)


def _inputs(b=3, m=4, s=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, p = torch.randn(b, 12, generator=g), torch.randn(b, 12, generator=g)
    negs = torch.randn(b, m, 12, generator=g)
    s1, s2 = torch.randn(s, 12, generator=g), torch.randn(s, 12, generator=g)
    scores = torch.rand(s, generator=g) * 5
    return q, p, negs, s1, s2, scores


def ref_infonce(q, p, negs, scale=20.0, in_batch=True):
    """Plain torch: each query vs [its positive, (other positives), its / all negatives]."""
    qn, pn, nn_ = F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(negs, dim=-1)  # negs (B, m, D)
    losses = []
    for i in range(q.shape[0]):
        pos = qn[i] @ pn[i]
        cands = [pos]
        if in_batch:
            cands += [qn[i] @ pn[j] for j in range(q.shape[0]) if j != i]
            cands += [qn[i] @ nn_[j, t] for j in range(q.shape[0]) for t in range(negs.shape[1])]
        else:
            cands += [qn[i] @ nn_[i, t] for t in range(negs.shape[1])]
        logits = torch.stack(cands) * scale
        losses.append(-(logits[0] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


def ref_cosent(s1, s2, scores, scale=20.0):
    cos = F.cosine_similarity(s1, s2)
    terms = [torch.zeros(())]
    for i, j in itertools.permutations(range(len(scores)), 2):
        if scores[i] > scores[j]:  # pair i should be more similar than pair j
            terms.append((cos[j] - cos[i]) * scale)
    return torch.logsumexp(torch.stack(terms), 0)  # log(1 + Σ exp(...))


@pytest.mark.parametrize("in_batch", [True, False])
def test_loss_equals_plain_torch_reference(in_batch):
    enc = Encoder()
    q, p, negs, s1, s2, scores = _inputs()
    loss = CrossGPUBalancingLoss(enc, in_batch_negatives=in_batch)
    e = [enc(q), enc(p), *[enc(negs[:, t]) for t in range(negs.shape[1])]]
    out = loss.compute_loss_from_embeddings(e, [enc(s1), enc(s2)], scores)
    ref_r = ref_infonce(enc(q), enc(p), enc(negs), in_batch=in_batch)
    torch.testing.assert_close(out["retrieval"], ref_r)
    torch.testing.assert_close(out["sts"], 0.8 * ref_cosent(enc(s1), enc(s2), scores))


def test_config_and_citation():
    loss = CrossGPUBalancingLoss(Encoder(), sts_weight=0.5)
    cfg = loss.get_config_dict()
    assert cfg["sts_weight"] == 0.5 and cfg["scale"] == 20.0 and math.isclose(loss.temperature, 0.05)
    assert "2408.15710" in loss.citation


# ------------------------------------------------------------------ several processes

# (world, case, args): the cases of one world size run in order on the same processes, one launch
# per world size; a refused step leaves the ranks in step for the next case
CASES = {
    2: [("grads", 2, (0, 1)), ("grads", 1, (1,)), ("positives",), ("mismatched",)],
    3: [("grads", 2, (2,))],
}


def _w_cases(cases: list[tuple]) -> list:
    out = []
    for name, *args in cases:
        if name == "grads":  # (retrieval ranks, ranks with an STS batch)
            world = dist.get_world_size()
            retrieval_ranks, sts_on = args
            out.append(
                _w_grads(retrieval_ranks, 4, [_sts(10 + r) if r in sts_on else None for r in range(world)])
            )
        elif name == "positives":
            out.append(_w_positive_gathering_would_hurt())
        else:  # rank 1 brings 3 negatives instead of 2
            _, _, negs, *_ = _inputs(m=4)
            out.append(_w_grads(2, 4, [None, None], [negs[:, :2], negs[:, :3]]))
    return out


@pytest.fixture(scope="module")
def ran():
    """``ran(world, name, *args)``: the per-rank results of that case."""
    results = {}
    for world, cases in CASES.items():
        per_rank = launch(_w_cases, world, (cases,), timeout=180)
        results.update({repr((world, *case)): [rank[i] for rank in per_rank] for i, case in enumerate(cases)})
    return lambda *case: results[repr(case)]


def _w_grads(retrieval_ranks: int, m: int, sts_batches: list, negs_override=None):
    rank = dist.get_rank()
    enc = torch.nn.parallel.DistributedDataParallel(Encoder())
    q, p, negs, *_ = _inputs(m=m)
    loss = CrossGPUBalancingLoss(enc, retrieval_ranks=retrieval_ranks)
    per = m // retrieval_ranks
    ret = []
    if rank < retrieval_ranks:
        mine = negs[:, rank * per : (rank + 1) * per] if negs_override is None else negs_override[rank]
        ret = [enc(q), enc(p), *[enc(mine[:, t]) for t in range(mine.shape[1])]]
    sts, scores = [], None
    if sts_batches[rank] is not None:
        s1, s2, scores = sts_batches[rank]
        sts = [enc(s1), enc(s2)]
    try:
        out = loss.compute_loss_from_embeddings(ret, sts, scores, num_negatives=per, dim=8)
    except DistributedOperationError as err:
        return f"DistributedOperationError: {err}"
    total = out["retrieval"] + out["sts"]
    total.backward()
    return {"retrieval": out["retrieval"].item(), "grads": [x.grad.clone() for x in enc.parameters()]}


def _reference(m: int, sts_batches: list):
    enc = Encoder()
    q, p, negs, *_ = _inputs(m=m)
    ret = ref_infonce(enc(q), enc(p), enc(negs))
    sts = [ref_cosent(enc(b[0]), enc(b[1]), b[2]) for b in sts_batches if b is not None]
    (ret + 0.8 * torch.stack(sts).mean()).backward()
    return ret.item(), [x.grad for x in enc.parameters()]


def _sts(seed):
    *_, s1, s2, scores = _inputs(seed=seed)
    return (s1, s2, scores)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,retrieval_ranks,sts_on",
    [
        (2, 2, [0, 1]),  # both ranks: shared queries, half the negatives each, own STS batch
        (3, 2, [2]),  # the paper's layout in small: 2 retrieval ranks, 1 STS rank
        (2, 1, [1]),  # 1 retrieval rank (all negatives), 1 STS rank
    ],
)
def test_gradients_match_one_process_on_concatenated_negatives(world, retrieval_ranks, sts_on, ran):
    m = 4
    sts_batches = [_sts(10 + r) if r in sts_on else None for r in range(world)]
    results = ran(world, "grads", retrieval_ranks, tuple(sts_on))
    ref_ret, ref_grads = _reference(m, sts_batches)
    for rank, res in enumerate(results):
        if rank < retrieval_ranks:
            # same value on every retrieval rank: each query saw all m negatives, and its own
            # positive exactly once (positives were not gathered)
            assert res["retrieval"] == pytest.approx(ref_ret * world / retrieval_ranks, rel=1e-5)
        for g, r in zip(res["grads"], ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _w_positive_gathering_would_hurt():
    """What the loss avoids: gathering positives from ranks sharing queries."""
    rank = dist.get_rank()
    enc = Encoder()
    q, p, *_ = _inputs(m=2)
    from shared_dist import gather

    pos_all = gather(enc(p).detach())  # (2B, D): every positive twice
    logits = F.normalize(enc(q), dim=-1) @ F.normalize(pos_all, dim=-1).T * 20
    return F.cross_entropy(logits, torch.arange(3) + rank * 3).item()


@pytest.mark.distributed
def test_gathering_positives_would_create_false_negatives(ran):
    wrong = ran(2, "positives")[0]
    enc = Encoder()
    q, p, *_ = _inputs(m=2)
    right = F.cross_entropy(
        F.normalize(enc(q), dim=-1) @ F.normalize(enc(p), dim=-1).T * 20, torch.arange(3)
    ).item()
    assert wrong > right + 0.5  # the duplicate positive competes with the true one


@pytest.mark.distributed
def test_mismatched_negative_counts_across_ranks_raise(ran):
    results = ran(2, "mismatched")
    for msg in results:
        assert isinstance(msg, str) and msg.startswith("DistributedOperationError"), msg
        assert "rank 0: 6" in msg and "rank 1: 9" in msg, msg


@pytest.mark.parametrize("scores, warns", [([3.0], True), ([2.0, 2.0], True), ([1.0, 4.0], False)])
def test_an_sts_batch_without_signal_is_said_once(tiny, scores, warns):
    """CoSENT of one pair (fit()'s DataLoader(examples): batch size 1) or of equal scores is 0: the
    STS half would never train, silently."""
    import warnings

    from conan_st import make_balanced_datasets
    from tests.conan.helpers import collate, retrieval_ds

    sts = Dataset.from_dict(
        {
            "sentence1": [f"a cat sits {i}" for i in range(len(scores))],
            "sentence2": ["a cat"] * len(scores),
            "score": scores,
        }
    )
    rows = make_balanced_datasets(retrieval_ds(2, 1), sts)["sts"]
    feats, labels = collate(tiny, [rows[i] for i in range(len(rows))])
    loss = CrossGPUBalancingLoss(tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(feats, labels)
        loss(feats, labels)
    said = [w for w in caught if "CoSENT compares pairs within a batch" in str(w.message)]
    assert len(said) == (1 if warns else 0), [str(w.message) for w in caught]
