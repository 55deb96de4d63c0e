from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rrcm_diffusers import RRCMFinetuningLoss, RRCMPretrainingLoss, ema_rate, karras_sigmas, update_ema
from rrcm_diffusers.trajectory import SIGMA_MIN
from shared_dist.testing import launch
from tests.rrcm.helpers import tiny_model


def _batch(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1
    a = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    v = (x.flip(-1) + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    eps = torch.randn(x.shape, generator=g)
    return x, a, v, eps


def _nce(q, k, tau=0.2):
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def test_pretraining_loss_equals_independent_computation():
    online, x_a_b_eps = tiny_model(), _batch()
    target = copy.deepcopy(online)
    x, a, b, eps = x_a_b_eps
    n, big_n = 7, 21
    out = RRCMPretrainingLoss()(online, target, x, a, b, n, big_n, noise=eps)
    s = karras_sigmas(big_n)
    with torch.no_grad():
        ka = target(a + SIGMA_MIN * eps, SIGMA_MIN, output_projection=True).projection
        kb = target(b + SIGMA_MIN * eps, SIGMA_MIN, output_projection=True).projection
        qa = online(a + SIGMA_MIN * eps, SIGMA_MIN, output_projection=True).projection
        qb = online(b + SIGMA_MIN * eps, SIGMA_MIN, output_projection=True).projection
        student = online(x + float(s[n]) * eps, float(s[n])).features
        teacher = online(x + float(s[n + 1]) * eps, float(s[n + 1])).features
    torch.testing.assert_close(out["instance"], _nce(qa, kb) + _nce(qb, ka))
    torch.testing.assert_close(out["consistency"], _nce(student, teacher))
    torch.testing.assert_close(out["loss"].detach(), out["instance"] + out["consistency"])


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def test_stop_grad_branches_receive_no_gradient():
    x, a, b, eps = _batch()
    n, big_n = 10, 41
    online = tiny_model()
    target = copy.deepcopy(online)
    # consistency term alone: the teacher pass (online at s_{n+1}) must be stop-grad
    RRCMPretrainingLoss(instance_weight=0.0)(online, target, x, a, b, n, big_n, noise=eps)["loss"].backward()
    got = _grads(online)
    assert all(p.grad is None for p in target.parameters())  # EMA target: never a gradient

    s = karras_sigmas(big_n)
    ref_model = tiny_model()
    student = ref_model(x + float(s[n]) * eps, float(s[n])).features
    teacher = ref_model(x + float(s[n + 1]) * eps, float(s[n + 1])).features
    _nce(student, teacher.detach()).backward()
    for g, r in zip(got, _grads(ref_model)):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, r)
    # and the same loss WITHOUT the stop-grad would give other gradients: the check has teeth
    wrong = tiny_model()
    st = wrong(x + float(s[n]) * eps, float(s[n])).features
    te = wrong(x + float(s[n + 1]) * eps, float(s[n + 1])).features
    _nce(st, te).backward()
    assert any(
        not torch.allclose(g, w) for g, w in zip(got, _grads(wrong)) if g is not None and w is not None
    )

    # instance term: the online net gets gradient through its projector, the target none
    online.zero_grad()
    RRCMPretrainingLoss(consistency_weight=0.0)(online, target, x, a, b, n, big_n, noise=eps)[
        "loss"
    ].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in online.projector.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_ema_update_values_and_rate_schedule():
    online, target = tiny_model(seed=1), tiny_model(seed=2)
    before = [p.clone() for p in target.parameters()]
    update_ema(target, online, 0.9)
    for t, b0, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b0 + 0.1 * o)
    assert ema_rate(0, 100) == pytest.approx(0.99)
    assert ema_rate(100, 100) == pytest.approx(0.9999)
    rates = [ema_rate(k, 100) for k in range(101)]
    assert all(r1 <= r2 for r1, r2 in itertools.pairwise(rates))
    assert rates[50] == pytest.approx((0.99 + 0.9999) / 2)  # sigmoid: symmetric around the middle


def test_contrastive_loss_needs_two_samples():
    x, a, b, eps = _batch(b=1)
    online = tiny_model()
    with pytest.raises(ValueError, match="at least 2"):
        RRCMPretrainingLoss()(online, copy.deepcopy(online), x, a, b, 3, 21, noise=eps)


def test_bad_grid_index_and_noise_shape():
    x, a, b, eps = _batch()
    online = tiny_model()
    with pytest.raises(ValueError, match="grid_index must be in"):
        RRCMPretrainingLoss()(online, online, x, a, b, 20, 21, noise=eps)
    with pytest.raises(ValueError, match="noise must have the shape"):
        RRCMPretrainingLoss()(online, online, x, a, b, 2, 21, noise=eps[:2])


def _w_pretrain_step(shards):
    rank = dist.get_rank()
    # float64: the comparison with one process is then exact to ~1e-10, not float32 noise
    online = torch.nn.parallel.DistributedDataParallel(tiny_model().double())
    target = copy.deepcopy(online.module)
    x, a, b, eps = (t[rank].double() for t in shards)
    out = RRCMPretrainingLoss()(online, target, x, a, b, 5, 21, noise=eps)
    out["loss"].backward()
    return {"loss": out["loss"].item(), "grads": _grads(online.module)}


