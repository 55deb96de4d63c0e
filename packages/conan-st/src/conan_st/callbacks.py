"""DynamicHardNegativeMiningCallback: Conan's dynamic hard-negative mining as a trainer callback."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

import shared_dist

from .mining import NegativeStore, corpus_from_pairs, dynamic_negatives_dataset, mine_candidates, rescore
from .model_card import tidy_model_card_data

logger = logging.getLogger(__name__)


class DynamicHardNegativeMiningCallback(TrainerCallback, ExportableState):
    """Keeps hard negatives hard while training runs (Conan-embedding, section 3.2).

    Every ``interval`` steps an example whose negatives satisfy
    ``ratio · S_cur < S_init`` and ``|S_cur| < abs_bound`` moves to its next window of
    candidate ranks ``[(i−1)·n + skip, i·n + skip)``. The training dataset built by
    :meth:`train_dataset` reads every row's negatives from the store when the row is loaded;
    a moved window is served from the next pass over the data (the next time the example is
    drawn), so that the batches the sampler checked for false negatives are the batches trained.

    Works on every rank: observations are gathered through ``shared_dist`` before each check,
    so every rank makes the same decisions. Its state (windows, scores, observations since the
    last check, history) travels inside each checkpoint's ``trainer_state.json`` (transformers'
    ``ExportableState``), so ``trainer.train(resume_from_checkpoint=DIR)`` continues exactly from
    whatever folder ``DIR`` is, on every node that can read it. Keep
    ``restore_callback_states_from_checkpoint`` at its default (False): the callback restores
    itself. Check statistics (``dhnm/*``) go into the trainer's logs at every check step.

    Args:
        store: the :class:`~conan_st.mining.NegativeStore` (see :meth:`from_pairs`).
        queries: texts of the examples' queries.
        corpus: texts of the candidate documents.
        positives: the examples' positive texts (kept by :meth:`from_pairs`): with them,
            :meth:`train_dataset` refuses pairs whose rows are not the mined examples.
        loss: a :class:`~conan_st.CrossGPUBalancingLoss`; with ``score_source="loss"`` its
            similarities give S_cur for free.
        interval: steps between checks (100 in the paper).
        ratio: the rule's 1.15.
        abs_bound: the rule's 0.8. S_init is the score when the window was
            assigned (see ``initial_score`` of :meth:`from_pairs` and :class:`~conan_st.mining.NegativeStore`).
            With ``score_source="loss"``, S_cur is measured in training mode (dropout on), which
            lowers cosines a little against the mining scores (eval mode); ``"rescore"`` measures
            both alike.
        score_source: ``"loss"`` (free: scores of the rows the loss saw since the last check)
            or ``"rescore"`` (re-embed the queries and current negatives of every example, or of
            ``rescore_sample`` random ones, at each check; each rank re-embeds its share).
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
        positives: list[str] | None = None,
    ) -> None:
        if score_source not in ("loss", "rescore"):
            raise ValueError(f"score_source must be 'loss' or 'rescore', got {score_source!r}")
        if score_source == "loss" and loss is None:
            raise ValueError(
                "score_source='loss' needs the loss (a CrossGPUBalancingLoss) to read scores from"
            )
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1 (steps between checks), got {interval!r}")
        if not 0 < ratio < math.inf:  # the rule fires when ratio·S_cur < S_init
            raise ValueError(f"ratio must be a finite number > 0 (paper: 1.15), got {ratio!r}")
        if not 0 < abs_bound <= 1:  # a bound on |cosine|
            raise ValueError(f"abs_bound must be in (0, 1] (a bound on |cos|, paper: 0.8), got {abs_bound!r}")
        if rescore_sample is not None and rescore_sample < 1:
            raise ValueError(f"rescore_sample must be None or >= 1, got {rescore_sample!r}")
        if len(queries) != len(store):
            raise ValueError(f"{len(queries)} queries for a store of {len(store)} examples")
        if positives is not None and len(positives) != len(queries):
            raise ValueError(f"{len(positives)} positives for {len(queries)} queries")
        if len(store) and int(store.candidates.max()) >= len(corpus):
            raise ValueError(
                f"the store's candidates name document {int(store.candidates.max())}, but the corpus "
                f"holds {len(corpus)} documents: pass the corpus the candidates were mined from"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be an int >= 1 (texts per re-scoring batch), got {batch_size!r}"
            )
        self.store, self.queries, self.corpus, self.positives = store, list(queries), corpus, positives
        self.interval, self.ratio, self.abs_bound = interval, ratio, abs_bound
        self.score_source, self.rescore_sample, self.batch_size = score_source, rescore_sample, batch_size
        self.history: list[dict[str, float]] = []
        self._pending: dict[int, float] = {}
        self._unlogged: dict[str, float] = {}
        self.loss = loss
        if loss is not None and score_source == "loss":
            loss.add_score_observer(self._observe)

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
        initial_score: str = "mined",
        store_class: Callable[..., NegativeStore] = NegativeStore,
        **kwargs: Any,
    ) -> DynamicHardNegativeMiningCallback:
        """Mine candidate lists for (anchor, positive) ``pairs`` and build the callback.

        The corpus is the deduplicated positives plus ``extra_documents``; candidates come from
        ``miner`` (default: ``model``, the model being trained) through the search backend.
        ``initial_score``: S_init of a window is its candidates' mean mining score (``"mined"``,
        the paper's) or the first score observed after it was assigned (``"observed"``).
        ``store_class``: the store to build, called as :class:`~conan_st.mining.NegativeStore` is
        (an ablation passes a subclass with another window rule).
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
        store = store_class(
            cand, num_negatives, skip, end_policy, candidate_scores=scores, initial_score=initial_score
        )
        return cls(store, list(pairs["anchor"]), corpus, positives=list(pairs["positive"]), **kwargs)

    def train_dataset(self, pairs: Dataset, balanced: bool = True) -> Dataset:
        """``pairs`` with negatives read live from the store (for ``make_balanced_datasets``).

        Row ``i`` gets example ``i``'s negatives, so ``pairs`` must be the mined pairs, in the same
        order: anything else (shuffled, filtered, another dataset of the same length) is refused.
        """
        for column, expected in (("anchor", self.queries), ("positive", self.positives)):
            if expected is None or column not in pairs.column_names:
                continue
            got = list(pairs[column])
            if got != expected:
                bad = next(
                    (i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))
                )
                raise ValueError(
                    f"pairs do not match the examples the negatives were mined for: {column} of row {bad} "
                    f"differs ({len(got)} rows given, {len(expected)} mined); pass the same pairs, in the "
                    "same order, as to from_pairs"
                )
        return dynamic_negatives_dataset(pairs, self.store, self.corpus, balanced)

    # ------------------------------------------------------------------ observations

    def _observe(self, example_ids: torch.Tensor, scores: torch.Tensor) -> None:
        # a row served under an older window (its window moved since this pass began) says
        # nothing about the current window: drop it
        current = self.store.is_current(example_ids)
        for i, s in zip(example_ids.cpu()[current].tolist(), scores.cpu()[current].tolist()):
            self._pending[i] = s

    def _sync_pending(self) -> dict[int, float]:
        """Every rank's observations since the last check, merged (mean per example), in id order."""
        merged: dict[int, list[float]] = {}
        for part in shared_dist.gather_object(self._pending):
            for i, s in part.items():
                merged.setdefault(int(i), []).append(s)
        return {i: sum(v) / len(v) for i, v in sorted(merged.items())}

    def check_now(self, model=None) -> dict[str, float]:
        """Sync observations across ranks, apply the rule, return the check's summary."""
        if self.score_source == "rescore":
            if model is None:
                raise ValueError("score_source='rescore' needs the model at check time")
            ids = list(range(len(self.store)))
            if self.rescore_sample and self.rescore_sample < len(ids):
                g = torch.Generator().manual_seed(len(self.history))
                ids = torch.randperm(len(ids), generator=g)[: self.rescore_sample].sort().values.tolist()
            # each rank re-embeds its share; _sync_pending below merges them on every rank
            ids = ids[shared_dist.get_rank() :: shared_dist.get_world_size()]
            was_training = model.training
            model.eval()
            s = rescore(model, self.store, self.queries, self.corpus, ids, self.batch_size)
            model.train(was_training)
            self._pending.update(zip(ids, s.tolist()))
        merged = self._sync_pending()
        self._pending = {}
        if merged:
            self.store.observe(torch.tensor(list(merged)), torch.tensor(list(merged.values())))
        summary = self.store.check(self.ratio, self.abs_bound)
        summary["observed"] = len(merged)
        return summary

    # ------------------------------------------------------------------ trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and hasattr(model, "model_card_data"):
            # the card shows each task's own columns, and example ids as ids, not "score" statistics
            tidy_model_card_data(model.model_card_data, num_examples=len(self.store.window))
        if state.global_step == 0:
            return
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if not isinstance(saved, dict) or "store" not in saved.get("attributes", {}):
            raise ValueError(
                f"resuming at step {state.global_step}, but the checkpoint's trainer_state.json holds no "
                f"{type(self).__name__} state: it was written without this callback"
            )
        self._load_attributes(saved["attributes"])
        logger.info("restored negative-mining state of step %d", state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # a fresh pass serves the current windows; a run resumed mid-epoch keeps the windows
        # that pass was served with (restored), so it rebuilds the same batches
        if float(state.epoch or 0.0).is_integer():
            self.store.snapshot()

    def on_step_end(self, args, state, control, **kwargs):
        is_check = state.global_step % self.interval == 0
        if not is_check:
            if control.should_save:
                # the checkpoint must hold every rank's observations: rank 0 writes it
                merged = self._sync_pending()
                self._pending = merged if shared_dist.get_rank() == 0 else {}
            return
        summary = self.check_now(kwargs.get("model"))
        record = {"step": state.global_step, **{f"dhnm/{k}": v for k, v in summary.items()}}
        self.history.append(record)
        self._unlogged = {k: v for k, v in record.items() if k != "step"}
        control.should_log = True
        logger.info(
            "step %d: %d of %d observed examples advanced (mean S_init %.3f, S_cur %.3f)",
            state.global_step,
            summary["advanced"],
            summary["checked"],
            summary["mean_s_init"],
            summary["mean_s_cur"],
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        # into the logs the trainer hands to the callbacks after this one (progress, and any
        # tracker callback registered after it) and into state.log_history
        if not self._unlogged or logs is None:
            return
        logs.update(self._unlogged)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._unlogged)
        self._unlogged = {}

    # ------------------------------------------------------------------ checkpoint state

    def state(self) -> dict[str, Any]:
        """transformers' ``ExportableState``: written into every checkpoint's trainer_state.json."""
        return {
            "args": {},
            "attributes": {
                "store": self.store.state_dict(),
                "pending": {str(i): s for i, s in self._pending.items()},
                "history": self.history,
            },
        }

    def _load_attributes(self, attributes: dict[str, Any]) -> None:
        self.store.load_state_dict(attributes["store"])
        self.history = list(attributes.get("history", []))
        # rank 0 saved every rank's observations; the others start empty, as they were
        pending = attributes.get("pending", {}) if shared_dist.get_rank() == 0 else {}
        self._pending = {int(i): float(s) for i, s in pending.items()}
