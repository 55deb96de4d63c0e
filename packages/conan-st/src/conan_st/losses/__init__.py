from __future__ import annotations

from .cached_cross_gpu_balancing import CachedCrossGPUBalancingLoss
from .cross_gpu_balancing import CrossGPUBalancingLoss, TaskColumns

__all__ = ["CachedCrossGPUBalancingLoss", "CrossGPUBalancingLoss", "TaskColumns"]
