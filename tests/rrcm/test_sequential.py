"""Sequential CERTIFY (`certify_sequential`): the guarantee holds whenever a run stops, measured on
counts with p_A known exactly (10^5 simulated images per case, at and around every threshold of the
radius grid); the certifier draws its samples through the same code as `certify`; fixed-n CERTIFY is
untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm

from rrcm_diffusers.certification import (
    FUTILITY,
    certify,
    certify_sequential,
    look_levels,
    look_points,
    lower_confidence_bound,
    radius_thresholds,
    reachable_levels,
    sequential_bounds,
    sequential_looks,
    sequential_selection,
)

SIGMA = 0.5
THRESHOLDS = radius_thresholds([i * SIGMA / 4 for i in range(9)], SIGMA)  # r = 0, σ/4, ..., 2σ
THRESHOLDS_REPORT = radius_thresholds(
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], SIGMA
)  # report.RADII


def _votes(p: float, seed: int):
    """``draw`` for `sequential_bounds`: binomial votes at a known p_A."""
    rng = np.random.default_rng(seed)
    return lambda k, active: rng.binomial(k, p, size=active.size)


def _simulate(p: float, alpha: float, n_max: int, runs: int, seed: int, **kw):
    return sequential_bounds(_votes(p, seed), n_max, alpha, THRESHOLDS, runs=runs, **kw)


def _cases() -> list[float]:
    """p_A on every threshold, just below and just above it, and at the extremes."""
    ps = [0.3, 0.999, 1.0]
    for t in THRESHOLDS:
        ps += [t, max(t - 0.003, 0.0), min(t + 0.003, 1.0)]
    return sorted(set(ps))


def _check_rate(p: float, lower: np.ndarray, alpha: float) -> None:
    """A certificate is wrong when its lower bound exceeds the true p_A: the rate must not exceed α
    beyond a one-sided 95 % binomial interval (Clopper-Pearson)."""
    wrong, runs = int((lower > p).sum()), lower.size
    assert (beta.ppf(0.05, wrong, runs - wrong + 1) if wrong else 0.0) <= alpha, (p, wrong, runs)


def test_wrong_certificates_stay_below_alpha_whenever_a_run_stops():
    """On every threshold of the grid (the hardest p_A for a stopping rule) and at both ends:
    11 cases x 10^4 runs = 1.1 x 10^5 simulated images at α = 0.05."""
    for i, p in enumerate([0.3, *THRESHOLDS, 1.0]):
        _, drawn, lower = _simulate(p, 0.05, 10_000, 10_000, seed=i)
        _check_rate(p, lower, 0.05)
        assert drawn.min() >= 100 and drawn.max() <= 10_000


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("alpha", [0.05, 0.001])
def test_wrong_certificates_stay_below_alpha_over_a_million_runs(alpha):
    """On, just below and just above every threshold: 10^5 runs per case, 29 cases, n_max = 10^5."""
    for i, p in enumerate(_cases()):
        _, _, lower = _simulate(p, alpha, 100_000, 100_000, seed=100 + i)
        _check_rate(p, lower, alpha)


def test_clear_images_stop_early_and_borderline_ones_use_the_budget():
    _, drawn, lower = _simulate(1.0, 0.001, 100_000, 1000, seed=0)
    assert drawn.max() <= 800 and (lower >= THRESHOLDS[-1]).all()  # robust beyond 2σ after ≤ 800
    _, drawn, _ = _simulate(0.2, 0.001, 100_000, 1000, seed=1)
    assert drawn.max() == sequential_looks(100_000, 0.001, THRESHOLDS)[0]  # an abstention: at the first look
    # at what the last look needs to certify a threshold: most of the budget (it may still certify it)
    level = look_levels(0.001, len(sequential_looks(100_000, 0.001, THRESHOLDS)))[-1]
    needed = float(reachable_levels(THRESHOLDS, 100_000, level)[4])
    _, drawn, _ = _simulate(needed, 0.001, 100_000, 200, seed=2)
    assert np.median(drawn) >= 50_000
    # on the threshold itself: the last look would certify it with probability ~0 (its bound lies
    # below p̂), so the futility bound stops it early, at the radius below, as fixed n would end
    _, drawn, lower = _simulate(THRESHOLDS[4] + 1e-4, 0.001, 100_000, 200, seed=2)
    assert np.median(drawn) < 100_000 and (lower < THRESHOLDS[4]).mean() > 0.95


def test_look_points_grow_by_half_and_end_at_n_max():
    assert look_points(10_000) == [100, 150, 225, 338, 507, 761, 1142, 1713, 2570, 3855, 5783, 8675, 10_000]
    assert look_points(1000, first=300) == [300, 450, 675, 1000]
    assert look_points(1000, first=300, growth=2) == [300, 600, 1000]
    assert look_points(80) == [80]
    with pytest.raises(ValueError, match="n_max must be a positive integer"):
        look_points(0)
    with pytest.raises(ValueError, match="growth must be a number > 1"):
        look_points(1000, growth=1)


def test_look_levels_spend_alpha_mostly_at_the_last_look_and_sum_to_it():
    levels = look_levels(0.001, 9)
    assert levels[-1] == pytest.approx(0.0008) and levels[:-1] == [pytest.approx(0.0002 / 8)] * 8
    assert sum(levels) == pytest.approx(0.001) and look_levels(0.05, 1) == [0.05]


@pytest.mark.parametrize("futility", [0.5, 1e-6])
def test_the_futility_level_never_touches_the_guarantee(futility):
    """The upper bound only decides when an image stops: at a futility level far looser (0.5) and far
    stricter (1e-6) than the default, certificates are still wrong at rate <= α, on every threshold."""
    for i, p in enumerate([*THRESHOLDS, 1.0]):
        _, _, lower = _simulate(p, 0.05, 10_000, 5000, seed=1000 + i, futility=futility)
        _check_rate(p, lower, 0.05)


def test_futility_trades_samples_for_images_stopped_below_a_radius_they_could_reach():
    """p_A exactly what the last look needs to certify a threshold t: a futility stop below t happens
    at a look only when the β-upper bound falls below p_A, so at most β per look (K looks: K·β); a
    looser β spends fewer samples on an image just below t."""
    looks = sequential_looks(10_000, 0.001, THRESHOLDS)
    level, t = look_levels(0.001, len(looks))[-1], THRESHOLDS[4]
    needed = float(reachable_levels(THRESHOLDS, 10_000, level)[4])
    for beta_ in (0.05, 0.2):
        _, drawn, lower = _simulate(needed, 0.001, 10_000, 4000, seed=7, futility=beta_)
        early_below = int(((drawn < 10_000) & (lower < t)).sum())
        assert beta.ppf(0.05, early_below, 4000 - early_below + 1) <= len(looks) * beta_, (beta_, early_below)
    mean_drawn = []
    for beta_ in (1e-4, 0.05, 0.3):
        _, drawn, _ = _simulate(t - 0.01, 0.001, 10_000, 2000, seed=8, futility=beta_)
        mean_drawn.append(drawn.mean())
    assert mean_drawn[0] > mean_drawn[1] > mean_drawn[2], mean_drawn
    with pytest.raises(ValueError, match=r"futility must be in \(0, 1\)"):
        certify_sequential(lambda x: torch.zeros(x.shape[0], 3), torch.rand(1, 1, 4, 4), 0.5, futility=1.0)


@pytest.mark.parametrize("n_max", [1000, 10_000, 100_000])
def test_the_first_look_is_the_fewest_samples_that_can_certify_the_top_radius(n_max):
    looks = sequential_looks(n_max, 0.001, THRESHOLDS)
    levels, first = look_levels(0.001, len(looks)), looks[0]
    needed = reachable_levels(THRESHOLDS, n_max, levels[-1])
    top = max(t for t, p in zip(THRESHOLDS, needed) if p <= 1)
    level = levels[0]
    # `first` straight successes certify `top`, one sample fewer would not
    assert (
        lower_confidence_bound(first, first, level)
        >= top
        > lower_confidence_bound(first - 1, first - 1, level)
    )
    assert looks == look_points(n_max, first)


@pytest.mark.parametrize("n_max, level", [(1000, 0.001 / 3), (10_000, 0.05 / 6)])
def test_reachable_levels_are_the_least_vote_fractions_that_certify(n_max, level):
    """Against the scalar Clopper–Pearson bound, vote by vote around each threshold."""
    for t, p in zip(THRESHOLDS, reachable_levels(THRESHOLDS, n_max, level)):
        if p == np.inf:
            assert lower_confidence_bound(n_max, n_max, level) < t
            continue
        v = round(p * n_max)
        assert lower_confidence_bound(v, n_max, level) >= t > lower_confidence_bound(v - 1, n_max, level)


def test_an_image_that_cannot_reach_the_next_radius_stops_before_n_max():
    """p_A 0.01 below a threshold: to show it is below (upper bound < t) takes ~2 x n_max samples,
    but by ~n_max / 3 the upper bound is below what the LAST look would need to certify t (~t + 0.013),
    so the image stops there, at the radius below, instead of spending the budget."""
    t = THRESHOLDS[4]
    _, drawn, lower = _simulate(t - 0.01, 0.001, 10_000, 2000, seed=5)
    assert np.median(drawn) <= 6400 and (lower < t).all() and (lower >= THRESHOLDS[3]).mean() > 0.9


@pytest.mark.parametrize("radii", [[], [-0.5], [float("nan")]])
def test_a_bad_radii_grid_is_named(radii):
    with pytest.raises(ValueError, match="radii must be a non-empty list"):
        certify_sequential(lambda x: torch.zeros(x.shape[0], 3), torch.rand(1, 1, 4, 4), 0.5, radii=radii)


def _threshold_classifier(image: torch.Tensor, p: float):
    """Votes class 0 exactly when the noise at pixel 0 is below Φ⁻¹(p): p_A = p exactly."""
    cut = float(norm.ppf(p))

    def f(x: torch.Tensor) -> torch.Tensor:
        z = (x[:, 0, 0, 0] - image[0, 0, 0]) / SIGMA  # (B,), N(0, 1)
        logits = torch.zeros(x.shape[0], 2)
        logits[:, 1] = (z >= cut).float()
        return logits

    return f


def test_the_certifier_matches_its_loop_and_fixed_n_is_unchanged():
    image = torch.full((1, 4, 4), 0.5)
    clf = _threshold_classifier(image, 0.999)
    seq = certify_sequential(clf, image[None], SIGMA, n0=50, n_max=10_000, alpha=0.001,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert seq.predictions.tolist() == [0] and int(seq.samples[0]) < 10_000
    looks = sequential_looks(10_000, 0.001, THRESHOLDS)
    assert lower_confidence_bound(
        int(seq.counts[0]),
        int(seq.samples[0]),
        look_levels(0.001, len(looks))[looks.index(int(seq.samples[0]))],
    ) == pytest.approx(float(seq.p_lower[0]))
    assert float(seq.radii[0]) == pytest.approx(SIGMA * norm.ppf(float(seq.p_lower[0])))
    fixed = certify(clf, image[None], SIGMA, n0=50, n=10_000, generator=torch.Generator().manual_seed(0))
    assert fixed.samples is None  # fixed-n CERTIFY: no field set, results as before
    assert fixed.counts.tolist() == [int(fixed.counts[0])] and int(fixed.counts[0]) > 9900


def _class_classifier(image: torch.Tensor, probs: list[float]):
    """Votes class k exactly when Φ(noise at pixel 0) falls in the k-th of the intervals ``probs`` cut
    [0, 1] into: class k's probability is probs[k] exactly."""
    cuts = torch.tensor(norm.ppf(np.cumsum(probs)[:-1]), dtype=torch.float32)  # (K - 1,)

    def f(x: torch.Tensor) -> torch.Tensor:
        z = (x[:, 0, 0, 0] - image[0, 0, 0]) / SIGMA  # (B,), N(0, 1)
        return torch.nn.functional.one_hot(torch.bucketize(z, cuts), len(probs)).float()  # (B, K)

    return f


