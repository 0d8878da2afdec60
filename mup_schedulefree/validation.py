"""Argument checks shared by the optimizers and the muP factories, in one dialect.

Every message names the argument and the value, and says what is allowed:
``Invalid lr: '1e-2' (must be a real number, got str)``, ``Invalid lr: -1.0 (must lie in [0.0, inf))``.
A value of the wrong type raises TypeError; a number out of range raises ValueError.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def real_number(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError naming ``name`` if it is not a real number.

    Python and NumPy reals and one-element real tensors (a tensor learning rate) are numbers;
    None, strings, bools and complex values are not.

    Args:
        name: argument name shown in the message.
        value: the value supplied by the user.

    Returns:
        The value as a Python float.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
            return float(value)
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number or a 1-element real tensor, "
                        f"got a {value.dtype} tensor of shape {tuple(value.shape)})")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number, got {type(value).__name__})")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float | None = None, *,
                low_open: bool = False, high_open: bool = True) -> None:
    """Raise ValueError naming ``name`` unless ``value`` lies in the stated interval.

    Args:
        name: argument name shown in the message.
        value: the value supplied by the user.
        low: lower bound.
        high: upper bound, or None for unbounded.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
    """
    number = real_number(name, value)
    too_low = number <= low if low_open else number < low
    too_high = number == math.inf if high is None else (number >= high if high_open else number > high)
    if too_low or too_high or number != number:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        bound = f"{lo}{low}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"Invalid {name}: {value!r} (must lie in {bound})")


def check_count(name: str, value: Any) -> None:
    """Raise unless ``value`` is a non-negative int (a number of steps).

    Args:
        name: argument name shown in the message.
        value: the value supplied by the user.

    Raises:
        TypeError: ``value`` is not an int (bools and floats are not).
        ValueError: ``value`` is negative.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name}: {value!r} (must be a non-negative int, got {type(value).__name__})")
    if value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must lie in [0, inf))")
