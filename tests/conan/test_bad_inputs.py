"""conan-st under hostile input: an error naming the argument and what was expected, never a
silently dropped column, a meaningless rule or a positive served as a negative."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from conan_st import CrossGPUBalancingLoss, DynamicHardNegativeMiningCallback, NegativeStore
from conan_st.experiment import train_recipe
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
def test_bad_loss_argument_is_named(case, minilm):
    kwargs, match = LOSS_CASES[case]
    with pytest.raises(ValueError, match=match):
        CrossGPUBalancingLoss(minilm, **kwargs)


def test_labels_without_sts_columns_do_not_drop_negatives(minilm):
    # retrieval-only rows (anchor, positive, negative_1, negative_2) with a NaN label column: the
    # loss would read the two negatives as (sentence1, sentence2) and train without them
    rows = retrieval_ds(4, 2).add_column("score", [math.nan] * 4)
    feats, labels = collate(minilm, [rows[i] for i in range(4)])
    with pytest.raises(ValueError, match="have text in the sentence1 column: these look like negatives"):
        CrossGPUBalancingLoss(minilm)(feats, labels)


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


@pytest.mark.parametrize(
    "setting", [{"sts_weight": 0.2}, {"dynamic": False}, {"sts_batch_size": 0}, {"window_rule": "always"}]
)
def test_conan_settings_on_another_recipe_are_refused(setting, tmp_path):
    """An ablation setting on a recipe without STS or mining would be silently ignored."""
    with pytest.raises(ValueError, match="settings of the 'conan' recipe; 'mnrl'"):
        train_recipe("mnrl", tmp_path, **setting)


def test_unknown_window_rule_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(
        ValueError, match="window_rule must be one of \\('paper', 'always', 'random'\\), got 'Paper'"
    ):
        train_recipe("conan", tmp_path, window_rule="Paper")


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
