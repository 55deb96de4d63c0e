from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import CoSENTLoss
from sentence_transformers.sentence_transformer.losses.adaptive_layer import (
    ForwardDecorator as AdaptiveLayerForward,
)
from sentence_transformers.sentence_transformer.losses.matryoshka import ForwardDecorator as MatryoshkaForward
from torch import Tensor, nn

import shared_dist
from shared_dist import DistributedOperationError

from ..labels import is_id_label, label_to_id
from ..layout import TaskLayout


@dataclass(frozen=True)
class TaskColumns:
    """One step's input on this rank, split by task: what :class:`CrossGPUBalancingLoss` embeds.

    Attributes:
        retrieval: tokenised columns ``[anchor, positive, negative_1..negative_j]`` of the
            retrieval rows, with this rank's ``j`` negatives; empty when the rank has none.
        sts: tokenised ``[sentence1, sentence2]`` of the STS rows; empty when the rank has none.
        scores: (S,) STS scores, or None.
        num_negatives: ``j``, negative columns on this rank (also known to ranks without retrieval rows).
        example_ids: (B,) the retrieval rows' example ids, or None (for the score observers).
        query_fingerprint: a hash of the queries, which every retrieval rank must share.
    """

    retrieval: list[dict[str, Tensor]]
    sts: list[dict[str, Tensor]]
    scores: Tensor | None
    num_negatives: int
    example_ids: Tensor | None
    query_fingerprint: int | None

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`CrossGPUBalancingLoss.compute_loss_from_embeddings`."""
        return {
            "scores": self.scores,
            "num_negatives": self.num_negatives,
            "example_ids": self.example_ids,
            "query_fingerprint": self.query_fingerprint,
        }


class CrossGPUBalancingLoss(nn.Module):
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
    ) -> None:
        r"""
        The Cross-GPU Batch Balance loss of Conan-embedding: every optimisation step carries a
        retrieval task AND an STS task, and retrieval queries see the hard negatives of every GPU.

        On ``W`` processes, ranks ``0..R-1`` hold the SAME (query, positive) rows and DIFFERENT
        slices of the hard negatives; only the negatives are gathered (gathering positives too
        would make a query's own positive a false negative ``R - 1`` times), so each query is
        scored against all of its ``m`` negatives. The other ranks compute CoSENT on their own
        STS batches. On one process a batch holds both tasks. The loss is

            L = InfoNCE(q, p⁺, negatives of all ranks) + β · CoSENT,

        and the per-rank terms are weighted so that, after DDP averages gradients over ``W``
        ranks, the gradient is exactly that of ``L`` (STS averaged over the ranks that hold STS).

        Args:
            model: SentenceTransformer model.
            scale: inverse temperature of the InfoNCE logits (20 = τ 0.05, as in MNRL).
            sts_weight: β, weight of the CoSENT term (0.8 in the paper). It sets the trade-off
                between the tasks (a lower β: better retrieval, worse STS); the number of STS
                rows per step hardly moves it (measured in RESULTS.md).
            sts_scale: inverse temperature of CoSENT (20 = τ 0.05).
            in_batch_negatives: also score each query against the other queries' positives and
                negatives (as MultipleNegativesRankingLoss does). With False a query sees only
                its own positive and its own ``m`` negatives.
            retrieval_ranks: R, the ranks that run retrieval when ``W > 1`` (default ``W - 1``,
                or ``W`` when there is one process). With ``R == W`` every rank also takes an
                STS batch. Must agree with :class:`~conan_st.TaskBalancedBatchSampler`.
            sts_score_range: declared (min, max) of STS scores; scores outside raise. None: no check.
            return_dict: return ``{"retrieval": ..., "sts": ...}`` so the trainer logs each term.
                The dict scales and adds term by term, so :class:`MatryoshkaLoss` keeps the terms
                apart; inside :class:`AdaptiveLayerLoss` / ``Matryoshka2dLoss`` (which add a
                KL tensor to the loss) the sum is returned.

        References:
            - Li et al., Conan-embedding: General Text Embedding with More and Better Negative
              Samples, 2024. https://arxiv.org/abs/2408.15710 (section 3.3, Cross-GPU Batch Balance Loss)
            - Su, CoSENT, 2022. https://kexue.fm/archives/8847

        Requirements:
            1. Batches that mix retrieval rows and STS rows in one set of columns, as built by
               :func:`conan_st.make_balanced_datasets` and served by
               :class:`conan_st.TaskBalancedBatchSampler`; or plain retrieval rows with no score.
            2. ``m`` (the number of negative columns) divisible by R.

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
            - :class:`~sentence_transformers.losses.MultipleNegativesRankingLoss` with
              ``gather_across_devices=True`` gathers queries, positives and negatives of
              DIFFERENT queries per rank; this loss shares queries across retrieval ranks and
              gathers only negatives, and adds the STS task to every step.
            - :class:`~sentence_transformers.losses.CoSENTLoss` computes the STS term.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
                from sentence_transformers import SentenceTransformerTrainingArguments
                from conan_st import CrossGPUBalancingLoss, TaskBalancedBatchSampler, make_balanced_datasets

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
                trainer = SentenceTransformerTrainer(
                    model=model, args=args, train_dataset=train, loss=CrossGPUBalancingLoss(model),
                )
                trainer.train()
        """
        super().__init__()
        if not 0 < scale < math.inf or not 0 < sts_scale < math.inf:
            raise ValueError(f"scale and sts_scale must be finite and > 0, got {scale} and {sts_scale}")
        if not 0 <= sts_weight < math.inf:
            raise ValueError(f"sts_weight must be a finite number >= 0 (paper: 0.8), got {sts_weight}")
        if retrieval_ranks is not None and (
            isinstance(retrieval_ranks, bool) or not isinstance(retrieval_ranks, int) or retrieval_ranks < 1
        ):
            raise ValueError(f"retrieval_ranks must be None (W - 1) or an int >= 1, got {retrieval_ranks!r}")
        if sts_score_range is not None and not sts_score_range[0] < sts_score_range[1]:
            raise ValueError(f"sts_score_range must be (min, max) with min < max, got {sts_score_range}")
        self.model = model
        self.scale = scale
        self.sts_weight = sts_weight
        self.sts_scale = sts_scale
        self.in_batch_negatives = in_batch_negatives
        self.retrieval_ranks = retrieval_ranks
        self.sts_score_range = sts_score_range
        self.return_dict = return_dict
        self.cosent = CoSENTLoss(model, scale=sts_scale)
        self._score_observers: list[Callable[[Tensor, Tensor], None]] = []

    # ------------------------------------------------------------------ embedding

    def add_score_observer(self, observer: Callable[[Tensor, Tensor], None]) -> None:
        """Call ``observer(example_ids, scores)`` at every step with retrieval rows that carry example ids.

        ``example_ids`` (B,) are the rows' ids (see :mod:`conan_st.mining`) and ``scores`` (B,) each
        query's mean cosine to its own negatives, of every rank's slice, detached. Inside
        ``MatryoshkaLoss`` only the full-size embeddings are reported. The mining callback
        (``score_source="loss"``) reads its S_cur from here at no cost.
        """
        if not callable(observer):
            raise TypeError(f"observer must be callable as observer(example_ids, scores), got {observer!r}")
        self._score_observers.append(observer)

    def task_columns(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None
    ) -> TaskColumns:
        """Split a batch's columns by task: the rows of each task, and this rank's slice of the negatives."""
        features = list(sentence_features)
        layout = TaskLayout.current(self.retrieval_ranks)
        ret_rows, sts_rows = self._split_rows(features, labels)
        n_sts_cols = 2 if labels is not None else 0
        ret_feats, sts_feats = features[: len(features) - n_sts_cols], features[len(features) - n_sts_cols :]
        if len(ret_feats) < 2:
            raise ValueError(
                f"expected columns (anchor, positive, negative_1..m[, sentence1, sentence2]), got {len(features)} columns"
            )
        self._check_sts_columns(sts_feats, ret_rows)
        negs = ret_feats[2:]
        if len(negs) % layout.retrieval_ranks:
            raise ValueError(
                f"the {len(negs)} negative columns must split evenly over retrieval_ranks={layout.retrieval_ranks}"
            )
        per_rank = len(negs) // layout.retrieval_ranks
        if layout.is_retrieval_rank and layout.retrieval_ranks > 1:
            k = layout.rank
            negs = negs[k * per_rank : (k + 1) * per_rank]  # this rank's slice of the negatives
        retrieval = [_select_rows(f, ret_rows) for f in ret_feats[:2] + negs] if ret_rows.any() else []
        sts = [_select_rows(f, sts_rows) for f in sts_feats] if sts_rows.any() else []
        example_ids = None
        if retrieval and labels is not None and is_id_label(labels[ret_rows].float()).all():
            example_ids = label_to_id(labels[ret_rows].float())
        return TaskColumns(
            retrieval=retrieval,
            sts=sts,
            scores=labels[sts_rows] if sts else None,
            num_negatives=per_rank,
            example_ids=example_ids,
            query_fingerprint=_fingerprint(retrieval[0]) if retrieval else None,
        )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Any:
        # 1. the columns of each task on this rank
        tasks = self.task_columns(sentence_features, labels)
        # 2. embed them: each (B, D) retrieval, (S, D) STS
        retrieval = embed_columns(self.model, tasks.retrieval) if tasks.retrieval else []
        sts = embed_columns(self.model, tasks.sts, separate_first=False) if tasks.sts else []
        # 3. the loss (gathers the negatives across ranks)
        return self.compute_loss_from_embeddings(retrieval, sts, **tasks.loss_kwargs())

    def _warn_if_no_sts_signal(self, scores: Tensor | None) -> None:
        """CoSENT ranks the pairs of a batch against each other: one pair, or pairs of one score, give
        exactly 0 and the STS task never trains (``DataLoader(examples)`` in ``fit()`` has batch size 1).
        Said once per loss, not per step."""
        if scores is None or getattr(self, "_warned_sts", False) or scores.unique().numel() > 1:
            return
        self._warned_sts = True
        warnings.warn(
            f"an STS batch of {scores.numel()} pair(s) with {scores.unique().numel()} distinct score(s): CoSENT "
            "compares pairs within a batch, so its term is 0 and the STS task does not train; use STS batches of "
            ">= 2 pairs with different scores (TaskBalancedBatchSampler's sts_batch_size, or a DataLoader "
            "batch_size in fit())",
            stacklevel=3,
        )

    def _check_sts_columns(self, sts_feats: list[dict[str, Tensor]], ret_rows: Tensor) -> None:
        """With labels, the last two columns are (sentence1, sentence2), empty on retrieval rows.
        Text there on a retrieval row means the data has no STS columns and these are negatives:
        reading them as STS would silently drop them."""
        if not sts_feats or not ret_rows.any() or "attention_mask" not in sts_feats[0]:
            return
        if not hasattr(self, "_empty_len"):  # tokens of an empty text: the special tokens only
            # _unwrap: under DDP the trainer hands the loss the wrapped model; tokenize() is deprecated in 6.x
            self._empty_len = int(_unwrap(self.model).preprocess([""])["attention_mask"].sum())
        for name, f in zip(("sentence1", "sentence2"), sts_feats):
            if bool((f["attention_mask"][ret_rows].sum(-1) > self._empty_len).any()):
                raise ValueError(
                    f"labels were given, so the last two columns are read as (sentence1, sentence2), but "
                    f"retrieval rows (label NaN or an example id) have text in the {name} column: these look "
                    "like negatives. Build the data with conan_st.make_balanced_datasets, or drop the label "
                    "column for retrieval-only data"
                )

    def _split_rows(self, features: list[dict[str, Tensor]], labels: Tensor | None) -> tuple[Tensor, Tensor]:
        rows = _batch_size(features[0])
        device = features[0]["input_ids"].device if "input_ids" in features[0] else None
        if labels is None:
            return torch.ones(rows, dtype=torch.bool, device=device), torch.zeros(
                rows, dtype=torch.bool, device=device
            )
        labels = labels.float()
        sts = ~(torch.isnan(labels) | is_id_label(labels))  # retrieval rows: NaN or an example id
        if self.sts_score_range is not None and sts.any():
            lo, hi = self.sts_score_range
            bad = labels[sts][(labels[sts] < lo) | (labels[sts] > hi)]
            if bad.numel():
                raise ValueError(
                    f"STS scores must lie in sts_score_range={self.sts_score_range}, got {bad.tolist()[:5]}"
                )
        return ~sts, sts

    # ------------------------------------------------------------------ loss

    def compute_loss_from_embeddings(
        self,
        retrieval: list[Tensor],
        sts: list[Tensor],
        scores: Tensor | None,
        num_negatives: int | None = None,
        dim: int | None = None,
        example_ids: Tensor | None = None,
        query_fingerprint: int | None = None,
    ) -> Any:
        """The loss from embeddings.

        Args:
            retrieval: ``[anchor, positive, negative_1..negative_j]`` embeddings of this rank's
                retrieval rows, each (B, D); empty when this rank has no retrieval rows.
            sts: ``[sentence1, sentence2]`` embeddings of this rank's STS rows, each (S, D), or empty.
            scores: (S,) STS scores.
            num_negatives: j, negatives per query on this rank (for ranks without retrieval rows).
            dim: embedding size D (for ranks without retrieval rows).
            example_ids: (B,) ids of the retrieval rows, for the observers of :meth:`add_score_observer`.
            query_fingerprint: a hash of this rank's queries; on several processes the retrieval
                ranks' fingerprints must agree (they share queries), else the step fails.
        """
        out = self._loss_terms(retrieval, sts, scores, num_negatives, dim, example_ids, query_fingerprint)
        if self.return_dict and not _inside_adaptive_layer_loss(self.model):
            return LossTerms(out)
        return out["retrieval"] + out["sts"]

    def _loss_terms(
        self, retrieval, sts, scores, num_negatives, dim, example_ids, query_fingerprint
    ) -> dict[str, Tensor]:
        """``{"retrieval": ..., "sts": ...}``, each weighted for DDP's average (see the class docstring)."""
        layout = TaskLayout.current(self.retrieval_ranks)
        ref = (retrieval or sts or [None])[0]
        if ref is None:
            raise ValueError("a batch with neither retrieval nor STS rows")
        zero = ref.sum() * 0.0  # keeps every rank's graph connected to the model
        if layout.world_size > 1:  # a collective: every rank joins, with or without queries
            _check_shared_queries(query_fingerprint if retrieval else None, layout, ref.device)
        ret_loss = self._retrieval_loss(
            retrieval, layout, num_negatives, dim or ref.shape[-1], zero, example_ids
        )
        sts_loss = zero
        if sts:
            self._warn_if_no_sts_signal(scores)
            sts_loss = self.cosent.compute_loss_from_embeddings(sts, scores)
        return {
            "retrieval": ret_loss * layout.retrieval_weight,
            "sts": sts_loss * self.sts_weight * layout.sts_weight,
        }

    def _retrieval_loss(
        self, retrieval, layout: TaskLayout, num_negatives, dim: int, zero: Tensor, example_ids=None
    ) -> Tensor:
        if retrieval:
            q, p, negs = retrieval[0], retrieval[1], retrieval[2:]
            b, j = q.shape[0], len(negs)
            local = (
                torch.stack(negs, 1).reshape(b * j, -1) if j else q.new_zeros((0, q.shape[-1]))
            )  # (B*j, D)
        else:
            # a rank without retrieval rows still joins the collective, with no rows
            q = p = None
            b, j = 0, num_negatives or 0
            local = zero.new_zeros((0, dim)) + zero
        if layout.world_size > 1:
            gathered, offsets = shared_dist.gather(local, return_offsets=True)  # (R*B*j, D)
            counts = [offsets[r + 1] - offsets[r] for r in range(layout.world_size)]
            ret_counts = counts[: layout.retrieval_ranks]
            if len(set(ret_counts)) > 1 or any(counts[layout.retrieval_ranks :]):
                table = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
                raise DistributedOperationError(
                    "retrieval ranks must hold the same queries and the same number of negatives "
                    f"(rows of negatives per rank: {table})"
                )
        else:
            gathered = local
        if q is None:
            # no queries here, but the backward pass of the gather is a collective too: keep
            # this rank's graph through it so every rank joins the reduce-scatter
            return zero + gathered.sum() * 0.0
        # (B, j) own negatives on each of the R retrieval ranks, rank-major: index k*B*j + i*j + t
        sim_pos = _cos(q, p)  # (B, B)
        sim_neg = _cos(q, gathered)  # (B, R*B*j)
        rows = torch.arange(b, device=q.device)
        r = gathered.shape[0] // max(b * j, 1)
        own = (
            sim_neg.view(b, r, b, j)[rows, :, rows] if j else None
        )  # (B, R, j): query i vs its own negatives
        observing = self._score_observers and example_ids is not None and own is not None
        # with MatryoshkaLoss, report only the full-size embeddings' scores
        if observing and q.shape[-1] == _unwrap(self.model).get_embedding_dimension():
            scores = own.detach().mean(dim=(1, 2))  # (B,), once for every observer
            for observer in self._score_observers:
                observer(example_ids, scores)
        if self.in_batch_negatives:
            logits = torch.cat([sim_pos, sim_neg], 1) * self.scale
            return nn.functional.cross_entropy(logits, rows)
        logits = torch.cat([sim_pos[rows, rows].unsqueeze(1), own.reshape(b, r * j)], 1) * self.scale
        return nn.functional.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=q.device))

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "sts_weight": self.sts_weight,
            "sts_scale": self.sts_scale,
            "in_batch_negatives": self.in_batch_negatives,
            "retrieval_ranks": self.retrieval_ranks,
            "sts_score_range": self.sts_score_range,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return """
@misc{li2024conanembedding,
      title={Conan-embedding: General Text Embedding with More and Better Negative Samples},
      author={Shiyu Li and Yang Tang and Shizhe Chen and Xi Chen},
      year={2024},
      eprint={2408.15710},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2408.15710},
}

@online{su2022cosent,
      title={CoSENT: A more efficient sentence vector scheme than Sentence-BERT},
      author={Su, Jianlin},
      year={2022},
      month={Jan},
      url={https://kexue.fm/archives/8847},
}
"""


