"""`DynamicHardNegativeMiningCallback` (conan_st/callbacks.py) inside SentenceTransformerTrainer: the
train dataset it serves, windows moved at a check and served from the next pass, exact resume from a
moved checkpoint, its statistics reaching the trainer's log and trackers. Its 2-process re-scoring is
in test_correctness.py (one launch per world size there)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import TrainerCallback

from conan_st import (
    CrossGPUBalancingLoss,
    DynamicHardNegativeMiningCallback,
    NegativeStore,
    TaskBalancedBatchSampler,
    make_balanced_datasets,
)
from tests.conan.helpers import DOCS, PAIRS, Recorder, load_tiny, mining_callback, sts_rows


def test_train_dataset_refuses_pairs_it_was_not_mined_for(tiny):
    cb = mining_callback(tiny, score_source="rescore")
    assert len(cb.train_dataset(PAIRS)) == 24
    with pytest.raises(ValueError, match="anchor of row 0 differs"):
        cb.train_dataset(PAIRS.shuffle(seed=1))
    other = PAIRS.map(lambda r: {"positive": r["positive"] + "!"})
    with pytest.raises(ValueError, match="positive of row 0 differs"):
        cb.train_dataset(other)
    with pytest.raises(ValueError, match="23 rows given, 24 mined"):
        cb.train_dataset(PAIRS.select(range(23)))


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
    cb = mining_callback(model, loss, interval=3, ratio=1e-6, abs_bound=1.0)
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
    rec = Recorder(loss)
    cb = mining_callback(tiny, loss, interval=3, ratio=1e-6, abs_bound=1.0)
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
    cb = mining_callback(tiny, score_source="rescore")
    state = cb.state()["attributes"]["store"]
    other = DynamicHardNegativeMiningCallback.from_pairs(
        tiny, PAIRS, num_negatives=3, depth=30, skip=10, extra_documents=DOCS, score_source="rescore"
    )
    with pytest.raises(ValueError, match="made for other candidate lists"):
        other.store.load_state_dict(state)


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
    cb = mining_callback(tiny, loss, interval=2)
    trainer = _mining_trainer(tiny, loss, cb, tmp_path, 4, 100)
    trainer.add_callback(Tracker())
    trainer.train()
    stats = [h for h in seen if "dhnm/advanced" in h]
    assert len(stats) == 2 and all("dhnm/observed" in h for h in stats)
