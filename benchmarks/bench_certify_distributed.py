"""Certifying a test set on 2 processes vs 1 (``rrcm_diffusers.dataset_certification``), same images.

Both runs: the CLI on the same MNIST test images, each process one thread (OMP_NUM_THREADS=1), one
after the other, in a rotating order over ``--rounds`` rounds (median [min, max] printed); the model of an experiment config (default: the main job's,
examples/rrcm/configs/mnist_main.yaml) with fresh weights (weights do not change the cost of fixed-n
CERTIFY) unless ``--pipeline`` names a saved one. With ``--radii`` the CLI certifies sequentially: an
image then costs 100x another, and the ranks share a queue of images (``shared_dist.next_index``). Prints the certification loop's wall time (the CLI's ``wall_s``)
and the whole command's, and the speed-up 1 process / 2 processes (target >= 1.8x), and checks that
both runs wrote the same certificates.

    python benchmarks/bench_certify_distributed.py [--images 40] [--n 1000] [--rounds 5]
    python benchmarks/bench_certify_distributed.py --pipeline reports/latest/rrcm/rrcm-sigma0.5/pipeline \
        --n 10000 --radii 0 0.25 0.5 0.75 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import interleave, machine, ratios, spread

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=550)
    parser.add_argument("--config", default=str(REPO / "examples/rrcm/configs/mnist_main.yaml"))
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--radii", type=float, nargs="+", default=None, help="certify sequentially on this grid"
    )
    args = parser.parse_args()
    print(machine())
    tmp = Path(tempfile.mkdtemp(prefix="bench_certify_distributed_"))
    pipeline = args.pipeline
    if pipeline is None:
        import torch

        from rrcm_diffusers import RRCMModel, RRCMPipeline
        from rrcm_diffusers.experiment import load_config

        torch.manual_seed(0)
        model = RRCMModel(**{**load_config(args.config).model, "projection_dim": 0, "num_classes": 10})
        pipeline = str(tmp / "pipeline")
        RRCMPipeline(model=model).save_pretrained(pipeline)
    cli = ["-m", "rrcm_diffusers.dataset_certification", "--pipeline", pipeline, "--dataset", "mnist",
           "--num-images", str(args.images), "--sigma", "0.5", "--n0", "100", "--n", str(args.n),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    if args.data_dir:
        cli += ["--data-dir", args.data_dir]
    if args.radii:
        cli += ["--radii", *map(str, args.radii)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0"]  # fmt: skip
    walls: dict[str, list[float]] = {}

    def run(name: str, prefix: list[str], extra: dict[str, str]) -> float:
        """One CLI run into a fresh folder; the certification loop's wall time (the CLI's wall_s)."""
        out = tmp / f"{name.replace(' ', '_')}_{len(walls.setdefault(name, []))}"
        start = time.perf_counter()
        proc = subprocess.run(
            [*prefix, *cli, "--out", str(out)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        walls[name].append(time.perf_counter() - start)  # the whole command
        return row["wall_s"]

    cert = interleave(
        {
            "1 process": lambda: run("1 process", [sys.executable], {}),
            "2 processes": lambda: run("2 processes", launch, {"ACCELERATE_USE_CPU": "true"}),
        },
        args.rounds,
    )
    records = [
        [{k: v for k, v in json.loads(line).items() if k != "seconds"}
         for line in (tmp / d / "certificates.jsonl").read_text().splitlines()]
        for d in ("1_process_0", "2_processes_0")
    ]  # fmt: skip
    same = sorted(records[0], key=lambda r: r["index"]) == sorted(records[1], key=lambda r: r["index"])
    print(f"median [min, max] over {args.rounds} interleaved rounds:")
    for name in cert:
        print(
            f"{name:12s} certification {spread(cert[name], '.1f')} s   whole command {spread(walls[name], '.1f')} s"
        )
    print(
        f"speed-up 1 process / 2 processes: certification {spread(ratios(cert['1 process'], cert['2 processes']), '.2f')}x"
        f" (target >= 1.8x), whole command {spread(ratios(walls['1 process'], walls['2 processes']), '.2f')}x;"
        f" identical certificates: {same}"
    )
    how = f"sequential on radii {args.radii}, n_max" if args.radii else "n"
    print(
        f"({args.images} images, n0 = 100, {how} = {args.n}, batch {args.batch_size}, each process 1 thread)"
    )


if __name__ == "__main__":
    main()
