"""Built-in conan-st plugins: exact torch search, faiss search, NV-Retriever negative filter."""

from __future__ import annotations

import importlib.util

import torch
from sentence_transformers.util import dot_score, semantic_search

from .hookspecs import hookimpl


class TorchSearch:
    """Exact inner-product top-k: sentence-transformers' ``util.semantic_search`` (chunked, so
    memory ~ corpus + one query block x corpus block), as tensors."""

    name = "torch"

    def __init__(self, query_block: int = 1024, corpus_block: int = 65536) -> None:
        self.query_block, self.corpus_block = query_block, corpus_block

    @torch.inference_mode()
    def search(
        self, queries: torch.Tensor, corpus: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check(queries, corpus, top_k)
        hits = semantic_search(
            queries, corpus, self.query_block, self.corpus_block, top_k, score_function=dot_score
        )  # per query: [{"corpus_id", "score"}], best first
        scores = torch.tensor([[h["score"] for h in row] for row in hits], dtype=queries.dtype)  # (Q, k)
        ids = torch.tensor([[h["corpus_id"] for h in row] for row in hits], dtype=torch.long)  # (Q, k)
        return scores, ids


class FaissSearch:
    """Exact inner-product search with faiss (IndexFlatIP)."""

    name = "faiss"

    def search(
        self, queries: torch.Tensor, corpus: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss

        _check(queries, corpus, top_k)
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(corpus.detach().float().cpu().contiguous().numpy())
        scores, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), top_k)
        return torch.from_numpy(scores), torch.from_numpy(idx).long()


def _check(queries: torch.Tensor, corpus: torch.Tensor, top_k: int) -> None:
    if corpus.shape[0] == 0:
        raise ValueError("corpus is empty: nothing to search")
    if queries.dim() != 2 or corpus.dim() != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"queries (Q, D) and corpus (N, D) must share D, got {tuple(queries.shape)}, {tuple(corpus.shape)}"
        )
    if not 0 < top_k <= corpus.shape[0]:
        raise ValueError(f"top_k must be in [1, {corpus.shape[0]}] (corpus size), got {top_k}")


class PositiveRatioFilter:
    """NV-Retriever's rule: drop candidates scoring above ``ratio`` x the positive's score.

    Written as sentence-transformers' ``relative_margin = 1 - ratio`` (``mine_hard_negatives``):
    keep ``score <= pos - |pos| * (1 - ratio)``, which is ``ratio * pos`` for a positive ``pos``
    and stays BELOW ``pos`` when ``pos`` is negative (``ratio * pos`` would lie above it).
    """

    def __init__(self, ratio: float = 0.95) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def __call__(self, candidate_scores: torch.Tensor, positive_scores: torch.Tensor) -> torch.Tensor:
        pos = positive_scores.unsqueeze(1)  # (Q, 1)
        return candidate_scores <= pos - pos.abs() * (1 - self.ratio)


@hookimpl
def conan_search_backends():
    table = {"torch": TorchSearch}
    if importlib.util.find_spec("faiss") is not None:
        table["faiss"] = FaissSearch
    return table


@hookimpl
def conan_negative_filters():
    return {"positive_ratio": PositiveRatioFilter}
