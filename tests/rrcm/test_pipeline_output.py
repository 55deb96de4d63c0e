"""What fine-tuning writes loads in one line, and a pipeline keeps the model's conditioning grid."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from diffusers import CMStochasticIterativeScheduler

from rrcm_diffusers import RRCMModel, RRCMPipeline, grid_scheduler
from rrcm_diffusers.training import FinetuneConfig, finetune
from rrcm_diffusers.trajectory import noise_level_for_sigma
from tests.rrcm.helpers import tiny_model


def test_finetune_output_is_a_pipeline_with_a_model_card(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(32, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(32) % 4
    cfg = FinetuneConfig(sigma=0.25, probe_steps=2, steps=3, batch_size=8, warmup_steps=0, log_every=1)
    model, _ = finetune(
        tiny_model().for_classification(4), images, labels, cfg, Accelerator(cpu=True), tmp_path
    )
    pipe = RRCMPipeline.from_pretrained(tmp_path / "final")  # one line, as a user loads it
    x = torch.rand(2, 1, 28, 28)
    same = [
        p.certify(x, sigma=0.25, n0=20, n=100, batch_size=50, generator=torch.Generator().manual_seed(1))
        for p in (pipe, RRCMPipeline(model=model))
    ]
    assert torch.equal(same[0].predictions, same[1].predictions) and torch.equal(same[0].radii, same[1].radii)
    card = (tmp_path / "final" / "README.md").read_text()
    assert "σ = 0.25" in card and "32 images of shape (1, 28, 28)" in card
    assert (
        "linear probe: 2, fine-tuning: 3" in card
        and "2501.13094" in card
        and "library_name: diffusers" in card
    )


def test_pipeline_uses_the_model_grid_and_refuses_another(tmp_path):
    model = tiny_model().for_classification(3)
    assert model.config.num_scales == 81
    pipe = RRCMPipeline(model=model)  # the default scheduler is the model's grid
    assert pipe.scheduler.config.num_train_timesteps == 81
    assert noise_level_for_sigma(0.5, 81) == pytest.approx(0.9654, abs=1e-4)
    RRCMPipeline(model=model, scheduler=grid_scheduler(81))
    # diffusers' default CMStochasticIterativeScheduler has 40 points: σ = 0.5 would be conditioned at 1.0717
    with pytest.raises(ValueError, match=r"not the grid the model was fine-tuned on.*grid_scheduler\(81\)"):
        RRCMPipeline(model=model, scheduler=CMStochasticIterativeScheduler())
    with pytest.raises(ValueError, match="sigma_max"):
        RRCMPipeline(
            model=model, scheduler=CMStochasticIterativeScheduler(num_train_timesteps=81, sigma_max=40)
        )
    pipe.save_pretrained(tmp_path / "p")
    assert RRCMModel.from_pretrained(tmp_path / "p" / "model").config.num_scales == 81
    assert RRCMPipeline.from_pretrained(tmp_path / "p").scheduler.config.num_train_timesteps == 81
