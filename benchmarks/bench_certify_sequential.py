"""Fixed-n CERTIFY vs sequential CERTIFY on the same images, the same pipeline and the same n (n_max):
forward passes, wall time, certified accuracy at every radius of the report, and the paired McNemar
test between the two (a sequential certificate must not lose images).

    python benchmarks/bench_certify_sequential.py --pipeline reports/latest/rrcm/rrcm-sigma0.5/pipeline \\
        --dataset mnist --sigma 0.5 --num-images 500 --n 10000 [--n 100000] [--out runs/seq0.5]

``--fixed-from runs/seq0.5`` reuses the fixed-n arm a previous ``--out`` wrote (the same images, n and
per-image generators give the same fixed-n certificates; checked on the labels and n) and runs only the
sequential one: ~15 minutes less per σ here when only the stopping rule changed.

Targets (issue #33): certified accuracy within 1 point at every reported radius (McNemar not
significant), >= 5x fewer forward passes at n = 10,000 and >= 25x at n = 100,000. The radii grid is
the report's (0 to 2 in steps of 0.25) cut at 2σ. Prints the per-image distribution of samples.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import machine

from rrcm_diffusers.certification import (
    CertifyResult,
    certify,
    certify_sequential,
    image_generator,
    radius_thresholds,
    sequential_looks,
)
from rrcm_diffusers.data import load_dataset, strided_class_subset
from rrcm_diffusers.dataset_certification import load_pipeline
from rrcm_diffusers.report import RADII, paired_tests, summary_row


def _run(kind: str, classifier, images, labels, sigma, n0, n, alpha, radii, batch_size):
    """Image by image with each image's own generator (as the dataset CLI): both methods draw the
    same selection noise, and the same estimation noise as far as the sequential one goes."""
    out, start = [], time.perf_counter()
    for i in range(images.shape[0]):
        g = image_generator(0, i)
        if kind == "fixed":
            out.append(certify(classifier, images[i : i + 1], sigma, n0, n, alpha, batch_size, g))
        else:
            out.append(
                certify_sequential(classifier, images[i : i + 1], sigma, n0, n, alpha, radii, batch_size, g)
            )
    seconds = time.perf_counter() - start
    cat = lambda name: torch.cat([getattr(r, name) for r in out])  # noqa: E731
    samples, selection = (cat("samples"), cat("selection")) if kind == "sequential" else (None, None)
    result = CertifyResult(
        cat("predictions"), cat("radii"), cat("p_lower"), cat("counts"), samples, selection
    )
    return summary_row(kind, sigma, result, labels, n0=n0, n=n, alpha=alpha, seconds=seconds), result


def _reuse(args, n: int, labels: torch.Tensor):
    """The fixed-n arm of an earlier run of this script on the same images (its --out file)."""
    path = f"{args.fixed_from}-n{n}.json"
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SystemExit(
            f"--fixed-from: {path} not found (an earlier run with --out {args.fixed_from} --n {n} writes it)"
        ) from None
    if data["labels"] != labels.tolist() or max(data["looks"]) != n:
        raise SystemExit(f"--fixed-from {args.fixed_from}: other images or another n than this run's")
    arm = data["fixed"]
    result = CertifyResult(
        torch.tensor(arm["predictions"]), torch.tensor(arm["radii"], dtype=torch.float64),
        torch.tensor(arm["p_lower"], dtype=torch.float64), torch.tensor(arm["counts"]),
        torch.full((labels.numel(),), n),
    )  # fmt: skip
    row = summary_row(
        "fixed",
        args.sigma,
        result,
        labels,
        n0=args.n0,
        n=n,
        alpha=args.alpha,
        seconds=arm.get("seconds") or 0.0,
    )
    return row, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--num-images", type=int, default=500, help="class-balanced test images")
    parser.add_argument("--n", type=int, nargs="+", default=[10_000], help="n (fixed) = n_max (sequential)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--out", default=None, help="write per-image certificates to OUT-n<n>.json")
    fixed_arm = parser.add_mutually_exclusive_group()
    fixed_arm.add_argument("--fixed-from", default=None, help="reuse the fixed-n arm of FIXED_FROM-n<n>.json")
    fixed_arm.add_argument(
        "--skip-fixed",
        action="store_true",
        help="run the sequential arm alone: fixed n's forward passes are exact (images x (n0 + n)), its "
        "certified accuracy is not measured (for n = 100,000, ~3 h per σ here)",
    )
    args = parser.parse_args()
    print(machine())
    images, labels = load_dataset(args.dataset, "test", args.data_dir)
    classes = int(labels.max()) + 1
    keep = strided_class_subset(labels, max(1, args.num_images // classes))
    images, labels = images[keep].float() / 255, labels[keep]
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    classifier = pipe.base_classifier(args.sigma)
    radii = [r for r in RADII if r <= 2 * args.sigma + 1e-9]
    for n in args.n:
        settings = (labels, args.sigma, args.n0, n, args.alpha, radii, args.batch_size)
        fixed = fixed_result = None
        if args.fixed_from:
            fixed, fixed_result = _reuse(args, n, labels)
        elif not args.skip_fixed:
            fixed, fixed_result = _run("fixed", classifier, images, *settings)
        seq, seq_result = _run("sequential", classifier, images, *settings)
        rows = [fixed, seq] if fixed else [seq]
        looks = sequential_looks(n, args.alpha, radius_thresholds(radii, args.sigma))
        used = seq_result.samples
        print("  where the samples go (sequential): look, images stopping there, share of its forward passes")
        for m in [0, *looks]:  # 0: abstained after the selection step, no estimation sample
            stop = used == m
            print(
                f"    {m:>7,}  {int(stop.sum()):>5}  {float((used[stop] + seq_result.selection[stop]).sum()) / seq['forward_passes']:6.1%}"
                + ("  (abstained after the selection step)" if m == 0 else "")
            )
        if args.out:
            with open(f"{args.out}-n{n}.json", "w") as f:
                json.dump({"labels": labels.tolist(), "looks": looks, **{
                    kind: {k: getattr(r, k).tolist() for k in ("predictions", "radii", "p_lower", "counts")}
                    | {"samples": used.tolist() if kind == "sequential" else None, "seconds": row["seconds"],
                       "selection": seq_result.selection.tolist() if kind == "sequential" else None}
                    for kind, r, row in (("fixed", fixed_result, fixed), ("sequential", seq_result, seq)) if r}}, f)  # fmt: skip
        print(f"\n{images.shape[0]} images, σ {args.sigma}, n = n_max = {n}, α {args.alpha}, radii {radii}")
        for r in rows:
            accs = " ".join(f"{100 * r[f'r={x:g}']:.1f}" for x in radii)
            print(f"  {r['method']:10s} forward passes {r['forward_passes']:>11,}  wall {r['seconds']:8.1f} s  "
                  f"samples/image median {r['samples_median']:g} p90 {r['samples_p90']:g}  cert. acc. % {accs}")  # fmt: skip
        if fixed is None:
            passes = images.shape[0] * (args.n0 + n)
            print(
                f"  fixed n (not run) draws {passes:,} forward passes: {passes / seq['forward_passes']:.1f}x the sequential arm's"
            )
            continue
        wall = (
            f"{fixed['seconds'] / seq['seconds']:.1f}x"
            if fixed["seconds"]
            else "n/a (fixed arm reused, not timed)"
        )
        print(f"  ratio fixed / sequential: forward passes {fixed['forward_passes'] / seq['forward_passes']:.1f}x, "
              f"wall {wall}")  # fmt: skip
        tests = paired_tests(rows, reference="sequential", radii=radii)
        worst = max(abs(t["reference_acc"] - t["baseline_acc"]) for t in tests)
        print(
            f"  largest accuracy difference {100 * worst:.1f} points; McNemar p per radius: "
            + " ".join(f"{t['p_value']:.2g}" for t in tests)
        )
        print(json.dumps({"n": n, "fixed": {k: fixed[k] for k in ("forward_passes", "seconds")},
                          "sequential": {k: seq[k] for k in ("forward_passes", "seconds", "samples_median",
                                                               "samples_p90")}}))  # fmt: skip


if __name__ == "__main__":
    main()
