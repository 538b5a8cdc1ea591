"""Value transforms of the ``mapping`` transformation (``transform: [trim, lowercase]``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import orjson

from dataflare.records import RecordError, iso_utc, to_epoch_seconds


def _text(name: str, fn: Callable[[str], str]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        if not isinstance(value, str):
            msg = f"{name} expects a string, got {type(value).__name__} ({value!r})"
            raise RecordError(msg)
        return fn(value)

    return apply


def _parse(text: str, kind: type[int] | type[float]) -> int | float | None:
    """``text`` as a number of ``kind``, else ``None`` (``1_000`` is not one)."""
    if "_" in text:
        return None
    try:
        return kind(text)
    except ValueError:
        return None


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
        num = _parse(text, int)
        if num is None:
            num = _parse(text, float)
            if num is None or not math.isfinite(num):
                msg = f"to_int: {value!r} is not a number"
                raise RecordError(msg)
        return to_int(num)
    msg = f"to_int: got a {type(value).__name__} ({value!r})"
    raise RecordError(msg)


def to_float(value: Any) -> float:
    """Float value of a number or numeric string."""
    if isinstance(value, bool):
        msg = f"to_float: got a bool ({value!r})"
        raise RecordError(msg)
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        num = _parse(value.strip(), float)
        if num is None:
            msg = f"to_float: {value!r} is not a number"
            raise RecordError(msg)
        out = float(num)
    else:
        msg = f"to_float: got a {type(value).__name__} ({value!r})"
        raise RecordError(msg)
    if not math.isfinite(out):  # NaN and infinities have no JSON form
        msg = f"to_float: {value!r} is not a finite number"
        raise RecordError(msg)
    return out


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
    """Text of a value (``true``/``false`` for booleans, JSON for objects and lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value, default=str).decode()
    return str(value)


def to_timestamp(value: Any) -> str:
    """ISO-8601 UTC text of an ISO-8601 string or epoch seconds."""
    seconds = to_epoch_seconds(value)
    try:
        return iso_utc(seconds)
    except (ValueError, OverflowError, OSError):
        msg = (f"to_timestamp: {value!r} is out of range as epoch seconds (epoch "
               "milliseconds need dividing by 1000, e.g. an expression 'ts / 1000')")
        raise RecordError(msg) from None


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
