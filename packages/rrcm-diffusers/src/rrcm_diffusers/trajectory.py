"""The EDM noise trajectory rRCM trains along, taken from diffusers' consistency-model scheduler.

Grid: ``CMStochasticIterativeScheduler(num_train_timesteps=N, sigma_min=0.002, sigma_max=80,
sigma_data=0.5, rho=7).sigmas`` — the Karras grid, index 0 = s_max, index N-1 = s_min.
Time condition: the same scheduler's ``sigma_to_t`` (250 * ln s). Input scaling:
c_in(s) = 1 / sqrt(s^2 + sigma_data^2).

Names: ``sigma`` (σ) is only ever the smoothing noise std in [0, 1] pixel space; the model's
noise level s on the grid is ``noise_level`` (``level``). The model sees pixels in [-1, 1],
where smoothing noise σ has std 2σ: `noise_level_for_sigma` and `add_smoothing_noise` are that
convention, written once. (``RRCMModel.forward`` keeps its ``sigma=`` keyword for s until 0.2.)
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
from diffusers import CMStochasticIterativeScheduler
from diffusers.utils.torch_utils import randn_tensor

import shared_dist

from ._checks import check_sigma

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0
CERTIFY_NUM_SCALES = 81  # the grid used for fine-tuning and certification


def grid_scheduler(num_scales: int = CERTIFY_NUM_SCALES) -> CMStochasticIterativeScheduler:
    """The diffusers scheduler whose Karras grid rRCM trains on and conditions with (N points)."""
    return CMStochasticIterativeScheduler(
        num_train_timesteps=num_scales,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        sigma_data=SIGMA_DATA,
        rho=RHO,
    )


_scheduler = lru_cache(maxsize=16)(grid_scheduler)  # read-only uses: one instance per N


def karras_sigmas(num_scales: int) -> torch.Tensor:
    """The N-point Karras grid (float64, descending: index 0 is s_max)."""
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    return _scheduler(num_scales).sigmas.clone()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Time condition 250 * ln(s), computed by the scheduler's own ``sigma_to_t``."""
    t = _scheduler(CERTIFY_NUM_SCALES).sigma_to_t(sigma.detach().double().cpu().numpy())
    return torch.as_tensor(t, dtype=torch.float32, device=sigma.device)


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def icm_num_scales(step: int, total_steps: int, s0: int = 20, s1: int = 80) -> int:
    """Number of grid points N at ``step`` of the doubling ("icm") schedule.

    N(k) = min(s0 * 2^ceil(k / K'), s1) + 1 with K' = ceil(K / log2(ceil(s1 / s0) + 1)).
    """
    if total_steps <= 0 or step < 0:
        raise ValueError(f"need total_steps > 0 and step >= 0, got {total_steps=} {step=}")
    k_prime = icm_stage_length(total_steps, s0, s1)
    return min(s0 * 2 ** math.ceil(step / k_prime), s1) + 1


def icm_stage_length(total_steps: int, s0: int = 20, s1: int = 80) -> int:
    """K' of the doubling schedule."""
    return math.ceil(total_steps / math.log2(math.ceil(s1 / s0) + 1))


def sample_grid_index(num_scales: int, generator: torch.Generator | None = None) -> int:
    """One index n ~ U{0..N-2} for the whole batch, the same on every rank (rank 0 draws)."""
    device = generator.device if generator is not None else None  # drawn where the generator lives
    n = int(torch.randint(0, num_scales - 1, (1,), generator=generator, device=device).item())
    return int(shared_dist.broadcast_object(n, src=0))


def grid_index_for_sigma(sigma: float, num_scales: int = CERTIFY_NUM_SCALES) -> int:
    """Index of the grid level nearest to 2*sigma.

    ``sigma`` is the smoothing noise std in [0, 1] pixel space; the model sees pixels in
    [-1, 1], where that noise has std 2*sigma.
    """
    check_sigma(sigma)
    sigmas = karras_sigmas(num_scales)
    return int(torch.argmin((sigmas - 2.0 * float(sigma)).abs()).item())


def noise_level_for_sigma(sigma: float, num_scales: int = CERTIFY_NUM_SCALES) -> float:
    """The noise level s the model is conditioned on for smoothing noise ``sigma``: the grid point
    nearest to 2σ."""
    return float(karras_sigmas(num_scales)[grid_index_for_sigma(sigma, num_scales)])


def grid_sigma_for_sigma(sigma: float, num_scales: int = CERTIFY_NUM_SCALES) -> float:
    """Deprecated name of `noise_level_for_sigma` (0.1.0)."""
    warnings.warn(
        "grid_sigma_for_sigma is deprecated; use noise_level_for_sigma", FutureWarning, stacklevel=2
    )
    return noise_level_for_sigma(sigma, num_scales)


def add_smoothing_noise(
    x: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x`` (pixels in [-1, 1]) plus smoothing noise σ of [0, 1] pixel space, i.e. std 2σ here;
    drawn with ``randn_tensor`` on the generator's device, then moved to ``x``'s."""
    return x + 2.0 * sigma * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
