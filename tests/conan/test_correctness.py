"""conan-st in the configurations users run: every rank trains, no false negatives, bound
negatives, checked query sharing (the correctness issue, item by item; the mining callback's own
cases, exact resume included, are in test_callbacks.py)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from conan_st import (
    CrossGPUBalancingLoss,
    DynamicHardNegativeMiningCallback,
    TaskBalancedBatchSampler,
    make_balanced_datasets,
)
from conan_st.builtin_plugins import PositiveRatioFilter
from conan_st.labels import MAX_EXAMPLE_ID, id_to_label, label_to_id
from shared_dist import DistributedOperationError
from shared_dist.testing import launch
from tests.conan.helpers import PAIRS, Recorder, load_tiny, mining_callback, shared_passage_pairs, sts_rows

ENV = {"CONAN_ST_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train(model, cfg: dict, out: str) -> dict:
    loss = CrossGPUBalancingLoss(model, retrieval_ranks=cfg.get("r"))
    rec = Recorder(loss)
    args = SentenceTransformerTrainingArguments(
        output_dir=out,
        num_train_epochs=cfg.get("epochs", 1),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-6,
        per_device_train_batch_size=cfg["pdbs"],
        dataloader_num_workers=cfg["workers"],
        dataloader_drop_last=cfg["drop_last"],
        batch_sampler=cfg.get("batch_sampler", "batch_sampler"),
        use_cpu=True,
        multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(
            retrieval_batch_size=cfg["ret"], sts_batch_size=cfg["sts"], retrieval_ranks=cfg.get("r")
        ),
    )
    train = make_balanced_datasets(shared_passage_pairs(), sts_rows())
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)
    trainer.train()
    return {"global_step": trainer.state.global_step, "steps": rec.steps}


def _w_trainer(model_path: str, configs: list[dict]) -> list[dict]:
    os.environ["ACCELERATE_USE_CPU"] = "true"
    model = load_tiny(model_path)
    return [_train(model, cfg, tempfile.mkdtemp()) for cfg in configs]


def _expected_steps(cfg: dict, world: int = 1, rows: int = 36) -> int:
    # the trainer turns dataloader_drop_last on under DDP (it says so); the sampler follows it
    drop_last = cfg["drop_last"] or world > 1
    full, rest = divmod(rows, cfg["ret"])
    return (full + int(bool(rest) and not drop_last)) * cfg.get("epochs", 1)


def _assert_no_false_negatives(step: dict) -> None:
    """No row's anchor or positive appears in another row (as anchor, positive or negative)."""
    rows = list(zip(step["anchor"], step["positive"], *step["negatives"]))
    for i, (a, p, *_) in enumerate(rows):
        for j, other in enumerate(rows):
            if i != j:
                assert a not in other and p not in other, (i, j, rows)


# ------------------------------------------------------------------ one launch per world size


def _w_cases(model_path: str, names: list[str]) -> dict:
    """This file's cases for one world size, in order, on the same processes."""
    workers = {
        "trainer": lambda: _w_trainer(model_path, CONFIGS[dist.get_world_size()]),
        "rescore": lambda: _w_sharded_rescore(model_path),
        "queries": lambda: _w_loss_with_rank_queries(model_path),
    }
    return {name: workers[name]() for name in names}


@pytest.fixture(scope="module")
def ran(tiny_path):
    """``ran(world, case)``: the per-rank results of a case; each world size launched once."""
    cases = {2: ["trainer", "rescore", "queries"], 3: ["trainer"]}
    results = {}

    def get(world: int, name: str) -> list:
        if world not in results:  # on first use: a -k selection of 3-process tests launches 3 only
            per_rank = launch(_w_cases, world, (tiny_path, cases[world]), timeout=480, env=ENV)
            results[world] = {n: [rank[n] for rank in per_rank] for n in cases[world]}
        return results[world][name]

    return get


# README sizes (retrieval 4, STS 32, trainer batch left at its default 8) and unequal ones:
# per_device_train_batch_size never matches a rank's batch length, some epochs end short.
CONFIGS = {
    2: [
        {"ret": 4, "sts": 32, "pdbs": 8, "workers": 0, "drop_last": False},
        {"ret": 5, "sts": 8, "pdbs": 4, "workers": 2, "drop_last": False, "r": 2},
        {"ret": 5, "sts": 3, "pdbs": 16, "workers": 0, "drop_last": True, "batch_sampler": "no_duplicates"},
    ],
    3: [
        {"ret": 4, "sts": 32, "pdbs": 8, "workers": 2, "drop_last": True},
        {"ret": 3, "sts": 7, "pdbs": 2, "workers": 0, "drop_last": False, "r": 2},  # m = 2 splits over 2
        {"ret": 5, "sts": 3, "pdbs": 8, "workers": 0, "drop_last": True, "r": 1},
    ],
}


