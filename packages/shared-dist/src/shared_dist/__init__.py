"""shared-dist: differentiable cross-process gather over uneven batches.

See :mod:`shared_dist.operations` for the gradient rule and the debug mode.
"""

from __future__ import annotations

from .operations import (
    DistributedOperationError,
    barrier,
    broadcast_object,
    check_same,
    gather,
    gather_object,
    get_rank,
    get_world_size,
    is_debug_mode,
    is_distributed,
    local_slice,
    next_index,
    reduce,
)

__version__ = "0.1.0"

__all__ = [
    "DistributedOperationError",
    "barrier",
    "broadcast_object",
    "check_same",
    "gather",
    "gather_object",
    "get_rank",
    "get_world_size",
    "is_debug_mode",
    "is_distributed",
    "local_slice",
    "next_index",
    "reduce",
]
