"""`DDSPipeline` (pipeline_dds.py), diffusion-denoised smoothing: the timestep that matches σ, the image
shapes its UNet takes, weights it refuses. Its certification shares `certification.py` (test_certification.py);
its folders load with diffusers' generic loader (test_pipeline_loading.py)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from rrcm_diffusers.pipeline_dds import DDSPipeline, small_unet
from tests.rrcm.helpers import tiny_model


def test_dds_timestep_matches_the_noise_level():
    sched = DDPMScheduler(num_train_timesteps=1000)
    pipe = DDSPipeline(
        unet=small_unet(), scheduler=sched, classifier=tiny_model(num_classes=10, projection_dim=0)
    )
    abar = sched.alphas_cumprod.double()
    for sigma in (0.25, 0.5, 1.0):
        t = pipe.timestep_for_sigma(sigma)
        ratio = math.sqrt((1 - abar[t]) / abar[t])
        assert abs(ratio - 2 * sigma) < 0.02 * 2 * sigma
        neighbours = [math.sqrt((1 - abar[u]) / abar[u]) for u in (t - 1, t + 1)]
        assert all(abs(v - 2 * sigma) >= abs(ratio - 2 * sigma) for v in neighbours)


@pytest.mark.parametrize(
    "shape,entry", [((2, 3, 28, 28), "certify"), ((2, 1, 32, 32), "certify"), ((2, 3, 28, 28), "call")]
)
def test_dds_names_an_image_shape_its_unet_cannot_take(shape, entry):
    pipe = DDSPipeline(
        unet=small_unet(),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        classifier=tiny_model(num_classes=10),
    )
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\) for this pipeline's UNet"):
        if entry == "certify":
            pipe.certify(torch.rand(*shape), sigma=0.5, n0=10, n=20)
        else:
            pipe(torch.rand(*shape), sigma=0.5, num_samples=20)


def test_a_dds_unet_with_integer_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    pipe = DDSPipeline(unet=small_unet(), scheduler=DDPMScheduler(), classifier=tiny_model(num_classes=10))
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.int8) for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match=r"unet.*holds non-floating tensors"):
        DDSPipeline.from_pretrained(tmp_path)
