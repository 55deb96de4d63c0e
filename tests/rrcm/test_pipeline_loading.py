"""A saved pipeline opens the way diffusers users open pipelines: with its own class, and with
diffusers' generic `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, which the
model card shows; the certificates are the same either way."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from rrcm_diffusers import RRCMPipeline
from rrcm_diffusers.dataset_certification import load_pipeline
from rrcm_diffusers.pipeline_dds import DDSPipeline, small_unet
from rrcm_diffusers.pipeline_rrcm import HUB_MODULE, write_model_card
from tests.rrcm.helpers import tiny_model

IMAGES = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _certify(pipe):
    out = pipe.certify(IMAGES, sigma=0.5, n0=10, n=50, generator=torch.Generator().manual_seed(0))
    return out.predictions.tolist(), out.radii.tolist()


@pytest.mark.parametrize("kind", ["rrcm", "dds"])
def test_diffusers_generic_loader_opens_a_saved_pipeline(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "rrcm":
        pipe = RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0))
    else:
        pipe = DDSPipeline(unet=small_unet(), scheduler=DDPMScheduler(), classifier=tiny_model(num_classes=3))
    pipe.save_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    own = type(pipe).from_pretrained(tmp_path)  # the class itself needs no trust_remote_code
    assert type(generic) is type(pipe) and type(own) is type(pipe)
    assert type(load_pipeline(tmp_path)) is type(pipe)  # the certification CLI reads the same folder
    assert _certify(generic) == _certify(own) == _certify(pipe)


def test_the_generic_loader_asks_for_trust_remote_code_and_a_changed_stub_is_not_trusted(tmp_path):
    RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)  # diffusers' rule for any custom pipeline
    stub = tmp_path / f"{HUB_MODULE}.py"
    stub.write_text(stub.read_text() + "print('other code')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        RRCMPipeline.from_pretrained(tmp_path)  # not our one line any more: diffusers' check applies


def test_the_model_card_shows_both_calls(tmp_path):
    card = write_model_card(tmp_path, sigma=0.5, data="MNIST", steps={"fine-tuning": 3}).read_text()
    assert "RRCMPipeline.from_pretrained(" in card
    assert "DiffusionPipeline.from_pretrained(" in card and "trust_remote_code=True" in card
