"""conan-st through the real sentence-transformers paths: trainer, fit(), MatryoshkaLoss."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

from conan_st import CrossGPUBalancingLoss, TaskBalancedBatchSampler, make_balanced_datasets
from tests.conan.helpers import collate, retrieval_ds, sts_rows


def mixed_rows(n_ret=3, n_sts=4):
    dd = make_balanced_datasets(retrieval_ds(), sts_rows(max(n_sts, 10)))
    return [dd["retrieval"][i] for i in range(n_ret)] + [dd["sts"][i] for i in range(n_sts)]


def test_forward_embeds_each_task_on_its_own_rows(tiny):
    feats, labels = collate(tiny, mixed_rows())
    loss = CrossGPUBalancingLoss(tiny)
    out = loss(feats, labels)
    # reference: embed the texts directly and call the embedding-level loss
    enc = lambda texts: tiny.encode(texts, convert_to_tensor=True)  # noqa: E731
    rows = mixed_rows()
    ret, sts = rows[:3], rows[3:]
    e = [enc([r[c] for r in ret]) for c in ("anchor", "positive", "negative_1", "negative_2")]
    s = [enc([r[c] for r in sts]) for c in ("sentence1", "sentence2")]
    ref = loss.compute_loss_from_embeddings(e, s, torch.tensor([r["score"] for r in sts]))
    torch.testing.assert_close(out["retrieval"].detach(), ref["retrieval"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["sts"].detach(), ref["sts"], rtol=1e-4, atol=1e-5)


def test_matryoshka_wrapping(tiny):
    feats, labels = collate(tiny, mixed_rows())
    inner = CrossGPUBalancingLoss(tiny)
    dims = [32, 8]
    terms = MatryoshkaLoss(tiny, inner, matryoshka_dims=dims)(feats, labels)
    # the terms survive the wrapper's weighted sum, so the trainer still logs each of them
    assert set(terms) == {"retrieval", "sts"} and all(
        v.dim() == 0 and v.requires_grad for v in terms.values()
    )
    total = sum(terms.values())
    rows = mixed_rows()
    ret, sts = rows[:3], rows[3:]
    enc = lambda texts, d: tiny.encode(texts, convert_to_tensor=True)[:, :d]  # noqa: E731
    expect = {"retrieval": 0.0, "sts": 0.0}
    for d in dims:
        e = [enc([r[c] for r in ret], d) for c in ("anchor", "positive", "negative_1", "negative_2")]
        s = [enc([r[c] for r in sts], d) for c in ("sentence1", "sentence2")]
        out = inner.compute_loss_from_embeddings(e, s, torch.tensor([r["score"] for r in sts]))
        for k in expect:
            expect[k] += float(out[k])
    assert total.item() == pytest.approx(sum(expect.values()), rel=1e-4)
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expect, rel=1e-4)


def test_adaptive_layer_wrappers(tiny):
    """AdaptiveLayerLoss calls the loss again on the same features to reuse the cached layers."""
    import random

    from sentence_transformers.sentence_transformer.losses import (
        AdaptiveLayerLoss,
        Matryoshka2dLoss,
        MultipleNegativesRankingLoss,
    )

    tiny.eval()  # no dropout: the two wrapped losses see the same embeddings
    rows = mixed_rows(4, 0)[:4]
    with torch.no_grad():
        values = []
        for inner in (CrossGPUBalancingLoss(tiny), MultipleNegativesRankingLoss(tiny)):
            random.seed(0)  # the same sampled layer for both
            feats, _ = collate(tiny, rows)
            values.append(AdaptiveLayerLoss(tiny, inner)(feats[:4], None).item())
    # on one process, retrieval rows alone: the loss is MNRL with hard negatives
    assert values[0] == pytest.approx(values[1], rel=1e-4)
    feats, labels = collate(tiny, mixed_rows())
    loss = Matryoshka2dLoss(tiny, CrossGPUBalancingLoss(tiny), [32, 8])(feats, labels)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad


def test_trainer_every_step_carries_both_tasks(tiny, tmp_path):
    seen = []
    loss = CrossGPUBalancingLoss(tiny)
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
        model=tiny, args=args, train_dataset=make_balanced_datasets(retrieval_ds(), sts_rows()), loss=loss
    )
    trainer.train()
    assert seen == [(4, 6)] * 3
    logged = [h for h in trainer.state.log_history if "retrieval" in h]
    assert len(logged) == 3 and all("sts" in h and math.isfinite(h["retrieval"]) for h in logged)


def test_fit_path_trains(tiny, tmp_path, monkeypatch):
    from sentence_transformers.sentence_transformer.readers import InputExample
    from torch.utils.data import DataLoader

    monkeypatch.chdir(tmp_path)  # fit() writes checkpoints/ into the working directory
    model = tiny
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


def test_bad_loss_input(tiny):
    rows = mixed_rows()
    feats, labels = collate(tiny, rows)
    with pytest.raises(ValueError, match=r"STS scores must lie in sts_score_range=\(0.0, 1.0\)"):
        CrossGPUBalancingLoss(tiny, sts_score_range=(0.0, 1.0))(feats, labels)
    with pytest.raises(ValueError, match=r"retrieval_ranks must be in \[1, 1\]"):
        CrossGPUBalancingLoss(tiny, retrieval_ranks=2)(feats, labels)
    with pytest.raises(ValueError, match="expected columns"):
        CrossGPUBalancingLoss(tiny)(feats[:1] + feats[-2:], labels)
    with pytest.raises(ValueError, match="sts_weight must be a finite number >= 0"):
        CrossGPUBalancingLoss(tiny, sts_weight=-1)