@pytest.mark.distributed
@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", [2, 3])
def test_trainer_runs_every_step_without_false_negatives(world, ran):
    results = ran(world, "trainer")
    for c, cfg in enumerate(CONFIGS[world]):
        r = cfg.get("r") or world - 1
        expected = _expected_steps(cfg, world)
        per_rank = [res[c] for res in results]
        assert [x["global_step"] for x in per_rank] == [expected] * world, cfg
        assert all(len(x["steps"]) == expected for x in per_rank), cfg
        full = sum(len(x["anchor"]) == cfg["ret"] for x in per_rank[0]["steps"])
        assert full >= expected - 2, cfg  # short batches only where the data leaves no choice
        for s in range(expected):
            steps = [x["steps"][s] for x in per_rank]
            for k in range(r):  # retrieval ranks: the same queries, the whole step's retrieval rows
                assert (
                    steps[k]["anchor"] == steps[0]["anchor"] and steps[k]["positive"] == steps[0]["positive"]
                )
            assert all(not steps[k]["anchor"] for k in range(r, world)), cfg
            assert all(steps[k]["sts"] == cfg["sts"] for k in range(world) if k >= r or r == world), cfg
            assert 1 <= len(steps[0]["anchor"]) <= cfg["ret"]
            _assert_no_false_negatives(steps[0])
            if cfg.get("batch_sampler") == "no_duplicates":  # no text repeats at all
                texts = [
                    t
                    for row in zip(steps[0]["anchor"], steps[0]["positive"], *steps[0]["negatives"])
                    for t in row
                ]
                assert len(texts) == len(set(texts)), cfg


def test_single_process_trainer_steps_and_epochs(tiny, tmp_path):
    cfg = {"ret": 5, "sts": 4, "pdbs": 3, "workers": 0, "drop_last": False, "epochs": 2}
    res = _train(tiny, cfg, str(tmp_path))
    assert res["global_step"] == len(res["steps"]) == _expected_steps(cfg) == 16
    for step in res["steps"]:
        _assert_no_false_negatives(step)
        assert step["sts"] == 4


def test_single_process_trainer_retrieval_only(tiny, tmp_path):
    """sts_batch_size=0 trains retrieval alone through the trainer (no STS rows, finite loss)."""
    cfg = {"ret": 5, "sts": 0, "pdbs": 3, "workers": 0, "drop_last": True}
    res = _train(tiny, cfg, str(tmp_path))
    assert res["global_step"] == len(res["steps"]) == _expected_steps(cfg) == 7
    for step in res["steps"]:
        _assert_no_false_negatives(step)
        assert step["sts"] == 0 and len(step["anchor"]) == 5


# ------------------------------------------------------------------ item 3: bound negatives


def _w_sharded_rescore(model_path: str) -> dict:
    from conan_st import callbacks

    model = load_tiny(model_path)
    cb = mining_callback(model, score_source="rescore")
    asked: list[list[int]] = []
    real = callbacks.rescore

    def spy(*args):  # the real re-scoring, recording which examples this rank re-embeds
        asked.append(list(args[4]))
        return real(*args)

    callbacks.rescore = spy
    cb.check_now(model)
    return {"asked": asked, "s_cur": cb.store.s_cur.tolist()}


