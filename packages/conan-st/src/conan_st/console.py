"""The console scripts' entry points: parse with the light parsers of `conan_st.cli` first, so that
``--help`` and a bad flag answer at once, then import the module that does the work."""

from __future__ import annotations

from .cli import evaluate_parser, experiment_parser


def experiment(argv: list[str] | None = None) -> None:
    """``conan-experiment``."""
    args = experiment_parser().parse_args(argv)
    from .experiment import run_cli  # the heavy imports, once the arguments are known

    run_cli(args)


def evaluate(argv: list[str] | None = None) -> None:
    """``conan-evaluate``."""
    args = evaluate_parser().parse_args(argv)
    from .evaluation import run_cli  # the heavy imports, once the arguments are known

    run_cli(args)
