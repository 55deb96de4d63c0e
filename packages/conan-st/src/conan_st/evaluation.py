"""mteb evaluation on the local data sets (no Hub): retrieval and STS tasks built from files.

``local_tasks(data_dir)`` returns mteb tasks for CMRC2018 (zh retrieval), Cranfield (en
retrieval), STS-B-zh and STS-B-en test splits; ``evaluate_models`` runs ``mteb.evaluate``
on them and returns a tidy table. ``python -m conan_st.evaluation MODEL [MODEL ...] --out PREFIX``
prints it, writes it (PREFIX.json, PREFIX.md) and keeps mteb's own result files under
``PREFIX_mteb/`` (mteb's ``ResultCache`` layout: ``results/<model>/<revision>/<task>.json``), the
files published mteb results are compared with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .cli import TASK_NAMES, MissingExtraError  # noqa: F401  (TASK_NAMES re-exported where the tasks are)

try:  # mteb is the [mteb] extra: training needs none of it
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise MissingExtraError(
        f"conan_st.evaluation needs mteb ({err}); install it with: pip install 'conan-st[mteb]'"
    ) from err

from .checkpoints import write_text_atomic
from .data import default_data_dir, load_beir, load_sts

_COMMON: dict[str, Any] = dict(
    reference=None,
    category="t2t",
    eval_splits=["test"],
    date=None,
    domains=None,
    task_subtypes=None,
    license=None,
    annotations_creators=None,
    dialect=None,
    modalities=["text"],
    sample_creation=None,
    bibtex_citation=None,
)


def _metadata(
    name: str, description: str, path: Path, task_type: str, main_score: str, lang: str
) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=description,
        dataset={"path": str(path), "revision": "local"},
        type=task_type,
        eval_langs=[lang],
        main_score=main_score,
        **_COMMON,
    )


class LocalRetrievalTask(AbsTaskRetrieval):
    """A BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) as an mteb task.

    mteb reads ``metadata`` from the class, so :meth:`create` makes one subclass per task.
    """

    folder: Path
    max_queries: int | None = None

    @classmethod
    def create(
        cls, name: str, folder: str | Path, lang: str, max_queries: int | None = None
    ) -> LocalRetrievalTask:
        folder = Path(folder)
        md = _metadata(
            name, f"local retrieval task from {folder.name}", folder, "Retrieval", "ndcg_at_10", lang
        )
        return type(name, (cls,), {"metadata": md, "folder": folder, "max_queries": max_queries})()

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        corpus, queries, qrels = load_beir(self.folder, "test")
        if self.max_queries:
            keep = sorted(queries)[: self.max_queries]
            queries = {q: queries[q] for q in keep}
            qrels = {q: qrels[q] for q in keep}
        if not corpus or not queries:
            raise ValueError(f"{self.folder}: empty corpus or no test queries")
        self.corpus, self.queries, self.relevant_docs = {"test": corpus}, {"test": queries}, {"test": qrels}
        self.data_loaded = True


class LocalSTSTask(AbsTaskSTS):
    """An STS TSV (sentence1, sentence2, score in [0, 5]) as an mteb task."""

    min_score = 0
    max_score = 5
    path: Path

    @classmethod
    def create(cls, name: str, path: str | Path, lang: str) -> LocalSTSTask:
        path = Path(path)
        md = _metadata(name, f"local STS task from {path.name}", path, "STS", "cosine_spearman", lang)
        return type(name, (cls,), {"metadata": md, "path": path})()

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = {"test": load_sts(self.path)}
        self.data_loaded = True


def local_tasks(
    data_dir: str | Path | None = None, names: list[str] | None = None, max_queries: int | None = None
) -> list:
    """The local tasks by name; ``max_queries`` keeps the first k test queries of retrieval tasks."""
    root = Path(data_dir or default_data_dir()) / "text"
    table = {
        "CMRC2018Local": lambda: LocalRetrievalTask.create(
            "CMRC2018Local", root / "retrieval/cmrc2018", "zho-Hans", max_queries
        ),
        "CranfieldLocal": lambda: LocalRetrievalTask.create(
            "CranfieldLocal", root / "retrieval/cranfield", "eng-Latn", max_queries
        ),
        "STSBzhLocal": lambda: LocalSTSTask.create(
            "STSBzhLocal", root / "pairs/zh/stsb-zh-test.tsv", "zho-Hans"
        ),
        "STSBenLocal": lambda: LocalSTSTask.create(
            "STSBenLocal", root / "pairs/en/stsb-en-test.tsv", "eng-Latn"
        ),
    }
    names = names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {sorted(table)}")
    return [table[n]() for n in names]


def evaluate_model(
    model, tasks: list, batch_size: int = 64, results_dir: str | Path | None = None
) -> dict[str, float]:
    """Main score of each task (nDCG@10 for retrieval, cosine Spearman for STS).

    ``results_dir``: also write mteb's result files there (re-evaluated every call, never read back:
    a retrained model under the same name must not reuse its predecessor's scores).
    """
    import mteb
    from mteb.cache import ResultCache

    results = mteb.evaluate(
        model,
        tasks,
        cache=ResultCache(results_dir) if results_dir is not None else None,
        overwrite_strategy="always",
        encode_kwargs={"batch_size": batch_size},
        show_progress_bar=False,
    )
    scores = {}
    for res in results.task_results:
        scores[res.task_name] = float(res.get_score())
    return scores


def main(argv: list[str] | None = None) -> None:
    """``conan-evaluate``: parse (`conan_st.cli`), then evaluate."""
    from .cli import evaluate_parser

    run_cli(evaluate_parser().parse_args(argv))


def run_cli(args: argparse.Namespace) -> None:
    from sentence_transformers import SentenceTransformer

    tasks = local_tasks(args.data_dir, args.tasks)
    mteb_dir = args.out + "_mteb" if args.out else None
    table = {}
    for m in args.models:
        model = SentenceTransformer(
            m, device=args.device
        )  # None: sentence-transformers picks the accelerator
        print(f"evaluating {m} on {model.device}")
        if not model.model_card_data.model_name:  # mteb files results under the model's name
            model.model_card_data.model_name = f"local/{Path(m).resolve().name}"
        table[m] = evaluate_model(model, tasks, results_dir=mteb_dir)
    names = [t.metadata.name for t in tasks]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{table[m][n]:.4f}" for n in names) + " |" for m in args.models]
    print("\n".join(lines))
    if args.out:
        write_text_atomic(args.out + ".json", json.dumps(table, indent=2))
        write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
