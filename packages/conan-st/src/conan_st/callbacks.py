"""DynamicHardNegativeMiningCallback: Conan's dynamic hard-negative mining as a trainer callback."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

import shared_dist

from .mining import NegativeStore, corpus_from_pairs, dynamic_negatives_dataset, mine_candidates, rescore

logger = logging.getLogger(__name__)


class DynamicHardNegativeMiningCallback(TrainerCallback):
    """Keeps hard negatives hard while training runs (Conan-embedding, section 3.2).

    Every ``interval`` steps an example whose negatives satisfy
    ``ratio · S_cur < S_init`` and ``|S_cur| < abs_bound`` moves to its next window of
    candidate ranks ``[(i−1)·n + skip, i·n + skip)``. The training dataset built by
    :meth:`train_dataset` reads every row's negatives from the store when the row is loaded,
    so the running dataloader serves the new negatives right away.

    Works on every rank: observations are gathered through ``shared_dist`` before each check,
    so every rank makes the same decisions. The store is saved into each checkpoint
    (``dhnm_store.safetensors``) and restored when training resumes from one.

    Args:
        store: the :class:`~conan_st.mining.NegativeStore` (see :meth:`from_pairs`).
        queries, corpus: texts of the examples' queries and of the candidate documents.
        loss: a :class:`~conan_st.CrossGPUBalancingLoss`; with ``score_source="loss"`` its
            similarities give S_cur for free.
        interval: steps between checks (100 in the paper).
        ratio, abs_bound: the rule's 1.15 and 0.8.
        score_source: ``"loss"`` (free: scores of the rows the loss saw since the last check)
            or ``"rescore"`` (re-embed the queries and current negatives of every example, or of
            ``rescore_sample`` random ones, at each check).
    """

    def __init__(
        self,
        store: NegativeStore,
        queries: list[str],
        corpus: list[str],
        loss: Any | None = None,
        interval: int = 100,
        ratio: float = 1.15,
        abs_bound: float = 0.8,
        score_source: str = "loss",
        rescore_sample: int | None = None,
        batch_size: int = 64,
    ) -> None:
        if score_source not in ("loss", "rescore"):
            raise ValueError(f"score_source must be 'loss' or 'rescore', got {score_source!r}")
        if score_source == "loss" and loss is None:
            raise ValueError(
                "score_source='loss' needs the loss (a CrossGPUBalancingLoss) to read scores from"
            )
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if len(queries) != len(store):
            raise ValueError(f"{len(queries)} queries for a store of {len(store)} examples")
        self.store, self.queries, self.corpus = store, queries, corpus
        self.interval, self.ratio, self.abs_bound = interval, ratio, abs_bound
        self.score_source, self.rescore_sample, self.batch_size = score_source, rescore_sample, batch_size
        self.history: list[dict[str, float]] = []
        self._pending: dict[int, float] = {}
        self.loss = loss
        if loss is not None and score_source == "loss":
            loss.score_observer = self._observe

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pairs(
        cls,
        model,
        pairs: Dataset,
        num_negatives: int = 8,
        depth: int = 100,
        skip: int = 10,
        extra_documents: list[str] | None = None,
        miner=None,
        backend: str | None = None,
        positive_ratio: float | None = None,
        end_policy: str = "stay",
        **kwargs: Any,
    ) -> DynamicHardNegativeMiningCallback:
        """Mine candidate lists for (anchor, positive) ``pairs`` and build the callback.

        The corpus is the deduplicated positives plus ``extra_documents``; candidates come from
        ``miner`` (default: ``model``, the model being trained) through the search backend.
        """
        missing = [c for c in ("anchor", "positive") if c not in pairs.column_names]
        if missing:
            raise ValueError(f"pairs dataset is missing columns {missing}")
        if len(pairs) == 0:
            raise ValueError("pairs dataset is empty")
        corpus, positives = corpus_from_pairs(pairs, extra_documents)
        usable = len(corpus) - max(len(p) for p in positives)
        if usable < skip + num_negatives:
            raise ValueError(
                f"the corpus ({len(corpus)} documents) is smaller than one window: skip={skip} + "
                f"num_negatives={num_negatives} candidates are needed beyond each query's positives"
            )
        cand, scores = mine_candidates(
            miner or model,
            list(pairs["anchor"]),
            corpus,
            positives,
            depth=depth,
            backend=backend,
            positive_ratio=positive_ratio,
        )
        store = NegativeStore(cand, num_negatives, skip, end_policy, candidate_scores=scores)
        return cls(store, list(pairs["anchor"]), corpus, **kwargs)

    def train_dataset(self, pairs: Dataset, balanced: bool = True) -> Dataset:
        """``pairs`` with negatives read live from the store (for ``make_balanced_datasets``)."""
        return dynamic_negatives_dataset(pairs, self.store, self.corpus, balanced)

    # ------------------------------------------------------------------ observations

    def _observe(self, example_ids: torch.Tensor, scores: torch.Tensor) -> None:
        for i, s in zip(example_ids.tolist(), scores.tolist()):
            self._pending[i] = s

    def check_now(self, model=None) -> dict[str, float]:
        """Sync observations across ranks, apply the rule, return the check's summary."""
        if self.score_source == "rescore":
            if model is None:
                raise ValueError("score_source='rescore' needs the model at check time")
            ids = list(range(len(self.store)))
            if self.rescore_sample and self.rescore_sample < len(ids):
                g = torch.Generator().manual_seed(len(self.history))
                ids = torch.randperm(len(ids), generator=g)[: self.rescore_sample].sort().values.tolist()
            was_training = model.training
            model.eval()
            s = rescore(model, self.store, self.queries, self.corpus, ids, self.batch_size)
            model.train(was_training)
            self._pending.update(zip(ids, s.tolist()))
        merged: dict[int, list[float]] = {}
        for part in shared_dist.gather_object(self._pending):
            for i, s in part.items():
                merged.setdefault(i, []).append(s)
        self._pending = {}
        if merged:
            ids = torch.tensor(sorted(merged))
            vals = torch.tensor([sum(merged[i]) / len(merged[i]) for i in sorted(merged)])
            self.store.observe(ids, vals)
        summary = self.store.check(self.ratio, self.abs_bound)
        summary["observed"] = len(merged)
        return summary

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming: restore the windows saved with that checkpoint
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.store.load_state(ckpt)
            logger.info("restored negative-mining state from %s", ckpt)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.interval:
            return
        summary = self.check_now(kwargs.get("model"))
        record = {"step": state.global_step, **{f"dhnm/{k}": v for k, v in summary.items()}}
        self.history.append(record)
        state.log_history.append(record)
        logger.info(
            "step %d: %d of %d observed examples advanced (mean S_init %.3f, S_cur %.3f)",
            state.global_step,
            summary["advanced"],
            summary["checked"],
            summary["mean_s_init"] if not math.isnan(summary["mean_s_init"]) else float("nan"),
            summary["mean_s_cur"],
        )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.store.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")