@pytest.mark.distributed
def test_two_process_step_equals_one_process_step():
    x, a, b, eps = _batch(b=8)
    shards = [t.chunk(2) for t in (x, a, b, eps)]
    results = launch(_w_pretrain_step, 2, (shards,), timeout=180)
    online = tiny_model().double()
    x, a, b, eps = (t.double() for t in (x, a, b, eps))
    ref = RRCMPretrainingLoss()(online, copy.deepcopy(online), x, a, b, 5, 21, noise=eps)
    ref["loss"].backward()
    assert sum(r["loss"] for r in results) / 2 == pytest.approx(ref["loss"].item(), rel=1e-10)
    for res in results:
        for g, r in zip(res["grads"], _grads(online)):
            if r is None:
                continue
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_finetuning_loss_equals_explicit_formula():
    torch.manual_seed(0)
    model = tiny_model(num_classes=4, projection_dim=0)
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    labels = torch.tensor([0, 3, 1])
    loss_fn = RRCMFinetuningLoss(sigma=0.5, num_noise_samples=2)
    assert loss_fn.lam == 20.0 and loss_fn.eta == 0.5
    out = loss_fn(model, images, labels, generator=torch.Generator().manual_seed(5))
    # reference: same noise, explicit per-image sums
    noise = torch.randn((6, 1, 28, 28), generator=torch.Generator().manual_seed(5))
    x = torch.cat([images, images]) + 1.0 * noise
    logits = model(x, loss_fn.noise_level).logits
    ce = F.cross_entropy(logits, torch.cat([labels, labels]))
    total_kl, total_h = 0.0, 0.0
    for j in range(3):
        p = [logits[i * 3 + j].softmax(-1) for i in range(2)]
        pbar = (p[0] + p[1]) / 2
        total_kl += sum((pbar * (pbar.log() - pi.log())).sum() for pi in p) / 2
        total_h += -(pbar * pbar.log()).sum()
    expect = ce + 20.0 * total_kl / 3 + 0.5 * total_h / 3
    torch.testing.assert_close(out["loss"], expect, rtol=1e-5, atol=1e-6)
    assert float(loss_fn.noise_level) == pytest.approx(0.9654, abs=1e-4)


def test_finetuning_loss_rejects_bad_sigma_and_labels():
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        RRCMFinetuningLoss(sigma=0)
    model = tiny_model(num_classes=4, projection_dim=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        RRCMFinetuningLoss(0.25)(model, torch.zeros(2, 1, 28, 28), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ choices checked against the authors' code


def test_authors_ema_schedule_is_their_concave_curve():
    import numpy as np

    def authors(step, total, start=0.99, end=0.9999, a=15):  # their create_ema_and_scales_fn, "sigmoid"
        ema = np.sqrt((step / total) * (end**2 - start**2) + start**2)
        c = 2 / (1 + np.exp(-a * ((ema - start) / (end - start)))) - 1
        return c * end + (1 - c) * start

    rates = [ema_rate(k, 1000, steepness=15, schedule="authors") for k in range(1001)]
    assert rates == pytest.approx([authors(k, 1000) for k in range(1001)], rel=0, abs=1e-12)
    # what PretrainConfig(ema_schedule="authors") gets: their A = 15 without being told
    assert [ema_rate(k, 1000, schedule="authors") for k in range(1001)] == rates
    assert rates[0] == pytest.approx(0.99) and rates[-1] == pytest.approx(0.9999, abs=1e-8)
    assert rates[500] == pytest.approx(0.999889, abs=1e-6)  # horizon 1/(1 - rate) ~ 9,000 steps
    assert ema_rate(500, 1000) == pytest.approx(0.99495, abs=1e-5)  # the default S-curve: ~198 steps
    steps = np.diff(rates)
    assert (steps[1:] <= steps[:-1] + 1e-15).all()  # concave: it rises fastest at the start
    with pytest.raises(ValueError, match="schedule must be 'sigmoid' or 'authors'"):
        ema_rate(1, 10, schedule="cosine")


def test_one_directional_instance_term_is_the_authors_a_to_b():
    online, (x, a, b, eps) = tiny_model(), _batch()
    target = copy.deepcopy(online)
    one = RRCMPretrainingLoss(consistency_weight=0.0, symmetric=False)(
        online, target, x, a, b, 3, 21, noise=eps
    )
    both = RRCMPretrainingLoss(consistency_weight=0.0)(online, target, x, a, b, 3, 21, noise=eps)
    with torch.no_grad():
        qa, qb = (online(v + SIGMA_MIN * eps, SIGMA_MIN, output_projection=True).projection for v in (a, b))
        ka, kb = (target(v + SIGMA_MIN * eps, SIGMA_MIN, output_projection=True).projection for v in (a, b))
    torch.testing.assert_close(one["instance"], _nce(qa, kb))
    torch.testing.assert_close(both["instance"], _nce(qa, kb) + _nce(qb, ka))


def test_time_token_is_the_sinusoidal_embedding_unless_asked_for_the_mlp():
    from diffusers.models.embeddings import Timesteps

    from rrcm_diffusers.trajectory import c_noise

    plain = tiny_model()
    assert isinstance(plain.backbone.time_embed, torch.nn.Identity)
    assert not any("time_embed" in name for name, _ in plain.named_parameters())
    seen = {}
    hook = plain.backbone.time_embed.register_forward_hook(lambda mod, inp, out: seen.update(token=out))
    plain(torch.zeros(2, 1, 28, 28), 0.5)
    hook.remove()
    want = Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=0)(c_noise(torch.full((2,), 0.5)))
    torch.testing.assert_close(seen["token"], want)
    with torch.no_grad():  # the noise level still conditions the model
        assert not torch.allclose(
            plain(torch.zeros(2, 1, 28, 28), 0.5).features, plain(torch.zeros(2, 1, 28, 28), 2.0).features
        )
    mlp = tiny_model(backbone_kwargs={"time_mlp": True})
    assert any("time_embed" in name for name, _ in mlp.named_parameters())
