"""Controls for the paper's window rule, for the ablation in quality_experiment.py — not part
of the library: an experiment passes one as ConanSettings(store_class=partial(ControlStore, rule=...))."""

from __future__ import annotations

from typing import Any

import torch

from conan_st.mining import NegativeStore

WINDOW_RULES = ("paper", "always", "random")


class ControlStore(NegativeStore):
    """The two controls for the paper's window rule (the ablation of examples/conan/quality_experiment.py).

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
