"""Argument checks shared by every callback: errors name the argument and what is allowed."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an int >= ``low`` (bools refused), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    return value


def check_callable(name: str, value: Any, signature: str) -> Any:
    """``value`` if it is ``None`` or callable, else ``TypeError`` naming ``name`` and the
    expected ``signature`` (e.g. ``"(model, batch) -> loss"``)."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable {signature}, got {type(value).__name__}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite number within the bounds (open or closed), else
    ``ValueError`` naming ``name`` and the allowed interval."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)
