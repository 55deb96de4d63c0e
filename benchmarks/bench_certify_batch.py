"""Certification wall time at several batch sizes: what the default ``batch_size`` should be on a CPU.

The noise is drawn in fixed chunks whatever the batch size, so every batch size gives the same
certificates (checked); only the time changes. Two settings, each timed once per batch size per round,
in a rotating order, printed as seconds median [min, max] and, per round, each batch size's time over
the first one's (the baseline: the default before the change, 1000):

* default: ``RRCMPipeline.certify`` as a user calls it (fixed n, all of torch's threads) on ``--images``
  random images, with a fresh classifier of each config's model (weights do not change the cost of
  fixed-n CERTIFY): the README's (mnist_small.yaml, 4x4 patches), the main job's (7x7), CIFAR-10 CPU's;
* ``--report DIR``: the main job's certification table as it runs (`report.certify_methods`: its
  rRCM, Cohen and scratch+consistency pipelines from DIR at σ 0.5 and 1, sequential, ``--workers``
  images side by side on one torch thread each) on a class-balanced MNIST test subset.

    python benchmarks/bench_certify_batch.py [--batch-sizes 1000 256 128] [--rounds 5]
    python benchmarks/bench_certify_batch.py --report reports/latest/rrcm --batch-sizes 1100 128 256
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import classifier_kwargs, interleave, machine, ratios, spread

from rrcm_diffusers import RRCMModel, RRCMPipeline
from rrcm_diffusers.data import load_mnist, strided_class_subset
from rrcm_diffusers.experiment import cm_scheduler
from rrcm_diffusers.report import certify_methods

CONFIGS = ["mnist_small", "mnist_main", "cifar10_cpu"]
METHODS = {"rRCM": "rrcm", "Cohen": "cohen", "scratch+consistency": "scratch"}  # name -> folder prefix


def user_certify(config: str, images: int, n: int) -> Callable[[int], tuple[float, list]]:
    """``pipe.certify`` at fixed n on random images with a fresh classifier of ``config``'s model."""
    kw, shape = classifier_kwargs(
        Path(__file__).resolve().parents[1] / "examples/rrcm/configs" / f"{config}.yaml"
    )
    torch.manual_seed(0)
    pipe = RRCMPipeline(model=RRCMModel(**kw).eval(), scheduler=cm_scheduler())
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(images, *shape)  # (N, C, H, W) in [0, 1]

    def run(batch_size: int) -> tuple[float, list]:
        start = time.perf_counter()
        out = pipe.certify(
            x, 0.5, n0=100, n=n, batch_size=batch_size, generator=torch.Generator().manual_seed(0)
        )
        return time.perf_counter() - start, out.radii.tolist()

    return run


def main_job_table(report: Path, per_class: int, n: int, workers: int) -> Callable[[int], tuple[float, list]]:
    """The main job's sequential table on its trained pipelines, ``workers`` images side by side."""
    x, y = load_mnist("test")
    sub = strided_class_subset(y, per_class)
    images, labels = x[sub].float() / 255.0, y[sub]  # (N, 1, 28, 28) in [0, 1], (N,)
    pipes = {
        (name, s): RRCMPipeline.from_pretrained(report / f"{folder}-sigma{s:g}" / "pipeline")
        for name, folder in METHODS.items()
        for s in (0.5, 1.0)
    }
    table = {name: (lambda s, name=name: pipes[(name, s)].base_classifier(s)) for name in METHODS}

    def run(batch_size: int) -> tuple[float, list]:
        start = time.perf_counter()
        rows = certify_methods(
            table, images, labels, [0.5, 1.0], n=n, batch_size=batch_size, progress=False, sequential=True,
            workers=workers,
        )  # fmt: skip
        return time.perf_counter() - start, [(r["acr"], r["forward_passes"], r["abstain"]) for r in rows]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1000, 256, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=2, help="random images per config (default setting)")
    parser.add_argument("--n", type=int, default=None, help="n (n_max with --report); default 4000 / 1000")
    parser.add_argument("--report", type=Path, help="the main job's rrcm folder: time its table instead")
    parser.add_argument("--per-class", type=int, default=3, help="with --report: test images per class")
    parser.add_argument("--workers", type=int, default=2, help="with --report: images side by side")
    args = parser.parse_args()
    print(machine())
    if args.report:
        n = args.n or 1000
        settings = {f"main job table ({10 * args.per_class} images x 6, n_max {n}, {args.workers} workers)":
                    main_job_table(args.report, args.per_class, n, args.workers)}  # fmt: skip
    else:
        n = args.n or 4000
        settings = {
            f"{c}: pipe.certify, {args.images} images, n {n}": user_certify(c, args.images, n)
            for c in CONFIGS
        }
    base, differ = args.batch_sizes[0], []
    for name, run in settings.items():
        results: dict[int, list] = {b: [] for b in args.batch_sizes}

        def timed(b: int, run=run, results=results) -> float:
            seconds, certificates = run(b)
            results[b].append(certificates)
            return seconds

        times = interleave({b: (lambda b=b: timed(b)) for b in args.batch_sizes}, args.rounds)
        print(name)
        for b in args.batch_sizes:
            same = all(c == results[base][0] for c in results[b])
            differ += [] if same else [f"{name}, batch {b}"]
            print(
                f"  batch {b:5d}: {spread(times[b], '.2f')} s; per round / batch {base}: "
                f"{' '.join(f'{r:.2f}' for r in ratios(times[b], times[base]))}; certificates "
                f"{'identical' if same else 'DIFFER'}"
            )
    if differ:  # the noise is drawn whatever the batch: a difference is a bug, not a timing
        raise SystemExit(f"certificates differ from batch {base}'s: {differ}")


if __name__ == "__main__":
    main()
