"""conan-st: Conan-embedding training methods for sentence-transformers.

* :class:`CrossGPUBalancingLoss` — retrieval InfoNCE over the hard negatives of every GPU +
  β·CoSENT, both tasks in every optimisation step;
* :class:`TaskBalancedBatchSampler` and :func:`make_balanced_datasets` — the batches it needs,
  through sentence-transformers' own multi-dataset batch sampler extension point;
* :class:`DynamicHardNegativeMiningCallback` — hard negatives refreshed while training runs;
* :func:`last_complete_checkpoint` — resume after a kill from the newest checkpoint written whole.
"""

from __future__ import annotations

from .callbacks import DynamicHardNegativeMiningCallback
from .checkpoints import last_complete_checkpoint
from .data import make_balanced_datasets
from .layout import TaskLayout
from .losses import CrossGPUBalancingLoss
from .mining import NegativeStore, dynamic_negatives_dataset, mine_candidates
from .sampler import TaskBalancedBatchSampler

__version__ = "0.1.0"

__all__ = [
    "CrossGPUBalancingLoss",
    "DynamicHardNegativeMiningCallback",
    "NegativeStore",
    "TaskBalancedBatchSampler",
    "TaskLayout",
    "dynamic_negatives_dataset",
    "last_complete_checkpoint",
    "make_balanced_datasets",
    "mine_candidates",
]
