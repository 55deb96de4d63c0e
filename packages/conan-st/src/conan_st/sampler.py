"""A multi-dataset batch sampler that puts BOTH tasks into every optimisation step."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler, NoDuplicatesBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset

from .data import negative_columns, same_text
from .labels import ID_LABEL_BASE
from .layout import TaskLayout

logger = logging.getLogger(__name__)


class TaskBalancedBatchSampler(MultiDatasetDefaultBatchSampler):
    """Serves retrieval and STS rows together, laid out for :class:`CrossGPUBalancingLoss`.

    Pass it as ``SentenceTransformerTrainingArguments(multi_dataset_batch_sampler=...)`` with a
    ``DatasetDict`` from :func:`conan_st.make_balanced_datasets`. For each step it emits one
    batch per process, in rank order (accelerate hands batch ``k`` of every ``W`` to rank ``k``):

    * one process: ``retrieval_batch_size`` retrieval rows + ``sts_batch_size`` STS rows;
    * ``W > 1``: the same retrieval rows for ranks ``0..R-1`` and an STS batch for each other
      rank (with ``R == W``, every rank also gets its own STS batch).

    The batches of one step differ in length by design, so the sampler declares no fixed
    ``batch_size`` (accelerate then shards them as they are); ``per_device_train_batch_size``
    plays no part.

    No false negatives: within the retrieval rows of a step (the GLOBAL batch — every rank
    scores its queries against all of them), no row's anchor or positive text appears in any
    other row, as anchor, positive or negative. Rows that would break this are deferred to a
    later step, like sentence-transformers' ``NoDuplicatesBatchSampler``; with
    ``batch_sampler="no_duplicates"`` in the training arguments, no text may repeat at all
    (negatives included), as that sampler does.

    An epoch is one pass over the retrieval rows (``dataloader_drop_last`` drops the last short
    step); STS rows cycle, reshuffled each pass.

    Args:
        dataset: the trainer's ``ConcatDataset`` of the two task datasets.
        batch_samplers: the trainer's per-dataset samplers (their batch size is the default;
            the retrieval one gives ``drop_last`` and the duplicate rule).
        retrieval_batch_size: retrieval rows per step (paper: 4 per GPU).
        sts_batch_size: STS rows per step (paper: 32 per GPU).
            ``sts_batch_size=0`` serves retrieval rows only (dynamic mining without the STS
            task); every rank must then run retrieval (``retrieval_ranks`` = world size).
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
        self.ret_data = dataset.datasets[self.ret_index]
        self.ret_len, self.sts_len = len(self.ret_data), len(dataset.datasets[self.sts_index])
        ret_sampler = batch_samplers[self.ret_index]
        self.ret_bs = _int_at_least(
            "retrieval_batch_size", retrieval_batch_size, getattr(ret_sampler, "batch_size", None)
        )
        self.sts_bs = _int_at_least(
            "sts_batch_size", sts_batch_size, getattr(batch_samplers[self.sts_index], "batch_size", None), 0
        )
        if self.ret_len < self.ret_bs or self.sts_len == 0:
            raise ValueError(
                f"each task needs data: {self.ret_len} retrieval rows (batch {self.ret_bs}), {self.sts_len} STS rows"
            )
        self.drop_last = bool(getattr(ret_sampler, "drop_last", True))
        self.no_duplicates = isinstance(ret_sampler, NoDuplicatesBatchSampler)
        self.layout = TaskLayout.current(retrieval_ranks)
        if self.sts_bs == 0 and self.layout.retrieval_ranks < self.layout.world_size:
            raise ValueError(
                f"sts_batch_size=0 (retrieval only) needs every rank to run retrieval, but only "
                f"retrieval_ranks={self.layout.retrieval_ranks} of {self.layout.world_size} processes do: "
                f"pass retrieval_ranks={self.layout.world_size} here and to the loss"
            )
        # accelerate's BatchSamplerShard yields a group of W batches only when the last one has
        # exactly `batch_size` rows; our batches differ per rank, so declare no fixed size
        self.batch_size = None

    @classmethod
    def configure(cls, **kwargs) -> functools.partial:
        """``multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(retrieval_batch_size=4, ...)``."""
        return functools.partial(cls, **kwargs)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.ret_len, self.ret_bs)
        return full + int(bool(rest) and not self.drop_last)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.layout.world_size

    def __iter__(self) -> Iterator[list[int]]:
        # every rank builds the same stream (same seed, same data); accelerate deals it out by rank
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        sts_stream = self._sts_stream(g)
        world, r = self.layout.world_size, self.layout.retrieval_ranks
        for local in self._retrieval_batches(g):
            ret_batch = [i + self.ret_offset for i in local]
            if world == 1:
                yield ret_batch + [next(sts_stream) for _ in range(self.sts_bs)]
                continue
            for rank in range(world):
                batch = list(ret_batch) if rank < r else []
                if rank >= r or r == world:
                    batch += [next(sts_stream) for _ in range(self.sts_bs)]
                yield batch

    # ------------------------------------------------------------------ retrieval rows

    def _retrieval_batches(self, g: torch.Generator) -> Iterator[list[int]]:
        """``steps_per_epoch`` batches of retrieval rows (dataset-local ids), none with a false negative.

        Greedy, in shuffled order: a row that clashes with the batch being filled waits for a
        later one; when the pass runs dry, rows of a fresh shuffle fill the rest (a few rows
        then repeat within the epoch, as with ``NoDuplicatesBatchSampler``). A batch that no
        remaining row can join without a clash goes out short (a warning says so): the step
        count stays exact and the batch stays clean.
        """
        sizes = [self.ret_bs] * (self.ret_len // self.ret_bs)
        if not self.drop_last and self.ret_len % self.ret_bs:
            sizes.append(self.ret_len % self.ret_bs)
        keys = _RowKeys(self.ret_data, strict=self.no_duplicates)
        order = iter(torch.randperm(self.ret_len, generator=g).tolist())
        waiting: list[int] = []
        for size in sizes:
            batch: list[int] = []
            protected: set[int] = set()  # anchors and positives of the batch
            texts: set[int] = set()  # every text of the batch
            still_waiting: list[int] = []
            candidates = iter(waiting)
            refilled = False
            while len(batch) < size:
                i = next(candidates, None)
                if i is None:
                    i = next(order, None)
                if i is None:  # this pass is used up: draw fillers from one fresh shuffle
                    order = iter(torch.randperm(self.ret_len, generator=g).tolist())
                    if refilled:  # every row has been tried against this batch: send it short
                        logger.warning(
                            "a retrieval batch holds %d of %d rows: no other row can join it without a false "
                            "negative (too few distinct anchors/positives for this batch size)",
                            len(batch),
                            size,
                        )
                        break
                    refilled = True
                    continue
                own, everything = keys(i)
                if i in batch or own & texts or everything & protected:
                    still_waiting.append(i)
                    continue
                batch.append(i)
                protected |= own
                texts |= everything
            waiting = still_waiting + list(candidates)
            yield batch

    def _sts_stream(self, g: torch.Generator) -> Iterator[int]:
        while True:
            yield from (torch.randperm(self.sts_len, generator=g) + self.sts_offset).tolist()


class _RowKeys:
    """Per retrieval row: the ids of its protected texts (anchor, positive) and of all its texts.

    Texts are interned to ints by ``data.same_text`` (case and spacing variants are one text, as for
    the miner), so comparisons are the same in every process. Rows
    are read through the dataset, so live-negative datasets give the negatives they serve.
    """

    def __init__(self, dataset, strict: bool) -> None:
        self.dataset, self.strict = dataset, strict
        self.intern: dict[str, int] = {}
        self.cache: dict[int, tuple[frozenset[int], frozenset[int]]] = {}

    def __call__(self, i: int) -> tuple[frozenset[int], frozenset[int]]:
        if i not in self.cache:
            row = self.dataset[i]

            def ids(cols: list[str]) -> frozenset[int]:
                return frozenset(self.intern.setdefault(same_text(row[c]), len(self.intern)) for c in cols)

            everything = ids(["anchor", "positive", *negative_columns(list(row))])
            self.cache[i] = (everything if self.strict else ids(["anchor", "positive"]), everything)
        return self.cache[i]


def _int_at_least(name: str, value: int | None, default: int | None, minimum: int = 1) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _is_sts(dataset) -> bool:
    """STS rows carry a score; retrieval rows NaN or an example id (see ``conan_st.mining``)."""
    if not len(dataset):
        return False
    first = dataset[0].get("score")
    return first is not None and not math.isnan(first) and first > ID_LABEL_BASE
