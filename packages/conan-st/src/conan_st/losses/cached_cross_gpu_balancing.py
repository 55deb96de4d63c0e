from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import (
    CachedLossMixin,
    _validate_mini_batch_num_tokens,
    has_static_embedding_input,
)
from sentence_transformers.sentence_transformer.losses.matryoshka import (
    CachedLossDecorator as MatryoshkaCachedLoss,
)
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .cross_gpu_balancing import CrossGPUBalancingLoss, LossTerms, TaskColumns, _unwrap

_ST_VERSION = sentence_transformers.__version__
_DDP_SAFE_REPLAY = tuple(int(part) for part in _ST_VERSION.split(".")[:2]) >= (6, 2)


class CachedCrossGPUBalancingLoss(CachedLossMixin, CrossGPUBalancingLoss):
    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        sts_weight: float = 0.8,
        sts_scale: float = 20.0,
        in_batch_negatives: bool = True,
        retrieval_ranks: int | None = None,
        sts_score_range: tuple[float, float] | None = (0.0, 5.0),
        return_dict: bool = True,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        r"""
        :class:`~conan_st.CrossGPUBalancingLoss` with GradCache: a batch of any size in the memory
        of ``mini_batch_size`` texts, so one GPU gets the many negatives Conan gets from many.

        The uncached loss holds the activations of every text of the step at once, which caps its
        batch. This one, as :class:`~sentence_transformers.losses.CachedMultipleNegativesRankingLoss`:

            (1) embeds every column in mini-batches without a graph, keeping each mini-batch's RNG state;
            (2) computes the loss over the whole batch from those embeddings (gathering the negatives
                of every rank, as the uncached loss does) and back-propagates it to the embeddings,
                whose gradients are cached;
            (3) in the backward pass, re-embeds each mini-batch with a graph under its saved RNG
                state (the same dropout masks) and feeds it the cached gradient.

        The gradient equals the uncached loss's at the same batch (up to float rounding; with
        dropout, for the masks drawn in (1)), on one process or many, with the same per-rank task
        layout and DDP weighting. The texts are embedded twice, so a step costs about 1.3-2x the
        uncached one at equal batch (``benchmarks/bench_cbb.py`` measures it).

        Args:
            model: SentenceTransformer model.
            scale, sts_weight, sts_scale, in_batch_negatives, retrieval_ranks, sts_score_range:
                as in :class:`~conan_st.CrossGPUBalancingLoss`.
            return_dict: return ``{"retrieval": ..., "sts": ...}`` so the trainer logs each term;
                both terms' gradient flows through one replay (the STS entry is its value,
                detached, and the retrieval entry carries the rest). Inside ``MatryoshkaLoss`` the
                sum is returned.
            mini_batch_size: texts per embedding forward pass: what bounds the memory. The larger,
                the faster, as long as it fits.
            mini_batch_num_tokens: pack mini-batches by non-padding tokens instead of by
                ``mini_batch_size`` texts (as in sentence-transformers' cached losses).
            show_progress_bar: a progress bar over the mini-batches.

        References:
            - Li et al., Conan-embedding: General Text Embedding with More and Better Negative
              Samples, 2024. https://arxiv.org/abs/2408.15710 (section 3.3)
            - Gao et al., Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup,
              2021. https://arxiv.org/abs/2101.06983

        Requirements:
            1. The batches of :class:`~conan_st.CrossGPUBalancingLoss` (see there).
            2. A large ``per_device_train_batch_size`` (``retrieval_batch_size``) and a small
               ``mini_batch_size``; with batches that fit in memory the uncached loss is faster.
            3. Not inside ``AdaptiveLayerLoss`` / ``Matryoshka2dLoss`` (nor are sentence-transformers'
               cached losses); ``MatryoshkaLoss`` works.

        Inputs:
            +--------------------------------------------------------------------------+-----------------------------+
            | Texts                                                                    | Labels                      |
            +==========================================================================+=============================+
            | (anchor, positive, negative_1, ..., negative_m, sentence1, sentence2)    | score: NaN on retrieval     |
            |                                                                          | rows, similarity on STS rows|
            +--------------------------------------------------------------------------+-----------------------------+
            | (anchor, positive, negative_1, ..., negative_m)                          | none                        |
            +--------------------------------------------------------------------------+-----------------------------+

        Relations:
            - :class:`~conan_st.CrossGPUBalancingLoss` is the same loss without caching: faster
              when the batch fits in memory.
            - :class:`~sentence_transformers.losses.CachedMultipleNegativesRankingLoss` caches
              MNRL the same way; this loss adds the STS task and the Cross-GPU negatives.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from sentence_transformers import SentenceTransformerTrainingArguments
                from conan_st import (
                    CachedCrossGPUBalancingLoss, TaskBalancedBatchSampler, make_balanced_datasets,
                )

                model = SentenceTransformer("all-MiniLM-L6-v2")
                retrieval = Dataset.from_dict({
                    "anchor": ["what is the capital of France?", "who wrote Hamlet?"],
                    "positive": ["Paris is the capital of France.", "Hamlet is a play by Shakespeare."],
                    "negative_1": ["Lyon is a city in France.", "Macbeth is a Scottish king."],
                })
                sts = Dataset.from_dict({
                    "sentence1": ["A man plays guitar.", "A cat sleeps."],
                    "sentence2": ["Someone plays an instrument.", "A dog runs."],
                    "score": [4.2, 0.4],
                })
                train = make_balanced_datasets(retrieval, sts)
                args = SentenceTransformerTrainingArguments(
                    output_dir="out", per_device_train_batch_size=2,
                    multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(
                        retrieval_batch_size=2, sts_batch_size=2),
                )
                loss = CachedCrossGPUBalancingLoss(model, mini_batch_size=1)
                trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss)
                trainer.train()
        """
        super().__init__(
            model,
            scale=scale,
            sts_weight=sts_weight,
            sts_scale=sts_scale,
            in_batch_negatives=in_batch_negatives,
            retrieval_ranks=retrieval_ranks,
            sts_score_range=sts_score_range,
            return_dict=return_dict,
        )
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(
                f"mini_batch_size must be an int >= 1 (texts per forward pass), got {mini_batch_size!r}"
            )
        _validate_mini_batch_num_tokens(mini_batch_num_tokens)
        if has_static_embedding_input(_unwrap(model)):
            raise ValueError(
                "CachedCrossGPUBalancingLoss cannot split a StaticEmbedding model's inputs into mini-batches; "
                "use CrossGPUBalancingLoss"
            )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        self._sts_value: Tensor | None = None

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Any:
        if isinstance(self.model, DistributedDataParallel) and not _DDP_SAFE_REPLAY:
            # before 6.2 the replay all-reduces at every mini-batch: ranks with different numbers of
            # mini-batches (an STS rank and a retrieval rank) would wait on each other forever
            raise RuntimeError(
                f"CachedCrossGPUBalancingLoss under DDP needs sentence-transformers >= 6.2 (installed: "
                f"{_ST_VERSION}), whose GradCache replay synchronises gradients once per step: "
                "pip install -U 'sentence-transformers>=6.2'"
            )
        # 1. the columns of each task on this rank
        tasks = self.task_columns(sentence_features, labels)
        # 2. GradCache (CachedLossMixin): embed without a graph, loss and its gradient wrt. the
        #    embeddings (calculate_loss), replay the mini-batches in the backward pass
        total = self.forward_cached(tasks.retrieval + tasks.sts, tasks)
        # 3. per-term logging: the sum's gradient is what replays; the STS entry is a constant
        #    (inside MatryoshkaLoss, which calls calculate_loss once per size, the sum)
        if not self.return_dict or isinstance(self.calculate_loss, MatryoshkaCachedLoss):
            return total
        return LossTerms({"retrieval": total - self._sts_value, "sts": self._sts_value})

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: TaskColumns | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss over the whole batch from the mini-batch embeddings (``labels``: the step's
        :class:`~conan_st.losses.cross_gpu_balancing.TaskColumns`). With ``with_backward``, its
        gradient reaches the embeddings and the detached sum is returned."""
        tasks = labels
        n = len(tasks.retrieval)
        embeddings = [torch.cat(mini_batches) for mini_batches in reps]  # (B, D) or (S, D) each
        terms = self._loss_terms(embeddings[:n], embeddings[n:], dim=None, **tasks.loss_kwargs())
        total = terms["retrieval"] + terms["sts"]
        if with_backward:
            total.backward()  # collectives of the negatives' gather included: every rank runs it
            total = total.detach()
        self._sts_value = terms["sts"].detach()
        return total

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **super().get_config_dict(),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def citation(self) -> str:
        return (
            super().citation
            + """
@misc{gao2021scaling,
      title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
      author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
      year={2021},
      eprint={2101.06983},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
}
"""
        )
