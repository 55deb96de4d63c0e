"""The small model, inputs and losses of the gradient tests, and their single-process reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))


def inputs(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, generator=g) for n in sizes]


def global_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Same loss on every rank: all queries against all keys."""
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.1
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def local_loss(q_local: torch.Tensor, k_all: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.normalize(q_local, dim=-1) @ F.normalize(k_all, dim=-1).T / 0.1
    return F.cross_entropy(logits, labels)


def reference(sizes: list[int], use: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = small_model()
    x = torch.cat(inputs(sizes)).requires_grad_(True)
    z = model(x)
    q, k = z[:, :4], z[:, 1:]
    if use == "global":
        loss = global_loss(q, k)
    else:
        offs = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        per_rank = [
            local_loss(q[offs[r] : offs[r + 1]], k, torch.arange(offs[r], offs[r + 1]))
            for r in range(len(sizes))
        ]
        loss = torch.stack(per_rank).mean()  # DDP averages the per-rank losses
    loss.backward()
    return [p.grad for p in model.parameters()], x.grad
