"""Certified-accuracy reports: many methods, one harness, Markdown + CSV + JSON + a plot."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .certification import CertifyResult, average_certified_radius, certified_accuracy, certify

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]

# method name -> (sigma -> base classifier over [0, 1] images)
Methods = dict[str, Callable[[float], Callable[[torch.Tensor], torch.Tensor]]]


def certify_methods(
    methods: Methods,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigmas: list[float],
    n0: int = 100,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Certify every method at every σ on the same images with the same noise seed."""
    rows = []
    for name, make in methods.items():
        for sigma in sigmas:
            clf = make(sigma)
            gen = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            res = certify(clf, images, sigma, n0, n, alpha, batch_size, gen, progress=progress)
            seconds = time.perf_counter() - start
            rows.append(summary_row(name, sigma, res, labels, n0, n, alpha, seconds))
    return rows


def summary_row(
    method: str,
    sigma: float,
    result: CertifyResult,
    labels: torch.Tensor,
    n0: int,
    n: int,
    alpha: float,
    seconds: float,
) -> dict[str, Any]:
    """One report row: certified accuracy at every radius of ``RADII``, ACR, abstention, cost."""
    acc = certified_accuracy(result, labels, RADII)
    return {
        "method": method,
        "sigma": sigma,
        "images": int(labels.numel()),
        "n0": n0,
        "n": n,
        "alpha": alpha,
        **{f"r={r:g}": a for r, a in zip(RADII, acc)},
        "acr": average_certified_radius(result, labels),
        "abstain": float((result.predictions < 0).float().mean()),
        "seconds": seconds,
        "ms_per_noise_sample": 1000 * seconds / max(labels.numel() * (n0 + n), 1),
    }


def write_report(rows: list[dict[str, Any]], out: str | Path, title: str, notes: str = "") -> dict[str, Path]:
    """Write report.md, results.csv, results.json and certified_accuracy.png into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        k: out / v
        for k, v in {
            "md": "report.md",
            "csv": "results.csv",
            "json": "results.json",
            "png": "certified_accuracy.png",
        }.items()
    }
    paths["json"].write_text(json.dumps(rows, indent=2))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(markdown_table(rows, title, notes))

    fig, axes = plt.subplots(
        1,
        len({r["sigma"] for r in rows}),
        figsize=(4.5 * len({r["sigma"] for r in rows}), 3.6),
        squeeze=False,
    )
    for ax, sigma in zip(axes[0], sorted({r["sigma"] for r in rows})):
        for r in [r for r in rows if r["sigma"] == sigma]:
            ax.plot(RADII, [100 * r[f"r={x:g}"] for x in RADII], marker="o", ms=3, label=r["method"])
        ax.set_title(f"σ = {sigma:g}")
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def markdown_table(rows: list[dict[str, Any]], title: str = "", notes: str = "") -> str:
    head = "| method | σ | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR | abstain | ms/sample |"
    sep = "|---" * (len(RADII) + 5) + "|"
    lines = [f"## {title}", "", notes, "", head, sep] if title else [head, sep]
    for r in sorted(rows, key=lambda r: (r["sigma"], r["method"])):
        accs = " | ".join(f"{100 * r[f'r={x:g}']:.1f}" for x in RADII)
        lines.append(
            f"| {r['method']} | {r['sigma']:g} | {accs} | {r['acr']:.3f} | {100 * r['abstain']:.1f}% | "
            f"{r['ms_per_noise_sample']:.3f} |"
        )
    return "\n".join(lines) + "\n"
