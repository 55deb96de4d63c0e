"""The tiny rRCM model the tests build (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

from rrcm_diffusers import RRCMModel

TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=7, projection_hidden_dim=32, projection_dim=16)


def tiny_model(seed: int = 0, **overrides) -> RRCMModel:
    torch.manual_seed(seed)
    return RRCMModel(**{**TINY, **overrides})