def test_the_selection_stops_once_its_leader_is_clear_and_a_hopeless_image_abstains_there():
    image = torch.full((1, 4, 4), 0.5)
    run = lambda clf, n0=100: certify_sequential(  # noqa: E731
        clf, image[None], SIGMA, n0=n0, n_max=1000, generator=torch.Generator().manual_seed(0)
    )
    sure = run(_class_classifier(image, [0.0, 1.0]))  # 16 of 16 votes: stops at the first look
    assert sure.selection.tolist() == [16] and sure.predictions.tolist() == [1] and int(sure.samples[0]) > 0
    assert run(_class_classifier(image, [0.0, 1.0]), n0=10).selection.tolist() == [10]  # never past n0
    close = run(_class_classifier(image, [0.5, 0.5]))  # no clear leader: all of n0, then estimation
    assert close.selection.tolist() == [100] and int(close.samples[0]) > 0
    # the leader's rate is at most 0.4 and r = 0 needs 0.55 of 1,000 votes: abstains, no estimation sample
    hopeless = run(_class_classifier(image, [0.4, 0.3, 0.3]))
    assert hopeless.selection.tolist() == [100] and hopeless.samples.tolist() == [0]
    assert hopeless.predictions.tolist() == [-1] and hopeless.radii.tolist() == [0.0]


