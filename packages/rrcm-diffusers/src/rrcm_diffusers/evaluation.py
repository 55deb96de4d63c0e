"""Quick evaluation of an encoder or classifier on noisy images: features, linear probes, accuracy.

Certified accuracy is in `certification` (one image) and `dataset_certification` (a test set)."""

from __future__ import annotations

import torch

from .data import to_model_space
from .modeling_rrcm import RRCMModel
from .trajectory import SIGMA_MIN, add_smoothing_noise, noise_level_for_sigma


def _noisy_batches(images: torch.Tensor, sigma: float | None, batch_size: int, seed: int):
    """(model-space batch with smoothing noise σ, its noise level s); clean images at s = SIGMA_MIN."""
    gen = torch.Generator().manual_seed(seed)
    level = noise_level_for_sigma(sigma) if sigma else SIGMA_MIN
    for chunk in images.split(batch_size):
        x = to_model_space(chunk)  # (b, C, H, W) in [-1, 1]
        yield (add_smoothing_noise(x, sigma, gen) if sigma else x), level


@torch.no_grad()
def extract_features(
    model: RRCMModel, images: torch.Tensor, sigma: float | None, batch_size: int = 256, seed: int = 0
) -> torch.Tensor:
    """LN(CLS) features (N, D) of uint8 images, with smoothing noise σ (pixel space) or clean (None)."""
    model.eval()
    feats = [
        model(x.to(model.device), level).features.float().cpu()
        for x, level in _noisy_batches(images, sigma, batch_size, seed)
    ]
    return torch.cat(feats)


def linear_probe_accuracy(
    model: RRCMModel,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    sigma: float | None,
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Accuracy of a linear classifier trained on frozen (noisy) features of ``train``, on ``test``."""
    torch.manual_seed(seed)
    f_tr, f_te = (
        extract_features(model, train[0], sigma, seed=seed),
        extract_features(model, test[0], sigma, seed=seed + 1),
    )
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    head = torch.nn.Linear(f_tr.shape[1], int(train[1].max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(f_tr), train[1]).backward()
        opt.step()
    return (head(f_te).argmax(1) == test[1]).float().mean().item()


@torch.no_grad()
def noisy_accuracy(
    model: RRCMModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float | None,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of the classifier on one noisy copy per image (σ in pixel space)."""
    model.eval()
    correct = 0
    for (x, level), y in zip(_noisy_batches(images, sigma, batch_size, seed), labels.split(batch_size)):
        correct += (model(x.to(model.device), level).logits.argmax(1).cpu() == y).sum().item()
    return correct / len(labels)
