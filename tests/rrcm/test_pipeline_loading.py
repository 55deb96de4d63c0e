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
from rrcm_diffusers.pipeline_rrcm import hub_module, write_model_card
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


def test_the_generic_loader_asks_for_trust_remote_code_and_the_own_class_imports_nothing(tmp_path):
    RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)  # diffusers' rule for any custom pipeline
    stub = tmp_path / f"{hub_module('RRCMPipeline')}.py"
    stub.write_text("raise RuntimeError('this file must not run')\n")
    # the class itself never imports the folder's file (ranks loading at once raced on diffusers'
    # shared module cache): a changed or broken file does not matter to it
    assert type(RRCMPipeline.from_pretrained(tmp_path)) is RRCMPipeline


def _w_load(folders) -> list[str]:
    return [type(load_pipeline(folder)).__name__ for folder in folders]


@pytest.mark.distributed
def test_three_ranks_load_an_rrcm_and_a_dds_folder_at_once(tmp_path):
    from shared_dist.testing import launch

    torch.manual_seed(0)
    RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0)).save_pretrained(tmp_path / "rrcm")
    DDSPipeline(
        unet=small_unet(), scheduler=DDPMScheduler(), classifier=tiny_model(num_classes=3)
    ).save_pretrained(tmp_path / "dds")
    folders = [tmp_path / "rrcm", tmp_path / "dds"]  # one launch: each rank loads both, in turn
    rrcm, dds = zip(*launch(_w_load, 3, (folders,), timeout=120))  # per rank -> per folder
    assert rrcm == ("RRCMPipeline",) * 3
    assert dds == ("DDSPipeline",) * 3


def test_the_model_card_shows_both_calls(tmp_path):
    card = write_model_card(tmp_path, sigma=0.5, data="MNIST", steps={"fine-tuning": 3}).read_text()
    assert "RRCMPipeline.from_pretrained(" in card
    assert "DiffusionPipeline.from_pretrained(" in card and "trust_remote_code=True" in card
