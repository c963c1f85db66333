"""Type checks shared by the configs, the pipeline and the weight loaders: one definition of "a number"."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["check_finite_number", "check_positive_int", "concept_list", "is_integer", "is_real"]


def is_real(value: Any) -> bool:
    """A real number: Python / numpy ints and floats; not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value: Any) -> bool:
    """A Python / numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_finite_number(name: str, value: Any, example: str = "") -> None:
    """Raises `ValueError` naming `name` unless `value` is a finite real number (NaN or Inf would flow into every
    image; a string or a bool is a slip)."""
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number{example}, got {value!r}.")


def check_positive_int(name: str, value: Any) -> None:
    """Raises `ValueError` naming `name` unless `value` is an integer >= 1."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def concept_list(safety_concept: str | list[str]) -> list[str]:
    """`safety_concept` as a list of texts; a clear error for anything but a non-empty string or list of them."""
    concepts = [safety_concept] if isinstance(safety_concept, str) else safety_concept
    if not isinstance(concepts, (list, tuple)) or not concepts or not all(isinstance(c, str) and c for c in concepts):
        raise ValueError(f"`safety_concept` must be a non-empty string or list of strings, got {safety_concept!r}.")
    return list(concepts)
