"""Validation of named choices (model, optimizer, parametrization), one rule for all."""
from __future__ import annotations

from typing import Sequence


def check_choice(argument: str, value: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError naming ``argument``.

    Args:
        argument: the argument's name, shown in the message.
        value: the value given.
        choices: the accepted values.

    Returns:
        The value, unchanged.
    """
    if value not in choices:
        raise ValueError(f"{argument} must be one of {tuple(choices)}, got {value!r}")
    return value
