"""Where a sequential certificate's samples go, and how far ANY valid stopping rule could go: from
the per-image p_A that `bench_certify_sequential.py --out` measured (votes / n of its fixed-n run).

    python benchmarks/sequential_ceiling.py --certificates runs/seq05-n10000.json --sigma 0.5 --n-max 10000 100000

For each n_max, on the measured p_A of every image (binomial draws, ``--reps`` repetitions):
- fixed-n CERTIFY and `certify_sequential`'s rule (`sequential_bounds`, the library's own loop):
  forward passes (n0 included) and certified accuracy at every radius of the grid;
- the ceiling: for each image, the fewest samples at which ONE look (lower bound at the full α, upper
  bound at ``--futility`` as the rule's), seeing exactly the expected votes, would settle the radius
  bucket fixed-n reaches — no union bound, no look schedule, no sampling noise. A rule with the same
  futility level that matches fixed-n image by image cannot, on average, beat it by much.
- paired (at n_max = the measured n only): the rule on vote sequences that END at the fixed run's own
  votes (each look's new votes drawn without replacement from what remains: a hypergeometric bridge),
  so, as in the real benchmark, where both arms share each image's noise stream, the comparison is
  image by image: the mean difference per radius and the images fixed-n certified there that the rule
  did not. This one predicted the measured losses (σ 1, r = 1: 5 and 7 images with the rules before).
This is a simulation on measured p_A (n = 100,000 fixed on 500 images is ~3 h here), stated as such.
Images fixed-n abstained on are counted wrong in both arms (their class is not recorded).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import beta, norm

from rrcm_diffusers.certification import FUTILITY, radius_thresholds, reachable_levels, sequential_bounds
from rrcm_diffusers.report import RADII


def _certified(lower: np.ndarray, correct: np.ndarray, sigma: float, radii: list[float]) -> np.ndarray:
    """(R, N): image certified correct at each radius, from its lower bound of p_A."""
    radius = np.where(lower >= 0.5, sigma * norm.ppf(np.clip(lower, 0.5, 1 - 1e-16)), -1.0)  # (N,)
    return np.array([(radius >= r) & correct for r in radii])


def _accuracy(lower: np.ndarray, correct: np.ndarray, sigma: float, radii: list[float]) -> np.ndarray:
    return 100 * _certified(lower, correct, sigma, radii).mean(1)  # (R,) %


def _fixed(p: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    votes = rng.binomial(n, p)  # (N,)
    with np.errstate(invalid="ignore"):
        return np.where(votes > 0, beta.ppf(alpha, votes, n - votes + 1), 0.0)


def _ceiling(p: np.ndarray, n_max: int, alpha: float, thresholds: list[float], futility: float) -> np.ndarray:
    """Per image, the fewest samples one look (lower bound at α, upper at ``futility``) needs to settle
    fixed-n's bucket."""
    levels = np.asarray(thresholds)
    needed = reachable_levels(thresholds, n_max, alpha)  # (T,) p̂ fixed-n needs at n_max
    grid = np.unique(np.round(np.geomspace(10, n_max, 300)).astype(int))  # (G,)
    out = np.full(p.size, n_max)
    for i, pi in enumerate(p):
        bucket = int((needed <= pi).sum())  # thresholds fixed-n certifies in expectation
        votes = np.round(pi * grid)
        with np.errstate(invalid="ignore"):
            low = np.where(votes > 0, beta.ppf(alpha, votes, grid - votes + 1), 0.0)  # (G,)
            up = np.where(votes < grid, beta.ppf(1 - futility, votes + 1, grid - votes), 1.0)  # (G,)
        settled = (low >= (levels[bucket - 1] if bucket else -1.0)) & (
            up < (needed[bucket] if bucket < len(levels) else np.inf)
        )
        out[i] = grid[np.argmax(settled)] if settled.any() else n_max
    return out


def _bridge(votes: np.ndarray, n: int, rng: np.random.Generator):
    """``draw`` for `sequential_bounds`: each run's votes, k samples at a time, along a random order of
    the fixed run's n samples (``votes`` of them for the class): new votes ~ hypergeometric."""
    seen, got = np.zeros_like(votes), np.zeros_like(votes)

    def draw(k: int, active: np.ndarray) -> np.ndarray:
        left, hits = n - seen[active], votes[active] - got[active]  # (A,)
        new = rng.hypergeometric(hits, left - hits, np.full(active.size, k))  # (A,)
        seen[active] += k
        got[active] += new
        return new

    return draw


def _paired(data: dict, sigma: float, args, thresholds: list[float], radii: list[float]) -> None:
    fixed_run, n = data["fixed"], max(data["looks"])
    votes = np.asarray(fixed_run["counts"])  # (N,)
    correct = np.asarray(fixed_run["predictions"]) == np.asarray(data["labels"])  # (N,)
    fixed_ok = _certified(np.asarray(fixed_run["p_lower"]), correct, sigma, radii)  # (R, N)
    rng = np.random.default_rng(0)
    diffs, lost, passes = [], [], []
    for _ in range(args.reps):
        _, drawn, lower = sequential_bounds(
            _bridge(votes, n, rng), n, args.alpha, thresholds, runs=votes.size, futility=args.futility
        )
        ok = _certified(lower, correct, sigma, radii)  # (R, N)
        diffs.append(100 * (ok.mean(1) - fixed_ok.mean(1)))
        lost.append((fixed_ok & ~ok).sum(1))
        passes.append(int(drawn.sum()) + votes.size * args.n0)
    fixed_passes = votes.size * (n + args.n0)
    print(f"\nn_max {n:,} paired with the fixed run's own votes ({args.reps} repetitions)")
    print(f"  sequential forward passes {int(np.mean(passes)):>13,}  ratio {fixed_passes / np.mean(passes):.1f}x  "
          "acc. difference (points) " + " ".join(f"{d:+.2f}" for d in np.mean(diffs, 0)))  # fmt: skip
    print("  images fixed-n certified that the rule did not, per radius (mean): "
          + " ".join(f"{x:.1f}" for x in np.mean(lost, 0)))  # fmt: skip


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
    parser.add_argument(
        "--futility", type=float, default=FUTILITY, help="the upper bound's level (stopping only)"
    )
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
    _paired(data, args.sigma, args, thresholds, radii)
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
                futility=args.futility,
            )
            seq_acc.append(_accuracy(lower, correct, args.sigma, radii))
            seq_passes.append(int(drawn.sum()) + p.size * args.n0)
        fixed_passes = p.size * (n_max + args.n0)
        ceiling = int(_ceiling(p, n_max, args.alpha, thresholds, args.futility).sum()) + p.size * args.n0
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
