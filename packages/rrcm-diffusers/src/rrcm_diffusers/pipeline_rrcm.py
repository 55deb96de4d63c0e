"""RRCMPipeline: a fine-tuned rRCM model as a certifiably robust classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import CMStochasticIterativeScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput

from .certification import certify, predict
from .modeling_rrcm import RRCMModel
from .trajectory import grid_sigma_for_sigma


@dataclass
class RRCMPipelineOutput(BaseOutput):
    """
    Args:
        predictions (`torch.Tensor` of shape `(N,)`): smoothed class per image, -1 = abstain.
        counts (`torch.Tensor` of shape `(N, num_classes)`): votes over the noise samples.
        p_values (`torch.Tensor` of shape `(N,)`): two-sided binomial test p-values.
    """

    predictions: torch.Tensor
    counts: torch.Tensor
    p_values: torch.Tensor


@dataclass
class RRCMCertifyOutput(BaseOutput):
    """
    Args:
        predictions (`torch.Tensor` of shape `(N,)`): certified class per image, -1 = abstain.
        radii (`torch.Tensor` of shape `(N,)`): certified L2 radius in [0, 1] pixel space.
        p_lower (`torch.Tensor` of shape `(N,)`): lower confidence bound of p_A.
        counts (`torch.Tensor` of shape `(N,)`): votes for the selected class among `n` samples.
    """

    predictions: torch.Tensor
    radii: torch.Tensor
    p_lower: torch.Tensor
    counts: torch.Tensor


class RRCMPipeline(DiffusionPipeline):
    r"""
    Randomized smoothing with an rRCM classifier: one forward pass per noise sample.

    Noise N(0, σ²) is added in [0, 1] pixel space; the model sees 2(x + δ) − 1, i.e. noise of
    std 2σ in its [-1, 1] space, and is conditioned on the grid level of `scheduler` nearest
    to 2σ. The certificate holds whatever conditioning is used: only the noise actually added
    enters the guarantee.

    Args:
        model ([`RRCMModel`]): a fine-tuned model with a classifier head.
        scheduler ([`CMStochasticIterativeScheduler`]): defines the Karras grid (N = 81 by default).
    """

    model_cpu_offload_seq = "model"

    def __init__(self, model: RRCMModel, scheduler: CMStochasticIterativeScheduler) -> None:
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler)

    def classifier(self, sigma: float):
        """The base classifier f(x) for noisy images x in [0, 1] pixel space → logits (B, K)."""
        if self.model.classifier is None:
            raise ValueError("the pipeline's model has no classifier head; fine-tune it first")
        level = grid_sigma_for_sigma(sigma, self.scheduler.config.num_train_timesteps)
        model = self.model.eval()

        def f(x: torch.Tensor) -> torch.Tensor:
            return model(x.mul(2.0).sub_(1.0), level).logits  # (B, K); one temporary, x is left intact

        return f

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor in [0, 1], got {type(images).__name__}")
        cfg = self.model.config
        shape = tuple(images.shape[-3:]) if images.dim() >= 3 else tuple(images.shape)
        if images.dim() not in (3, 4) or shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must have shape (N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(images.shape)}"
            )
        return images.to(self.device, self.model.dtype)

    @torch.inference_mode()
    def __call__(
        self,
        images: torch.Tensor,
        sigma: float = 0.5,
        num_samples: int = 1000,
        alpha: float = 0.001,
        batch_size: int = 1000,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> RRCMPipelineOutput | tuple:
        r"""
        Smoothed prediction with abstention (Cohen's PREDICT).

        Args:
            images (`torch.Tensor` of shape `(N, C, H, W)`): clean images in [0, 1].
            sigma (`float`): smoothing noise std in [0, 1] pixel space.
            num_samples (`int`): noise samples per image.
            alpha (`float`): test level; abstain unless the top class wins at this level.
            batch_size (`int`): noisy copies per forward pass.
            generator (`torch.Generator`, *optional*): for reproducible noise.
            return_dict (`bool`): return an [`RRCMPipelineOutput`] instead of a tuple.
        """
        x = self._prepare(images)
        out = predict(
            self.classifier(sigma),
            x,
            sigma,
            num_samples,
            alpha,
            batch_size,
            generator,
            progress=not self._progress_disabled(),
        )
        if not return_dict:
            return (out.predictions, out.counts, out.p_values)
        return RRCMPipelineOutput(predictions=out.predictions, counts=out.counts, p_values=out.p_values)

    @torch.inference_mode()
    def certify(
        self,
        images: torch.Tensor,
        sigma: float = 0.5,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int = 1000,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> RRCMCertifyOutput | tuple:
        r"""
        Certified L2 radius per image (Cohen's CERTIFY).

        Args:
            images (`torch.Tensor` of shape `(N, C, H, W)`): clean images in [0, 1].
            sigma (`float`): smoothing noise std in [0, 1] pixel space.
            n0 (`int`): samples to select the class.
            n (`int`): samples to estimate its probability.
            alpha (`float`): failure probability of the certificate.
            batch_size (`int`): noisy copies per forward pass.
            generator (`torch.Generator`, *optional*): for reproducible noise.
            return_dict (`bool`): return an [`RRCMCertifyOutput`] instead of a tuple.
        """
        x = self._prepare(images)
        out = certify(
            self.classifier(sigma),
            x,
            sigma,
            n0,
            n,
            alpha,
            batch_size,
            generator,
            progress=not self._progress_disabled(),
        )
        if not return_dict:
            return (out.predictions, out.radii, out.p_lower, out.counts)
        return RRCMCertifyOutput(
            predictions=out.predictions, radii=out.radii, p_lower=out.p_lower, counts=out.counts
        )

    def _progress_disabled(self) -> bool:
        return bool(getattr(self, "_progress_bar_config", {}).get("disable", False))
