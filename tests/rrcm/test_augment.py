"""The classifiers' training augmentation (pad-4 crop + flip) against a slicing reference, and the
CIFAR-10 configs that use it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from rrcm_diffusers.augment import classifier_view, random_crop
from rrcm_diffusers.data import strided_class_subset
from rrcm_diffusers.experiment import _baselines, load_config
from rrcm_diffusers.training import FinetuneConfig, finetune
from tests.helpers import REPO
from tests.rrcm.helpers import tiny_model


def _offset(padded: torch.Tensor, window: torch.Tensor) -> tuple[int, int] | None:
    """Where ``window`` (C, H, W) sits in ``padded`` (C, H + 2p, W + 2p), by plain slicing."""
    h, w = window.shape[-2:]
    for dy in range(padded.shape[-2] - h + 1):
        for dx in range(padded.shape[-1] - w + 1):
            if torch.equal(padded[:, dy : dy + h, dx : dx + w], window):
                return dy, dx
    return None


def test_random_crop_is_a_uniform_window_of_the_black_padded_image():
    x = torch.rand(400, 3, 6, 5) * 2 - 1  # unequal H and W, so a swapped axis fails
    out = random_crop(x, padding=2, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    offsets = [_offset(padded[i], out[i]) for i in range(len(x))]
    assert None not in offsets
    assert set(offsets) == {(dy, dx) for dy in range(5) for dx in range(5)}  # every shift, 400 draws
    assert max(offsets.count(o) for o in set(offsets)) < 40  # ~16 each; no shift dominates


def test_classifier_view_is_seeded_and_none_draws_nothing():
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    a = classifier_view(x, "crop_flip", torch.Generator().manual_seed(1))
    b = classifier_view(x, "crop_flip", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert classifier_view(x, "none", g) is x
    assert torch.equal(g.get_state(), state)  # MNIST runs keep their noise stream bit for bit
    with pytest.raises(ValueError, match="augment must be one of"):
        classifier_view(x, "crop", g)


def test_finetune_trains_with_crop_flip_and_refuses_an_unknown_augment():
    x, y = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.arange(8) % 2
    cfg = FinetuneConfig(probe_steps=0, steps=2, batch_size=4, augment="crop_flip")
    _, hist = finetune(tiny_model().for_classification(2), x, y, cfg, Accelerator(cpu=True), progress=False)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    cfg.augment = "flip"
    with pytest.raises(ValueError, match=r"FinetuneConfig.augment must be one of \('none', 'crop_flip'\)"):
        finetune(tiny_model().for_classification(2), x, y, cfg, Accelerator(cpu=True), progress=False)


def test_every_method_of_the_cifar_config_trains_with_its_augment():
    cfg = load_config(REPO / "examples/rrcm/configs/cifar10_cpu.yaml")
    assert cfg.augment == "crop_flip"
    configs = [b.config_for(0.25) for b in _baselines(cfg).values()]  # Cohen, scratch+consistency
    configs.append(cfg.dds.classifier_config(cfg.seed, cfg.augment))
    assert len(configs) == 3 and {c.augment for c in configs} == {"crop_flip"}
    assert load_config(REPO / "examples/rrcm/configs/mnist_main.yaml").augment == "none"


def test_a_bad_augment_in_the_config_fails_at_load_not_after_pretraining():
    with pytest.raises(
        ValueError, match=r"finetune.augment in the overrides must be one of .*got 'crop-flip'"
    ):
        load_config(None, finetune={"augment": "crop-flip"})


def test_the_cifar_dds_config_certifies_the_cifar_tables_models_on_a_subset_of_its_images():
    # RESULTS.md sets cifar10_dds_cpu.yaml's DDS row beside cifar10_cpu.yaml's rRCM and Cohen rows
    table = load_config(REPO / "examples/rrcm/configs/cifar10_cpu.yaml")
    dds = load_config(REPO / "examples/rrcm/configs/cifar10_dds_cpu.yaml")
    assert dds.dds.enabled and not table.dds.enabled and dds.sigmas == table.sigmas
    for part in ("dataset", "seed", "model", "pretrain", "finetune", "cohen"):
        assert getattr(dds, part) == getattr(table, part), part
    labels = torch.arange(10).repeat_interleave(100)  # the test-1k split: 100 per class
    small = strided_class_subset(labels, dds.certify.per_class)
    assert set(small.tolist()) < set(strided_class_subset(labels, table.certify.per_class).tolist())
    for key in ("n0", "n", "alpha", "sequential"):  # the same certification, on fewer images
        assert getattr(dds.certify, key) == getattr(table.certify, key), key


def test_the_cifar_config_certifies_all_shared_test_images_sequentially():
    certify = load_config(REPO / "examples/rrcm/configs/cifar10_cpu.yaml").certify
    assert certify.per_class == 100 and certify.sequential  # the test-1k split: 100 per class


def test_the_cifar_equal_step_cohen_config_changes_only_cohens_steps_to_rrcms_total():
    # RESULTS.md sets this config's Cohen rows beside cifar10_cpu.yaml's rRCM rows, at equal steps
    table = load_config(REPO / "examples/rrcm/configs/cifar10_cpu.yaml")
    equal = load_config(REPO / "examples/rrcm/configs/cifar10_cohen_equal_cpu.yaml")
    for part in ("dataset", "seed", "sigmas", "model", "pretrain", "finetune", "certify"):
        assert getattr(equal, part) == getattr(table, part), part
    rrcm_steps = table.pretrain["steps"] + table.finetune["probe_steps"] + table.finetune["steps"]
    assert equal.cohen.steps == rrcm_steps > table.cohen.steps
    assert replace(equal.cohen, steps=table.cohen.steps) == table.cohen
