from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one default for both packages: only the built-in plugins; tests of entry-point loading opt in
os.environ.setdefault("RRCM_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("CONAN_ST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real data not found at {DATA} (expected ../shared/data beside the repo)")
    return DATA
