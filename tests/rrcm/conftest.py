from __future__ import annotations

import pytest

from tests.rrcm.helpers import tiny_model


@pytest.fixture
def tiny():
    return tiny_model()