def _replay(run: np.ndarray):
    """``draw`` for `sequential_selection`: the votes (K,) of the next ``k`` of ``run``'s (T, K)."""
    at = [0]

    def draw(k: int) -> torch.Tensor:
        at[0] += k
        return torch.from_numpy(run[at[0] - k : at[0]].sum(0))

    return draw


def test_the_selection_picks_what_n0_samples_pick_and_stops_a_reachable_image_at_most_at_futility():
    """1,500 simulated selections per case, votes drawn with known class probabilities."""
    thresholds = radius_thresholds([0.0, 0.5, 1.0], SIGMA)
    looks = sequential_looks(1000, 0.001, thresholds)
    needed = float(reachable_levels(thresholds, 1000, look_levels(0.001, len(looks))[-1])[0])
    rng = np.random.default_rng(0)
    for probs in ([needed, 1 - needed], [needed, *[(1 - needed) / 4] * 4], [0.6, 0.4], [0.9, 0.05, 0.05]):
        runs = 1_500
        votes = rng.multinomial(1, probs, size=(runs, 100))  # (R, 100, K): each run's first 100 votes
        picks, hopeless, drawn = [], 0, []
        for run in votes:
            c_a, m, reachable = sequential_selection(_replay(run), 100, needed)
            picks.append(c_a), drawn.append(m)
            hopeless += not reachable
        picks = np.asarray(picks)
        with_all = votes.sum(1).argmax(1)  # (R,) what CERTIFY's 100 samples pick on the same votes
        early = np.asarray(drawn) < 100
        assert (picks[early] == with_all[early]).mean() >= 0.999, probs  # stopping early changes no pick
        if probs[0] > 0.5:  # p_A reaches what r = 0 needs: stopped at the selection at most at futility
            assert (picks == 0).mean() >= (with_all == 0).mean() - 0.001, probs
            assert beta.ppf(0.05, max(hopeless, 1), runs - hopeless + 1) * (hopeless > 0) <= FUTILITY, probs
        if probs[0] >= 0.9:
            assert np.mean(drawn) < 40, probs  # a clear image's selection is short


