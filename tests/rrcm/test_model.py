from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from rrcm_diffusers import RRCMModel, hooks
from tests.rrcm.helpers import tiny_model


def test_save_load_round_trip_with_safetensors(tmp_path):
    model = tiny_model(num_classes=10).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = RRCMModel.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 1, 28, 28)
    a, b = model(x, 0.7, output_projection=True), loaded(x, 0.7, output_projection=True)
    assert torch.equal(a.features, b.features) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.projection, b.projection)


def test_noise_level_changes_the_representation(tiny):
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(tiny(x, 0.1).features, tiny(x, 1.0).features)


def test_for_classification_keeps_backbone_drops_projector(tiny):
    clf = tiny.for_classification(10)
    assert clf.projector is None and clf.classifier.out_features == 10
    for k, v in tiny.backbone.state_dict().items():
        assert torch.equal(v, clf.backbone.state_dict()[k])


@pytest.mark.parametrize(
    "sample,sigma,match",
    [
        (torch.randn(2, 3, 28, 28), 0.5, r"sample must have shape \(batch, 1, 28, 28\)"),
        (torch.randn(2, 1, 32, 32), 0.5, r"sample must have shape"),
        (torch.randn(1, 28, 28), 0.5, r"sample must have shape"),
        (torch.full((2, 1, 28, 28), float("nan")), 0.5, "sample contains NaN"),
        (torch.randn(2, 1, 28, 28), 0.0, r"sigma .* must be finite and > 0"),
        (torch.randn(2, 1, 28, 28), torch.tensor([0.5, -1.0]), r"sigma .* > 0"),
        (torch.randn(2, 1, 28, 28), torch.tensor([0.5, 0.5, 0.5]), "sigma must be a scalar or of shape"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(tiny, sample, sigma, match):
    with pytest.raises(ValueError, match=match):
        tiny(sample, sigma)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"backbone must be one of \[.*'vit'.*\], got 'nope'"):
        RRCMModel(backbone_type="nope")


def test_backbone_plugin_by_entry_point(tmp_path, monkeypatch):
    """A package installed with an entry point registers a backbone; the env var disables it."""
    pkg = tmp_path / "fake_backbone_plugin.py"
    pkg.write_text(
        textwrap.dedent("""
        import torch
        from rrcm_diffusers.hookspecs import hookimpl

        class Tiny(torch.nn.Module):
            def __init__(self, image_size, in_channels, width=8):
                super().__init__()
                self.out_dim = width
                self.lin = torch.nn.Linear(in_channels * image_size * image_size + 1, width)
            def forward(self, x, t):
                return self.lin(torch.cat([x.flatten(1), t[:, None]], 1))

        @hookimpl
        def rrcm_register_backbones():
            return {"tiny-mlp": Tiny}
    """)
    )
    dist_info = tmp_path / "fake_backbone_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-backbone-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[rrcm_diffusers.backbones]\ntiny = fake_backbone_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("RRCM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    try:
        hooks.get_plugin_manager.cache_clear()
        assert {"vit", "tiny-mlp"} <= set(hooks.available_backbones())
        model = RRCMModel(
            backbone_type="tiny-mlp", backbone_kwargs={"width": 8}, projection_dim=0, num_classes=3
        )
        assert model(torch.randn(2, 1, 28, 28), 0.5).logits.shape == (2, 3)

        monkeypatch.setenv("RRCM_DISABLE_PLUGIN_AUTOLOAD", "1")
        hooks.get_plugin_manager.cache_clear()
        assert set(hooks.available_backbones()) == {"vit", "resnet"}  # the built-in ones only
    finally:
        sys.modules.pop("fake_backbone_plugin", None)
        hooks.get_plugin_manager.cache_clear()
