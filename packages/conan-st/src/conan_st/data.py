"""Datasets for conan-st: task-balanced training sets and loaders for ``../shared/data/text``."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from datasets import Dataset, DatasetDict

STS_COLUMNS = ("sentence1", "sentence2", "score")


DATA_LAYOUT = "text/pairs and text/retrieval"  # what the shared data folder holds for this package


# Copied from rrcm_diffusers.data.default_data_dir with RRCM->CONAN
def default_data_dir() -> Path:
    """``$CONAN_DATA_DIR``, else ``../shared/data`` relative to the working directory."""
    path = Path(os.environ.get("CONAN_DATA_DIR", Path.cwd().parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder not found: {path}. Point CONAN_DATA_DIR at the shared data folder "
            f"(the one holding {DATA_LAYOUT})."
        )
    return path


def same_text(text: str) -> str:
    """The one rule for "the same text" (miner, corpus and sampler all use it): texts that differ only
    in letter case or white space are the same answer. A query's twin in the same batch would make
    its positive an in-batch negative; a document equal to a positive must never be served as one."""
    return " ".join(text.split()).casefold()


def check_texts(dataset: Dataset, columns: list[str] | tuple[str, ...], name: str) -> None:
    """Every value of ``columns`` is a string: a None (a missing cell) or a number would reach the
    tokenizer as a raw TypeError, or be embedded as the text "None"."""
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                raise ValueError(
                    f"{name} dataset, column {column!r}, row {row}: expected a text (str), got {value!r}"
                )


def negative_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c == "negative" or c.startswith("negative_")]


def check_retrieval_columns(dataset: Dataset, name: str = "retrieval") -> list[str]:
    """Columns must be anchor, positive, then negative columns; returns the negative columns."""
    cols = list(dataset.column_names)
    negs = negative_columns(cols)
    missing = [c for c in ("anchor", "positive") if c not in cols]
    extra = [c for c in cols if c not in ("anchor", "positive", *negs)]
    if missing or extra:
        raise ValueError(
            f"{name} dataset must have columns anchor, positive, negative_1..negative_m; "
            f"missing {missing}, unexpected {extra}"
        )
    if cols[:2] != ["anchor", "positive"]:
        raise ValueError(f"{name} dataset columns must start with anchor, positive; got {cols}")
    return negs


def check_sts(dataset: Dataset, score_range: tuple[float, float] | None = (0.0, 5.0)) -> None:
    cols = list(dataset.column_names)
    if sorted(cols) != sorted(STS_COLUMNS):
        missing = [c for c in STS_COLUMNS if c not in cols]
        extra = [c for c in cols if c not in STS_COLUMNS]
        raise ValueError(
            f"sts dataset must have columns sentence1, sentence2, score; missing {missing}, unexpected {extra}"
        )
    check_texts(dataset, ("sentence1", "sentence2"), "sts")
    for row, score in enumerate(dataset["score"]):
        # NaN marks a RETRIEVAL row in the balanced schema: an STS pair without a score is the
        # user's data, named here, not a problem of make_balanced_datasets
        number = isinstance(score, (int, float)) and not isinstance(score, bool)
        if not number or not math.isfinite(score):
            raise ValueError(
                f"sts dataset, column 'score', row {row}: expected a finite number, got {score!r}"
            )
        if score_range is not None and not score_range[0] <= score <= score_range[1]:
            raise ValueError(
                f"sts dataset, column 'score', row {row}: {score!r} is outside sts_score_range {score_range}"
            )


def make_balanced_datasets(
    retrieval: Dataset, sts: Dataset, sts_score_range: tuple[float, float] | None = (0.0, 5.0)
) -> DatasetDict:
    """Two task datasets with ONE set of columns, so a batch can hold rows of both.

    Columns: ``anchor, positive, negative_1..m, sentence1, sentence2, score``. Retrieval rows
    have empty STS texts and ``score = NaN``; STS rows have empty retrieval texts. The loss
    tells the rows apart by the NaN and embeds each column only for its own rows.
    """
    check_sts(sts, sts_score_range)
    if len(retrieval) == 0 or len(sts) == 0:
        raise ValueError(f"each task needs data: {len(retrieval)} retrieval rows, {len(sts)} sts rows")
    n_r, n_s = len(retrieval), len(sts)
    if "_example_id" in retrieval.column_names:
        # negatives resolved per row from a NegativeStore: the transform already yields this schema
        row = retrieval[0]
        negs = negative_columns(list(row))
        if list(row) != ["anchor", "positive", *negs, *STS_COLUMNS]:
            raise ValueError("a dynamic-negatives dataset must be built with balanced=True")
        ret_cols = {c: [""] for c in ("anchor", "positive", *negs)}
        ret_out = retrieval
    else:
        negs = check_retrieval_columns(retrieval)
        check_texts(retrieval, ["anchor", "positive", *negs], "retrieval")
        r = retrieval.to_dict()
        ret_cols = {"anchor": r["anchor"], "positive": r["positive"], **{c: r[c] for c in negs}}
        ret_out = Dataset.from_dict(
            {**ret_cols, "sentence1": [""] * n_r, "sentence2": [""] * n_r, "score": [math.nan] * n_r}
        )
    s = sts.to_dict()
    sts_rows = {
        **{c: [""] * n_s for c in ret_cols},
        "sentence1": s["sentence1"],
        "sentence2": s["sentence2"],
        "score": [float(x) for x in s["score"]],
    }
    return DatasetDict({"retrieval": ret_out, "sts": Dataset.from_dict(sts_rows)})


# ----------------------------------------------------------------------------- shared data loaders


def load_sts(path: str | Path) -> Dataset:
    """An STS/pair TSV (``sentence1 \\t sentence2 \\t score``, no header)."""
    rows = {"sentence1": [], "sentence2": [], "score": []}
    with open(path, encoding="utf-8", newline="") as f:
        for line in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(line) < 3:
                continue
            rows["sentence1"].append(line[0])
            rows["sentence2"].append(line[1])
            rows["score"].append(float(line[2]))
    if not rows["score"]:
        raise ValueError(f"no rows read from {path}")
    return Dataset.from_dict(rows)


def load_beir(
    folder: str | Path, split: str
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus id → text, query id → text, qrels query id → {doc id: relevance}) of one split."""
    folder = Path(folder)
    corpus = {}
    with open(folder / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            corpus[d["_id"]] = (d.get("title", "") + " " + d["text"]).strip() if d.get("title") else d["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(folder / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")
            if int(float(score)) > 0:
                qrels.setdefault(qid, {})[did] = int(float(score))
    queries = {}
    with open(folder / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if d["_id"] in qrels:
                queries[d["_id"]] = d["text"]
    return corpus, queries, qrels


def retrieval_pairs(folder: str | Path, split: str = "train") -> Dataset:
    """(anchor, positive) pairs from a BEIR folder, one row per (query, relevant doc)."""
    corpus, queries, qrels = load_beir(folder, split)
    anchors, positives = [], []
    for qid, docs in qrels.items():
        for did in docs:
            if did in corpus:
                anchors.append(queries[qid])
                positives.append(corpus[did])
    return Dataset.from_dict({"anchor": anchors, "positive": positives})