def test_the_pipeline_certifies_sequentially_when_given_the_radii(tmp_path):
    from rrcm_diffusers import RRCMPipeline
    from rrcm_diffusers.dataset_certification import certify_dataset, read_records, report_row
    from tests.rrcm.helpers import tiny_model

    pipe = RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0))
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = pipe.certify(images, sigma=0.5, n0=20, n=3000, radii=[0.0, 0.25, 0.5],
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    first = sequential_looks(3000, 0.001, radius_thresholds([0.0, 0.25, 0.5], 0.5))[0]
    assert out.samples is not None and ((out.samples >= first) & (out.samples <= 3000)).all()
    assert out.selection is not None and ((out.selection >= 16) & (out.selection <= 20)).all()
    assert ((out.predictions >= 0) == (out.p_lower >= 0.5)).all()
    assert pipe.certify(images, sigma=0.5, n0=20, n=300).samples is None  # the default: fixed n

    labels = torch.tensor([0, 1, 2])
    records = certify_dataset(
        pipe, images, labels, 0.5, tmp_path, n0=20, n=3000, radii=[0.0, 0.5], progress=False
    )
    first = sequential_looks(3000, 0.001, radius_thresholds([0.0, 0.5], 0.5))[0]
    assert all(first <= r["samples"] <= 3000 for r in records)
    assert [(r["samples"], r["selection"]) for r in read_records(tmp_path).values()] == [
        (r["samples"], r["selection"]) for r in records
    ]
    row = report_row(records, "rrcm", 0.5, 20, 3000, 0.001)
    assert row["forward_passes"] == sum(r["samples"] + r["selection"] for r in records)
    with pytest.raises(ValueError, match=r"differs in \['radii'\]"):
        certify_dataset(pipe, images, labels, 0.5, tmp_path, n0=20, n=3000, radii=[0.0, 1.0], progress=False)
    # a folder certified before the selection stopped early (no selection_looks in its record) is not mixed in
    run = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({k: v for k, v in run.items() if k != "selection_looks"}))
    with pytest.raises(ValueError, match=r"differs in \['selection_looks'\]"):
        certify_dataset(pipe, images, labels, 0.5, tmp_path, n0=20, n=3000, radii=[0.0, 0.5], progress=False)


