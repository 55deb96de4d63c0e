"""CachedCrossGPUBalancingLoss: the gradient of the uncached loss at the same batch, in the memory of
a mini-batch, on 1 and several processes, with dropout replayed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from sentence_transformers.base.losses.gradcache import _create_minibatch
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from conan_st import CachedCrossGPUBalancingLoss, CrossGPUBalancingLoss, make_balanced_datasets
from conan_st.labels import id_to_label
from shared_dist.testing import launch
from tests.conan.helpers import collate, load_tiny, retrieval_ds, sts_rows


def _rows(n_ret: int, m: int, n_sts: int, ids: bool = False) -> list[dict]:
    """``n_ret`` retrieval rows with ``m`` negatives, then ``n_sts`` STS rows (scores 1 and 5)."""
    data = make_balanced_datasets(retrieval_ds(max(n_ret, 1), m), sts_rows(max(n_sts, 2)))
    ret = [dict(data["retrieval"][i]) for i in range(n_ret)]
    if ids:  # example ids in the label, as the mining callback's rows carry them
        for i, row in enumerate(ret):
            row["score"] = id_to_label(100 + i)
    sts = [dict(data["sts"][i]) for i in range(n_sts)]
    if not ret:  # a rank with STS rows only: the retrieval columns are empty texts
        sts = [{**row, **{k: "" for k in data["retrieval"].column_names if k != "score"}} for row in sts]
    return ret + sts


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _mini_batch_reference(model, loss, rows, mini_batch_size: int, seed: int):
    """The uncached loss on embeddings drawn mini-batch by mini-batch, column by column, from
    ``seed``: the dropout masks GradCache draws in its first pass. Returns (terms, gradients)."""
    feats, labels = collate(model, rows)
    tasks = loss.task_columns(feats, labels)
    torch.manual_seed(seed)
    embeddings = []
    for column in tasks.retrieval + tasks.sts:
        rows_in_column = column["input_ids"].shape[0]
        parts = [  # cut as sentence-transformers' GradCache cuts (padding trimmed: the masks' shapes)
            model(_create_minibatch(column, i, i + mini_batch_size))["sentence_embedding"]
            for i in range(0, rows_in_column, mini_batch_size)
        ]
        embeddings.append(torch.cat(parts))  # (B, D) or (S, D)
    n = len(tasks.retrieval)
    terms = loss.compute_loss_from_embeddings(embeddings[:n], embeddings[n:], **tasks.loss_kwargs())
    model.zero_grad()
    (terms["retrieval"] + terms["sts"]).backward()
    return {k: v.item() for k, v in terms.items()}, _grads(model)


def _cached_step(model, rows, seed: int, **kw):
    feats, labels = collate(model, rows)
    loss = CachedCrossGPUBalancingLoss(model, **kw)
    torch.manual_seed(seed)
    terms = loss(feats, labels)
    model.zero_grad()
    sum(terms.values()).backward()
    return {k: v.item() for k, v in terms.items()}, _grads(model)


def test_same_gradient_as_the_uncached_loss_without_dropout(tiny):
    """Independent of mini-batching: the uncached loss embeds each column whole (merged forward)."""
    tiny.eval()  # no dropout; gradients still flow
    rows = _rows(n_ret=5, m=2, n_sts=3)  # 5 rows in mini-batches of 2: 2 + 2 + 1
    feats, labels = collate(tiny, rows)
    ref = CrossGPUBalancingLoss(tiny)(feats, labels)
    tiny.zero_grad()
    sum(ref.values()).backward()
    ref_grads = _grads(tiny)
    terms, grads = _cached_step(tiny, rows, seed=0, mini_batch_size=2)
    assert terms == pytest.approx({k: v.item() for k, v in ref.items()}, rel=1e-5)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mini_batch_size", [1, 3, 64])
def test_dropout_is_replayed_exactly(tiny, mini_batch_size):
    tiny.train()
    rows = _rows(n_ret=5, m=2, n_sts=4)
    ref_terms, ref_grads = _mini_batch_reference(tiny, CrossGPUBalancingLoss(tiny), rows, mini_batch_size, 7)
    terms, grads = _cached_step(tiny, rows, seed=7, mini_batch_size=mini_batch_size)
    assert terms == pytest.approx(ref_terms, rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # the comparison can fail: other masks (another seed) give another gradient
    _, other = _cached_step(tiny, rows, seed=8, mini_batch_size=mini_batch_size)
    assert max((g - r).abs().max().item() for g, r in zip(other, ref_grads)) > 1e-3


def test_score_observers_get_the_uncached_scores(tiny):
    tiny.eval()
    rows = _rows(n_ret=4, m=2, n_sts=2, ids=True)
    seen = {}
    for cls, kw in ((CrossGPUBalancingLoss, {}), (CachedCrossGPUBalancingLoss, {"mini_batch_size": 3})):
        loss = cls(tiny, **kw)
        loss.add_score_observer(
            lambda ids, scores, name=cls.__name__: seen.setdefault(name, []).append((ids, scores))
        )
        feats, labels = collate(tiny, rows)
        sum(loss(feats, labels).values()).backward()
    (ids, scores), (cached_ids, cached_scores) = (
        seen["CrossGPUBalancingLoss"][0],
        seen["CachedCrossGPUBalancingLoss"][0],
    )
    assert len(seen["CachedCrossGPUBalancingLoss"]) == 1  # once per step, not per mini-batch or replay
    assert ids.tolist() == cached_ids.tolist() == [100, 101, 102, 103]
    torch.testing.assert_close(cached_scores, scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="observer must be callable"):
        loss.add_score_observer("not a function")


def test_matryoshka_wrapping_matches_the_uncached_loss(tiny):
    tiny.eval()
    rows = _rows(n_ret=3, m=2, n_sts=4)
    results = []
    for loss in (CrossGPUBalancingLoss(tiny), CachedCrossGPUBalancingLoss(tiny, mini_batch_size=2)):
        feats, labels = collate(tiny, rows)
        out = MatryoshkaLoss(tiny, loss, matryoshka_dims=[32, 8])(feats, labels)
        total = sum(out.values()) if isinstance(out, dict) else out
        tiny.zero_grad()
        total.backward()
        results.append((total.item(), _grads(tiny)))
    (value, grads), (cached_value, cached_grads) = results
    assert cached_value == pytest.approx(value, rel=1e-5)
    for g, r in zip(cached_grads, grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_terms_are_logged_and_evaluation_needs_no_graph(tiny):
    tiny.eval()
    rows = _rows(n_ret=3, m=2, n_sts=4)
    feats, labels = collate(tiny, rows)
    ref = CrossGPUBalancingLoss(tiny)(feats, labels)
    feats, labels = collate(tiny, rows)
    with torch.no_grad():
        terms = CachedCrossGPUBalancingLoss(tiny, mini_batch_size=2)(feats, labels)
    assert set(terms) == {"retrieval", "sts"}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(
        {k: v.item() for k, v in ref.items()}, rel=1e-5
    )
    feats, labels = collate(tiny, rows)
    total = CachedCrossGPUBalancingLoss(tiny, mini_batch_size=2, return_dict=False)(feats, labels)
    assert total.dim() == 0 and total.item() == pytest.approx(sum(v.item() for v in ref.values()), rel=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_mini_batch_size_must_be_a_positive_int(tiny, bad):
    with pytest.raises(ValueError, match="mini_batch_size must be an int >= 1"):
        CachedCrossGPUBalancingLoss(tiny, mini_batch_size=bad)


def test_config_and_citation(tiny):
    loss = CachedCrossGPUBalancingLoss(tiny, mini_batch_size=16, sts_weight=0.5)
    cfg = loss.get_config_dict()
    assert cfg["mini_batch_size"] == 16 and cfg["sts_weight"] == 0.5 and cfg["scale"] == 20.0
    assert "2408.15710" in loss.citation and "2101.06983" in loss.citation


# ------------------------------------------------------------------ several processes


def _w_cached_vs_uncached(
    tiny_path: str, retrieval_ranks: int, b: int, m: int, sts_sizes: list[int], mbs: int
):
    """Per rank: the uncached loss on GradCache's mini-batch embeddings (same seed, same masks), then
    the cached loss inside DDP; both gradients averaged over the ranks as DDP averages them."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_tiny(tiny_path).train()
    rows = _rows(b if rank < retrieval_ranks else 0, m, sts_sizes[rank])
    ref_terms, ref_grads = _mini_batch_reference(
        model, CrossGPUBalancingLoss(model, retrieval_ranks=retrieval_ranks), rows, mbs, seed=10 + rank
    )
    for g in ref_grads:
        dist.all_reduce(g)
        g /= world
    feats, labels = collate(model, rows)
    loss = CachedCrossGPUBalancingLoss(model, retrieval_ranks=retrieval_ranks, mini_batch_size=mbs)
    # as the trainer hands it over: BERT's pooler gets no gradient, so find_unused_parameters as
    # transformers sets it for a model that is not a PreTrainedModel
    loss.model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    torch.manual_seed(10 + rank)
    terms = loss(feats, labels)
    model.zero_grad()
    sum(terms.values()).backward()
    return {
        "ref_terms": ref_terms,
        "terms": {k: v.item() for k, v in terms.items()},
        "ref_grads": ref_grads,
        "grads": _grads(model),
    }


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world,retrieval_ranks,sts_sizes",
    [
        (2, 2, [3, 5]),  # both ranks run retrieval (shared queries) and their own, unequal STS batch
        (3, 2, [0, 0, 6]),  # the paper's layout in small: the STS rank has 6 pairs, retrieval ranks 5 rows
    ],
)
def test_same_gradient_as_the_uncached_loss_across_processes_with_dropout(
    tiny_path, world, retrieval_ranks, sts_sizes
):
    results = launch(
        _w_cached_vs_uncached, world, (tiny_path, retrieval_ranks, 5, 4, sts_sizes, 2), timeout=180
    )
    for res in results:
        assert res["terms"] == pytest.approx(res["ref_terms"], rel=1e-5, abs=1e-7)
        for g, r in zip(res["grads"], res["ref_grads"]):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # DDP left every rank with the same gradient
    for g0, g1 in zip(results[0]["grads"], results[-1]["grads"]):
        torch.testing.assert_close(g0, g1)
