"""The report's uncertainty: Clopper–Pearson intervals, bootstrap ACR intervals and exact McNemar
paired tests, each against an independent computation."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from scipy.stats import beta
from scipy.stats import t as student_t

from rrcm_diffusers.certification import CertifyResult
from rrcm_diffusers.report import RADII, paired_tests, seed_summary, seed_tables, summary_row, write_report


def _row(method: str, correct: list[bool], radii: list[float], sigma: float = 0.5) -> dict:
    n = len(correct)
    labels = torch.zeros(n, dtype=torch.long)
    preds = torch.tensor([0 if c else 1 for c in correct])
    res = CertifyResult(preds, torch.tensor(radii, dtype=torch.float64), torch.zeros(n), torch.zeros(n))
    return summary_row(method, sigma, res, labels, n0=100, n=1000, alpha=0.001, seconds=1.0)


def test_clopper_pearson_matches_the_beta_quantiles():
    g = torch.Generator().manual_seed(0)
    correct = (torch.rand(50, generator=g) < 0.7).tolist()
    radii = (torch.rand(50, generator=g) * 1.5).tolist()
    row = _row("rRCM", correct, radii)
    for r in RADII:
        k = sum(c and rad >= r for c, rad in zip(correct, radii))
        lo = beta.ppf(0.025, k, 50 - k + 1) if k > 0 else 0.0
        hi = beta.ppf(0.975, k + 1, 50 - k) if k < 50 else 1.0
        assert row["ci95"][f"r={r:g}"] == pytest.approx([lo, hi], abs=1e-9)
        assert lo <= row[f"r={r:g}"] <= hi
    lo, hi = row["acr_ci95"]
    assert lo < row["acr"] < hi and lo >= 0 and hi <= max(radii)
    assert row["acr_ci95"] == _row("rRCM", correct, radii)["acr_ci95"]  # seeded


def test_mcnemar_is_the_exact_binomial_test_on_discordant_images():
    # 30 images: the reference alone certifies 9 at r=0.5, the baseline alone 2, both 10
    ref = [True] * 19 + [False] * 11
    base = [True] * 10 + [False] * 9 + [True] * 2 + [False] * 9
    rows = [_row("rRCM", ref, [0.8] * 30), _row("Cohen", base, [0.8] * 30)]
    (t,) = [t for t in paired_tests(rows) if t["r"] == 0.5]
    assert (t["only_reference"], t["only_baseline"]) == (9, 2)
    exact = min(1.0, 2 * sum(math.comb(11, i) for i in range(0, 3)) / 2**11)
    assert t["p_value"] == pytest.approx(exact, rel=1e-12)
    assert t["reference_acc"] == pytest.approx(19 / 30) and t["baseline_acc"] == pytest.approx(12 / 30)
    with pytest.raises(ValueError, match="different image counts"):
        paired_tests([rows[0], _row("Cohen", base[:20], [0.8] * 20)])


def test_report_shows_intervals_and_paired_tests(tmp_path):
    ref, base = [True] * 19 + [False] * 11, [True] * 12 + [False] * 18
    rows = [_row("rRCM", ref, [0.8] * 30), _row("Cohen", base, [0.8] * 30)]
    paths = write_report(rows, tmp_path, "t")
    md = paths["md"].read_text()
    assert "Clopper–Pearson" in md and "| 0.5 | Cohen | 0.5 | 63.3 | 40.0 | 7 | 0 |" in md
    header = next(csv.reader(paths["csv"].read_text().splitlines()))
    assert "certified_radius" not in header and "ci95" not in header  # per-image data: JSON only
    assert json.loads(paths["json"].read_text())[0]["certified_radius"] == [0.8] * 19 + [-1.0] * 11


def test_a_kill_while_writing_the_report_leaves_the_previous_one(tmp_path, monkeypatch):
    ref, base = [True] * 19 + [False] * 11, [True] * 12 + [False] * 18
    first = write_report([_row("rRCM", ref, [0.8] * 30)], tmp_path, "t")
    before = {k: p.read_bytes() for k, p in first.items()}

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing a file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report([_row("rRCM", ref, [0.8] * 30), _row("Cohen", base, [0.8] * 30)], tmp_path, "t")
    assert {k: p.read_bytes() for k, p in first.items()} == before
    monkeypatch.undo()
    second = write_report([_row("rRCM", ref, [0.8] * 30), _row("Cohen", base, [0.8] * 30)], tmp_path, "t")
    assert "| Cohen |" in second["md"].read_text() and len(json.loads(second["json"].read_text())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in second.values())  # no temp


def test_seed_summary_is_mean_sd_and_a_t_interval_over_seeds():
    # three seeds of 40 images with unequal accuracies; rRCM minus Cohen at r=0: +5, +15, -2.5 points
    runs = []
    for ref_k, base_k in ((20, 18), (24, 18), (16, 17)):
        ref = [i < ref_k for i in range(40)]
        base = [i < base_k for i in range(40)]
        runs.append([_row("rRCM", ref, [0.6] * 40), _row("Cohen", base, [0.3] * 40)])
    summary = seed_summary(runs)
    rrcm = next(m for m in summary["methods"] if m["method"] == "rRCM")
    assert rrcm["seeds"] == 3
    assert rrcm["r=0"]["mean"] == pytest.approx(60 / 120) and rrcm["r=0"]["sd"] == pytest.approx(0.1)
    d = [0.05, 0.15, -0.025]
    (t,) = [t for t in summary["paired"] if t["metric"] == "r=0"]
    mean, se = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2 / 3)
    half = student_t.ppf(0.975, 2) * se
    assert t["differences"] == pytest.approx(d) and t["mean"] == pytest.approx(mean)
    assert t["ci95"] == pytest.approx([mean - half, mean + half])
    assert t["p_value"] == pytest.approx(2 * student_t.sf(abs(mean / se), 2))
    # each seed's McNemar p over images: seed 0 discordant 2 / 0 -> p = 0.5
    assert t["mcnemar_p"][0] == pytest.approx(0.5)
    (far,) = [t for t in summary["paired"] if t["metric"] == "r=0.5"]  # Cohen never reaches 0.5
    assert far["differences"] == pytest.approx([0.5, 0.6, 0.4])
    md = seed_tables(summary)
    assert "| rRCM | 0.5 | 50.0 ± 10.0 |" in md and "+5.0 / +15.0 / -2.5" in md
    with pytest.raises(ValueError, match="every run must hold each"):
        seed_summary([runs[0], runs[1][:1]])


def test_a_report_without_matplotlib_keeps_its_tables(tmp_path, monkeypatch):
    """[plot] is optional: without matplotlib the tables are written and one notice names the extra."""
    import sys

    from rrcm_diffusers.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(UserWarning, match=r"pip install 'rrcm-diffusers\[plot\]'"):
        paths = write_report([_row("m", [True, False], [0.3, 0.0])], tmp_path, "t")
    assert set(paths) == {"md", "csv", "json"} and all(p.is_file() for p in paths.values())
    assert not (tmp_path / "certified_accuracy.png").exists()


def test_certify_methods_gives_each_image_its_own_noise_and_the_same_certificates_on_two_threads():
    """Image i's noise comes from image_generator(seed, i) whatever else is certified, so the rows
    are the per-image certificates, and two worker threads give them to the bit (unequal sizes: 7
    images on 2 threads); torch's thread count is restored after."""
    from rrcm_diffusers import RRCMPipeline
    from rrcm_diffusers.certification import certify_sequential, image_generator
    from rrcm_diffusers.report import certify_methods
    from tests.rrcm.helpers import tiny_model

    clf = RRCMPipeline(model=tiny_model(num_classes=3, projection_dim=0)).base_classifier(0.5)
    images = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    settings = dict(n0=20, n=600, progress=False, sequential=True, seed=3)
    threads = torch.get_num_threads()
    (one,) = certify_methods({"m": lambda s: clf}, images, labels, [0.5], workers=1, **settings)
    (two,) = certify_methods({"m": lambda s: clf}, images, labels, [0.5], workers=2, **settings)
    assert torch.get_num_threads() == threads
    with torch.inference_mode():
        reference = [
            certify_sequential(
                clf, images[i : i + 1], 0.5, n0=20, n_max=600, radii=RADII, generator=image_generator(3, i)
            )
            for i in range(7)
        ]
    want = [float(r.radii[0]) if int(r.predictions[0]) == int(y) else -1.0 for r, y in zip(reference, labels)]
    assert one["certified_radius"] == want and two["certified_radius"] == want
    assert one["forward_passes"] == two["forward_passes"] == sum(int(r.samples[0]) + 20 for r in reference)
    assert len(set(want)) > 1  # not one radius for all: the comparison can tell images apart
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        certify_methods({"m": lambda s: clf}, images, labels, [0.5], workers=0, **settings)