def test_futility_reaches_the_pipelines_and_the_dataset_runs_and_is_refused_without_radii(tmp_path):
    from rrcm_diffusers import RRCMPipeline
    from rrcm_diffusers.dataset_certification import certify_dataset, image_generator
    from tests.rrcm.helpers import tiny_model

    pipe = RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0))
    images, labels = (
        torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 2]),
    )
    radii, clf = [0.0, 0.25, 0.5], pipe.base_classifier(0.5)
    seq = dict(n0=20, n_max=3000, radii=radii)

    def direct(futility, i=None):  # certify_sequential itself, the reference
        x, g = (
            (images, torch.Generator().manual_seed(0))
            if i is None
            else (images[i : i + 1], image_generator(0, i))
        )
        return certify_sequential(clf, x, 0.5, futility=futility, generator=g, **seq)

    def piped(futility):
        return pipe.certify(images, sigma=0.5, n0=20, n=3000, radii=radii, futility=futility,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip

    loose, default = piped(0.5), piped(None)
    for got, want in ((loose, direct(0.5)), (default, direct(0.05))):
        assert got.samples.tolist() == want.samples.tolist() and torch.equal(got.radii, want.radii)
    assert int(loose.samples.sum()) < int(default.samples.sum())  # a looser futility stops sooner here
    with pytest.raises(ValueError, match=r"futility \(0.5\) applies only to sequential certification"):
        pipe.certify(images, sigma=0.5, n0=20, n=300, futility=0.5)  # fixed n: refused, not ignored

    records = certify_dataset(pipe, images, labels, 0.5, tmp_path / "loose", n0=20, n=3000, radii=radii,
                              futility=0.5, progress=False)  # fmt: skip
    assert [r["samples"] for r in records] == [int(direct(0.5, i).samples[0]) for i in range(3)]
    run = json.loads((tmp_path / "loose" / "run.json").read_text())
    assert run["futility"] == 0.5
    with pytest.raises(ValueError, match=r"differs in \['futility'\]"):  # other certificates: another run
        certify_dataset(
            pipe, images, labels, 0.5, tmp_path / "loose", n0=20, n=3000, radii=radii, progress=False
        )
    certify_dataset(pipe, images[:1], labels[:1], 0.5, tmp_path / "default", n0=20, n=3000, radii=radii,
                    futility=0.05, progress=False)  # fmt: skip
    # the default leaves the record as before: folders certified before futility was an option resume
    assert "futility" not in json.loads((tmp_path / "default" / "run.json").read_text())


def test_the_report_states_the_guarantee_and_where_the_samples_went():
    from rrcm_diffusers.report import SEQUENTIAL_GUARANTEE, certify_methods, markdown_table

    image = torch.full((1, 4, 4), 0.5)
    images, labels = image[None].repeat(3, 1, 1, 1), torch.zeros(3, dtype=torch.long)
    methods = {
        "sure": lambda s: _threshold_classifier(image, 0.9999),
        "unsure": lambda s: _threshold_classifier(image, 0.7),
    }
    rows = certify_methods(methods, images, labels, [SIGMA], n0=20, n=5000, progress=False, sequential=True)
    for row, selection in zip(rows, (16, 20)):  # sure: 16 votes of 16 end its selection; unsure: n0
        histogram = {int(k): c for k, c in row["samples_histogram"].items()}
        assert sum(histogram.values()) == 3 and set(histogram) <= set(
            sequential_looks(5000, 0.001, THRESHOLDS_REPORT)
        )
        assert row["forward_passes"] == sum(k * c for k, c in histogram.items()) + 3 * selection
    sure, unsure = sorted(rows, key=lambda r: r["method"])
    # a clear image stops before n_max (the grid's top radius reachable at 5,000 is 2.5σ: ~1,300 samples)
    assert max(int(k) for k in sure["samples_histogram"]) < sure["n"]
    assert unsure["forward_passes"] > sure["forward_passes"]  # p_A 0.7, near the threshold Φ(0.5) = 0.69
    text = markdown_table(rows)
    assert SEQUENTIAL_GUARANTEE in text and "- sure σ 0.5: " in text and "- unsure σ 0.5: " in text
    fixed = certify_methods(methods, images, labels, [SIGMA], n0=20, n=500, progress=False)
    assert SEQUENTIAL_GUARANTEE not in markdown_table(fixed)  # fixed n: the table as before
