"""conan-st under hostile input: an error naming the argument and what was expected, never a
silently dropped column, a meaningless rule or a positive served as a negative."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from conan_st import CrossGPUBalancingLoss, DynamicHardNegativeMiningCallback, NegativeStore
from conan_st.mining import mine_candidates
from conan_st.sampler import _int_at_least
from tests.conan.helpers import collate, retrieval_ds

LOSS_CASES = {
    "sts_weight nan": (dict(sts_weight=math.nan), "sts_weight must be a finite number >= 0"),
    "sts_weight negative": (dict(sts_weight=-0.5), "sts_weight must be a finite number >= 0"),
    "sts_weight inf": (dict(sts_weight=math.inf), "sts_weight must be a finite number >= 0"),
    "scale inf": (dict(scale=math.inf), "scale and sts_scale must be finite and > 0"),
    "sts_scale zero": (dict(sts_scale=0.0), "scale and sts_scale must be finite and > 0"),
    "retrieval_ranks 0": (dict(retrieval_ranks=0), "retrieval_ranks must be None"),
    "retrieval_ranks -1": (dict(retrieval_ranks=-1), "retrieval_ranks must be None"),
    "retrieval_ranks 1.5": (dict(retrieval_ranks=1.5), "retrieval_ranks must be None"),
    "sts_score_range reversed": (dict(sts_score_range=(5.0, 0.0)), "sts_score_range must be"),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_bad_loss_argument_is_named(case, tiny):
    kwargs, match = LOSS_CASES[case]
    with pytest.raises(ValueError, match=match):
        CrossGPUBalancingLoss(tiny, **kwargs)


def test_labels_without_sts_columns_do_not_drop_negatives(tiny):
    # retrieval-only rows (anchor, positive, negative_1, negative_2) with a NaN label column: the
    # loss would read the two negatives as (sentence1, sentence2) and train without them
    rows = retrieval_ds(4, 2).add_column("score", [math.nan] * 4)
    feats, labels = collate(tiny, [rows[i] for i in range(4)])
    with pytest.raises(ValueError, match="have text in the sentence1 column: these look like negatives"):
        CrossGPUBalancingLoss(tiny)(feats, labels)


def _store(n: int = 12, depth: int = 30) -> NegativeStore:
    return NegativeStore(torch.arange(n * depth).view(n, depth) % 50, num_negatives=2, skip=10)


CALLBACK_CASES = {
    "ratio negative": (dict(ratio=-1.0), "ratio must be a finite number > 0"),
    "ratio nan": (dict(ratio=math.nan), "ratio must be a finite number > 0"),
    "ratio zero": (dict(ratio=0.0), "ratio must be a finite number > 0"),
    "abs_bound zero": (dict(abs_bound=0.0), r"abs_bound must be in \(0, 1\]"),
    "abs_bound 2": (dict(abs_bound=2.0), r"abs_bound must be in \(0, 1\]"),
    "interval 0": (dict(interval=0), "interval must be an int >= 1"),
    "interval 2.5": (dict(interval=2.5), "interval must be an int >= 1"),
    "rescore_sample 0": (dict(rescore_sample=0), "rescore_sample must be None or >= 1"),
    "score_source typo": (dict(score_source="los"), "score_source must be 'loss' or 'rescore'"),
    "loss scores without a loss": (dict(score_source="loss"), "score_source='loss' needs the loss"),
    "queries of another length": (dict(queries=["q"] * 5), "5 queries for a store of 12 examples"),
}


@pytest.mark.parametrize("case", list(CALLBACK_CASES))
def test_bad_callback_argument_is_named(case):
    kwargs = {"queries": [f"q{i}" for i in range(12)], "score_source": "rescore", **CALLBACK_CASES[case][0]}
    with pytest.raises(ValueError, match=CALLBACK_CASES[case][1]):
        DynamicHardNegativeMiningCallback(_store(), corpus=[f"d{i}" for i in range(50)], **kwargs)


STORE_CASES = {
    "a document twice in one list": (
        lambda: NegativeStore(torch.tensor([[3, 4, 5, 4], [1, 2, 3, 6]]), num_negatives=2, skip=0),
        "candidates of example 0 list a document more than once",
    ),
    "1-D candidates": (
        lambda: NegativeStore(torch.arange(5), num_negatives=2),
        r"candidates must be \(num_examples",
    ),
    "fewer candidates than negatives": (
        lambda: NegativeStore(torch.tensor([[1, -1, -1], [1, 2, 3]]), num_negatives=2, skip=0),
        "example 0 has only 1 candidates",
    ),
    "end_policy typo": (
        lambda: NegativeStore(torch.tensor([[1, 2, 3]]), num_negatives=2, skip=0, end_policy="loop"),
        "end_policy must be 'stay' or 'wrap'",
    ),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_bad_store_is_named(case):
    run, match = STORE_CASES[case]
    with pytest.raises(ValueError, match=match):
        run()


@pytest.mark.parametrize(
    "name,value", [("retrieval_batch_size", 0), ("sts_batch_size", -1), ("sts_batch_size", True), ("x", 2.0)]
)
def test_bad_batch_size_is_named(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        _int_at_least(name, value, 8)


def test_case_and_spacing_variants_of_a_positive_are_never_negatives(minilm):
    pairs = Dataset.from_dict(
        {"anchor": ["where is the eiffel tower?"], "positive": ["The Eiffel Tower is in Paris."]}
    )
    corpus = [
        "The Eiffel Tower is in Paris.",  # 0: the positive
        "the eiffel tower is in paris.",  # 1: case variant
        "The  Eiffel Tower   is in Paris. ",  # 2: spacing variant
        "WHERE IS THE EIFFEL TOWER?",  # 3: the query itself, shouted
        *[f"an unrelated note on topic {i}" for i in range(8)],
    ]
    cand, _ = mine_candidates(minilm, list(pairs["anchor"]), corpus, [[0]], depth=8)
    assert not {0, 1, 2, 3} & set(cand[0].tolist()), cand


# ------------------------------------------------------------------ round 3 (#31)


def test_a_querys_case_or_spacing_twin_never_shares_its_batch():
    """One text rule (``data.same_text``) for miner and sampler: the sampler compared exact strings,
    so a twin landed in the same batch and its positive became an in-batch negative."""
    from torch.utils.data import BatchSampler, ConcatDataset, SequentialSampler

    from conan_st import TaskBalancedBatchSampler, make_balanced_datasets
    from tests.conan.helpers import sts_rows

    anchors = [
        "What is the capital of France?",
        "what is  the capital of france ?",
        "What IS the capital of France?",
    ]
    anchors += [f"an unrelated question {i}" for i in range(5)]
    rows = Dataset.from_dict({"anchor": anchors, "positive": [f"answer {i}" for i in range(8)]})
    dd = make_balanced_datasets(rows, sts_rows(4))
    concat = ConcatDataset([dd["retrieval"], dd["sts"]])
    stub = [BatchSampler(SequentialSampler(range(len(d))), 2, True) for d in dd.values()]
    sampler = TaskBalancedBatchSampler(concat, stub, retrieval_batch_size=4, sts_batch_size=2)
    twins = {0, 2}  # rows 0 and 2 differ only in case and spacing; row 1 in a space before "?"
    for batch in sampler:
        assert len(twins & set(batch)) <= 1, batch


def test_twin_queries_share_their_positives_in_the_corpus():
    from conan_st.mining import corpus_from_pairs

    pairs = Dataset.from_dict(
        {"anchor": ["Who wrote it?", "who  wrote it?"], "positive": ["Ann did.", "Bob did."]}
    )
    corpus, positives = corpus_from_pairs(pairs)
    assert corpus == ["Ann did.", "Bob did."] and positives == [
        [0, 1],
        [0, 1],
    ]  # neither is the other's negative


TEXT_CASES = {  # None cells and numbers were a TypeError from the tokenizer, or the text "None"
    "None anchor": (
        lambda: corpus_from_pairs_call({"anchor": ["q", None], "positive": ["a", "b"]}),
        r"pairs dataset, column 'anchor', row 1: expected a text \(str\), got None",
    ),
    "number positive": (
        lambda: corpus_from_pairs_call({"anchor": ["q", "r"], "positive": [2, 3]}),  # ids, not texts
        r"pairs dataset, column 'positive', row 0: expected a text \(str\), got 2",
    ),
    "None extra document": (
        lambda: corpus_from_pairs_call({"anchor": ["q"], "positive": ["a"]}, ["d", None]),
        r"extra_documents\[1\]: expected a text",
    ),
    "None STS sentence": (
        lambda: balanced({"sentence1": ["x", None], "sentence2": ["y", "z"], "score": [1.0, 2.0]}),
        r"sts dataset, column 'sentence1', row 1: expected a text",
    ),
    "NaN STS score": (
        lambda: balanced({"sentence1": ["x", "w"], "sentence2": ["y", "z"], "score": [1.0, math.nan]}),
        r"sts dataset, column 'score', row 1: expected a finite number, got nan",
    ),
    "NaN STS score with no range": (
        lambda: balanced({"sentence1": ["x", "w"], "sentence2": ["y", "z"], "score": [math.nan, 1.0]}, None),
        r"sts dataset, column 'score', row 0: expected a finite number",
    ),
    "STS score out of range": (
        lambda: balanced({"sentence1": ["x", "w"], "sentence2": ["y", "z"], "score": [1.0, 7.0]}),
        r"row 1: 7.0 is outside sts_score_range \(0.0, 5.0\)",
    ),
    "None retrieval negative": (
        lambda: balanced_retrieval({"anchor": ["q"], "positive": ["a"], "negative_1": [None]}),
        r"retrieval dataset, column 'negative_1', row 0: expected a text",
    ),
}


def corpus_from_pairs_call(columns, extra=None):
    from conan_st.mining import corpus_from_pairs

    return corpus_from_pairs(Dataset.from_dict(columns), extra)


def balanced(sts_columns, score_range=(0.0, 5.0)):
    from conan_st import make_balanced_datasets

    return make_balanced_datasets(retrieval_ds(2, 1), Dataset.from_dict(sts_columns), score_range)


def balanced_retrieval(columns):
    from conan_st import make_balanced_datasets
    from tests.conan.helpers import sts_rows

    return make_balanced_datasets(Dataset.from_dict(columns), sts_rows(2))


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_a_bad_text_or_score_is_named_with_its_row(case):
    run, match = TEXT_CASES[case]
    with pytest.raises(ValueError, match=match):
        run()


ROUND3_STORE_CASES = {
    "-1 in the middle of a row": (
        lambda: NegativeStore(torch.tensor([[3, -1, 5, 6], [1, 2, 3, 6]]), num_negatives=2, skip=0),
        r"candidates of example 0 must be corpus ids >= 0, padded with -1 at the end only",
    ),
    "-1 first": (
        lambda: NegativeStore(torch.tensor([[1, 2, 3, 6], [-1, 2, 3, 6]]), num_negatives=2, skip=0),
        "candidates of example 1 must be corpus ids >= 0",
    ),
    "-2 as padding": (
        lambda: NegativeStore(torch.tensor([[1, 2, 3, -2]]), num_negatives=2, skip=0),
        "padded with -1 at the end only",
    ),
    "float candidates": (
        lambda: NegativeStore(torch.tensor([[1.0, 2.0, 3.0]]), num_negatives=2, skip=0),
        "candidates must hold integer corpus ids",
    ),
    "ids past the corpus": (
        lambda: DynamicHardNegativeMiningCallback(
            NegativeStore(torch.tensor([[1, 2, 30]]), num_negatives=2, skip=0),
            ["q"],
            corpus=["d"] * 10,
            score_source="rescore",
        ),
        "the store's candidates name document 30, but the corpus holds 10 documents",
    ),
    "rescore batch_size 0": (
        lambda: DynamicHardNegativeMiningCallback(
            NegativeStore(torch.tensor([[1, 2, 3]]), num_negatives=2, skip=0),
            ["q"],
            corpus=["d"] * 10,
            score_source="rescore",
            batch_size=0,
        ),
        "batch_size must be an int >= 1",
    ),
}


@pytest.mark.parametrize("case", list(ROUND3_STORE_CASES))
def test_a_store_that_would_serve_the_wrong_text_is_refused(case):
    run, match = ROUND3_STORE_CASES[case]
    with pytest.raises(ValueError, match=match):
        run()


def test_trailing_padding_is_still_accepted():
    store = NegativeStore(torch.tensor([[1, 2, 3, -1], [1, 2, 3, 6]]), num_negatives=2, skip=0)
    assert store.valid.tolist() == [3, 4]


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_an_unparsable_world_size_is_named(monkeypatch, tmp_path, value):
    from conan_st.checkpoints import _rng_problem

    (tmp_path / "rng_state_0.pth").write_bytes(b"")
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ValueError, match=f"WORLD_SIZE must be a positive integer, got '{value}'"):
        _rng_problem(tmp_path)
