"""conan-st in the configurations users run: every rank trains, no false negatives, bound
negatives, checked query sharing, exact resume (the correctness issue, item by item)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from conan_st import (
    CrossGPUBalancingLoss,
    DynamicHardNegativeMiningCallback,
    NegativeStore,
    TaskBalancedBatchSampler,
    make_balanced_datasets,
)
from conan_st.builtin_plugins import PositiveRatioFilter
from conan_st.labels import MAX_EXAMPLE_ID, id_to_label, label_to_id
from shared_dist import DistributedOperationError
from shared_dist.testing import launch
from tests.conan.helpers import DOCS, PAIRS, load_tiny, shared_passage_pairs, sts_rows

ENV = {"CONAN_ST_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class _Recorder:
    """Wraps the loss's row split: what each forward call really trained on, as texts."""

    def __init__(self, loss: CrossGPUBalancingLoss) -> None:
        self.steps: list[dict] = []
        tokenizer = loss.model.tokenizer
        original = loss._split_rows

        def spy(features, labels):
            ret, sts = original(features, labels)
            rows = ret.nonzero().flatten()
            decode = lambda f: tokenizer.batch_decode(f["input_ids"][rows], skip_special_tokens=True)  # noqa: E731
            n_cols = len(features) - (2 if labels is not None else 0)
            cols = [decode(f) for f in features[:n_cols]]
            self.steps.append(
                {"anchor": cols[0], "positive": cols[1], "negatives": cols[2:], "sts": int(sts.sum())}
            )
            return ret, sts

        loss._split_rows = spy


def _train(model, cfg: dict, out: str) -> dict:
    loss = CrossGPUBalancingLoss(model, retrieval_ranks=cfg.get("r"))
    rec = _Recorder(loss)
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


def _callback(model, loss=None, **kw):
    return DynamicHardNegativeMiningCallback.from_pairs(
        model, PAIRS, num_negatives=2, depth=30, skip=10, extra_documents=DOCS, loss=loss, **kw
    )


def test_train_dataset_refuses_pairs_it_was_not_mined_for(tiny):
    cb = _callback(tiny, score_source="rescore")
    assert len(cb.train_dataset(PAIRS)) == 24
    with pytest.raises(ValueError, match="anchor of row 0 differs"):
        cb.train_dataset(PAIRS.shuffle(seed=1))
    other = PAIRS.map(lambda r: {"positive": r["positive"] + "!"})
    with pytest.raises(ValueError, match="positive of row 0 differs"):
        cb.train_dataset(other)
    with pytest.raises(ValueError, match="23 rows given, 24 mined"):
        cb.train_dataset(PAIRS.select(range(23)))


def _w_sharded_rescore(model_path: str) -> dict:
    from conan_st import callbacks

    model = load_tiny(model_path)
    cb = _callback(model, score_source="rescore")
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
    single = _callback(model, score_source="rescore")
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


# ------------------------------------------------------------------ item 6: exact resume


def _mining_trainer(model, loss, cb, out, steps, save_steps):
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        report_to=[],
        disable_tqdm=True,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        seed=0,
        multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(
            retrieval_batch_size=8, sts_batch_size=4
        ),
    )
    train = make_balanced_datasets(cb.train_dataset(PAIRS), sts_rows())
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss, callbacks=[cb])


def _run(model_path, tmp, steps, resume=None, save_steps=4):
    torch.manual_seed(0)
    model = load_tiny(model_path)
    loss = CrossGPUBalancingLoss(model)
    # tiny ratio: every observed example with S_init > 0 is "easy" at the next check, so windows move
    cb = _callback(model, loss, interval=3, ratio=1e-6, abs_bound=1.0)
    trainer = _mining_trainer(model, loss, cb, tmp, steps, save_steps)
    trainer.train(resume_from_checkpoint=resume)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    logs = [
        {
            k: v
            for k, v in h.items()
            if k not in ("train_runtime", "train_samples_per_second", "train_steps_per_second")
        }
        for h in trainer.state.log_history
    ]
    return cb, weights, logs


