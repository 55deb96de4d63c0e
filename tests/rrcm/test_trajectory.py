from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler

from rrcm_diffusers import (
    add_smoothing_noise,
    grid_index_for_sigma,
    grid_sigma_for_sigma,
    icm_num_scales,
    icm_stage_length,
    karras_sigmas,
    noise_level_for_sigma,
)
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


# ---------------------------------------------------------------- one name per quantity


def test_noise_level_is_the_grid_point_nearest_to_twice_sigma():
    grid = karras_sigmas(81)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        level = noise_level_for_sigma(sigma)
        assert level in grid.tolist()
        assert abs(level - 2 * sigma) == pytest.approx((grid - 2 * sigma).abs().min().item())
    with pytest.warns(FutureWarning, match="noise_level_for_sigma"):
        assert grid_sigma_for_sigma(0.5) == noise_level_for_sigma(0.5)


def test_smoothing_noise_has_std_two_sigma_in_model_space():
    x = torch.zeros(4000, 1, 2, 2)
    noisy = add_smoothing_noise(x, 0.25, torch.Generator().manual_seed(0))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, 0.5 * eps)  # the same draw, scaled by 2σ
    assert noisy.std().item() == pytest.approx(0.5, rel=0.03)
    assert add_smoothing_noise(x.double(), 0.25).dtype == torch.float64


def test_the_evaluation_helpers_keep_their_old_import_path():
    from rrcm_diffusers import evaluation, training

    assert training.noisy_accuracy is evaluation.noisy_accuracy
    assert training.linear_probe_accuracy is evaluation.linear_probe_accuracy
