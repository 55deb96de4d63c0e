"""The console scripts' entry points: parse with the light parsers of `rrcm_diffusers.cli` first, so that
``--help`` and a bad flag answer at once, then import the module that does the work."""

from __future__ import annotations

from .cli import certify_parser, experiment_parser


def certify(argv: list[str] | None = None) -> None:
    """``rrcm-certify``."""
    parser = certify_parser()
    args = parser.parse_args(argv)
    from .dataset_certification import run_cli  # the heavy imports, once the arguments are known

    run_cli(parser, args)


def experiment(argv: list[str] | None = None) -> None:
    """``rrcm-experiment``."""
    args = experiment_parser().parse_args(argv)
    from .experiment import run_cli  # the heavy imports, once the arguments are known

    run_cli(args)
