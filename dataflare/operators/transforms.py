"""Value transforms of the ``mapping`` transformation (``transform: [trim, lowercase]``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, Field, ValidationError, field_validator

from dataflare.config import Strict
from dataflare.records import RecordError, a_or_an, iso_utc, to_epoch_seconds


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
    msg = f"to_int: got {a_or_an(type(value).__name__)} ({value!r})"
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
        msg = f"to_float: got {a_or_an(type(value).__name__)} ({value!r})"
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

RESULT_KIND: dict[str, str] = {
    "to_int": "integer", "to_float": "number", "to_string": "string", "to_bool": "boolean",
    "to_timestamp": "string", "sha256": "string", "md5": "string", "trim": "string",
    "lowercase": "string", "uppercase": "string", "regex_extract": "string",
    "regex_replace": "string", "to_timezone": "string", "parse_timestamp": "string",
}
"""The kind of value each transform returns (for the type flow)."""

NEEDS: dict[str, str] = {"trim": "string", "lowercase": "string", "uppercase": "string"}
"""The kind of value a transform needs, where a value of another kind is a record error."""


def transform_name(spec: TransformSpec) -> str:
    """The name of a transform in a list (``trim`` or ``{regex_extract: {...}}``)."""
    return spec if isinstance(spec, str) else next(iter(spec), "")


class RegexExtract(Strict):
    """``regex_extract``: the first match of ``pattern`` (``null`` when none)."""

    pattern: str = Field(description="Regular expression (Python syntax), searched in the text.")
    group: int | str | None = Field(
        None, description="Group returned: a number or name (default: the first group if the "
        "pattern has one, else the whole match)."
    )

    _check = field_validator("pattern")(classmethod(lambda cls, v: _regex(v)))


class RegexReplace(Strict):
    """``regex_replace``: every match of ``pattern`` replaced."""

    pattern: str = Field(description="Regular expression (Python syntax).")
    replacement: str = Field(
        "", description="Replacement text; `\\1` or `\\g<name>` insert a group."
    )

    _check = field_validator("pattern")(classmethod(lambda cls, v: _regex(v)))


class ToTimezone(Strict):
    """``to_timezone``: a timestamp as ISO-8601 local time with its offset in ``timezone``."""

    timezone: str = Field(description="IANA time zone, e.g. 'Asia/Shanghai'.")

    _check = field_validator("timezone")(classmethod(lambda cls, v: _zone(v)))


class ParseTimestamp(Strict):
    """``parse_timestamp``: text read with a strptime ``format``, as ISO-8601 UTC."""

    format: str = Field(description="strptime format, e.g. '%d/%m/%Y %H:%M'.")
    timezone: str = Field("UTC", description="IANA time zone of a text without an offset.")

    _check = field_validator("timezone")(classmethod(lambda cls, v: _zone(v)))


def _regex(pattern: str) -> str:
    from dataflare.expr_functions import regex

    regex(pattern)  # ValueError names the problem
    return pattern


def _zone(name: str) -> str:
    from dataflare.expr_functions import zone

    zone(name)
    return name


def _with_params(name: str, params: BaseModel) -> Callable[[Any], Any]:
    from dataflare import expr_functions as f

    if isinstance(params, RegexExtract):
        pattern = f.regex(params.pattern)
        return lambda v: f.MORE_FUNCTIONS["regex_extract"][0](v, pattern, params.group)
    if isinstance(params, RegexReplace):
        pattern, repl = f.regex(params.pattern), params.replacement
        return lambda v: f.MORE_FUNCTIONS["regex_replace"][0](v, pattern, repl)
    if isinstance(params, ToTimezone):
        return lambda v: f.MORE_FUNCTIONS["to_timezone"][0](v, params.timezone)
    assert isinstance(params, ParseTimestamp), name
    return lambda v: f.MORE_FUNCTIONS["parse_timestamp"][0](v, params.format, params.timezone)


PARAMETERISED: dict[str, type[BaseModel]] = {
    "regex_extract": RegexExtract,
    "regex_replace": RegexReplace,
    "to_timezone": ToTimezone,
    "parse_timestamp": ParseTimestamp,
}
"""Transforms written ``{name: {params}}`` in a transform list, with their settings models."""

TransformSpec = str | dict[str, Any]
"""A transform in a list: a name, or ``{name: {params}}`` for :data:`PARAMETERISED`."""


def check_transform(spec: Any) -> Any:
    """Validate one transform of a list; ``ValueError`` says what is wrong."""
    from dataflare.dsl_compiler.problems import did_you_mean

    known = [*TRANSFORMS, *PARAMETERISED]
    if isinstance(spec, dict):
        if len(spec) != 1:
            msg = f"a transform with settings is one '{{name: {{settings}}}}', got {len(spec)} keys"
            raise ValueError(msg)
        [(name, params)] = spec.items()
        if name not in PARAMETERISED:
            hint = did_you_mean(str(name), list(PARAMETERISED))
            msg = (f"unknown transform with settings {name!r}{hint}; known: "
                   f"{', '.join(PARAMETERISED)}")
            raise ValueError(msg)
        try:
            model = PARAMETERISED[name].model_validate(params or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = f"transform {name!r}: {where + ': ' if where else ''}{err['msg']}"
            raise ValueError(msg) from None
        return {name: model}
    if spec not in TRANSFORMS:
        hint = did_you_mean(str(spec), known)
        if spec in PARAMETERISED:
            msg = f"transform {spec!r} needs settings: {{{spec}: {{...}}}}"
        else:
            msg = f"unknown transform {spec!r}{hint}; known: {', '.join(known)}"
        raise ValueError(msg)
    return spec


def chain(names: list[Any]) -> Callable[[Any], Any]:
    """One function applying the transforms in order (``null`` stays ``null``).

    Each is a name of :data:`TRANSFORMS` or ``{name: settings}`` of :data:`PARAMETERISED`.
    """
    fns = [
        TRANSFORMS[n] if isinstance(n, str)
        else _with_params(*next(iter(check_transform(n).items())))
        for n in names
    ]

    def apply(value: Any) -> Any:
        for fn in fns:
            if value is None:
                return None
            value = fn(value)
        return value

    return apply
