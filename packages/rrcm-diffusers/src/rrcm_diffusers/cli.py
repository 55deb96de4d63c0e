"""The console scripts' options, parsed before anything heavy is imported: ``--help`` and a bad flag
answer at once, not after torch and diffusers have loaded (the package imports its names lazily).

``rrcm-certify`` (`rrcm_diffusers.dataset_certification`) and ``rrcm-experiment``
(`rrcm_diffusers.experiment`).
"""

from __future__ import annotations

import argparse

from ._checks import DATASETS, positive_float_arg, positive_int_arg, probability_arg


def add_certify_options(parser: argparse.ArgumentParser) -> None:
    """σ, n0, n, α, batch size and seed: the arguments of CERTIFY, each checked by its type."""
    parser.add_argument(
        "--sigma",
        type=positive_float_arg,
        default=0.5,
        help="noise std in [0, 1] pixel space (default: %(default)s)",
    )
    parser.add_argument(
        "--n0",
        type=positive_int_arg,
        default=100,
        help="noise samples to select the class (default: %(default)s)",
    )
    parser.add_argument(
        "--n",
        type=positive_int_arg,
        default=100_000,
        help="noise samples to estimate p_A (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=probability_arg,
        default=0.001,
        help="failure probability per image (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int_arg,
        default=256,
        help="noisy copies per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed (image i's noise depends on (seed, i)) (default: %(default)s)",
    )


def certify_parser() -> argparse.ArgumentParser:
    """The options of ``rrcm-certify`` (``python -m rrcm_diffusers.dataset_certification``)."""
    parser = argparse.ArgumentParser(
        prog="rrcm-certify",
        description="Certify a test set with a saved pipeline on every process of an `accelerate launch`, resumably.",
    )
    parser.add_argument("--pipeline", required=True, help="a saved RRCMPipeline or DDSPipeline folder")
    parser.add_argument("--out", required=True, help="results folder (resumed if it holds this run)")
    parser.add_argument(
        "--dataset", choices=DATASETS, default="mnist", help="test split to certify (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the shared data folder (default: $RRCM_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--per-class",
        type=positive_int_arg,
        default=None,
        help="class-balanced subset: K test images per class (default: all)",
    )
    parser.add_argument(
        "--num-images",
        type=positive_int_arg,
        default=None,
        help="only the first K test images (default: all)",
    )
    add_certify_options(parser)
    parser.add_argument(
        "--name", default=None, help="the method's name in the report (default: the folder's)"
    )
    parser.add_argument(
        "--radii", type=float, nargs="+", default=None, metavar="R",
        help="the radii you report: certify sequentially, each image stopping once its radius on this grid "
        "is decided (--n is then the most samples per image); default: fixed-n CERTIFY",
    )  # fmt: skip
    parser.add_argument(
        "--futility", type=probability_arg, default=None, metavar="LEVEL",
        help="with --radii: the level of the upper bound that judges a radius out of reach; larger stops "
        "images sooner and loses more to the radius below, never the guarantee (default: 0.05)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def experiment_parser() -> argparse.ArgumentParser:
    """The options of ``rrcm-experiment`` (``python -m rrcm_diffusers.experiment``)."""
    parser = argparse.ArgumentParser(
        prog="rrcm-experiment",
        description="The rRCM experiment end to end: pretrain → probe → fine-tune per σ → baselines → DDS → certify.",
    )
    parser.add_argument(
        "--config", default=None, help="YAML file overriding the defaults (examples/rrcm/configs/*.yaml; "
        "default: the built-in MNIST settings)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder (stages already there are reused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="run once per training seed into OUT/seed{S}; "
        "writes OUT/seeds.md (mean ± sd, paired differences over seeds) (default: the config's seed only)",
    )  # fmt: skip
    return parser
