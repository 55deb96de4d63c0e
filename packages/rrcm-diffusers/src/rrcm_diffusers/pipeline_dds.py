"""DDSPipeline: diffusion denoised smoothing (Carlini et al., 2023), the baseline rRCM is measured against."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ._checks import check_sigma
from .certification import with_autocast
from .modeling_rrcm import RRCMModel, check_floating_weights
from .pipeline_rrcm import RRCMPipeline, make_loadable_by_diffusers, own_class_config
from .trajectory import SIGMA_MIN


class DDSPipeline(DiffusionPipeline):
    r"""
    Denoise-then-classify: one UNet pass (one-shot x0 prediction) + one classifier pass per
    noise sample.

    For a noisy input y = 2(x + δ) − 1 (noise std 2σ in [-1, 1] space) pick t* with
    sqrt((1 − ᾱ_t*)/ᾱ_t*) ≈ 2σ; then sqrt(ᾱ_t*)·y is distributed as the forward process at t*,
    the UNet predicts ε, x̂0 = (x_t* − sqrt(1 − ᾱ_t*)·ε̂)/sqrt(ᾱ_t*), and a classifier trained on
    clean images labels x̂0.

    Args:
        unet ([`UNet2DModel`]): ε-prediction model trained on the same images.
        scheduler ([`DDPMScheduler`]): its noise schedule.
        classifier ([`RRCMModel`]): a classifier trained on clean images (queried at s_min).
    """

    model_cpu_offload_seq = "unet->classifier"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, classifier: RRCMModel) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            make_loadable_by_diffusers(save_directory, type(self).__name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DDSPipeline:
        """diffusers' loader, after refusing a UNet weight file with non-floating tensors (the
        classifier's own loader checks its files)."""
        check_floating_weights(Path(pretrained_model_name_or_path) / "unet")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        return own_class_config(super().load_config(*args, **kwargs), cls.__name__)

    def timestep_for_sigma(self, sigma: float) -> int:
        """t* with sqrt((1 − ᾱ_t)/ᾱ_t) closest to 2σ."""
        check_sigma(sigma)
        abar = self.scheduler.alphas_cumprod.double()
        return int(torch.argmin(((1 - abar) / abar).sqrt().sub(2 * sigma).abs()))

    def base_classifier(self, sigma: float, autocast_dtype: torch.dtype | None = None):
        """Denoise-then-classify f(x) for noisy images x in [0, 1] pixel space → logits (B, K);
        the same contract as `RRCMPipeline.base_classifier`."""
        t = self.timestep_for_sigma(sigma)
        abar = float(self.scheduler.alphas_cumprod[t])
        unet, clf = self.unet.eval(), self.classifier.eval()

        def f(x: torch.Tensor) -> torch.Tensor:
            y = x.mul(2.0).sub_(1.0)  # (B, C, H, W), noise std 2σ
            x_t = math.sqrt(abar) * y
            eps = unet(x_t, torch.full((x.shape[0],), t, device=x.device)).sample
            x0 = ((x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
            return clf(x0, SIGMA_MIN).logits  # (B, K)

        return with_autocast(f, autocast_dtype)

    def _prepare(self, images) -> torch.Tensor:
        """Images on the pipeline's device, checked against the UNet's input shape."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor in [0, 1], got {type(images).__name__}")
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != size:
            raise ValueError(
                f"images must have shape (N, {channels}, {size[0]}, {size[1]}) for this pipeline's UNet, "
                f"got {tuple(images.shape)}"
            )
        return x.to(self.device)

    # PREDICT and CERTIFY are RRCMPipeline's, on this pipeline's base classifier: the same arguments,
    # input checks, outputs, and noise for a given generator (one implementation, not a copy)
    __call__ = RRCMPipeline.__call__
    certify = RRCMPipeline.certify
    _progress_disabled = RRCMPipeline._progress_disabled


def small_unet(image_size: int = 28, channels: int = 1) -> UNet2DModel:
    """A CPU-sized ε-prediction UNet for 28x28 / 32x32 images."""
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def train_ddpm(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list[float]:
    """Standard DDPM training (ε-prediction, uniform t) on uint8 images; returns the losses.

    Trains on ``device`` (default: where ``unet`` is). Draws come from one CPU generator and
    are moved there, so the run is the same on every device for a given seed.
    """
    from .data import to_model_space

    unet = unet.to(device) if device is not None else unet
    device = unet.device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    unet.train()
    losses = []  # on the device: no host sync per step
    for _ in tqdm(range(steps), disable=not progress, desc="ddpm"):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g, device=g.device)
        x0 = to_model_space(images[idx]).to(device)  # (B, C, H, W)
        noise = randn_tensor(x0.shape, generator=g, device=device, dtype=x0.dtype)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=g, device=g.device
        )
        t = t.to(device)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist() if losses else []
