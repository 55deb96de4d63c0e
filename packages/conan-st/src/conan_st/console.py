"""The console scripts' entry points: parse with the light parsers of `conan_st.cli` first, so that
``--help`` and a bad flag answer at once, then import the module that does the work."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from .cli import MissingExtraError, evaluate_parser, experiment_parser


def experiment(argv: list[str] | None = None) -> None:
    """``conan-experiment``."""
    parser = experiment_parser()
    args = parser.parse_args(argv)
    from .experiment import run_cli  # the heavy imports, once the arguments are known

    with _input_errors(parser):
        run_cli(args)


def evaluate(argv: list[str] | None = None) -> None:
    """``conan-evaluate``."""
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    with _input_errors(parser):
        from .evaluation import run_cli  # the heavy imports, once the arguments are known (mteb: an extra)

        run_cli(args)


@contextlib.contextmanager
def _input_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """An error in what the user gave, found once the work has started (a ``ValueError``: a folder of
    another run, a bad value in a file; an ``OSError``: a missing file, folder or model; the ``[mteb]``
    extra not installed) ends the script as a bad flag does, ``prog: error: message`` and exit status 2,
    instead of a traceback that buries the message. ``python -m`` on the module keeps the traceback."""
    try:
        yield
    except (ValueError, OSError, MissingExtraError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
