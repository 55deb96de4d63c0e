"""Batched image augmentations in plain torch (pixels in [-1, 1]), reproducible with a generator.

BYOL-style strong views for colour images (crop, flip, colour jitter, blur, solarize) and
a digit-friendly variant (crop/shift, blur) for grey images, applied per sample on the
whole batch at once — no Python loop over images. `classifier_view` is the standard CIFAR
training augmentation (pad-4 random crop + horizontal flip) for the classifiers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(n: int, g: torch.Generator | None, device) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device, then moved (as diffusers' ``randn_tensor`` does)."""
    return torch.rand(n, generator=g, device=g.device if g is not None else device).to(device)


def _u(n: int, lo: float, hi: float, g: torch.Generator | None, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, g, device)


def _coin(n: int, p: float, g: torch.Generator | None, device) -> torch.Tensor:
    return _rand(n, g, device) < p


def random_resized_crop(x, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), generator=None) -> torch.Tensor:
    b, dev = x.shape[0], x.device
    area = _u(b, *scale, generator, dev)
    log_r = _u(b, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)  # fraction of the width kept
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (2 * _rand(b, generator, dev) - 1) * (1 - w)
    cy = (2 * _rand(b, generator, dev) - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)  # (B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_hflip(x, p=0.5, generator=None) -> torch.Tensor:
    flip = _coin(x.shape[0], p, generator, x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def color_jitter(x, strength=0.4, p=0.8, generator=None) -> torch.Tensor:
    b, dev = x.shape[0], x.device
    y = (x + 1) / 2  # [0, 1]
    bright = _u(b, 1 - strength, 1 + strength, generator, dev)[:, None, None, None]
    contrast = _u(b, 1 - strength, 1 + strength, generator, dev)[:, None, None, None]
    sat = _u(b, 1 - strength, 1 + strength, generator, dev)[:, None, None, None]
    j = y * bright
    mean = j.mean(dim=(1, 2, 3), keepdim=True)
    j = (j - mean) * contrast + mean
    if x.shape[1] == 3:
        grey = j.mean(dim=1, keepdim=True)
        j = (j - grey) * sat + grey
    j = j.clamp(0, 1)
    apply = _coin(b, p, generator, dev)[:, None, None, None]
    return torch.where(apply, j * 2 - 1, x)


def random_grayscale(x, p=0.2, generator=None) -> torch.Tensor:
    if x.shape[1] != 3:
        return x
    apply = _coin(x.shape[0], p, generator, x.device)[:, None, None, None]
    return torch.where(apply, x.mean(dim=1, keepdim=True).expand_as(x), x)


def gaussian_blur(x, p=0.5, sigma=(0.1, 1.5), generator=None) -> torch.Tensor:
    b, c, h, w = x.shape
    k = 2 * max(1, math.ceil(2 * sigma[1])) + 1
    s = _u(b, *sigma, generator, x.device)  # (B,)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r[None] ** 2) / (2 * s[:, None] ** 2))  # (B, k)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="replicate"), kern[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="replicate"), kern[:, None, :, None], groups=b * c)
    apply = _coin(b, p, generator, x.device)[:, None, None, None]
    return torch.where(apply, y.view(b, c, h, w), x)


def random_solarize(x, p=0.2, generator=None) -> torch.Tensor:
    apply = _coin(x.shape[0], p, generator, x.device)[:, None, None, None]
    return torch.where(apply & (x > 0), -x, x)  # 1 - y for y > 0.5, in [-1, 1] space


def strong_view(x: torch.Tensor, kind: str = "rgb", generator: torch.Generator | None = None) -> torch.Tensor:
    """One strong augmentation of a batch: ``kind`` is ``"rgb"`` (BYOL) or ``"grey"`` (digits)."""
    if kind == "grey":
        x = random_resized_crop(x, scale=(0.5, 1.0), ratio=(0.8, 1.25), generator=generator)
        return gaussian_blur(x, p=0.5, sigma=(0.1, 1.0), generator=generator)
    if kind != "rgb":
        raise ValueError(f"kind must be 'rgb' or 'grey', got {kind!r}")
    x = random_resized_crop(x, generator=generator)
    x = random_hflip(x, generator=generator)
    x = color_jitter(x, generator=generator)
    x = random_grayscale(x, generator=generator)
    x = gaussian_blur(x, generator=generator)
    return random_solarize(x, generator=generator)


def light_view(x: torch.Tensor, kind: str = "rgb", generator: torch.Generator | None = None) -> torch.Tensor:
    """The trajectory view: horizontal flip only (none for digits)."""
    return random_hflip(x, generator=generator) if kind == "rgb" else x


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``RandomCrop(size, padding)`` per sample: pad with black (-1), cut a random
    window of the original size."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, value=-1.0)  # (B, C, H + 2p, W + 2p)
    dy = (_rand(b, generator, x.device) * (2 * padding + 1)).long()  # (B,) in [0, 2p]
    dx = (_rand(b, generator, x.device) * (2 * padding + 1)).long()
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]  # (B, C, H, W)


CLASSIFIER_AUGMENTS = ("none", "crop_flip")


def check_classifier_augment(kind: str, name: str = "augment") -> None:
    """Raise a ValueError naming ``name`` unless ``kind`` is one of `CLASSIFIER_AUGMENTS`."""
    if kind not in CLASSIFIER_AUGMENTS:
        raise ValueError(f"{name} must be one of {CLASSIFIER_AUGMENTS}, got {kind!r}")


def classifier_view(
    x: torch.Tensor, kind: str = "none", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The classifiers' training augmentation, before the smoothing noise: ``"none"`` or
    ``"crop_flip"`` (pad-4 random crop + horizontal flip, as the authors and Cohen et al. train on CIFAR-10)."""
    check_classifier_augment(kind)
    if kind == "none":
        return x
    return random_hflip(random_crop(x, generator=generator), generator=generator)
