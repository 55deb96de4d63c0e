from __future__ import annotations

from .cross_gpu_balancing import CrossGPUBalancingLoss

__all__ = ["CrossGPUBalancingLoss"]
