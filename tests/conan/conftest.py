from __future__ import annotations

import copy

import pytest

from tests.conan.helpers import minilm_path


@pytest.fixture(scope="session")
def _minilm_once():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 64
    return model


@pytest.fixture
def minilm(_minilm_once):
    """The real small model, loaded once per session; each test gets a copy of its own (to change or train)."""
    return copy.deepcopy(_minilm_once)