def test_resume_from_a_moved_checkpoint_is_exact(tmp_path, tiny_path):
    # 24 pairs / 8 = 3 steps an epoch; checks at 3 and 6; the checkpoint at 4 lies mid-epoch,
    # between checks, with observations pending: the hard case
    full_cb, full_w, full_logs = _run(tiny_path, tmp_path / "full", 7)
    _run(tiny_path, tmp_path / "part", 4)
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(tmp_path / "part" / "checkpoint-4", moved)
    shutil.rmtree(tmp_path / "part")
    res_cb, res_w, res_logs = _run(tiny_path, tmp_path / "resumed", 7, resume=str(moved))
    assert json.dumps(full_cb.history, sort_keys=True) == json.dumps(res_cb.history, sort_keys=True)
    assert len(full_cb.history) == 2
    assert all(h["dhnm/advanced"] > 0 for h in full_cb.history)
    for name in ("window", "served", "s_init", "s_cur", "assignments"):
        a, b = getattr(full_cb.store, name), getattr(res_cb.store, name)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    for k in full_w:
        assert torch.equal(full_w[k], res_w[k]), k
    steps = lambda logs: {h["step"]: h for h in logs if "loss" in h}  # noqa: E731
    # the resumed run's log: steps 1-4 restored from the checkpoint, 5-7 trained again; all identical
    assert json.dumps(steps(full_logs), sort_keys=True) == json.dumps(steps(res_logs), sort_keys=True)
    assert sorted(steps(res_logs)) == list(range(1, 8))
    assert any("dhnm/advanced" in h for h in full_logs)  # check statistics reach the trainer's logs


def test_moved_windows_are_served_from_the_next_pass(tiny, tmp_path):
    loss = CrossGPUBalancingLoss(tiny)
    rec = _Recorder(loss)
    cb = _callback(tiny, loss, interval=3, ratio=1e-6, abs_bound=1.0)
    # 3 steps an epoch: the check at step 3 moves windows; step 4 opens the next pass
    _mining_trainer(tiny, loss, cb, tmp_path, 4, 100).train()
    assert cb.history[0]["dhnm/advanced"] > 0 and int(cb.store.window.sum()) == cb.history[0]["dhnm/advanced"]
    assert torch.equal(cb.store.served, cb.store.window)
    anchors = list(PAIRS["anchor"])
    for step, want_window in ((rec.steps[0], 0), (rec.steps[3], None)):
        for a, *negs in zip(step["anchor"], *step["negatives"]):
            i = next(k for k, q in enumerate(anchors) if q.lower().replace("?", " ?") == a or q.lower() == a)
            w = int(cb.store.window[i]) if want_window is None else want_window
            start, stop = cb.store.window_span(i, w)
            assert tuple(negs) == tuple(cb.corpus[j] for j in cb.store.candidates[i, start:stop].tolist())


def test_resume_refuses_a_store_of_other_candidates(tmp_path, tiny):
    cb = _callback(tiny, score_source="rescore")
    state = cb.state()["attributes"]["store"]
    other = DynamicHardNegativeMiningCallback.from_pairs(
        tiny, PAIRS, num_negatives=3, depth=30, skip=10, extra_documents=DOCS, score_source="rescore"
    )
    with pytest.raises(ValueError, match="made for other candidate lists"):
        other.store.load_state_dict(state)


# ------------------------------------------------------------------ item 7


def test_example_ids_travel_exactly_beyond_float32_integers():
    ids = torch.tensor([0, 1, 2**24 - 1, 2**24 + 1, 123_456_789, MAX_EXAMPLE_ID])
    labels = torch.tensor([id_to_label(i) for i in ids.tolist()])  # float32, as the collator builds it
    assert labels.dtype == torch.float32
    assert torch.equal(label_to_id(labels), ids)
    with pytest.raises(ValueError, match="example ids must be in"):
        id_to_label(MAX_EXAMPLE_ID + 1)


def test_observation_of_a_row_served_under_an_older_window_is_dropped():
    cands = torch.arange(30).repeat(2, 1)
    store = NegativeStore(cands, 5, 10)
    cb = DynamicHardNegativeMiningCallback(
        store, ["q0", "q1"], [f"d{i}" for i in range(30)], score_source="rescore"
    )
    store.window[0] = 1  # example 0's window moved after this pass began (served is still 0)
    cb._observe(torch.tensor([0, 1]), torch.tensor([0.5, 0.4]))
    assert cb._pending == {1: pytest.approx(0.4)}
    store.snapshot()  # next pass: example 0 is served its new window, and its scores count again
    assert store.served_negatives(0) == store.negatives(0) == list(range(15, 20))
    cb._observe(torch.tensor([0]), torch.tensor([0.3]))
    assert 0 in cb._pending


def test_check_statistics_reach_a_tracker_callback(tiny, tmp_path):
    seen = []

    class Tracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    loss = CrossGPUBalancingLoss(tiny)
    cb = _callback(tiny, loss, interval=2)
    trainer = _mining_trainer(tiny, loss, cb, tmp_path, 4, 100)
    trainer.add_callback(Tracker())
    trainer.train()
    stats = [h for h in seen if "dhnm/advanced" in h]
    assert len(stats) == 2 and all("dhnm/observed" in h for h in stats)


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