@pytest.mark.timeout(300)
def test_rescoring_is_sharded_across_ranks_and_merged(ran, tiny_path):
    ranks = ran(2, "rescore")
    n = len(PAIRS)
    assert [r["asked"] for r in ranks] == [[list(range(0, n, 2))], [list(range(1, n, 2))]]
    assert ranks[0]["s_cur"] == ranks[1]["s_cur"]  # every rank decides on the same merged scores
    model = load_tiny(tiny_path)
    single = mining_callback(model, score_source="rescore")
    single.check_now(model)
    torch.testing.assert_close(torch.tensor(ranks[0]["s_cur"]), single.store.s_cur, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ item 4: shared queries checked


def _w_loss_with_rank_queries(model_path: str) -> dict:
    """The same step with the same queries on both ranks, then with each rank's own queries."""
    import torch.distributed as dist

    from tests.conan.helpers import collate

    model = load_tiny(model_path)
    out = {}
    for same in (True, False):
        k = 0 if same else dist.get_rank()
        rows = [
            {
                "anchor": f"query {k}-{i}",
                "positive": f"doc {k}-{i}",
                "negative_1": f"n{i}a",
                "negative_2": f"n{i}b",
            }
            for i in range(3)
        ]
        feats, _ = collate(model, rows)
        loss = CrossGPUBalancingLoss(model, retrieval_ranks=2)
        try:
            out[same] = float(loss(feats, None)["retrieval"])
        except DistributedOperationError as err:
            out[same] = str(err)
    return out


@pytest.mark.distributed
def test_loss_refuses_retrieval_ranks_with_different_queries(ran):
    ranks = ran(2, "queries")
    assert all(isinstance(r[True], float) and math.isfinite(r[True]) for r in ranks)
    assert all(
        isinstance(r[False], str) and "retrieval ranks hold different queries" in r[False] for r in ranks
    )


# ------------------------------------------------------------------ item 7


def test_example_ids_travel_exactly_beyond_float32_integers():
    ids = torch.tensor([0, 1, 2**24 - 1, 2**24 + 1, 123_456_789, MAX_EXAMPLE_ID])
    labels = torch.tensor([id_to_label(i) for i in ids.tolist()])  # float32, as the collator builds it
    assert labels.dtype == torch.float32
    assert torch.equal(label_to_id(labels), ids)
    with pytest.raises(ValueError, match="example ids must be in"):
        id_to_label(MAX_EXAMPLE_ID + 1)


def test_positive_ratio_filter_follows_relative_margin_for_negative_positives():
    keep = PositiveRatioFilter(0.95)
    scores = torch.tensor([[0.94, 0.96], [-0.51, -0.49]])
    pos = torch.tensor([1.0, -0.5])
    # positive 1.0: threshold 0.95; positive -0.5: threshold -0.5 - 0.025 = -0.525 (below the positive)
    assert keep(scores, pos).tolist() == [[True, False], [False, False]]
    assert keep(torch.tensor([[-0.53]]), torch.tensor([-0.5])).tolist() == [[True]]


def test_model_card_shows_each_task_its_columns_and_ids_as_ids(tiny, tmp_path):
    pairs = shared_passage_pairs().select_columns(["anchor", "positive"])
    loss = CrossGPUBalancingLoss(tiny)
    mining = DynamicHardNegativeMiningCallback.from_pairs(
        tiny, pairs, num_negatives=2, skip=2, loss=loss, interval=2
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(
            retrieval_batch_size=4, sts_batch_size=4
        ),
    )
    train = make_balanced_datasets(mining.train_dataset(pairs), sts_rows())
    SentenceTransformerTrainer(
        model=tiny, args=args, train_dataset=train, loss=loss, callbacks=[mining]
    ).train()
    tiny.save_pretrained(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    retrieval = card[card.index("#### retrieval") : card.index("#### sts")]
    sts = card[card.index("#### sts") :]
    assert "-1000000" not in card  # the float32 id labels are not shown as scores
    assert "example id (not a similarity score)" in retrieval and "<code>0</code>" in retrieval
    assert "sentence1" not in retrieval and "<code></code>" not in retrieval
    assert "* Columns: <code>sentence1</code>, <code>sentence2</code>, and <code>score</code>" in sts
    assert "anchor" not in sts.split("* Loss")[0]


def test_model_card_loss_only_layout_drops_the_nan_marker():
    from conan_st.model_card import tidy_dataset_info

    stats = {c: {"dtype": "string", "data": {}} for c in ("anchor", "positive", "sentence1", "sentence2")}
    info = {
        "_example_columns": ["anchor", "positive", "sentence1", "sentence2", "score"],
        "examples": {
            "anchor": ["q"],
            "positive": ["p"],
            "sentence1": [""],
            "sentence2": [""],
            "score": [math.nan],
        },
        "stats": {**stats, "score": {"dtype": "float", "data": {"min": math.nan}}},
    }
    assert tidy_dataset_info(info)
    assert info["_example_columns"] == ["anchor", "positive"] and "score" not in info["stats"]
    assert not tidy_dataset_info({"_example_columns": ["text"], "examples": {"text": ["a"]}, "stats": {}})
