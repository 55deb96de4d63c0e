"""Which rank runs which task under the Cross-GPU Batch Balance layout."""

from __future__ import annotations

from dataclasses import dataclass

import shared_dist


@dataclass(frozen=True)
class TaskLayout:
    """Roles of the ranks for one step.

    * one process: every batch holds both tasks;
    * ``W > 1`` and ``R < W``: ranks ``0..R-1`` run retrieval on the same queries (different
      negative slices), ranks ``R..W-1`` run STS — the paper's layout (R = 4 of W = 5);
    * ``R == W > 1``: every rank runs retrieval on the same queries and also its own STS batch.

    ``retrieval_weight`` and ``sts_weight`` scale the per-rank terms so that DDP's average over
    ``W`` ranks yields ``L_retrieval + β · mean(L_sts over the ranks holding STS)``.
    """

    world_size: int
    rank: int
    retrieval_ranks: int

    @classmethod
    def current(cls, retrieval_ranks: int | None = None) -> TaskLayout:
        world, rank = shared_dist.get_world_size(), shared_dist.get_rank()
        r = retrieval_ranks if retrieval_ranks is not None else (world - 1 if world > 1 else 1)
        if not 1 <= r <= world:
            raise ValueError(f"retrieval_ranks must be in [1, {world}] for {world} processes, got {r}")
        return cls(world, rank, r)

    @property
    def is_retrieval_rank(self) -> bool:
        return self.rank < self.retrieval_ranks

    @property
    def carries_sts(self) -> bool:
        return self.rank >= self.retrieval_ranks or self.retrieval_ranks == self.world_size

    @property
    def sts_ranks(self) -> int:
        return (
            self.world_size - self.retrieval_ranks
            if self.retrieval_ranks < self.world_size
            else self.world_size
        )

    @property
    def retrieval_weight(self) -> float:
        return self.world_size / self.retrieval_ranks

    @property
    def sts_weight(self) -> float:
        return self.world_size / self.sts_ranks