_NO_QUERIES = -(2**62)


def _fingerprint(feature: dict[str, Any]) -> int | None:
    """A 56-bit hash of the tokenised rows (None for inputs without token ids)."""
    ids = feature.get("input_ids")
    if not isinstance(ids, Tensor):
        return None
    mask = feature.get("attention_mask")
    ids = ids.detach().cpu()
    mask = mask.detach().cpu().bool() if isinstance(mask, Tensor) else torch.ones_like(ids, dtype=torch.bool)
    h = hashlib.blake2b(digest_size=7)
    h.update(ids[mask].numpy().tobytes())
    h.update(mask.sum(1).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def _check_shared_queries(fingerprint: int | None, layout: TaskLayout, device: torch.device) -> None:
    """One all-reduce (max of h and of -h): the retrieval ranks must hold the same queries.

    Every rank joins, the STS ranks with a neutral value, and every rank sees the same result,
    so a mismatch raises everywhere instead of silently scoring queries against negatives mined
    for other queries (as the default sampler or ``fit()`` under DDP would feed it).
    """
    key = torch.tensor(
        [fingerprint, -fingerprint] if fingerprint is not None else [_NO_QUERIES, _NO_QUERIES],
        dtype=torch.int64,
        device=device,
    )
    hi, neg_lo = shared_dist.reduce(key, op="max").tolist()
    if hi != _NO_QUERIES and hi != -neg_lo:
        raise DistributedOperationError(
            f"the {layout.retrieval_ranks} retrieval ranks hold different queries in this step; "
            "CrossGPUBalancingLoss needs the same (anchor, positive) rows on ranks 0..R-1 with the "
            "negatives split among them: train with conan_st.TaskBalancedBatchSampler "
            "(multi_dataset_batch_sampler=TaskBalancedBatchSampler.configure(...)); the default "
            "sampler and fit() under DDP give every rank different rows"
        )


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).T


