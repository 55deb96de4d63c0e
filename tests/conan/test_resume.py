"""conan-st training (CrossGPUBalancingLoss + dynamic mining, inside SentenceTransformerTrainer)
killed with SIGKILL and resumed from ``last_complete_checkpoint`` gives the uninterrupted run,
to the bit (CPU): the same weights, the same log, the same mining history — also when the kill
lands after the weights were saved but before trainer_state.json (which holds the mining store)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conan_st import last_complete_checkpoint
from tests.helpers import run_in_new_process

STEPS = 8  # 24 pairs in batches of 8: 3 steps an epoch; mining checks at 3 and 6; saves every 2


def _train(out: str, kill: str, model_path: str) -> None:
    """The training command, in a process of its own: ``STEPS`` steps of the tiny model, saving every 2,
    resumed from the last complete checkpoint; ``kill`` ("step:N", "save:N", "state:N" or "none") says
    where it kills -9 itself."""
    import signal

    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import TrainerState

    from conan_st import (
        CrossGPUBalancingLoss,
        DynamicHardNegativeMiningCallback,
        TaskBalancedBatchSampler,
        make_balanced_datasets,
    )
    from tests.conan.helpers import DOCS, PAIRS, load_tiny, sts_rows

    where, _, at = kill.partition(":")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class KillMidStep(TrainerCallback):  # after the optimiser step, before any save of that step
        def on_step_end(self, args, state, control, **kwargs):
            if where == "step" and state.global_step == int(at):
                die()

    if where == "save":  # weights, optimiser and RNG written; trainer_state.json (the store) not yet
        real_rng = Trainer._save_rng_state

        def rng_then_die(self, output_dir):
            real_rng(self, output_dir)
            if self.state.global_step == int(at):
                die()

        Trainer._save_rng_state = rng_then_die
    if where == "state":  # trainer_state.json half written
        real_json = TrainerState.save_to_json

        def half_then_die(self, path):
            real_json(self, path)
            if self.global_step == int(at):
                text = Path(path).read_text()
                Path(path).write_text(text[: len(text) // 2])
                die()

        TrainerState.save_to_json = half_then_die

    torch.manual_seed(0)
    model = load_tiny(model_path)  # the mechanics of resume, not MiniLM's quality
    loss = CrossGPUBalancingLoss(model)
    cb = DynamicHardNegativeMiningCallback.from_pairs(
        model, PAIRS, num_negatives=2, depth=30, skip=10, extra_documents=DOCS, loss=loss,
        interval=3, ratio=1e-6, abs_bound=1.0,  # every example seen is "easy": windows move
    )  # fmt: skip
    args = SentenceTransformerTrainingArguments(
        output_dir=out, max_steps=STEPS, report_to=[], disable_tqdm=True, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=2, seed=0,
        multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(retrieval_batch_size=8, sts_batch_size=4),
    )  # fmt: skip
    train = make_balanced_datasets(cb.train_dataset(PAIRS), sts_rows())
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=loss, callbacks=[cb, KillMidStep()]
    )
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))


def _job(out, model_path: str, kill: str = "none") -> int:
    return run_in_new_process(_train, str(out), kill, model_path, timeout=300)


def _final(out):
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    runtime = (
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "total_flos",
        "train_loss",
    )
    logs = [{k: v for k, v in h.items() if k not in runtime} for h in state["log_history"]]
    weights = load_file(str(out / f"checkpoint-{STEPS}" / "model.safetensors"))
    return weights, logs, state["stateful_callbacks"]["DynamicHardNegativeMiningCallback"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _job(out, tiny_path) == 0
    return _final(out)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "kill,resumes_from",
    [("step:5", 4), ("step:7", 6), ("save:6", 4), ("state:6", 4)],
    ids=["mid-step-5", "mid-step-7", "after-weights-before-store", "store-half-written"],
)
def test_killed_training_resumes_bit_exactly(kill, resumes_from, uninterrupted, tmp_path, tiny_path):
    assert _job(tmp_path, tiny_path, kill) == -9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{resumes_from}")
    if kill.startswith(("save", "state")):  # the half-written checkpoint-6 is skipped, with the reason
        assert [str(w.message) for w in caught] and "checkpoint-6" in str(caught[0].message)
    assert _job(tmp_path, tiny_path) == 0
    weights, logs, store = _final(tmp_path)
    ref_weights, ref_logs, ref_store = uninterrupted
    assert weights.keys() == ref_weights.keys() and all(
        torch.equal(weights[k], ref_weights[k]) for k in weights
    )
    assert json.dumps(logs, sort_keys=True) == json.dumps(ref_logs, sort_keys=True)
    assert [h["step"] for h in logs if "loss" in h] == list(range(1, STEPS + 1))  # none twice, none lost
    assert json.dumps(store, sort_keys=True) == json.dumps(ref_store, sort_keys=True)
    assert any(h.get("dhnm/advanced", 0) > 0 for h in ref_logs)  # the windows did move


def test_last_complete_checkpoint_skips_what_cannot_be_resumed(tmp_path):
    def ckpt(step, state=True, weights=b"ok"):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if weights is not None:
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
            if weights != b"ok":
                (folder / "model.safetensors").write_bytes(weights)
        return folder

    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None
    ckpt(2)
    ckpt(10)
    ckpt(12, state=False)
    (ckpt(14) / "trainer_state.json").write_text('{"global_step": 1')
    ckpt(16, weights=b"\x00\x01")
    (ckpt(18) / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    ckpt(20, weights=None)
    (tmp_path / "checkpoint-30.tmp").mkdir()
    (tmp_path / "checkpoint-40").write_text("a file, not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # 10 before 2
    reasons = [str(w.message) for w in caught]
    assert len(reasons) == 5
    for step, why in [
        (20, "no model weights"),
        (18, "is for step 4"),
        (16, "model.safetensors is damaged"),
        (14, "cut short or damaged"),
        (12, "no trainer_state.json"),
    ]:
        assert any(f"checkpoint-{step}:" in r and why in r for r in reasons), (step, reasons)
    assert (tmp_path / "checkpoint-12").is_dir()  # skipped, never deleted


def test_last_complete_checkpoint_wants_every_ranks_rng_state(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    def ckpt(step, ranks, cut=None):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        for r in ranks:
            torch.save({"cpu": torch.random.get_rng_state()}, folder / f"rng_state_{r}.pth")
        if cut is not None:
            path = folder / f"rng_state_{cut}.pth"
            path.write_bytes(path.read_bytes()[:100])

    ckpt(4, [0, 1])
    ckpt(6, [0, 1], cut=1)
    ckpt(8, [0])  # killed before rank 1 saved its RNG state; rank 0 had written trainer_state.json
    monkeypatch.setenv("WORLD_SIZE", "2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    reasons = " | ".join(str(w.message) for w in caught)
    assert (
        "checkpoint-8: no rng_state_1.pth" in reasons
        and "checkpoint-6: rng_state_1.pth is cut short" in reasons
    )
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process resume of a two-process run: transformers' call
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # quality_experiment resumes from quality.json: a kill mid-write must leave the previous file
    from conan_st.checkpoints import write_text_atomic

    path = tmp_path / "quality.json"
    write_text_atomic(path, '{"done": 1}')

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"done": 2, "cut": "here')
    assert json.loads(path.read_text()) == {"done": 1}
    monkeypatch.undo()
    write_text_atomic(path, '{"done": 2}')
    assert json.loads(path.read_text()) == {"done": 2} and sorted(p.name for p in tmp_path.iterdir()) == [
        "quality.json"
    ]
