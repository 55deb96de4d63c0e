"""A short real training run on the shared data improves both held-out metrics."""

from __future__ import annotations

import pytest

from conan_st.experiment import ConanSettings, RecipeConfig, evaluate, train_recipe
from tests.conan.helpers import minilm_path


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_short_conan_training_improves_retrieval_and_sts(data_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(minilm_path(), device="cpu")
    base.max_seq_length = 128
    before = evaluate(base, data_dir, max_queries=300)
    config = RecipeConfig(
        "conan", steps=40, batch_size=16, num_negatives=2, conan=ConanSettings(check_interval=10)
    )
    model, record = train_recipe(config, tmp_path, data_dir=data_dir, progress=False)
    after = evaluate(model, data_dir, max_queries=300)
    assert after["CMRC2018Local"] > before["CMRC2018Local"] + 0.05, (before, after)
    assert after["STSBzhLocal"] > before["STSBzhLocal"] + 0.02, (before, after)
    assert len(record["dhnm_checks"]) == 4  # the mining rule ran every 10 steps
