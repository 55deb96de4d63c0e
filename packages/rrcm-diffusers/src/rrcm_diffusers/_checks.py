"""Argument checks shared by the configs, the trainer and the CLIs: an error that names the argument
and what was expected, before anything is computed or written."""

from __future__ import annotations

import argparse
import math
import numbers
from typing import Any

DATASETS = ("mnist", "cifar10")  # the test sets the CLIs load (`rrcm_diffusers.data`)

# past this the noise drowns any [0, 1] image and overflows float16 (1e300 became inf in float32 and
# reached the model as NaN logits)
MAX_SIGMA = 1e4


def check_sigma(sigma: Any, name: str = "sigma") -> float:
    """σ as a float, or an error naming it: a finite number in (0, MAX_SIGMA], not a bool (a bool is a
    Real: True would be σ = 1)."""
    if not (isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and 0 < sigma <= MAX_SIGMA):
        raise ValueError(
            f"{name} must be a finite number > 0 and <= {MAX_SIGMA:g} (noise std in [0, 1] pixel space), "
            f"got {sigma!r}"
        )
    return float(sigma)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; booleans and floats (1e5, 2.5) are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(
    name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = False
) -> float:
    """``value`` as a finite float in [low, high] (``low_open``: (low, high]); booleans are refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > low if low_open else value >= low) and value <= high:
        return float(value)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def positive_int_arg(text: str) -> int:
    """argparse ``type=`` for counts: 0 and negative numbers are refused (they meant "all" or
    "slice from the end")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _float_arg(text: str, ok, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float_arg(text: str) -> float:
    """argparse ``type=`` for σ-like values: finite and > 0."""
    return _float_arg(text, lambda v: v > 0, "a finite number > 0")


def probability_arg(text: str) -> float:
    """argparse ``type=`` for α: in (0, 1)."""
    return _float_arg(text, lambda v: 0 < v < 1, "a number in (0, 1)")
