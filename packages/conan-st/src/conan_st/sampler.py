"""A multi-dataset batch sampler that puts BOTH tasks into every optimisation step."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset

from .layout import TaskLayout
from .mining import ID_LABEL_BASE


class TaskBalancedBatchSampler(MultiDatasetDefaultBatchSampler):
    """Serves retrieval and STS rows together, laid out for :class:`CrossGPUBalancingLoss`.

    Pass it as ``SentenceTransformerTrainingArguments(multi_dataset_batch_sampler=...)`` with a
    ``DatasetDict`` from :func:`conan_st.make_balanced_datasets`. For each step it emits one
    batch per process, in rank order (accelerate hands batch ``k`` of every ``W`` to rank ``k``):

    * one process: ``retrieval_batch_size`` retrieval rows + ``sts_batch_size`` STS rows;
    * ``W > 1``: the same retrieval rows for ranks ``0..R-1`` and an STS batch for each other
      rank (with ``R == W``, every rank also gets its own STS batch).

    An epoch is one pass over the retrieval rows; STS rows cycle, reshuffled each pass.

    Args:
        dataset: the trainer's ``ConcatDataset`` of the two task datasets.
        batch_samplers: the trainer's per-dataset samplers (their batch size is the default).
        retrieval_batch_size, sts_batch_size: rows per step of each task (paper: 4 and 32 per GPU).
        retrieval_ranks: R (must match the loss's); default ``W - 1`` (``1`` on one process).
    """

    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        generator: torch.Generator | None = None,
        seed: int = 0,
        retrieval_batch_size: int | None = None,
        sts_batch_size: int | None = None,
        retrieval_ranks: int | None = None,
    ) -> None:
        super().__init__(dataset, batch_samplers, generator, seed)
        if len(dataset.datasets) != 2:
            raise ValueError(f"expected two datasets (retrieval, sts), got {len(dataset.datasets)}")
        roles = [_is_sts(d) for d in dataset.datasets]
        if sorted(roles) != [False, True]:
            raise ValueError(
                "expected one retrieval dataset (score NaN) and one STS dataset (numeric score); "
                "build them with conan_st.make_balanced_datasets"
            )
        self.sts_index, self.ret_index = roles.index(True), roles.index(False)
        offsets = [0, *dataset.cumulative_sizes[:-1]]
        self.ret_offset, self.sts_offset = offsets[self.ret_index], offsets[self.sts_index]
        self.ret_len, self.sts_len = (
            len(dataset.datasets[self.ret_index]),
            len(dataset.datasets[self.sts_index]),
        )
        self.ret_bs = retrieval_batch_size or batch_samplers[self.ret_index].batch_size
        self.sts_bs = sts_batch_size or batch_samplers[self.sts_index].batch_size
        if self.ret_len < self.ret_bs or self.sts_len == 0:
            raise ValueError(
                f"each task needs data: {self.ret_len} retrieval rows (batch {self.ret_bs}), {self.sts_len} STS rows"
            )
        self.layout = TaskLayout.current(retrieval_ranks)

    @classmethod
    def configure(cls, **kwargs) -> functools.partial:
        """``multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(retrieval_batch_size=4, ...)``."""
        return functools.partial(cls, **kwargs)

    @property
    def steps_per_epoch(self) -> int:
        return self.ret_len // self.ret_bs

    def __len__(self) -> int:
        return self.steps_per_epoch * self.layout.world_size

    def __iter__(self) -> Iterator[list[int]]:
        # every rank builds the same stream (same seed); accelerate then deals it out by rank
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        ret = (torch.randperm(self.ret_len, generator=g) + self.ret_offset).tolist()
        sts_stream = self._sts_stream(g)
        world, r = self.layout.world_size, self.layout.retrieval_ranks
        for step in range(self.steps_per_epoch):
            ret_batch = ret[step * self.ret_bs : (step + 1) * self.ret_bs]
            if world == 1:
                yield ret_batch + [next(sts_stream) for _ in range(self.sts_bs)]
                continue
            for rank in range(world):
                batch = list(ret_batch) if rank < r else []
                if rank >= r or r == world:
                    batch += [next(sts_stream) for _ in range(self.sts_bs)]
                yield batch

    def _sts_stream(self, g: torch.Generator) -> Iterator[int]:
        while True:
            yield from (torch.randperm(self.sts_len, generator=g) + self.sts_offset).tolist()


def _is_sts(dataset) -> bool:
    """STS rows carry a score; retrieval rows NaN or an example id (see ``conan_st.mining``)."""
    if not len(dataset):
        return False
    first = dataset[0].get("score")
    return first is not None and not math.isnan(first) and first > ID_LABEL_BASE + 0.5
