"""Randomized-smoothing PREDICT and CERTIFY (Cohen, Rosenfeld & Kolter, 2019) for any classifier.

``classifier`` is any callable mapping a batch of images in [0, 1] pixel space, already
noised, (B, C, H, W), to logits (B, K). The smoothing noise N(0, σ²I) is added here, in
[0, 1] pixel space, in batches on the classifier's device.

Reproducibility: noise is drawn from ``generator`` in fixed chunks of ``NOISE_CHUNK``
samples, independent of ``batch_size``, so counts (and certificates) do not change with
the batch size for a fixed generator.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from scipy.stats import beta, binom, binomtest, norm
from tqdm.auto import tqdm

from ._checks import MAX_SIGMA, check_sigma  # noqa: F401 (MAX_SIGMA: part of this module's API)

NOISE_CHUNK = 256
# Noisy copies per forward pass when the caller does not say. 256, not the 1,000 of Cohen et al.'s GPU
# code: on a CPU a batch's activations then stay in cache, and `certify` on 2 threads took 0.61-0.89x the
# time it took at 1,000 for the README's, the main job's and the CIFAR-10 CPU config's models
# (benchmarks/bench_certify_batch.py; the main job's table, two images at a time on one thread each,
# gained nothing measurable: docs/results/rrcm.md); on a GPU 256 copies of a small image fill the device
# less than a larger batch would: raise it there. The certificates do not depend on it (the noise is
# drawn in NOISE_CHUNK rows whatever the batch).
DEFAULT_BATCH_SIZE = 256
ABSTAIN = -1
# Sequential CERTIFY (issue #33; benchmarks/bench_certify_sequential.py, sequential_ceiling.py):
# - looks LOOK_GROWTH apart: an image stops at most 1.5x after it could have (doubling: 2x);
# - FINAL_SHARE of α at the last look, the rest split evenly over the others (a union bound: the
#   levels sum to α). The images that run to n_max are the ones near a radius, so the last look's
#   level decides whether they keep fixed-n's radius: at α/K, 5-7 of 500 MNIST images lost one;
# - FUTILITY: the upper bound that judges a radius out of reach only decides when to stop, never
#   a certificate, so it need not be conservative (α/K was).
LOOK_GROWTH = 1.5
FINAL_SHARE = 0.8
FUTILITY = 0.05
# Its selection step (`sequential_selection`): the n0 samples only pick c_A, and the estimation samples
# after them are independent of whatever picked it, so the selection may stop once its leader is clear:
# at the first of SELECTION_LOOKS (then n0) where the leader beats the runner-up in a one-sided sign test
# at SELECTION_ERROR (at 16 samples: 16 of 16 votes). On the main job's 6 models x 500 MNIST images it
# picked the class that 100 samples pick every time, with 49 samples on average (16 to 67 per model).
SELECTION_LOOKS = (16, 32, 64)
SELECTION_ERROR = 1e-4

Classifier = Callable[[torch.Tensor], torch.Tensor]


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def with_autocast(classifier: Classifier, autocast_dtype: torch.dtype | None) -> Classifier:
    """``classifier`` run under ``torch.autocast(autocast_dtype)``, returning float32 logits;
    ``classifier`` itself when ``autocast_dtype`` is None.

    Randomized smoothing certifies whatever deterministic base classifier votes, so certificates
    computed under autocast are as sound as in float32: they certify the reduced-precision
    classifier, which may vote differently on a few noisy inputs. Off by default, so that a fixed
    generator gives the same certificates on every machine; ``benchmarks/bench_certify.py`` prints
    whether it is faster on yours and how many votes change. Autocast reduces the classifier's
    arithmetic, never the noise: that is drawn and added in float32 (`sample_counts`), as
    floating-point soundness asks (Voráček & Hein, ICLR 2023).
    """
    if autocast_dtype is None:
        return classifier
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None or one of {AUTOCAST_DTYPES}, got {autocast_dtype!r}")

    def f(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            return classifier(x).float()  # (B, K)

    return f


@dataclass
class PredictResult:
    predictions: torch.Tensor  # (N,) class or ABSTAIN
    counts: torch.Tensor  # (N, K) votes
    p_values: torch.Tensor  # (N,)


@dataclass
class CertifyResult:
    predictions: torch.Tensor  # (N,) class or ABSTAIN
    radii: torch.Tensor  # (N,) certified L2 radius (0 where abstaining)
    p_lower: torch.Tensor  # (N,) one-sided Clopper-Pearson lower bound of p_A
    counts: torch.Tensor  # (N,) votes for the selected class among the n samples
    samples: torch.Tensor | None = None  # (N,) estimation samples drawn per image (certify_sequential)
    selection: torch.Tensor | None = None  # (N,) selection samples drawn per image (certify_sequential)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, C, H, W) or (C, H, W) in [0, 1], got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.numel() and (images.min() < 0 or images.max() > 1 or not torch.isfinite(images).all()):
        raise ValueError(
            f"images must lie in [0, 1] pixel space, got range [{images.min().item():.3f}, {images.max().item():.3f}]"
        )
    return images


def _check_count(name: str, value) -> int:
    # a float such as 1e5 is refused, not truncated: the bound's guarantee is for the n actually drawn
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_common(sigma: float, alpha: float, batch_size: int) -> None:
    # a bool is a Real (True would be σ = 1); past MAX_SIGMA the noise drowns any [0, 1] image and
    # overflows float16/bfloat16 (1e300 became inf in float32 and reached the model as NaN logits)
    check_sigma(sigma)
    _check_level("alpha", alpha)
    _check_count("batch_size", batch_size)


def _check_level(name: str, value) -> None:
    """A probability level in (0, 1) (``alpha``, ``futility``); a bool is refused, not read as 0 or 1."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def check_futility(futility: float | None, radii: list[float] | None) -> float:
    """The futility level a sequential caller passes on: ``FUTILITY`` when unset. Set without
    ``radii`` (fixed-n CERTIFY, which has no stopping rule) it is refused, not silently ignored."""
    if futility is None:
        return FUTILITY
    if radii is None:
        raise ValueError(
            f"futility ({futility!r}) applies only to sequential certification (radii given); fixed-n "
            "CERTIFY has no stopping rule: leave futility unset"
        )
    _check_level("futility", futility)
    return float(futility)


