"""Certified-accuracy reports: many methods, one harness, Markdown + CSV + JSON + a plot.

Uncertainty, because a test set of a few hundred images is a sample: every row carries 95 %
Clopper–Pearson intervals on certified accuracy at each radius and a 95 % bootstrap interval on
ACR; :func:`paired_tests` compares a reference method with each other one on the SAME images with
an exact McNemar test (a two-sided binomial test on the discordant images). Over training seeds,
:func:`seed_summary` gives mean ± sd per method and the reference's paired difference to each
baseline with a 95 % t interval over seeds (the spread a new training run would show).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest, bootstrap, ttest_1samp
from tqdm.auto import tqdm

from ._atomic import write_atomic, write_text_atomic
from ._checks import check_int
from .certification import (
    DEFAULT_BATCH_SIZE,
    CertifyResult,
    average_certified_radius,
    certified_accuracy,
    certify,
    certify_sequential,
    check_futility,
    image_generator,
)

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
SEQUENTIAL_GUARANTEE = (
    "Sequential rows: each image drew samples in rounds and stopped once its radius on the table's grid "
    "could not change within n; its bound holds at every round at once (Clopper–Pearson at levels summing "
    "to α over the rounds), so for every image, whenever it stopped, its certificate is wrong with probability ≤ α. "
    "Its selection step stopped once the leading class was clear (at most n0 samples; forward passes count "
    "what was drawn)."
)
TESTED_RADII = [0.0, 0.5, 1.0]  # where the intervals and paired tests are tabulated
SEED_RADII = [0.0, 0.25, 0.5, 0.75, 1.0]  # the radii of the over-seeds table

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
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    sequential: bool = False,
    futility: float | None = None,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Certify every method at every σ on the same images. With ``sequential``, ``n`` is the most
    samples an image may use: it stops once its radius on the report's grid (``RADII``) cannot
    change (`certify_sequential` at ``futility``, default 0.05: the same α guarantee).

    Image i draws its noise from `image_generator(seed, i)` (as ``rrcm-certify`` does), so every
    method sees the same noise on an image, and ``workers`` threads certify images side by side with
    the same certificates as one: on a CPU, threads running one torch thread each beat one image at a
    time on all cores (2 cores, the main job: 0.140 vs 0.159 ms per forward pass). With ``workers`` > 1,
    torch's thread count is 1 for the call (it is process-wide) and restored after."""
    futility = check_futility(futility, RADII if sequential else None)
    check_int("workers", workers, 1)
    rows = []
    for name, make in methods.items():
        for sigma in sigmas:
            clf = make(sigma)

            def one(i: int, clf=clf, sigma=sigma) -> CertifyResult:
                x, settings = images[i : i + 1], dict(n0=n0, alpha=alpha, batch_size=batch_size)
                settings["generator"] = image_generator(seed, i)
                if sequential:
                    return certify_sequential(
                        clf, x, sigma, n_max=n, radii=RADII, futility=futility, **settings
                    )
                return certify(clf, x, sigma, n=n, **settings)

            start = time.perf_counter()
            with _torch_threads(1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool:
                each = pool.map(one, range(len(labels)))  # in order, whichever thread finishes first
                res = _concat(
                    list(tqdm(each, total=len(labels), disable=not progress, desc=f"certify {name}"))
                )
            seconds = time.perf_counter() - start
            rows.append(summary_row(name, sigma, res, labels, n0=n0, n=n, alpha=alpha, seconds=seconds))
    return rows


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` for the block (None: left as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _concat(results: list[CertifyResult]) -> CertifyResult:
    """One `CertifyResult` from per-image ones, in order (none: an empty one)."""
    if not results:
        long, real = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        return CertifyResult(long, real, real, long)
    samples, selection = (
        None if getattr(results[0], f) is None else torch.cat([getattr(r, f) for r in results])
        for f in ("samples", "selection")
    )
    return CertifyResult(
        *(torch.cat([getattr(r, f) for r in results]) for f in ("predictions", "radii", "p_lower", "counts")),
        samples=samples,
        selection=selection,
    )


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
    correct = result.predictions == labels.cpu()
    # per image: the certified radius when correct, -1 when wrong or abstaining (for paired tests)
    per_image = torch.where(correct, result.radii, torch.full_like(result.radii, -1.0))
    k = [int((per_image >= r).sum()) for r in RADII]  # certified correct at radius r
    # estimation samples per image: n each for fixed-n CERTIFY, fewer when sequential stopped early
    used = result.samples if result.samples is not None else torch.full((labels.numel(),), n)
    # selection samples: n0 each for CERTIFY, at most n0 when sequential (`sequential_selection`)
    passes = int(used.sum()) + (
        int(result.selection.sum()) if result.selection is not None else labels.numel() * n0
    )
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
        "ms_per_noise_sample": 1000 * seconds / max(passes, 1),
        "forward_passes": passes,  # noise samples classified in all
        "samples_mean": float(used.double().mean()) if used.numel() else 0.0,
        "samples_median": float(used.double().median()) if used.numel() else 0.0,
        "samples_p90": float(used.double().quantile(0.9)) if used.numel() else 0.0,
        "sequential": result.samples is not None,  # certify_sequential (samples per image recorded)
        # the histogram: images per sample count (a sequential run stops only at its look points)
        "samples_histogram": {int(k): int(c) for k, c in zip(*torch.unique(used, return_counts=True))},
        "ci95": {f"r={r:g}": _clopper_pearson(ki, labels.numel()) for r, ki in zip(RADII, k)},
        "acr_ci95": _bootstrap_mean(per_image.clamp_min(0.0).tolist()),
        "certified_radius": per_image.tolist(),
    }


def _clopper_pearson(k: int, n: int) -> list[float]:
    """Exact two-sided 95 % interval on a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return [float(ci.low), float(ci.high)]


def _bootstrap_mean(values: list[float], seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval on the mean (ACR), 2,000 resamples, seeded."""
    if len(set(values)) <= 1:
        return [float(values[0]), float(values[0])] if values else [0.0, 0.0]
    res = bootstrap((np.asarray(values),), np.mean, n_resamples=2000, method="percentile", random_state=seed)
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def paired_tests(
    rows: list[dict[str, Any]], reference: str = "rRCM", radii: list[float] = TESTED_RADII
) -> list[dict[str, Any]]:
    """Exact McNemar tests of ``reference`` against every other method at each σ and radius.

    Both methods must have certified the same images (same count, same labels order, which the
    harness guarantees). ``b``: images certified correct at r by the reference only, ``c``: by
    the other only; p = two-sided binomial test of b against Bin(b + c, 1/2) (1 when b + c = 0).
    """
    out = []
    refs = {r["sigma"]: r for r in rows if r["method"] == reference and "certified_radius" in r}
    for row in rows:
        ref = refs.get(row["sigma"])
        if ref is None or row["method"] == reference or "certified_radius" not in row:
            continue
        a, o = np.asarray(ref["certified_radius"]), np.asarray(row["certified_radius"])
        if a.shape != o.shape:
            raise ValueError(
                f"{reference} and {row['method']} at σ={row['sigma']} certified different image counts"
            )
        for r in radii:
            b, c = int(((a >= r) & ~(o >= r)).sum()), int((~(a >= r) & (o >= r)).sum())
            out.append(
                {
                    "sigma": row["sigma"],
                    "reference": reference,
                    "baseline": row["method"],
                    "r": r,
                    "reference_acc": float((a >= r).mean()),
                    "baseline_acc": float((o >= r).mean()),
                    "only_reference": b,
                    "only_baseline": c,
                    "p_value": float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0,
                }
            )
    return out


def write_report(rows: list[dict[str, Any]], out: str | Path, title: str, notes: str = "") -> dict[str, Path]:
    """Write report.md, results.csv, results.json and certified_accuracy.png into ``out``, each whole
    or not at all (a killed run leaves the previous report, never a cut one).

    The plot needs matplotlib (the ``[plot]`` extra): without it the tables are written and one
    notice says how to get the plot; the returned dict then has no ``"png"``."""
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
    write_text_atomic(paths["json"], json.dumps(rows, indent=2))
    scalar = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]  # per-image data: JSON only
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=scalar, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(paths["csv"], table.getvalue())
    write_text_atomic(paths["md"], markdown_table(rows, title, notes) + uncertainty_tables(rows))
    try:
        import matplotlib
    except ImportError:
        warnings.warn(
            f"{paths['png'].name} not drawn: the plot needs matplotlib (pip install 'rrcm-diffusers[plot]'); "
            "the tables are written",
            stacklevel=2,
        )
        return {k: v for k, v in paths.items() if k != "png"}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        len({r["sigma"] for r in rows}),
        figsize=(4.5 * len({r["sigma"] for r in rows}), 3.6),
        squeeze=False,
    )
    for ax, sigma in zip(axes[0], sorted({r["sigma"] for r in rows})):
        for r in [r for r in rows if r["sigma"] == sigma]:
            (line,) = ax.plot(
                RADII, [100 * r[f"r={x:g}"] for x in RADII], marker="o", ms=3, label=r["method"]
            )
            if "ci95" in r:  # the 95 % Clopper–Pearson band
                lo, hi = zip(*(r["ci95"][f"r={x:g}"] for x in RADII))
                ax.fill_between(
                    RADII, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(), alpha=0.15
                )
        ax.set_title(f"σ = {sigma:g}")
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(paths["png"], lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return paths


def markdown_table(rows: list[dict[str, Any]], title: str = "", notes: str = "") -> str:
    head = (
        "| method | σ | " + " | ".join(f"r={r:g}" for r in RADII)
        + " | ACR | abstain | ms/sample | forward passes (samples per image: median / p90) |"
    )  # fmt: skip
    sep = "|---" * (len(RADII) + 6) + "|"
    lines = [f"## {title}", "", notes, "", head, sep] if title else [head, sep]
    for r in sorted(rows, key=lambda r: (r["sigma"], r["method"])):
        accs = " | ".join(f"{100 * r[f'r={x:g}']:.1f}" for x in RADII)
        lines.append(
            f"| {r['method']} | {r['sigma']:g} | {accs} | {r['acr']:.3f} | {100 * r['abstain']:.1f}% | "
            f"{r['ms_per_noise_sample']:.3f} | {r.get('forward_passes', '')} "
            f"({r.get('samples_median', 0):g} / {r.get('samples_p90', 0):g}) |"
        )
    sequential = [r for r in rows if r.get("sequential")]
    if sequential:
        lines += ["", SEQUENTIAL_GUARANTEE, "", "Samples per image (images stopping at each look):", ""]
        for r in sorted(sequential, key=lambda r: (r["sigma"], r["method"])):
            looks = ", ".join(
                f"{k:,}: {c}" for k, c in sorted(r["samples_histogram"].items(), key=lambda kv: int(kv[0]))
            )
            lines.append(f"- {r['method']} σ {r['sigma']:g}: {looks}")
    return "\n".join(lines) + "\n"


def uncertainty_tables(rows: list[dict[str, Any]], reference: str = "rRCM") -> str:
    """Markdown: 95 % intervals per row, and the paired tests against ``reference`` (if any)."""
    rows = [r for r in rows if "ci95" in r]
    if not rows:
        return ""
    cols = " | ".join(f"r={r:g}" for r in TESTED_RADII)
    lines = [
        "",
        f"95 % intervals over images (Clopper–Pearson on certified accuracy, %; bootstrap on ACR), n = {rows[0]['images']} images:",
        "",
        f"| method | σ | {cols} | ACR |",
        "|---" * (len(TESTED_RADII) + 3) + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["sigma"], r["method"])):
        cis = " | ".join(
            f"{100 * r[f'r={x:g}']:.1f} [{100 * r['ci95'][f'r={x:g}'][0]:.1f}, {100 * r['ci95'][f'r={x:g}'][1]:.1f}]"
            for x in TESTED_RADII
        )
        lo, hi = r["acr_ci95"]
        lines.append(f"| {r['method']} | {r['sigma']:g} | {cis} | {r['acr']:.3f} [{lo:.3f}, {hi:.3f}] |")
    tests = paired_tests(rows, reference)
    if tests:
        lines += [
            "",
            f"Paired exact McNemar tests, {reference} vs each baseline on the same images (b: certified "
            f"correct at r by {reference} only, c: by the baseline only):",
            "",
            f"| σ | baseline | r | {reference} % | baseline % | b | c | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in tests:
            lines.append(
                f"| {t['sigma']:g} | {t['baseline']} | {t['r']:g} | {100 * t['reference_acc']:.1f} | "
                f"{100 * t['baseline_acc']:.1f} | {t['only_reference']} | {t['only_baseline']} | {t['p_value']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def seed_summary(
    runs: list[list[dict[str, Any]]], reference: str = "rRCM", radii: list[float] = SEED_RADII
) -> dict[str, list[dict[str, Any]]]:
    """Report rows of runs that differ only in the training seed, summarised over seeds.

    ``runs[i]`` holds seed i's rows (:func:`summary_row`), every (method, σ) once. ``methods``:
    mean and sd over seeds of certified accuracy at each radius and of ACR. ``paired``: per σ,
    baseline and metric, the reference minus the baseline in each seed, their mean, a 95 % t
    interval and p over seeds, and each seed's McNemar p over images (radii only).
    """
    keys = [f"r={r:g}" for r in radii] + ["acr"]
    by: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            by.setdefault((row["method"], row["sigma"]), []).append(row)
    if any(len(v) != len(runs) for v in by.values()):
        raise ValueError(
            f"runs: every run must hold each (method, σ) once; got {[len(v) for v in by.values()]}"
        )
    ordered = sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0]))  # by σ, then method
    methods = [
        {"method": m, "sigma": s, "seeds": len(v), **{k: _mean_sd([row[k] for row in v]) for k in keys}}
        for (m, s), v in ordered
    ]
    paired = []
    for (m, s), rows in ordered:
        refs = by.get((reference, s))
        if m == reference or refs is None:
            continue
        mcnemar = [paired_tests([a, b], reference, radii) for a, b in zip(refs, rows)]  # per seed
        for i, k in enumerate(keys):
            d = np.array([a[k] - b[k] for a, b in zip(refs, rows)])
            paired.append(
                {
                    "sigma": s,
                    "baseline": m,
                    "metric": k,
                    "differences": d.tolist(),
                    **_t_interval(d),
                    "mcnemar_p": [t[i]["p_value"] for t in mcnemar] if k != "acr" else None,
                }
            )
    return {"methods": methods, "paired": paired}


def _mean_sd(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _t_interval(d: np.ndarray) -> dict[str, Any]:
    """Mean of the paired differences, its 95 % t interval and p (nan where it is undefined)."""
    if len(d) < 2 or np.all(d == d[0]):  # no spread: the t statistic is undefined
        return {"mean": float(d.mean()), "ci95": [float(d.mean())] * 2, "p_value": float("nan")}
    test = ttest_1samp(d, 0.0)
    ci = test.confidence_interval(0.95)
    return {"mean": float(d.mean()), "ci95": [float(ci.low), float(ci.high)], "p_value": float(test.pvalue)}


def seed_tables(summary: dict[str, list[dict[str, Any]]], reference: str = "rRCM") -> str:
    """Markdown of :func:`seed_summary`: mean ± sd per method, then the paired differences."""
    keys = [k for k in summary["methods"][0] if k.startswith("r=")] + ["acr"]
    seeds = summary["methods"][0]["seeds"]
    lines = [
        f"Certified accuracy (%) and ACR, mean ± sd over {seeds} training seeds:",
        "",
        "| method | σ | " + " | ".join(k if k != "acr" else "ACR" for k in keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for row in summary["methods"]:
        cells = [_pm(row[k], 1 if k == "acr" else 100, ".3f" if k == "acr" else ".1f") for k in keys]
        lines.append(f"| {row['method']} | {row['sigma']:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{reference} minus each baseline, paired by seed: mean [95 % t interval over seeds] (p); "
        "then each seed's McNemar p over images:",
        "",
        "| σ | baseline | metric | difference | per seed | McNemar p per seed |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary["paired"]:
        scale, fmt = (1, ".3f") if t["metric"] == "acr" else (100, ".1f")
        diff = (
            f"{scale * t['mean']:+{fmt}} [{scale * t['ci95'][0]:+{fmt}}, {scale * t['ci95'][1]:+{fmt}}] "
            f"(p {t['p_value']:.2g})"
        )
        each = " / ".join(f"{scale * x:+{fmt}}" for x in t["differences"])
        ps = " / ".join(f"{p:.2g}" for p in t["mcnemar_p"]) if t["mcnemar_p"] else "—"
        lines.append(f"| {t['sigma']:g} | {t['baseline']} | {t['metric']} | {diff} | {each} | {ps} |")
    return "\n".join(lines) + "\n"


def _pm(stat: dict[str, float], scale: float, fmt: str) -> str:
    return f"{scale * stat['mean']:{fmt}} ± {scale * stat['sd']:{fmt}}"
