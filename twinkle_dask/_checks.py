"""Checks of user-given options: typed errors that quote the bad value and say what is valid.

A value of the wrong type raises :class:`ConfigurationTypeError` (a
``TypeError`` and a ``ConfigurationError``); a value of the right type that is
out of range raises :class:`ConfigurationError` (a ``ValueError``).
"""

from __future__ import annotations

import numbers
from typing import Any

from .exceptions import ConfigurationError, ConfigurationTypeError

__all__ = ["check_bool", "check_count", "check_int", "check_str", "check_timeout"]


def check_bool(where: str, name: str, value: Any) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise ConfigurationTypeError(f"{where}: {name} must be True or False, got {value!r}")
    return value


def check_int(where: str, name: str, value: Any) -> int:
    """``value`` as an int if it is an integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigurationTypeError(f"{where}: {name} must be an int, got {value!r}")
    return int(value)


def check_count(where: str, name: str, value: Any, *, minimum: int = 1) -> int | None:
    """``value`` if it is None or an int of at least ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigurationTypeError(f"{where}: {name} must be None or an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{where}: {name} must be None or an int >= {minimum}, got {value!r}")
    return int(value)


def check_str(where: str, name: str, value: Any) -> str | None:
    """``value`` if it is None or a string."""
    if value is not None and not isinstance(value, str):
        raise ConfigurationTypeError(f"{where}: {name} must be None or a string, got {value!r}")
    return value


def check_timeout(
    where: str, value: Any, *, name: str = "timeout", allow_zero: bool = False, optional: bool = True
) -> float | None:
    """``value`` in seconds if it is a positive number (``allow_zero``: non-negative) or None (``optional``)."""
    valid = ("None or " if optional else "") + "a number of seconds " + (">= 0" if allow_zero else "> 0")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationTypeError(f"{where}: {name} must be {valid}, got {value!r}")
    seconds = float(value)
    if not (seconds >= 0 if allow_zero else seconds > 0):  # NaN fails both
        raise ConfigurationError(f"{where}: {name} must be {valid}, got {value!r}")
    return seconds
