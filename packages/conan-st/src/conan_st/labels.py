"""Example ids in the label column: how a retrieval row tells the loss which example it is.

Retrieval rows carry their example id in the label column; STS rows carry their score. The
collator turns the label column into a float32 tensor, so the id is written into the BIT
PATTERN of a float32 at or below ID_LABEL_BASE (one ulp per id): exact for every id below
MAX_EXAMPLE_ID, where counting by whole numbers (ID_LABEL_BASE - id) stops being exact at 2**24.
"""

from __future__ import annotations

import numpy as np
import torch

ID_LABEL_BASE = -1_000_000.0
_BASE_BITS = int(np.float32(ID_LABEL_BASE).view(np.int32))
MAX_EXAMPLE_ID = int(np.float32(-np.finfo(np.float32).max).view(np.int32)) - _BASE_BITS  # ~9.07e8


def id_to_label(example_id: int) -> float:
    if not 0 <= example_id <= MAX_EXAMPLE_ID:
        raise ValueError(
            f"example ids must be in [0, {MAX_EXAMPLE_ID}] to travel in a float32 label, got {example_id}"
        )
    return float(np.array(_BASE_BITS + example_id, dtype=np.int32).view(np.float32))


def label_to_id(labels: torch.Tensor) -> torch.Tensor:
    return labels.float().contiguous().view(torch.int32).long() - _BASE_BITS


def is_id_label(labels: torch.Tensor) -> torch.Tensor:
    return labels <= ID_LABEL_BASE
