"""rRCM training objectives: contrastive pretraining along the trajectory, and noisy fine-tuning.

The paper's letters, used in names and docstrings here: N the grid size and n an index on it
(``num_scales``, ``grid_index``); s a noise level on the grid and σ the smoothing noise in [0, 1]
pixel space (see `trajectory`); τ the InfoNCE temperature (``tau``); m the noisy copies per image
(``num_noise_samples``); λ the consistency weight and η the entropy weight of fine-tuning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

import shared_dist

from ._checks import check_sigma
from .modeling_rrcm import RRCMModel, info_nce
from .trajectory import (
    CERTIFY_NUM_SCALES,
    SIGMA_MIN,
    add_smoothing_noise,
    karras_sigmas,
    noise_level_for_sigma,
)


class RRCMPretrainingLoss(nn.Module):
    r"""The rRCM pretraining objective for one batch.

    With ONE noise draw ε shared by every term and one grid index n shared by the batch:

    1. instance discrimination at s_min, symmetric (the spec's term1(a→b) + term1(b→a)):
       NCE(proj(online(a + s_min ε)), sg(proj(target(b + s_min ε)))) + (a ↔ b),
       where ``target`` is the EMA of ``online``. The authors' code computes the a→b
       direction only (``symmetric=False``), at half the cost of this term;
    2. trajectory consistency between adjacent grid points on the encoder's LN(CLS):
       NCE(online(x + s_n ε), sg(online(x + s_{n+1} ε))) — the teacher is the online
       network itself under stop-grad, one step less noisy.

    NCE is InfoNCE on L2-normalised vectors with cosine logits / τ; the targets are gathered
    from every rank (cross-device negatives), queries stay local.

    Args:
        tau: temperature τ (0.2).
        instance_weight: weight of term 1 (1; 0 for the ablation "consistency only").
        consistency_weight: weight of term 2 (1; 0 for the ablation "contrastive only").
        symmetric: both directions of term 1 (True, the spec) or a→b only (the authors' code).
    """

    def __init__(
        self,
        tau: float = 0.2,
        instance_weight: float = 1.0,
        consistency_weight: float = 1.0,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau, self.instance_weight, self.consistency_weight = tau, instance_weight, consistency_weight
        self.symmetric = symmetric

    def forward(
        self,
        online: RRCMModel,
        target: RRCMModel,
        x: torch.Tensor,
        view_a: torch.Tensor,
        view_b: torch.Tensor,
        grid_index: int,
        num_scales: int,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            online: the model being trained (may be DDP-wrapped).
            target: its EMA copy.
            x: lightly augmented images (flip only), pixels in [-1, 1], (B, C, H, W).
            view_a: a strong augmentation of the images, (B, C, H, W).
            view_b: a second strong augmentation of the same images, (B, C, H, W).
            grid_index: n in [0, N-2], the same on every rank (``sample_grid_index``).
            num_scales: N, the current grid size.
            generator: draws ε when ``noise`` is not given.
            noise: ε itself, (B, C, H, W), if you want to fix it.
        Returns:
            dict with ``loss`` (to back-propagate), ``instance`` and ``consistency``.
        """
        _check_pretraining_inputs(x, view_a, view_b, grid_index, num_scales, noise)
        eps = (
            noise
            if noise is not None
            else randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        )
        sigmas = karras_sigmas(num_scales)
        s_n, s_next = float(sigmas[grid_index]), float(sigmas[grid_index + 1])  # s_n > s_next

        zero = x.new_zeros(())
        instance = zero
        if self.instance_weight:  # views at the lowest noise level, online vs EMA target, both ways
            instance = self._instance_nce(online, target, view_a + SIGMA_MIN * eps, view_b + SIGMA_MIN * eps)
            if self.symmetric:
                instance = instance + self._instance_nce(
                    online, target, view_b + SIGMA_MIN * eps, view_a + SIGMA_MIN * eps
                )

        consistency = zero
        if self.consistency_weight:
            student = online(x + s_n * eps, s_n).features  # (B, D)
            with torch.no_grad():
                teacher = online(x + s_next * eps, s_next).features  # (B, D), stop-grad online
            consistency = info_nce(student, teacher, self.tau)

        loss = self.instance_weight * instance + self.consistency_weight * consistency
        return {"loss": loss, "instance": instance.detach(), "consistency": consistency.detach()}

    def _instance_nce(
        self, online: RRCMModel, target: RRCMModel, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        q = online(a, SIGMA_MIN, output_projection=True).projection  # (B, P)
        with torch.no_grad():
            k = target(b, SIGMA_MIN, output_projection=True).projection  # (B, P)
        return info_nce(q, k, self.tau)


def _check_pretraining_inputs(x, view_a, view_b, grid_index: int, num_scales: int, noise) -> None:
    if not x.shape == view_a.shape == view_b.shape:
        raise ValueError(
            f"x, view_a, view_b must have one shape, got {x.shape}, {view_a.shape}, {view_b.shape}"
        )
    if x.shape[0] * shared_dist.get_world_size() < 2:
        raise ValueError(
            f"the contrastive loss needs a batch of at least 2 across ranks, got x of shape {tuple(x.shape)}"
        )
    if not 0 <= grid_index <= num_scales - 2:
        raise ValueError(f"grid_index must be in [0, {num_scales - 2}], got {grid_index}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")


class RRCMFinetuningLoss(nn.Module):
    r"""Noisy fine-tuning with the consistency regulariser of Jeong & Shin (2020).

    Each image is repeated ``m`` times with independent noise 2σ·ε (σ in [0, 1] pixel space,
    so 2σ in [-1, 1] space), the model is conditioned on the grid level nearest to 2σ, and

        L = CE(logits, y) + λ · mean_i KL(p̄ ‖ p_i) + η · H(p̄),   p̄ = mean_i p_i.

    Args:
        sigma: smoothing noise σ > 0 in [0, 1] pixel space.
        num_noise_samples: m (2).
        consistency_weight: λ (10 for σ = 0.25, 20 for σ >= 0.5; 0 gives plain Gaussian augmentation).
        entropy_weight: η (0.5).
        num_scales: grid size used to pick the conditioning level (81).
    """

    def __init__(
        self,
        sigma: float,
        num_noise_samples: int = 2,
        consistency_weight: float | None = None,
        entropy_weight: float = 0.5,
        num_scales: int = CERTIFY_NUM_SCALES,
    ) -> None:
        super().__init__()
        check_sigma(sigma)
        if num_noise_samples < 1:
            raise ValueError(f"num_noise_samples must be >= 1, got {num_noise_samples}")
        self.sigma, self.m = float(sigma), num_noise_samples
        self.lam = (10.0 if sigma <= 0.25 else 20.0) if consistency_weight is None else consistency_weight
        self.eta = entropy_weight
        self.noise_level = noise_level_for_sigma(sigma, num_scales)  # s for σ

    def forward(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``images``: clean pixels in [-1, 1], (B, C, H, W); ``labels``: (B,)."""
        b = images.shape[0]
        if labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
        x = images.repeat(self.m, 1, 1, 1)  # (m*B, C, H, W), copy i of image j at row i*B + j
        x = add_smoothing_noise(x, self.sigma, generator)
        logits = model(x, self.noise_level).logits  # (m*B, K)
        ce = F.cross_entropy(logits, labels.repeat(self.m))
        log_p = F.log_softmax(logits, dim=-1).view(self.m, b, -1)  # (m, B, K)
        p_bar = log_p.exp().mean(0)  # (B, K)
        log_p_bar = p_bar.clamp_min(1e-12).log()
        # KL(p̄ ‖ p_i) = Σ_k p̄ (log p̄ − log p_i), averaged over i and the batch
        kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(-1).mean()
        entropy = -(p_bar * log_p_bar).sum(-1).mean()
        loss = ce + (self.lam * kl + self.eta * entropy if self.m > 1 else 0.0)
        acc = (logits.argmax(-1) == labels.repeat(self.m)).float().mean()
        return {
            "loss": loss,
            "ce": ce.detach(),
            "kl": kl.detach(),
            "entropy": entropy.detach(),
            "accuracy": acc,
        }


def ema_rate(
    step: int,
    total_steps: int,
    start: float = 0.99,
    end: float = 0.9999,
    steepness: float | None = None,
    schedule: str = "sigmoid",
) -> float:
    """EMA rate of the target network, rising from ``start`` (step 0) to ``end`` (last step).

    ``"sigmoid"`` (default, the spec's "sigmoid-shaped rate rising 0.99 → 0.9999"): an S-curve
    symmetric in time, so the averaging horizon 1/(1 − rate) grows with the run (100 steps at the
    start, 198 at half-way, 10,000 at the end).

    ``"authors"``: the schedule of the authors' code (``target_ema_mode="sigmoid"``, A =
    ``steepness``, default 15 as in their configs; the S-curve's default is 6):
    r = sqrt(t·(end² − start²) + start²), u = (r − start)/(end − start),
    c = 2/(1 + exp(−A·u)) − 1, rate = c·end + (1 − c)·start. It is concave: 0.99989 at half-way
    (a 9,000-step horizon), near ``end`` from ~20 % of the run on. The authors train 300k steps;
    in a run of a few thousand steps the target would barely follow the online network, which is
    why it is not the default here.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    t = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "authors":
        steepness = 15.0 if steepness is None else steepness
        ramp = math.sqrt(t * (end**2 - start**2) + start**2)
        c = 2.0 / (1.0 + math.exp(-steepness * (ramp - start) / (end - start))) - 1.0
        return c * end + (1.0 - c) * start
    if schedule != "sigmoid":
        raise ValueError(f"schedule must be 'sigmoid' or 'authors', got {schedule!r}")

    steepness = 6.0 if steepness is None else steepness

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    lo, hi = sig(-steepness), sig(steepness)
    return start + (end - start) * (sig(steepness * (2 * t - 1)) - lo) / (hi - lo)


@torch.no_grad()
def update_ema(target: nn.Module, online: nn.Module, rate: float) -> None:
    """target ← rate·target + (1 − rate)·online for parameters; buffers are copied."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1.0 - rate)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)
