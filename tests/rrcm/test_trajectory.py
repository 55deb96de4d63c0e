from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler

from rrcm_diffusers import grid_index_for_sigma, icm_num_scales, icm_stage_length, karras_sigmas
from rrcm_diffusers.trajectory import c_in, c_noise


@pytest.mark.parametrize("n", [21, 41, 81])
def test_grid_is_the_schedulers_and_matches_the_karras_formula(n):
    sched = CMStochasticIterativeScheduler(
        num_train_timesteps=n, sigma_min=0.002, sigma_max=80, sigma_data=0.5, rho=7
    )
    grid = karras_sigmas(n)
    assert torch.equal(grid, sched.sigmas)
    i = np.arange(n)
    lo, hi, rho = 0.002 ** (1 / 7), 80 ** (1 / 7), 7
    formula = (hi + i / (n - 1) * (lo - hi)) ** rho  # index 0 is s_max
    np.testing.assert_allclose(grid.numpy(), formula, rtol=1e-10)


def test_icm_schedule_values():
    k = 300_000
    assert icm_stage_length(k) == 129_203
    assert icm_num_scales(0, k) == 21
    assert icm_num_scales(1, k) == 41
    assert icm_num_scales(129_203, k) == 41
    assert icm_num_scales(129_204, k) == 81
    assert icm_num_scales(k, k) == 81


@pytest.mark.parametrize("sigma,index,level", [(0.25, 53, 0.4927), (0.5, 48, 0.9654), (1.0, 42, 2.0036)])
def test_sigma_to_grid_index(sigma, index, level):
    assert grid_index_for_sigma(sigma) == index
    assert float(karras_sigmas(81)[index]) == pytest.approx(level, abs=1e-4)


def test_conditioning_functions():
    s = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(c_noise(s), 250 * torch.log(s))
    torch.testing.assert_close(c_in(s), 1 / torch.sqrt(s**2 + 0.25))
    assert math.isclose(float(c_in(torch.tensor(0.0))), 2.0)


def test_bad_sigma_rejected():
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        grid_index_for_sigma(0.0)
