"""Every random draw and tensor follows the device it was given (issue: rRCM on a GPU).

On CPU: with the default device set to ``meta``, any tensor created without naming its device
lands on ``meta`` and fails against the CPU data or generator, so these tests catch a draw that
would later land on the wrong GPU/CPU side. The ``cuda`` tests run wherever CUDA exists.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler

from rrcm_diffusers import RRCMPipeline, RRCMPretrainingLoss, sample_grid_index
from rrcm_diffusers.augment import light_view, strong_view
from rrcm_diffusers.certification import sample_counts
from rrcm_diffusers.pipeline_dds import small_unet, train_ddpm
from tests.rrcm.helpers import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _linear_votes(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)[:, :10]  # (b, 10) logits from the pixels: no tensor of its own


def test_draws_name_their_device():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 28, 28)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    with torch.device("meta"):
        n = sample_grid_index(81, g)
        counts = sample_counts(_linear_votes, image, 0.5, 70, 32, num_classes=10, generator=g)
        views = [
            strong_view(x, "grey", g),
            light_view(x, "grey", g),
            strong_view(x.expand(3, 3, 28, 28), "rgb", g),
        ]
    assert 0 <= n <= 79
    assert counts.device.type == "cpu" and int(counts.sum()) == 70
    assert all(v.device.type == "cpu" and v.shape[0] == 3 for v in views)


def test_ddpm_training_follows_the_unet_device():
    from diffusers import DDPMScheduler

    images = (torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    torch.manual_seed(0)
    unet, scheduler = small_unet(28, 1), DDPMScheduler(num_train_timesteps=1000)
    with torch.device("meta"):  # a draw that names no device would land here and fail
        losses = train_ddpm(unet, scheduler, images, 2, 4, progress=False)
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)


def _pipe(device: str) -> RRCMPipeline:
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=81, sigma_min=0.002, sigma_max=80, sigma_data=0.5, rho=7
    )
    return RRCMPipeline(model=tiny_model().for_classification(10).to(device), scheduler=scheduler)


@cuda
def test_cpu_generator_gives_the_same_certificates_on_cuda_up_to_float_ties():
    images = torch.rand(3, 1, 28, 28)
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = _pipe(device).certify(
            images.to(device), sigma=0.5, n0=50, n=500, generator=torch.Generator().manual_seed(0)
        )
    # same noise (drawn on the CPU generator, then moved); logits may differ in the last bits, so a
    # sample at a class boundary may vote otherwise: a vote moves a radius by ~0.01 at n = 500
    cpu, cuda = out["cpu"], out["cuda"]
    same = cpu.predictions == cuda.predictions.cpu()
    assert same.float().mean() >= 2 / 3
    torch.testing.assert_close(cpu.radii[same], cuda.radii.cpu()[same], rtol=0, atol=0.05)


@cuda
def test_pretraining_step_runs_on_cuda_with_a_cuda_generator():
    model, target = tiny_model().cuda(), tiny_model().cuda().requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(4, 1, 28, 28, device="cuda") * 2 - 1
    n = sample_grid_index(21, g)
    views = (light_view(x, "grey", g), strong_view(x, "grey", g), strong_view(x, "grey", g))
    losses = RRCMPretrainingLoss()(model, target, *views, grid_index=n, num_scales=21, generator=g)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and all(
        p.grad is not None for p in model.parameters() if p.requires_grad
    )
