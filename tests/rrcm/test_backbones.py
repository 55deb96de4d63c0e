"""The built-in ResNet backbone: FiLM time conditioning, batch independence, save/load, training."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from rrcm_diffusers import RRCMModel, RRCMPipeline
from rrcm_diffusers.experiment import cm_scheduler
from rrcm_diffusers.training import FinetuneConfig, finetune

RESNET = dict(image_size=16, in_channels=3, backbone_type="resnet", backbone_kwargs={"widths": [8, 16]})


def _resnet(**kw) -> RRCMModel:
    torch.manual_seed(0)
    return RRCMModel(**{**RESNET, "projection_hidden_dim": 16, "projection_dim": 8, **kw})


def test_resnet_is_time_conditioned_and_each_image_independent_of_its_batch():
    model = _resnet(num_classes=4).eval()
    x = torch.randn(6, 3, 16, 16)
    out = model(x, 0.5)
    assert out.features.shape == (6, 16) and out.logits.shape == (6, 4)
    assert not torch.allclose(out.features, model(x, 0.05).features, atol=1e-4)  # FiLM acts
    alone = torch.cat([model(x[i : i + 1], 0.5).logits for i in range(6)])
    torch.testing.assert_close(alone, out.logits, rtol=1e-5, atol=1e-5)  # GroupNorm: no batch statistics


def test_resnet_time_embedding_gets_gradient_and_layer_decay_sees_its_depth():
    model = _resnet(num_classes=4)
    model(torch.randn(4, 3, 16, 16), 0.5).logits.sum().backward()
    assert model.backbone.time_embed.linear_1.weight.grad.abs().sum() > 0
    ids = {name.split(".")[1]: model.get_layer_id(name) for name, _ in model.named_parameters()}
    assert model.num_layers == 4 and ids["stem"] == 0 and ids["norm"] == 3 and ids["weight"] == 3


def test_resnet_pipeline_round_trip_and_finetune(tmp_path):
    model = _resnet().for_classification(4)
    x, y = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.arange(8) % 4
    cfg = FinetuneConfig(probe_steps=1, steps=2, batch_size=4, augment="crop_flip")
    model, hist = finetune(model, x, y, cfg, Accelerator(cpu=True), progress=False)
    assert [h["phase"] for h in hist] == ["probe", "finetune", "finetune"]
    RRCMPipeline(model=model, scheduler=cm_scheduler()).save_pretrained(tmp_path)
    loaded = RRCMPipeline.from_pretrained(tmp_path)
    images = torch.rand(3, 3, 16, 16)
    f, g = model.eval(), loaded.model.eval()
    assert torch.equal(f(images, 0.25).logits, g(images, 0.25).logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"widths": [8, 12]}, r"multiples of groups \(8\)"), ({"widths": [8] * 6}, "divisible by 2\\^")],
)
def test_resnet_bad_sizes_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RRCMModel(**{**RESNET, "backbone_kwargs": kwargs})


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_layer_wise_decay_gives_each_depth_its_rate(backbone):
    """lr · decay^(top − layer): the stem/embeddings get the smallest rate, the head the full one."""
    from rrcm_diffusers.training import param_groups_lrd

    kw = (
        RESNET
        if backbone == "resnet"
        else dict(image_size=16, in_channels=3, patch_size=8, hidden_size=16, depth=3)
    )
    model = RRCMModel(**{**kw, "num_heads": 2, "projection_dim": 0, "num_classes": 4})
    top = model.num_layers - 1  # blocks + embeddings + head
    assert top == model.backbone.depth + 1
    rate = {id(p): g["lr"] for g in param_groups_lrd(model, 1.0, 0.05, 0.5) for p in g["params"]}
    named = dict(model.named_parameters())
    first = "backbone.stem.weight" if backbone == "resnet" else "backbone.patch_embed.weight"
    assert rate[id(named[first])] == 0.5**top
    block0 = next(model.backbone.blocks[0].parameters())
    assert rate[id(block0)] == 0.5 ** (top - 1)
    assert rate[id(named["backbone.norm.weight"])] == rate[id(named["classifier.weight"])] == 1.0
