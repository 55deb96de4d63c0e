"""Where a sequential certificate's samples go, and how far ANY valid stopping rule could go: from
the per-image p_A that `bench_certify_sequential.py --out` measured (votes / n of its fixed-n run).

    python benchmarks/sequential_ceiling.py --certificates runs/seq05-n10000.json --sigma 0.5 --n-max 10000 100000

For each n_max, on the measured p_A of every image (binomial draws, ``--reps`` repetitions):
- fixed-n CERTIFY and `certify_sequential`'s rule (`sequential_bounds`, the library's own loop):
  forward passes (n0 included) and certified accuracy at every radius of the grid;
- the ceiling: for each image, the fewest samples at which ONE look at the full α, seeing exactly the
  expected votes, would settle the radius bucket fixed-n reaches — no union bound, no look schedule,
  no sampling noise. No valid rule that matches fixed-n image by image can, on average, beat it by much.
This is a simulation on measured p_A (n = 100,000 fixed on 500 images is ~3 h here), stated as such.
Images fixed-n abstained on are counted wrong in both arms (their class is not recorded).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import beta, norm

from rrcm_diffusers.certification import radius_thresholds, reachable_levels, sequential_bounds
from rrcm_diffusers.report import RADII


def _accuracy(lower: np.ndarray, correct: np.ndarray, sigma: float, radii: list[float]) -> np.ndarray:
    radius = np.where(lower >= 0.5, sigma * norm.ppf(np.clip(lower, 0.5, 1 - 1e-16)), -1.0)  # (N,)
    return np.array([100 * ((radius >= r) & correct).mean() for r in radii])


def _fixed(p: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    votes = rng.binomial(n, p)  # (N,)
    with np.errstate(invalid="ignore"):
        return np.where(votes > 0, beta.ppf(alpha, votes, n - votes + 1), 0.0)


def _ceiling(p: np.ndarray, n_max: int, alpha: float, thresholds: list[float]) -> np.ndarray:
    """Per image, the fewest samples one look at level α needs to settle fixed-n's bucket."""
    levels = np.asarray(thresholds)
    needed = reachable_levels(thresholds, n_max, alpha)  # (T,) p̂ fixed-n needs at n_max
    grid = np.unique(np.round(np.geomspace(10, n_max, 300)).astype(int))  # (G,)
    out = np.full(p.size, n_max)
    for i, pi in enumerate(p):
        bucket = int((needed <= pi).sum())  # thresholds fixed-n certifies in expectation
        votes = np.round(pi * grid)
        with np.errstate(invalid="ignore"):
            low = np.where(votes > 0, beta.ppf(alpha, votes, grid - votes + 1), 0.0)  # (G,)
            up = np.where(votes < grid, beta.ppf(1 - alpha, votes + 1, grid - votes), 1.0)  # (G,)
        settled = (low >= (levels[bucket - 1] if bucket else -1.0)) & (
            up < (needed[bucket] if bucket < len(levels) else np.inf)
        )
        out[i] = grid[np.argmax(settled)] if settled.any() else n_max
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--certificates", required=True, help="the JSON bench_certify_sequential.py --out wrote"
    )
    parser.add_argument("--sigma", type=float, required=True)
    parser.add_argument("--n-max", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with open(args.certificates) as f:
        data = json.load(f)
    fixed_run = data["fixed"]
    n_measured = max(data["looks"])
    p = np.asarray(fixed_run["counts"]) / n_measured  # (N,) measured p_A of the selected class
    correct = np.asarray(fixed_run["predictions"]) == np.asarray(data["labels"])  # (N,)
    radii = [r for r in RADII if r <= 2 * args.sigma + 1e-9]
    thresholds = radius_thresholds(radii, args.sigma)
    print(f"{p.size} images, σ {args.sigma}, p_A measured with n = {n_measured:,}; radii {radii}")
    for n_max in args.n_max:
        rng = np.random.default_rng(0)
        fixed_acc, seq_acc, seq_passes = [], [], []
        for _ in range(args.reps):
            fixed_acc.append(_accuracy(_fixed(p, n_max, args.alpha, rng), correct, args.sigma, radii))
            _, drawn, lower = sequential_bounds(
                lambda k, active, rng=rng: rng.binomial(k, p[active]),
                n_max,
                args.alpha,
                thresholds,
                runs=p.size,
            )
            seq_acc.append(_accuracy(lower, correct, args.sigma, radii))
            seq_passes.append(int(drawn.sum()) + p.size * args.n0)
        fixed_passes = p.size * (n_max + args.n0)
        ceiling = int(_ceiling(p, n_max, args.alpha, thresholds).sum()) + p.size * args.n0
        diff = np.mean(seq_acc, 0) - np.mean(fixed_acc, 0)
        print(f"\nn_max {n_max:,} (simulated, {args.reps} repetitions)")
        print(
            f"  fixed      forward passes {fixed_passes:>13,}  cert. acc. % "
            + " ".join(f"{a:.1f}" for a in np.mean(fixed_acc, 0))
        )
        print(f"  sequential forward passes {int(np.mean(seq_passes)):>13,}  ratio {fixed_passes / np.mean(seq_passes):.1f}x  "
              "acc. difference (points) " + " ".join(f"{d:+.2f}" for d in diff))  # fmt: skip
        print(
            f"  ceiling    forward passes {ceiling:>13,}  ratio {fixed_passes / ceiling:.1f}x (one look at full α, no noise)"
        )


if __name__ == "__main__":
    main()
