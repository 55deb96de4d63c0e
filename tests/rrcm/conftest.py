from __future__ import annotations

import pytest

from rrcm_diffusers import RRCMModel

TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=7, projection_hidden_dim=32, projection_dim=16)


def tiny_model(seed: int = 0, **overrides) -> RRCMModel:
    import torch

    torch.manual_seed(seed)
    return RRCMModel(**{**TINY, **overrides})


@pytest.fixture
def tiny():
    return tiny_model()