def check_arguments(
    *, images: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, batch_size: int
) -> None:
    """CERTIFY's arguments, checked as `certify` checks them (for callers that must check first)."""
    _check_images(images)
    _check_common(sigma, alpha, batch_size)
    _check_count("n0", n0), _check_count("n", n)


def _check_logits(logits, rows: int, num_classes: int | None) -> None:
    """Shape and type only (no device sync); finiteness is counted on the device."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        got = (
            f"{tuple(logits.shape)} {logits.dtype}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"classifier must return float logits of shape (batch, num_classes), got {got}")
    if logits.shape[0] != rows:
        raise ValueError(f"classifier returned {logits.shape[0]} rows of logits for a batch of {rows} images")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"classifier returned {logits.shape[1]} classes, earlier batches {num_classes}")


@torch.inference_mode()
def sample_counts(
    classifier: Classifier,
    image: torch.Tensor,
    sigma: float,
    num: int,
    batch_size: int,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Votes of ``classifier`` over ``num`` noisy copies of one image (C, H, W) → (K,).

    The noise is drawn and added in float32 at least, then the noisy copies are rounded to the
    image's dtype: Gaussian noise drawn in bfloat16 / float16 (8 / 11 bits of mantissa) is far from the
    Gaussian the certificate assumes, and Voráček & Hein ("Sound randomized smoothing in floating-point
    arithmetic", ICLR 2023) show such gaps can be exploited. Rounding x + δ afterwards is a fixed
    function of it, so it belongs to the base classifier, which the certificate allows to be anything.
    (float32 noise is not exactly Gaussian either; that residual risk is the one every published
    certificate carries.) float32 images are unaffected.

    Raises ``ValueError`` if the classifier returns anything but finite (rows, K) logits: a NaN
    row has no class, and counting it as a vote would certify garbage."""
    device = image.device
    nonfinite = torch.zeros((), dtype=torch.long, device=device)  # rows with a NaN/inf logit
    # votes stay on the device (no host sync per batch); one copy to the host at the end
    counts: torch.Tensor | None = (
        None if num_classes is None else torch.zeros(num_classes, dtype=torch.long, device=device)
    )
    # one buffer for the whole image: noise is drawn into it and noised in place, so a batch
    # costs no allocation and no copy besides the < NOISE_CHUNK rows carried to the next batch
    rows = min(num, batch_size + NOISE_CHUNK - 1)  # most rows ever waiting at once
    noise_dtype = torch.promote_types(image.dtype, torch.float32)  # never half precision (docstring)
    buffer = torch.empty((rows, *image.shape), device=device, dtype=noise_dtype)
    filled = drawn = 0  # rows of buffer holding noise not yet classified; samples drawn so far
    while drawn < num or filled:
        # 1. draw noise in fixed chunks (independent of batch_size) until a batch is ready
        while filled < batch_size and drawn < num:
            k = min(NOISE_CHUNK, num - drawn)
            _randn_into(buffer[filled : filled + k], generator)
            filled, drawn = filled + k, drawn + k
        b = min(batch_size, filled)
        # 2. classify the noisy batch and count votes
        batch = torch.add(image.unsqueeze(0), buffer[:b], alpha=sigma, out=buffer[:b])  # (b, C, H, W)
        logits = classifier(batch.to(image.dtype))  # (b, K); rounded only for a half-precision image
        _check_logits(logits, b, None if counts is None else counts.numel())
        if counts is None:
            counts = torch.zeros(logits.shape[-1], dtype=torch.long, device=device)
        counts += torch.bincount(logits.argmax(-1).to(device), minlength=counts.numel())
        nonfinite += (~torch.isfinite(logits)).any(-1).sum().to(device)
        # 3. carry the rows drawn beyond this batch to the front of the buffer
        filled -= b
        if filled:
            buffer[:filled] = buffer[b : b + filled].clone()
    assert counts is not None
    if int(nonfinite):  # one host sync per image, not per batch
        raise ValueError(
            f"classifier returned non-finite logits for {int(nonfinite)} of {num} noisy samples; "
            "refusing to count them as votes (check the model's weights and inputs)"
        )
    return counts.cpu()


