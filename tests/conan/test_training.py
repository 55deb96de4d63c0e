"""conan-st through the real sentence-transformers paths: trainer, fit(), MatryoshkaLoss."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from torch.utils.data import BatchSampler, ConcatDataset, SequentialSampler

import shared_dist
from conan_st import CrossGPUBalancingLoss, TaskBalancedBatchSampler, make_balanced_datasets
from shared_dist.testing import launch
from tests.conan.helpers import collate, retrieval_ds, sts_rows


def mixed_rows(n_ret=3, n_sts=4):
    dd = make_balanced_datasets(retrieval_ds(), sts_rows(max(n_sts, 10)))
    return [dd["retrieval"][i] for i in range(n_ret)] + [dd["sts"][i] for i in range(n_sts)]


def test_forward_embeds_each_task_on_its_own_rows(minilm):
    feats, labels = collate(minilm, mixed_rows())
    loss = CrossGPUBalancingLoss(minilm)
    out = loss(feats, labels)
    # reference: embed the texts directly and call the embedding-level loss
    enc = lambda texts: minilm.encode(texts, convert_to_tensor=True)  # noqa: E731
    rows = mixed_rows()
    ret, sts = rows[:3], rows[3:]
    e = [enc([r[c] for r in ret]) for c in ("anchor", "positive", "negative_1", "negative_2")]
    s = [enc([r[c] for r in sts]) for c in ("sentence1", "sentence2")]
    ref = loss.compute_loss_from_embeddings(e, s, torch.tensor([r["score"] for r in sts]))
    torch.testing.assert_close(out["retrieval"].detach(), ref["retrieval"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["sts"].detach(), ref["sts"], rtol=1e-4, atol=1e-5)


def test_matryoshka_wrapping(minilm):
    feats, labels = collate(minilm, mixed_rows())
    inner = CrossGPUBalancingLoss(minilm)
    dims = [384, 64]
    terms = MatryoshkaLoss(minilm, inner, matryoshka_dims=dims)(feats, labels)
    # the terms survive the wrapper's weighted sum, so the trainer still logs each of them
    assert set(terms) == {"retrieval", "sts"} and all(
        v.dim() == 0 and v.requires_grad for v in terms.values()
    )
    total = sum(terms.values())
    rows = mixed_rows()
    ret, sts = rows[:3], rows[3:]
    enc = lambda texts, d: minilm.encode(texts, convert_to_tensor=True)[:, :d]  # noqa: E731
    expect = {"retrieval": 0.0, "sts": 0.0}
    for d in dims:
        e = [enc([r[c] for r in ret], d) for c in ("anchor", "positive", "negative_1", "negative_2")]
        s = [enc([r[c] for r in sts], d) for c in ("sentence1", "sentence2")]
        out = inner.compute_loss_from_embeddings(e, s, torch.tensor([r["score"] for r in sts]))
        for k in expect:
            expect[k] += float(out[k])
    assert total.item() == pytest.approx(sum(expect.values()), rel=1e-4)
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expect, rel=1e-4)


def test_adaptive_layer_wrappers(minilm):
    """AdaptiveLayerLoss calls the loss again on the same features to reuse the cached layers."""
    import random

    from sentence_transformers.sentence_transformer.losses import (
        AdaptiveLayerLoss,
        Matryoshka2dLoss,
        MultipleNegativesRankingLoss,
    )

    minilm.eval()  # no dropout: the two wrapped losses see the same embeddings
    rows = mixed_rows(4, 0)[:4]
    with torch.no_grad():
        values = []
        for inner in (CrossGPUBalancingLoss(minilm), MultipleNegativesRankingLoss(minilm)):
            random.seed(0)  # the same sampled layer for both
            feats, _ = collate(minilm, rows)
            values.append(AdaptiveLayerLoss(minilm, inner)(feats[:4], None).item())
    # on one process, retrieval rows alone: the loss is MNRL with hard negatives
    assert values[0] == pytest.approx(values[1], rel=1e-4)
    feats, labels = collate(minilm, mixed_rows())
    loss = Matryoshka2dLoss(minilm, CrossGPUBalancingLoss(minilm), [384, 64])(feats, labels)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad


def test_trainer_every_step_carries_both_tasks(minilm, tmp_path):
    seen = []
    loss = CrossGPUBalancingLoss(minilm)
    original = loss._split_rows

    def spy(features, labels):
        ret, sts = original(features, labels)
        seen.append((int(ret.sum()), int(sts.sum())))
        return ret, sts

    loss._split_rows = spy
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=4,
        disable_tqdm=True,
        learning_rate=1e-5,
        multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(
            retrieval_batch_size=4, sts_batch_size=6
        ),
    )
    trainer = SentenceTransformerTrainer(
        model=minilm, args=args, train_dataset=make_balanced_datasets(retrieval_ds(), sts_rows()), loss=loss
    )
    trainer.train()
    assert seen == [(4, 6)] * 3
    logged = [h for h in trainer.state.log_history if "retrieval" in h]
    assert len(logged) == 3 and all("sts" in h and math.isfinite(h["retrieval"]) for h in logged)


def test_fit_path_trains(minilm, tmp_path, monkeypatch):
    from sentence_transformers.sentence_transformer.readers import InputExample
    from torch.utils.data import DataLoader

    monkeypatch.chdir(tmp_path)  # fit() writes checkpoints/ into the working directory
    model = minilm
    # 22 rows in batches of 7: fit() shuffles, so steps mix the tasks at random and the last
    # batch holds one row of one task; the loss takes whatever rows a batch holds
    rows = mixed_rows(12, 10)
    examples = []
    for r in rows:
        texts = [r["anchor"], r["positive"], r["negative_1"], r["negative_2"], r["sentence1"], r["sentence2"]]
        examples.append(InputExample(texts=texts, label=r["score"]))
    loss = CrossGPUBalancingLoss(model)
    feats, labels = collate(model, rows)
    model.eval()  # compare without dropout
    with torch.no_grad():
        before = sum(loss(feats, labels).values()).item()
    calls = []
    original = loss._split_rows
    loss._split_rows = lambda f, lab: calls.append(original(f, lab)) or calls[-1]
    model.fit(
        train_objectives=[(DataLoader(examples, batch_size=7, shuffle=False), loss)],
        epochs=10,
        warmup_steps=0,
        optimizer_params={"lr": 2e-4},
        show_progress_bar=False,
    )
    assert len(calls) == 4 * 10  # 4 batches an epoch, 10 epochs
    loss._split_rows = original
    model.eval()
    with torch.no_grad():
        after = sum(loss(*collate(model, rows)).values()).item()
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------ sampler layout


def _w_sampler(retrieval_ranks, sts_batch_size=3):
    dd = make_balanced_datasets(retrieval_ds(n=8), sts_rows(n=5))
    concat = ConcatDataset([dd["retrieval"], dd["sts"]])
    stub = [BatchSampler(SequentialSampler(range(len(d))), 2, True) for d in (dd["retrieval"], dd["sts"])]
    try:
        sampler = TaskBalancedBatchSampler(
            concat,
            stub,
            retrieval_batch_size=2,
            sts_batch_size=sts_batch_size,
            retrieval_ranks=retrieval_ranks,
        )
    except ValueError as err:
        return {"error": str(err)}
    return {"batches": list(sampler), "len": len(sampler), "world": shared_dist.get_world_size()}


@pytest.mark.distributed
@pytest.mark.parametrize("world,r", [(3, 2), (2, 2)])
def test_sampler_layout_on_several_ranks(world, r):
    res = launch(_w_sampler, world, (r,), timeout=60)
    assert res[0]["batches"] == res[1]["batches"]  # every rank builds the same stream
    batches, n_ret = res[0]["batches"], 8
    assert len(batches) == res[0]["len"] == 4 * world
    for step in range(4):
        group = batches[step * world : (step + 1) * world]
        ret = [[i for i in b if i < n_ret] for b in group]
        sts = [[i for i in b if i >= n_ret] for b in group]
        assert all(x == ret[0] and len(x) == 2 for x in ret[:r])  # same queries on retrieval ranks
        assert all(not x for x in ret[r:])
        carriers = range(world) if r == world else range(r, world)
        assert all(len(sts[k]) == 3 for k in carriers)
        assert all(not sts[k] for k in range(world) if k not in carriers)


@pytest.mark.distributed
def test_sampler_retrieval_only_on_several_ranks():
    """sts_batch_size=0: dynamic mining without STS; every rank the same retrieval rows, none idle."""
    res = launch(_w_sampler, 2, (2, 0), timeout=60)
    assert res[0]["batches"] == res[1]["batches"]
    batches = res[0]["batches"]
    assert len(batches) == 8 and all(len(b) == 2 and max(b) < 8 for b in batches)
    assert batches[0::2] == batches[1::2]  # both ranks of a step hold the same queries
    # an STS rank with nothing to do would hang DDP's gradient sync: refused, naming the fix
    res = launch(_w_sampler, 2, (1, 0), timeout=60)
    assert "sts_batch_size=0" in res[0]["error"] and "retrieval_ranks=2" in res[0]["error"]


def test_sampler_single_process_retrieval_only():
    res = _w_sampler(None, sts_batch_size=0)
    assert len(res["batches"]) == 4 and all(len(b) == 2 and max(b) < 8 for b in res["batches"])


def test_sampler_single_process_mixes_both_tasks():
    res = _w_sampler(None)
    for b in res["batches"]:
        assert len([i for i in b if i < 8]) == 2 and len([i for i in b if i >= 8]) == 3
    assert len(res["batches"]) == 4


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "retrieval,sts,match",
    [
        (retrieval_ds().remove_columns("positive"), sts_rows(), r"missing \['positive'\]"),
        (retrieval_ds().add_column("extra", ["x"] * 12), sts_rows(), r"unexpected \['extra'\]"),
        (retrieval_ds(), sts_rows().rename_column("score", "sim"), r"missing \['score'\]"),
        (
            retrieval_ds(),
            Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "score": [7.0]}),
            r"row 0: 7.0 is outside sts_score_range \(0.0, 5.0\)",
        ),
        (retrieval_ds(), sts_rows().select([]), "each task needs data"),
    ],
)
def test_bad_datasets(retrieval, sts, match):
    with pytest.raises(ValueError, match=match):
        make_balanced_datasets(retrieval, sts)


def test_bad_loss_input(minilm):
    rows = mixed_rows()
    feats, labels = collate(minilm, rows)
    with pytest.raises(ValueError, match=r"STS scores must lie in sts_score_range=\(0.0, 1.0\)"):
        CrossGPUBalancingLoss(minilm, sts_score_range=(0.0, 1.0))(feats, labels)
    with pytest.raises(ValueError, match=r"retrieval_ranks must be in \[1, 1\]"):
        CrossGPUBalancingLoss(minilm, retrieval_ranks=2)(feats, labels)
    with pytest.raises(ValueError, match="expected columns"):
        CrossGPUBalancingLoss(minilm)(feats[:1] + feats[-2:], labels)
    with pytest.raises(ValueError, match="sts_weight must be a finite number >= 0"):
        CrossGPUBalancingLoss(minilm, sts_weight=-1)
