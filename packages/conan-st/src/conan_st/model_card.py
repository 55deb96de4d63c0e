"""The training-data section of the sentence-transformers model card, told the way conan-st lays out data.

``make_balanced_datasets`` gives both tasks ONE set of columns (a batch holds rows of both), and
the dynamic-negatives dataset carries each retrieval row's example id in ``score`` (the only
column, besides ``label``, that sentence-transformers passes to the loss as a label). The card that
sentence-transformers computes from those datasets would show empty-string statistics for the other
task's columns and example ids as similarity "scores"; :func:`tidy_model_card_data` rewrites each
dataset's entry to show only its own columns and to name the ids for what they are.
"""

from __future__ import annotations

import math
from textwrap import indent

import torch
from transformers.modelcard import make_markdown_table

from .labels import is_id_label, label_to_id

RETRIEVAL_COLUMNS = ("anchor", "positive")
STS_COLUMNS = ("sentence1", "sentence2", "score")


def _own_columns(columns: list[str], examples: dict) -> list[str] | None:
    """The columns of this dataset's task, or None if it is not a conan-st balanced dataset."""
    if not set(RETRIEVAL_COLUMNS + STS_COLUMNS) <= set(columns):
        return None
    is_sts = all(a == "" for a in examples["anchor"]) and any(s != "" for s in examples["sentence1"])
    if is_sts:
        return list(STS_COLUMNS)
    return [c for c in columns if c not in ("sentence1", "sentence2")]


def _stats_table(stats: dict) -> str:
    # the same three rows sentence-transformers renders (model_card.compute_dataset_metrics)
    def html_list(data: dict) -> str:
        return (
            "<ul><li>" + "</li><li>".join(f"{k}: {v}" for k, v in data.items()) + "</li></ul>" if data else ""
        )

    lines = [
        {"": "type", **{k: v["dtype"] for k, v in stats.items()}},
        {"": "modality", **{k: v.get("modality", "") for k, v in stats.items()}},
        {"": "details", **{k: html_list(v["data"]) for k, v in stats.items()}},
    ]
    return indent(make_markdown_table(lines).replace("-:|", "--|"), "  ")


def tidy_dataset_info(info: dict, num_examples: int | None = None) -> bool:
    """Rewrite one dataset entry of the card in place; False if it is not conan-st's layout."""
    columns, examples = info.get("_example_columns"), info.get("examples")
    if not columns or not examples or "stats" not in info:
        return False
    keep = _own_columns(columns, examples)
    if keep is None:
        return False
    examples = {c: list(examples[c]) for c in keep}
    stats = {c: info["stats"][c] for c in keep if c in info["stats"]}
    if "score" in keep and "sentence1" not in keep:
        scores = torch.tensor([math.nan if s is None else s for s in examples["score"]], dtype=torch.float32)
        if len(scores) and bool(is_id_label(scores).all()):
            ids = label_to_id(scores).tolist()
            examples["score"] = ids
            data = {"meaning": "the row's example id, read by the loss to report scores to the miner"}
            if num_examples:
                data["range"] = f"0 to {num_examples - 1}"
            stats["score"] = {"dtype": "example id (not a similarity score)", "modality": "", "data": data}
        else:  # the loss-only layout: NaN marks a retrieval row
            keep.remove("score")
            examples.pop("score")
            stats.pop("score", None)
    info["_example_columns"] = keep
    info["examples"] = examples
    info["columns"] = [f"<code>{c}</code>" for c in keep]
    info["stats"] = stats
    info["stats_table"] = _stats_table(stats)
    return True


def tidy_model_card_data(card_data, num_examples: int | None = None) -> int:
    """Apply :func:`tidy_dataset_info` to every train/eval dataset of a model's ``model_card_data``;
    returns how many entries were rewritten. sentence-transformers renders the example tables from
    ``examples`` when it writes the card, so the rewritten entries are what the card shows."""
    count = 0
    for infos in (getattr(card_data, "train_datasets", None), getattr(card_data, "eval_datasets", None)):
        for info in infos or []:
            count += tidy_dataset_info(info, num_examples)
    return count
