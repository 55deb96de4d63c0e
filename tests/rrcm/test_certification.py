from __future__ import annotations

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler
from diffusers.utils.torch_utils import randn_tensor
from scipy.stats import norm

from rrcm_diffusers import RRCMPipeline, certify, predict
from rrcm_diffusers.certification import (
    ABSTAIN,
    NOISE_CHUNK,
    average_certified_radius,
    certified_accuracy,
    sample_counts,
)
from rrcm_diffusers.trajectory import noise_level_for_sigma
from tests.rrcm.helpers import tiny_model


def constant(k: int = 3, cls: int = 1):
    def f(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], k)
        out[:, cls] = 1.0
        return out

    return f


def alternating(x: torch.Tensor) -> torch.Tensor:
    """Row i votes class i % 2: with even batches, an exact tie."""
    out = torch.zeros(x.shape[0], 2)
    out[torch.arange(x.shape[0]), torch.arange(x.shape[0]) % 2] = 1.0
    return out


def bernoulli(p: float, sigma: float):
    """Votes class 0 with probability exactly p under the smoothing noise (image = 0.5)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        z = (x[:, 0, 0, 0] - 0.5) / sigma  # ~ N(0, 1)
        first = torch.as_tensor(norm.cdf(z.numpy())) < p
        return torch.stack([first.float(), (~first).float()], 1)

    return f


@pytest.mark.parametrize("n,factor", [(100_000, 3.8115), (10_000, 3.20), (1_000, 2.46)])
def test_largest_radius_for_unanimous_votes(n, factor):
    sigma = 0.5
    res = certify(constant(), torch.rand(1, 1, 4, 4), sigma, n0=100, n=n, batch_size=20_000)
    assert res.predictions.tolist() == [1]
    assert res.radii.item() == pytest.approx(factor * sigma, abs=0.005 * sigma)


def test_n0_may_exceed_n():
    # selection and estimation samples are independent (Cohen et al.): n0 > n is valid, and the
    # radius depends on n alone (unanimous votes over n = 1,000: 2.46 sigma)
    res = certify(constant(), torch.rand(1, 1, 4, 4), 0.5, n0=5_000, n=1_000, batch_size=1_000)
    assert res.predictions.tolist() == [1] and res.radii.item() == pytest.approx(2.46 * 0.5, abs=0.0025)


def test_constant_classifier_never_abstains():
    imgs = torch.rand(5, 1, 4, 4)
    assert predict(constant(cls=2), imgs, 0.25, num_samples=20).predictions.tolist() == [2] * 5
    assert certify(constant(cls=2), imgs, 0.25, n0=10, n=50).predictions.tolist() == [2] * 5


def test_predict_abstains_on_exact_tie():
    res = predict(alternating, torch.rand(2, 1, 4, 4), 0.5, num_samples=1000, batch_size=100)
    assert res.counts.tolist() == [[500, 500], [500, 500]]
    assert res.predictions.tolist() == [ABSTAIN, ABSTAIN]


def test_certificate_is_statistically_sound():
    """The lower bound exceeds the true p_A at most at rate alpha (plus sampling slack)."""
    p, sigma, alpha, repeats, n = 0.8, 0.5, 0.1, 400, 200
    imgs = torch.full((repeats, 1, 2, 2), 0.5)
    res = certify(
        bernoulli(p, sigma),
        imgs,
        sigma,
        n0=20,
        n=n,
        alpha=alpha,
        batch_size=n,
        generator=torch.Generator().manual_seed(0),
    )
    over = (res.p_lower > p).float().mean().item()
    assert over <= alpha + 3 * (alpha * (1 - alpha) / repeats) ** 0.5
    # and not vacuous: the bound is close to p on average
    assert p - 0.1 < res.p_lower.mean().item() < p
    # the radius is the formula applied to the bound
    ok = res.predictions == 0
    torch.testing.assert_close(res.radii[ok], sigma * torch.as_tensor(norm.ppf(res.p_lower[ok].numpy())))


def _pipeline(seed: int = 0) -> RRCMPipeline:
    model = tiny_model(seed, num_classes=10, projection_dim=0).eval()
    sched = CMStochasticIterativeScheduler(
        num_train_timesteps=81, sigma_min=0.002, sigma_max=80, sigma_data=0.5, rho=7
    )
    pipe = RRCMPipeline(model=model, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("batch_size", [1, 7, 255, 256, 300, 700, 5_000])
def test_classifier_sees_exactly_the_reference_noisy_inputs(batch_size):
    """Every noisy input, in order, equals image + σ·ε with ε drawn by ``randn_tensor`` in chunks
    of NOISE_CHUNK (the documented stream), whatever the batch size; votes are their argmax."""
    image, sigma, num = torch.rand(3, 5, 4), 0.37, 700  # H != W
    g = torch.Generator().manual_seed(11)
    chunks = [
        randn_tensor((min(NOISE_CHUNK, num - i), *image.shape), generator=g, device=image.device)
        for i in range(0, num, NOISE_CHUNK)
    ]
    expected = torch.add(image.unsqueeze(0), torch.cat(chunks), alpha=sigma)  # (num, C, H, W)
    seen: list[torch.Tensor] = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())  # the pipeline reuses its buffer: keep a copy
        return x.flatten(1)[:, :4]  # class = argmax of the first 4 pixels

    counts = sample_counts(
        recorder, image, sigma, num, batch_size, generator=torch.Generator().manual_seed(11)
    )
    assert [len(x) for x in seen] == [min(batch_size, num - i) for i in range(0, num, batch_size)]
    assert torch.equal(torch.cat(seen), expected)
    assert torch.equal(counts, torch.bincount(expected.flatten(1)[:, :4].argmax(1), minlength=4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_get_float32_noise_rounded_after_it_is_added(dtype):
    """A half-precision image (a pipeline moved to bf16) is noised in float32 and only then rounded:
    the classifier sees round(x + σ·ε) with ε from the float32 stream, not x + σ·ε drawn in bf16."""
    image, sigma, num = torch.rand(1, 6, 5).to(dtype), 0.5, 300
    g = torch.Generator().manual_seed(5)
    eps = torch.cat([randn_tensor((k, *image.shape), generator=g) for k in (NOISE_CHUNK, num - NOISE_CHUNK)])
    expected = torch.add(image.float().unsqueeze(0), eps, alpha=sigma).to(dtype)  # (num, C, H, W)
    seen: list[torch.Tensor] = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.flatten(1)[:, :3].float()

    sample_counts(recorder, image, sigma, num, 128, generator=torch.Generator().manual_seed(5))
    assert all(x.dtype == dtype for x in seen) and torch.equal(torch.cat(seen), expected)
    drawn_in_half = torch.randn((num, *image.shape), generator=torch.Generator().manual_seed(5), dtype=dtype)
    assert not torch.equal(torch.cat(seen), (image.unsqueeze(0) + sigma * drawn_in_half))  # the old way
    pipe = _pipeline().to(torch.bfloat16)  # and through a bf16 pipeline, end to end
    out = pipe.certify(
        torch.rand(2, 1, 28, 28), 0.5, n0=10, n=200, generator=torch.Generator().manual_seed(0)
    )
    assert out.counts.sum() > 0 and out.radii.dtype == torch.float64


def test_certify_is_invariant_to_batch_size():
    pipe = _pipeline()
    imgs = torch.rand(2, 1, 28, 28)
    outs = [
        pipe.certify(imgs, 0.5, n0=20, n=300, batch_size=bs, generator=torch.Generator().manual_seed(3))
        for bs in (300, 64, 7)
    ]
    for o in outs[1:]:
        assert torch.equal(o.counts, outs[0].counts) and torch.equal(o.radii, outs[0].radii)
    again = pipe.certify(imgs, 0.5, n0=20, n=300, batch_size=64, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(again.p_lower, outs[0].p_lower)  # other noise, other counts


def test_pipeline_classifier_maps_to_model_space_without_touching_its_input():
    pipe = _pipeline()
    x = torch.rand(5, 1, 28, 28)  # (B, C, H, W) noisy images in [0, 1]
    before = x.clone()
    with torch.inference_mode():  # the same (fast) path as the reference below
        logits = pipe.base_classifier(0.5)(x)  # (B, K)
    assert torch.equal(x, before)  # the fast path may not write into the caller's tensor
    level = noise_level_for_sigma(0.5, pipe.scheduler.config.num_train_timesteps)
    with torch.inference_mode():
        expected = pipe.model.eval()(2 * before - 1, level).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    with pytest.warns(FutureWarning, match="base_classifier"):  # the 0.1.0 name still works
        old_name = pipe.classifier(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(old_name(x), expected, rtol=0, atol=0)


def test_autocast_certifies_the_bf16_classifier_with_float32_logits():
    pipe = _pipeline()
    x = torch.rand(64, 1, 28, 28)  # (B, C, H, W) noisy images in [0, 1]
    with torch.inference_mode():
        fp32 = pipe.base_classifier(0.5)(x)
        bf16 = pipe.base_classifier(0.5, autocast_dtype=torch.bfloat16)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = pipe.base_classifier(0.5)(x)  # (B, K) what the model gives under autocast
    assert bf16.dtype == torch.float32 and torch.equal(bf16, reference.float())
    assert not torch.equal(bf16, fp32)  # really ran in bf16 ...
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)  # ... close to fp32
    imgs = torch.rand(2, 1, 28, 28)
    run = dict(n0=20, n=300, batch_size=64, autocast_dtype=torch.bfloat16)
    a = pipe.certify(imgs, 0.5, generator=torch.Generator().manual_seed(3), **run)
    b = pipe.certify(imgs, 0.5, generator=torch.Generator().manual_seed(3), **run)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.radii, b.radii)  # deterministic
    for bad in (torch.float32, "bfloat16"):
        with pytest.raises(ValueError, match="autocast_dtype must be None or one of"):
            pipe.certify(imgs, 0.5, n0=10, n=50, autocast_dtype=bad)


def test_pipeline_save_load_gives_identical_certificates(tmp_path):
    pipe = _pipeline()
    imgs = torch.rand(3, 1, 28, 28)
    a = pipe.certify(imgs, 0.25, n0=10, n=200, batch_size=100, generator=torch.Generator().manual_seed(0))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RRCMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    b = loaded.certify(imgs, 0.25, n0=10, n=200, batch_size=100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.predictions, b.predictions) and torch.equal(a.radii, b.radii)
    c = loaded(imgs, 0.25, num_samples=100, generator=torch.Generator().manual_seed(0))
    d = pipe(imgs, 0.25, num_samples=100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c.counts, d.counts)


def test_certified_accuracy_and_acr():
    from rrcm_diffusers.certification import CertifyResult

    res = CertifyResult(
        torch.tensor([0, 1, ABSTAIN, 2]),
        torch.tensor([0.6, 0.2, 0.0, 1.0], dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.long),
    )
    labels = torch.tensor([0, 1, 1, 0])
    assert certified_accuracy(res, labels, [0.0, 0.5, 1.0]) == [0.5, 0.25, 0.0]
    assert average_certified_radius(res, labels) == pytest.approx((0.6 + 0.2) / 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=0.0), "sigma must be a finite number > 0"),
        (dict(sigma=-1.0), "sigma must be a finite number > 0"),
        (dict(n0=0), "n0 must be a positive integer"),
        (dict(n=-5, n0=1), "n must be a positive integer"),
        (dict(alpha=0.0), r"alpha must be in \(0, 1\)"),
        (dict(alpha=1.5), r"alpha must be in \(0, 1\)"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(images=torch.rand(2, 1, 28, 28) * 2), r"images must lie in \[0, 1\]"),
        (dict(images=torch.rand(2, 3, 28, 28)), r"images must have shape \(N, 1, 28, 28\)"),
        (dict(images=torch.rand(2, 1, 32, 32)), r"images must have shape"),
    ],
)
def test_bad_certify_input(kwargs, match):
    pipe = _pipeline()
    args = dict(images=torch.rand(2, 1, 28, 28), sigma=0.5, n0=10, n=100, batch_size=50)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe.certify(**args)


def test_bad_predict_input():
    pipe = _pipeline()
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        pipe(torch.rand(1, 1, 28, 28), 0.5, num_samples=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        pipe(torch.rand(1, 1, 28, 28), 0.0)