def _batch_size(feature: dict[str, Any]) -> int:
    for v in feature.values():
        if isinstance(v, Tensor) and v.dim() >= 1:
            return v.shape[0]
    raise ValueError("could not infer the batch size of a feature column")


_SELECTED = "_conan_st_selected"


def _select_rows(feature: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """Keep ``rows`` of every batch tensor and trim padding columns no kept row uses.

    The same ``feature`` and ``rows`` give back the SAME dict: wrappers that call the loss again
    on the same features (``AdaptiveLayerLoss``) find what the model cached in it (all layers).
    """
    cached = feature.get(_SELECTED)
    if cached is not None and torch.equal(cached[0], rows):
        return cached[1]
    n = rows.shape[0]
    out = {
        k: (v[rows] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
        for k, v in feature.items()
        if k != _SELECTED
    }
    mask = out.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] and mask.any():
        width = int(mask.any(0).nonzero().max()) + 1  # last column any row uses (right padding)
        for k, v in out.items():
            if isinstance(v, Tensor) and v.dim() == 2 and v.shape == mask.shape:
                out[k] = v[:, :width]
    feature[_SELECTED] = (rows, out)
    return out


def _inside_adaptive_layer_loss(model: nn.Module) -> bool:
    """Whether ``AdaptiveLayerLoss`` (or ``Matryoshka2dLoss``) currently wraps the model's forward: it
    adds a KL tensor to what the loss returns, so the loss must return a tensor, not terms."""
    fn = getattr(model, "forward", None)
    while isinstance(fn, (MatryoshkaForward, AdaptiveLayerForward)):
        if isinstance(fn, AdaptiveLayerForward):
            return True
        fn = fn.fn
    return False


def _unwrap(model: nn.Module) -> nn.Module:
    """The SentenceTransformer inside a DDP wrapper (the trainer hands the loss the wrapped model)."""
    return getattr(model, "module", model)


class LossTerms(dict):
    """Loss terms by name that scale and add term by term.

    Wrappers that combine losses linearly (``MatryoshkaLoss``: ``loss = 0.0; loss += w * inner(...)``)
    then hand the trainer a dict, which it logs per term and sums for the backward pass.
    """

    def __mul__(self, weight: Any) -> LossTerms:
        return LossTerms({k: v * weight for k, v in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, weight: Any) -> LossTerms:
        return LossTerms({k: v / weight for k, v in self.items()})

    def __add__(self, other: Any) -> LossTerms:
        if isinstance(other, dict):
            return LossTerms({k: self.get(k, 0.0) + other.get(k, 0.0) for k in {**self, **other}})
        if isinstance(other, (int, float)) and other == 0:  # the wrappers' running sum starts at 0.0
            return LossTerms(self)
        return NotImplemented

    __radd__ = __add__
