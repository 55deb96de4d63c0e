from __future__ import annotations

import copy

import pytest

from tests.conan.helpers import build_tiny_model, load_tiny, minilm_path


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


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    """A tiny sentence-transformer (2-layer BERT on MiniLM's tokenizer), built once per run: for the
    tests of mechanics, where MiniLM's quality plays no part."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-st")))


@pytest.fixture
def tiny(tiny_path):
    """A fresh copy of the tiny model for each test (to change or train)."""
    return load_tiny(tiny_path)