def _randn_into(out: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fill ``out`` with N(0, 1) from ``generator``: the values ``randn_tensor`` would return for
    that shape. A generator on another device (a CPU generator for CUDA images) draws there and
    the noise is moved, so a fixed CPU generator gives the same certificates on every device."""
    if generator is None or generator.device == out.device:
        # device named: a default-device context (``with torch.device(...)``) must not redirect it
        torch.randn(out.shape, generator=generator, out=out, device=out.device, dtype=out.dtype)
    else:
        out.copy_(randn_tensor(out.shape, generator=generator, device=out.device, dtype=out.dtype))


def image_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for image ``index`` alone (numpy's SeedSequence mixes the two numbers): an
    image's noise then depends on its index, not on which images, processes or threads came first."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32).tolist()
    return torch.Generator().manual_seed((hi << 32) | lo)


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion."""
    if successes <= 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def predict(
    classifier: Classifier,
    images: torch.Tensor,
    sigma: float,
    num_samples: int = 1000,
    alpha: float = 0.001,
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> PredictResult:
    """Cohen's PREDICT: the top class when a two-sided binomial test (top two counts) rejects
    a tie at level ``alpha``, else abstain (``ABSTAIN``)."""
    images = _check_images(images)
    _check_common(sigma, alpha, batch_size)
    num_samples = _check_count("num_samples", num_samples)
    if images.shape[0] == 0:  # nothing to predict: empty results
        return PredictResult(
            torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long), torch.zeros(0)
        )
    preds, all_counts, pvals = [], [], []
    for image in tqdm(images, disable=not progress, desc="predict"):
        counts = sample_counts(classifier, image, sigma, num_samples, batch_size, generator=generator)
        top2 = counts.topk(min(2, counts.numel()))
        n_a = int(top2.values[0])
        n_b = int(top2.values[1]) if counts.numel() > 1 else 0
        p = binomtest(n_a, n_a + n_b, 0.5).pvalue if n_a + n_b > 0 else 1.0
        preds.append(int(top2.indices[0]) if p <= alpha else ABSTAIN)
        all_counts.append(counts)
        pvals.append(p)
    return PredictResult(torch.tensor(preds, dtype=torch.long), torch.stack(all_counts), torch.tensor(pvals))


def certify(
    classifier: Classifier,
    images: torch.Tensor,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> CertifyResult:
    """Cohen's CERTIFY: pick c_A with ``n0`` samples, count it over ``n`` fresh samples,
    bound p_A from below (one-sided Clopper–Pearson at level ``alpha``); abstain when the
    bound is < 0.5, else certify the L2 radius σ·Φ⁻¹(p_A_lower).

    The ``n0`` selection samples and the ``n`` estimation samples are independent draws, so any
    sizes are valid (Cohen's algorithm allows ``n0 > n``)."""
    images = _check_images(images)
    _check_common(sigma, alpha, batch_size)
    n0, n = _check_count("n0", n0), _check_count("n", n)
    preds, radii, lows, votes = [], [], [], []
    for image in tqdm(images, disable=not progress, desc="certify"):
        c_a = int(sample_counts(classifier, image, sigma, n0, batch_size, generator=generator).argmax())
        counts = sample_counts(classifier, image, sigma, n, batch_size, generator=generator)
        n_a = int(counts[c_a]) if c_a < counts.numel() else 0
        p_low = lower_confidence_bound(n_a, n, alpha)
        if p_low < 0.5:
            preds.append(ABSTAIN)
            radii.append(0.0)
        else:
            preds.append(c_a)
            radii.append(sigma * float(norm.ppf(p_low)))
        lows.append(p_low)
        votes.append(n_a)
    return CertifyResult(
        torch.tensor(preds, dtype=torch.long),
        torch.tensor(radii, dtype=torch.float64),
        torch.tensor(lows, dtype=torch.float64),
        torch.tensor(votes, dtype=torch.long),
    )


# ----------------------------------------------------------------------------- sequential CERTIFY


def look_points(n_max: int, first: int = 100, growth: float = LOOK_GROWTH) -> list[int]:
    """The sample counts at which the sequential certifier looks: ``first``, then each ``growth``
    times the last (rounded up), and ``n_max`` last (a look past ``n_max`` is never made)."""
    n_max, first = _check_count("n_max", n_max), _check_count("first_look", first)
    if not (isinstance(growth, numbers.Real) and growth > 1):
        raise ValueError(f"growth must be a number > 1, got {growth!r}")
    looks = [first]
    while looks[-1] * growth < n_max:
        looks.append(math.ceil(looks[-1] * growth))
    return [m for m in looks if m < n_max] + [n_max]


def radius_thresholds(radii: list[float], sigma: float) -> list[float]:
    """p_A levels Φ(r/σ) that certify each reported radius (r = 0: 1/2), sorted, de-duplicated."""
    if not radii or any(not (isinstance(r, numbers.Real) and 0 <= r < math.inf) for r in radii):
        raise ValueError(f"radii must be a non-empty list of finite radii >= 0, got {radii!r}")
    return sorted({0.5, *(float(norm.cdf(r / sigma)) for r in radii)})


def reachable_levels(thresholds: list[float], n_max: int, level: float) -> np.ndarray:
    """For each threshold t, the vote fraction at ``n_max`` samples whose Clopper–Pearson lower
    bound at ``level`` reaches t (``inf`` where even n_max votes out of n_max do not): the least
    p̂ the last look needs to certify that radius."""
    target = np.asarray(thresholds, dtype=np.float64)  # (T,)
    lo, hi = np.zeros(target.shape, np.int64), np.full(target.shape, n_max + 1)  # the answer is in [lo, hi]
    while (lo < hi).any():  # bisection: the bound is non-decreasing in the votes; ~log2(n_max) rounds
        mid = (lo + hi) // 2  # (T,) <= n_max
        with np.errstate(invalid="ignore", divide="ignore"):
            low = np.where(mid > 0, beta.ppf(level, np.maximum(mid, 1), n_max - mid + 1), 0.0)  # (T,)
        reached, open_ = low >= target, lo < hi
        hi = np.where(open_ & reached, mid, hi)
        lo = np.where(open_ & ~reached, mid + 1, lo)
    return np.where(lo <= n_max, lo / n_max, np.inf)


def look_levels(alpha: float, looks: int) -> list[float]:
    """The level of each of ``looks`` lower bounds: ``FINAL_SHARE``·α at the last, the rest of α split
    evenly over the others (all of α for a single look). They sum to α: the union bound."""
    if looks == 1:
        return [alpha]
    return [alpha * (1 - FINAL_SHARE) / (looks - 1)] * (looks - 1) + [alpha * FINAL_SHARE]


@functools.lru_cache(maxsize=64)
def _schedule(n_max: int, alpha: float, thresholds: tuple[float, ...], first: int | None):
    """Looks, per-look levels and reachable levels: the same for every image of a call (and of most
    calls), so computed once, not once per image."""
    looks = sequential_looks(n_max, alpha, list(thresholds)) if first is None else look_points(n_max, first)
    levels = look_levels(alpha, len(looks))
    return tuple(looks), tuple(levels), tuple(reachable_levels(list(thresholds), n_max, levels[-1]))


def sequential_looks(n_max: int, alpha: float, thresholds: list[float]) -> list[int]:
    """The look schedule `certify_sequential` uses: ``LOOK_GROWTH`` apart up to ``n_max``, from the
    fewest samples at which a run that never misses can certify the largest radius still reachable
    at ``n_max`` (a look before that could stop nothing but abstentions, and would cost every image α)."""
    looks = look_points(n_max)
    for _ in range(8):  # the first look and the number of looks depend on each other; settles in 2–3
        levels = look_levels(alpha, len(looks))
        reachable = [t for t, p in zip(thresholds, reachable_levels(thresholds, n_max, levels[-1])) if p <= 1]
        top = reachable[-1] if reachable else thresholds[0]
        first = min(n_max, max(1, math.ceil(math.log(levels[0]) / math.log(top))))  # level^(1/m) >= top
        if look_points(n_max, first) == looks:
            break
        looks = look_points(n_max, first)
    return looks


def sequential_bounds(
    draw: Callable[[int, np.ndarray], np.ndarray],
    n_max: int,
    alpha: float,
    thresholds: list[float],
    first: int | None = None,
    runs: int = 1,
    futility: float = FUTILITY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampling loop of `certify_sequential` on counts alone, for ``runs`` independent images at
    once (one in the certifier; 10^5 in the validity test): ``draw(k, active)`` returns, for each run
    in ``active`` (indices), its votes for the selected class among ``k`` fresh samples.

    At each look point n_1 < … < n_K = ``n_max`` (`sequential_looks`, or ``LOOK_GROWTH`` apart from
    ``first``) the one-sided Clopper–Pearson lower bound at level α_k (`look_levels`: 0.8α at the last
    look, 0.2α split over the others) is computed from all votes so far. A run stops as soon as
    nothing more can change its radius on the grid: every threshold is either below its lower bound
    (certified) or out of reach, i.e. its upper bound at level ``futility`` is below the vote fraction
    the last look would need to certify it (`reachable_levels`). That covers a lower bound past the
    highest threshold, a bucket decided between two thresholds, and an abstention (no threshold, 1/2
    included, within reach); otherwise it runs to ``n_max``. Returns per run (votes, samples, lower bound).

    Guarantee (a union bound over the K looks, Σ α_k = α): with probability ≥ 1 − α EVERY look's
    lower bound is below p_A, so the one returned is, whichever look any rule stops at. A certificate
    of radius σΦ⁻¹(lower) is therefore wrong with probability ≤ α for every image, however early it
    stopped. The stopping rule only decides how many samples an image gets, never the bound's level; so
    ``futility`` (any level in (0, 1)) trades samples against certified accuracy, never the
    guarantee: at each look, an image whose p_A is at least what the last look needs for a radius
    is stopped below that radius with probability ≤ ``futility``."""
    _check_level("futility", futility)
    looks, look_alpha, needed = _schedule(n_max, alpha, tuple(thresholds), first)
    levels = np.asarray(thresholds, dtype=np.float64)  # (T,)
    needed = np.asarray(needed)  # (T,)
    votes, drawn = np.zeros(runs, dtype=np.int64), np.zeros(runs, dtype=np.int64)
    lower = np.zeros(runs)
    active = np.arange(runs)
    for m, level in zip(looks, look_alpha):
        votes[active] += np.asarray(draw(m - int(drawn[active[0]]), active), dtype=np.int64)
        drawn[active] = m
        # the bounds depend on the vote count alone: compute them once per distinct count (U ≪ A)
        v, index = np.unique(votes[active], return_inverse=True)  # (U,), (A,)
        with np.errstate(invalid="ignore"):  # v = 0 (lower) and v = m (upper) are set below
            low = np.where(v > 0, beta.ppf(level, v, m - v + 1), 0.0)[index]  # (A,)
            up = np.where(v < m, beta.ppf(1 - futility, v + 1, m - v), 1.0)[index]  # (A,)
        lower[active] = low
        certified = (levels[None, :] <= low[:, None]).sum(1)  # (A,) thresholds already reached
        in_reach = (needed[None, :] <= up[:, None]).sum(1)  # (A,) thresholds n_max could still reach
        active = active[certified < in_reach]
        if active.size == 0:
            break
    return votes, drawn, lower


def sequential_selection(
    draw: Callable[[int], torch.Tensor], n0: int, needed: float, futility: float = FUTILITY
) -> tuple[int, int, bool]:
    """CERTIFY's selection step, stopped once its answer is clear: ``draw(k)`` returns the votes (K,)
    of ``k`` fresh noisy samples. Draws at most ``n0``, looking at ``SELECTION_LOOKS`` and at ``n0``, and
    stops at the first look where the leading class beats the runner-up in a one-sided sign test at
    level ``SELECTION_ERROR``. Returns (c_A, samples drawn, reachable); ``reachable`` is False when the
    leader's vote rate, bounded from above at level ``futility``, is below ``needed`` (the vote fraction
    the last look needs to certify r = 0): the image would abstain, so it stops here.

    Neither decision touches the guarantee: the estimation samples are independent of the selection
    whatever rule picked c_A, and an abstention certifies nothing. The leader's count is the largest
    count, at least the true top class's, so at each look an image whose p_A reaches ``needed`` is stopped
    with probability ≤ ``futility``, as at every look of `sequential_bounds` (a look before ``n0`` stops
    only on a clear lead, which leaves the upper bound high)."""
    counts, drawn = None, 0
    for m in [*(s for s in SELECTION_LOOKS if s < n0), n0]:
        votes = draw(m - drawn)  # (K,)
        counts, drawn = votes if counts is None else counts + votes, m
        lead, second = ([*counts.topk(min(2, counts.numel())).values.tolist(), 0])[:2]
        if binom.sf(lead - 1, lead + second, 0.5) <= SELECTION_ERROR:  # P(≥ lead of lead + second | a tie)
            break
    assert counts is not None
    lead = int(counts.max())
    up = float(beta.ppf(1 - futility, lead + 1, drawn - lead)) if lead < drawn else 1.0
    return int(counts.argmax()), drawn, up >= needed


def certify_sequential(
    classifier: Classifier,
    images: torch.Tensor,
    sigma: float,
    n0: int = 100,
    n_max: int = 100_000,
    alpha: float = 0.001,
    radii: list[float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
    progress: bool = False,
    first_look: int | None = None,
    futility: float = FUTILITY,
) -> CertifyResult:
    """CERTIFY with early stopping: the same guarantee as `certify` at a fraction of the samples.

    Per image: select c_A with at most ``n0`` samples as CERTIFY does (`sequential_selection`: it
    stops once the leading class is clear, and an image whose leader cannot reach r = 0 abstains there,
    with no estimation samples), then draw samples in rounds (look
    points 1.5x apart up to ``n_max``, from the fewest samples that could certify the largest radius
    of the grid: `sequential_looks`; or from ``first_look``) and stop when the image's radius on the
    grid ``radii`` (the radii you report; default: 0 to 2σ in steps of σ/4) can no longer change
    within ``n_max`` samples — see `sequential_bounds`. ``futility`` is the level of the upper bound
    that judges a radius out of reach: larger stops sooner and loses more images to the radius below
    (never validity).
    The certified radius is σΦ⁻¹ of the Clopper–Pearson lower bound at the stopping look's level
    (levels summing to ``alpha`` over the looks, 0.8·``alpha`` at the last: `look_levels`), so for
    every image, whenever it stops, P(the returned class is not the smoothed classifier's, robust at
    the returned radius) ≤ ``alpha``. The radius is exact, not rounded to the grid; only the
    decision to stop looks at the grid. ``samples`` and ``selection`` in the result: estimation and
    selection samples used per image.

    References: the union-bound confidence sequence over a fixed schedule of looks is the classical
    group-sequential construction; for randomized smoothing see Horváth et al., "Boosting randomized
    smoothing with variance reduced classifiers"/"adaptive sampling" (ICLR 2022) and Chen et al.,
    "Input-specific robustness certification" (AAAI 2022).
    """
    images = _check_images(images)
    _check_common(sigma, alpha, batch_size)
    n0, n_max = _check_count("n0", n0), _check_count("n_max", n_max)
    _check_level("futility", futility)
    thresholds = radius_thresholds([i * sigma / 4 for i in range(9)] if radii is None else list(radii), sigma)
    needed = _schedule(n_max, alpha, tuple(thresholds), first_look)[2][0]  # r = 0 at the last look
    preds, out_radii, lows, votes, used, selected = [], [], [], [], [], []
    for image in tqdm(images, disable=not progress, desc="certify (sequential)"):

        def counts_of(k: int, image=image) -> torch.Tensor:
            return sample_counts(classifier, image, sigma, k, batch_size, generator=generator)  # (K,)

        c_a, n_sel, reachable = sequential_selection(counts_of, n0, needed, futility)

        def draw(k: int, _active, c_a=c_a, counts_of=counts_of) -> np.ndarray:
            counts = counts_of(k)
            return np.array([int(counts[c_a]) if c_a < counts.numel() else 0])

        n_a, drawn, p_low = 0, 0, 0.0  # abstains after the selection: no estimation sample
        if reachable:
            (n_a,), (drawn,), (p_low,) = sequential_bounds(
                draw, n_max, alpha, thresholds, first_look, futility=futility
            )
        n_a, drawn, p_low = int(n_a), int(drawn), float(p_low)
        certified = p_low >= 0.5
        preds.append(c_a if certified else ABSTAIN)
        out_radii.append(sigma * float(norm.ppf(p_low)) if certified else 0.0)
        lows.append(p_low)
        votes.append(n_a)
        used.append(drawn)
        selected.append(n_sel)
    return CertifyResult(
        torch.tensor(preds, dtype=torch.long),
        torch.tensor(out_radii, dtype=torch.float64),
        torch.tensor(lows, dtype=torch.float64),
        torch.tensor(votes, dtype=torch.long),
        torch.tensor(used, dtype=torch.long),
        torch.tensor(selected, dtype=torch.long),
    )


def certified_accuracy(result: CertifyResult, labels: torch.Tensor, radii: list[float]) -> list[float]:
    """Fraction of images certified correct with radius >= r, for each r."""
    correct = result.predictions == labels.cpu()
    return [float(((result.radii >= r) & correct).float().mean()) for r in radii]


def average_certified_radius(result: CertifyResult, labels: torch.Tensor) -> float:
    """ACR: mean radius over images, counting wrong or abstained ones as 0."""
    correct = result.predictions == labels.cpu()
    return float(torch.where(correct, result.radii, torch.zeros_like(result.radii)).mean())
