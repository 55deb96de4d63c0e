"""conan-st: Conan-embedding training methods for sentence-transformers.

* :class:`CrossGPUBalancingLoss` — retrieval InfoNCE over the hard negatives of every GPU +
  β·CoSENT, both tasks in every optimisation step; :class:`CachedCrossGPUBalancingLoss` the same
  with GradCache, for batches larger than memory;
* :class:`TaskBalancedBatchSampler` and :func:`make_balanced_datasets` — the batches it needs,
  through sentence-transformers' own multi-dataset batch sampler extension point;
* :class:`DynamicHardNegativeMiningCallback` — hard negatives refreshed while training runs;
* :func:`last_complete_checkpoint` — resume after a kill from the newest checkpoint written whole.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Names are imported on first use: `import conan_st` (and so a console script's --help) does not
# load sentence-transformers, transformers and torch.
_LAZY = {
    "callbacks": ["DynamicHardNegativeMiningCallback"],
    "checkpoints": ["last_complete_checkpoint"],
    "data": ["make_balanced_datasets"],
    "layout": ["TaskLayout"],
    "losses": ["CachedCrossGPUBalancingLoss", "CrossGPUBalancingLoss"],
    "mining": ["NegativeStore", "dynamic_negatives_dataset", "mine_candidates"],
    "sampler": ["TaskBalancedBatchSampler"],
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .callbacks import DynamicHardNegativeMiningCallback
    from .checkpoints import last_complete_checkpoint
    from .data import make_balanced_datasets
    from .layout import TaskLayout
    from .losses import CachedCrossGPUBalancingLoss, CrossGPUBalancingLoss
    from .mining import NegativeStore, dynamic_negatives_dataset, mine_candidates
    from .sampler import TaskBalancedBatchSampler

__all__ = [
    "CachedCrossGPUBalancingLoss",
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
