"""Prompt–response pairs (e.g. from an LLM) → (query, positive) training pairs (Conan, section 3.1)."""

from __future__ import annotations

import re
from collections import Counter

import torch
from datasets import Dataset

DEFAULT_REFUSALS = (
    r"\bas an ai\b",
    r"\bi(?: am|'m) sorry\b",
    r"\bi cannot\b",
    r"\bi can(?:'|no)t help\b",
    r"\bi'm unable\b",
    r"\bi am unable\b",
    r"\bas a language model\b",
    "抱歉",
    "对不起",
    "作为一个人工智能",
    "作为一个ai",
    "作为ai",
    "我无法",
    "我不能",
)


def filter_prompt_response_pairs(
    dataset: Dataset,
    prompt_column: str = "prompt",
    response_column: str = "response",
    min_chars: int = 4,
    max_chars: int = 2048,
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSALS,
    deduplicate: bool = True,
    score_model=None,
    min_score: float = 0.4,
    batch_size: int = 64,
) -> tuple[Dataset, dict[str, int]]:
    """Rule filters, then an optional model-score filter; returns (anchor, positive) pairs and counts.

    Rules, in order: empty or too short/long prompt or response (``min_chars``/``max_chars``),
    refusal or boilerplate responses (``refusal_patterns``, case-insensitive regexes), and
    duplicate prompts or duplicate (prompt, response) pairs (first kept). With ``score_model``
    (a SentenceTransformer), pairs whose prompt·response cosine is below ``min_score`` are dropped
    (the paper's 0.4).

    Returns:
        the kept pairs as a Dataset(anchor, positive), and ``{reason: rows dropped}`` plus ``kept``.
    """
    missing = [c for c in (prompt_column, response_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset is missing columns {missing}; has {dataset.column_names}")
    refusal = re.compile("|".join(refusal_patterns), re.IGNORECASE) if refusal_patterns else None
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    anchors, positives = [], []
    for prompt, response in zip(dataset[prompt_column], dataset[response_column]):
        p, r = (prompt or "").strip(), (response or "").strip()
        if not min_chars <= len(p) <= max_chars or not min_chars <= len(r) <= max_chars:
            dropped["length"] += 1
        elif refusal is not None and refusal.search(r):
            dropped["refusal"] += 1
        elif deduplicate and p in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(p)
            anchors.append(p)
            positives.append(r)
    if score_model is not None and anchors:
        a = score_model.encode(
            anchors, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        b = score_model.encode(
            positives, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        keep = ((a * b).sum(-1) >= min_score).cpu()
        dropped["score"] = int((~keep).sum())
        idx = torch.nonzero(keep).flatten().tolist()
        anchors, positives = [anchors[i] for i in idx], [positives[i] for i in idx]
    counts = {"length": 0, "refusal": 0, "duplicate": 0, "score": 0, **dropped, "kept": len(anchors)}
    return Dataset.from_dict({"anchor": anchors, "positive": positives}), counts
