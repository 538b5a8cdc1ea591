"""Value transforms of the ``mapping`` transformation (``transform: [trim, lowercase]``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from dataflare.records import RecordError, iso_utc, to_epoch_seconds


def _text(name: str, fn: Callable[[str], str]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        if not isinstance(value, str):
            msg = f"{name} expects a string, got {type(value).__name__} ({value!r})"
            raise RecordError(msg)
        return fn(value)

    return apply


def to_int(value: Any) -> int:
    """Integer value of a number or numeric string; a fractional value is an error."""
    if isinstance(value, bool):
        msg = f"to_int: got a bool ({value!r})"
        raise RecordError(msg)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        msg = f"to_int: {value!r} is not a whole number"
        raise RecordError(msg)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                num = float(text)
            except ValueError:
                msg = f"to_int: {value!r} is not a number"
                raise RecordError(msg) from None
            return to_int(num)
    msg = f"to_int: got a {type(value).__name__} ({value!r})"
    raise RecordError(msg)


def to_float(value: Any) -> float:
    """Float value of a number or numeric string."""
    if isinstance(value, bool):
        msg = f"to_float: got a bool ({value!r})"
        raise RecordError(msg)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            msg = f"to_float: {value!r} is not a number"
            raise RecordError(msg) from None
    msg = f"to_float: got a {type(value).__name__} ({value!r})"
    raise RecordError(msg)


_TRUE = {"true", "yes", "y", "1", "on", "t"}
_FALSE = {"false", "no", "n", "0", "off", "f"}


def to_bool(value: Any) -> bool:
    """Boolean value of a bool, number or text such as ``yes``/``no``/``true``/``0``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    msg = f"to_bool: cannot read {value!r} as a boolean"
    raise RecordError(msg)


def to_string(value: Any) -> str:
    """Text of a value (``true``/``false`` for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_timestamp(value: Any) -> str:
    """ISO-8601 UTC text of an ISO-8601 string or epoch seconds."""
    return iso_utc(to_epoch_seconds(value))


def _digest(name: str) -> Callable[[Any], str]:
    def apply(value: Any) -> str:
        data = value if isinstance(value, str) else to_string(value)
        return hashlib.new(name, data.encode()).hexdigest()

    return apply


TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "trim": _text("trim", str.strip),
    "lowercase": _text("lowercase", str.lower),
    "uppercase": _text("uppercase", str.upper),
    "to_int": to_int,
    "to_float": to_float,
    "to_string": to_string,
    "to_bool": to_bool,
    "to_timestamp": to_timestamp,
    "sha256": _digest("sha256"),
    "md5": _digest("md5"),
}
"""Transforms by name. ``null`` passes through every transform unchanged."""


def chain(names: list[str]) -> Callable[[Any], Any]:
    """One function applying the named transforms in order (``null`` stays ``null``)."""
    fns = [TRANSFORMS[n] for n in names]

    def apply(value: Any) -> Any:
        for fn in fns:
            if value is None:
                return None
            value = fn(value)
        return value

    return apply
