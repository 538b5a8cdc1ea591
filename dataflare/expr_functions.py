"""The functions of the expression language beyond the basics of :mod:`dataflare.expr`.

Text (``substring``, ``slice``, ``replace``, ``split``, ``join``), regular expressions
(``regex_match``, ``regex_extract``, ``regex_replace``: a literal pattern is compiled once,
when the expression is), time (``parse_timestamp``, ``format_timestamp``, ``to_timezone``,
``days_between``), JSON (``parse_json``, ``to_json``), digests (``sha256``, ``hmac``),
lists (``first``, ``last``, ``sum``), casts (``int``, ``float``, ``string``, ``bool``) and
geography (``haversine``).

Every function returns ``null`` when its first argument is ``null``; a value of the wrong
kind is a record error (handled by the step's error policy).
"""

from __future__ import annotations

import hashlib
import hmac as hmac_lib
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from dataflare.operators.transforms import to_bool, to_float, to_int, to_string
from dataflare.records import RecordError, iso_utc, to_epoch_seconds


def _describe(value: Any) -> str:
    return f"{type(value).__name__} ({repr(value)[:40]})"


def _need(name: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        msg = f"{name}() expects {what}, got {_describe(value)}"
        raise RecordError(msg)


def _nullable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` returning ``null`` when its first argument is ``null``."""

    def apply(value: Any, *args: Any) -> Any:
        return None if value is None else fn(value, *args)

    apply.__name__ = fn.__name__
    return apply


# Text ---------------------------------------------------------------------------------

def _slice(value: Any, start: Any, end: Any = None) -> Any:
    _need("slice", value, (str, list), "a string or a list")
    _need("slice", start, int, "an integer start")
    if end is not None:
        _need("slice", end, int, "an integer end")
    return value[start:end]


def _substring(value: Any, start: Any, end: Any = None) -> Any:
    _need("substring", value, str, "a string")
    return _slice(value, start, end)


def _replace(value: Any, old: Any, new: Any) -> str:
    _need("replace", value, str, "a string")
    _need("replace", old, str, "a string to replace")
    _need("replace", new, str, "a replacement string")
    return str(value).replace(old, new)


def _split(value: Any, sep: Any) -> list[str]:
    _need("split", value, str, "a string")
    _need("split", sep, str, "a separator string")
    if not sep:
        msg = "split() needs a non-empty separator"
        raise RecordError(msg)
    return str(value).split(sep)


def _join(value: Any, sep: Any = "") -> str:
    _need("join", value, list, "a list")
    _need("join", sep, str, "a separator string")
    return str(sep).join(to_string(v) for v in value if v is not None)


# Regular expressions ------------------------------------------------------------------

@lru_cache(maxsize=256)
def regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled (cached); ``ValueError`` saying why when it is not valid."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        msg = f"invalid regular expression {pattern!r}: {exc}"
        raise ValueError(msg) from None


def _pattern(name: str, pattern: Any) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    _need(name, pattern, str, "a pattern string")
    try:
        return regex(pattern)
    except ValueError as exc:
        raise RecordError(str(exc)) from None


def _regex_match(value: Any, pattern: Any) -> bool:
    _need("regex_match", value, str, "a string")
    return _pattern("regex_match", pattern).search(value) is not None


def _regex_extract(value: Any, pattern: Any, group: Any = None) -> Any:
    """The first match: its group ``group``, else its first group, else the whole match."""
    _need("regex_extract", value, str, "a string")
    compiled = _pattern("regex_extract", pattern)
    m = compiled.search(value)
    if m is None:
        return None
    if group is None:
        group = 1 if compiled.groups else 0
    try:
        return m.group(group)
    except IndexError:
        msg = f"regex_extract(): no group {group!r} in {compiled.pattern!r}"
        raise RecordError(msg) from None


def _regex_replace(value: Any, pattern: Any, replacement: Any) -> str:
    _need("regex_replace", value, str, "a string")
    _need("regex_replace", replacement, str, "a replacement string")
    try:
        return _pattern("regex_replace", pattern).sub(replacement, value)
    except re.error as exc:
        msg = f"regex_replace(): invalid replacement {replacement!r}: {exc}"
        raise RecordError(msg) from None


# Time ---------------------------------------------------------------------------------

def _zone(name: str, tz: Any) -> ZoneInfo:
    _need(name, tz, str, "an IANA time zone name")
    try:
        return zone(tz)
    except ValueError as exc:
        msg = f"{name}(): {exc}"
        raise RecordError(msg) from None


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ``ValueError`` when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        msg = f"unknown time zone {name!r}"
        raise ValueError(msg) from None


def _moment(name: str, value: Any) -> datetime:
    """A timestamp (ISO-8601, epoch seconds, or ``'now'``) as an aware datetime."""
    if value == "now":
        return datetime.now(UTC)
    try:
        seconds = to_epoch_seconds(value)
        return datetime.fromtimestamp(seconds, tz=UTC)
    except RecordError as exc:
        msg = f"{name}(): {exc}"
        raise RecordError(msg) from None
    except (ValueError, OverflowError, OSError):
        msg = f"{name}(): timestamp {value!r} is out of range"
        raise RecordError(msg) from None


def _parse_timestamp(value: Any, fmt: Any = None, tz: Any = "UTC") -> str:
    """ISO-8601 UTC text of ``value`` read with the strptime ``fmt`` (naive: in ``tz``)."""
    if fmt is None:
        return iso_utc(_moment("parse_timestamp", value).timestamp())
    _need("parse_timestamp", value, str, "a string")
    _need("parse_timestamp", fmt, str, "a format string")
    try:
        dt = datetime.strptime(value, fmt)
    except ValueError:
        msg = f"parse_timestamp(): {value!r} does not match the format {fmt!r}"
        raise RecordError(msg) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_zone("parse_timestamp", tz))
    return iso_utc(dt.timestamp())


_FORMATTED: dict[tuple[Any, ...], str] = {}
"""Recent ``format_timestamp`` results: records of a window or a minute share the text."""


def _format_timestamp(value: Any, fmt: Any, tz: Any = "UTC") -> str:
    cacheable = value.__class__ in (int, float, str) and value != "now"
    key = (value.__class__, value, fmt, tz)
    if cacheable and fmt.__class__ is str and tz.__class__ is str:
        text = _FORMATTED.get(key)
        if text is not None:
            return text
    _need("format_timestamp", fmt, str, "a format string")
    text = _moment("format_timestamp", value).astimezone(_zone("format_timestamp", tz)).strftime(
        fmt
    )
    if cacheable:
        if len(_FORMATTED) >= 10_000:
            _FORMATTED.clear()
        _FORMATTED[key] = text
    return text


def _to_timezone(value: Any, tz: Any) -> str:
    local = _moment("to_timezone", value).astimezone(_zone("to_timezone", tz))
    return local.isoformat(timespec="milliseconds" if local.microsecond else "seconds")


def _days_between(start: Any, end: Any) -> Any:
    """Whole days from ``start`` to ``end`` (negative when ``end`` is earlier)."""
    if end is None:
        return None
    delta = _moment("days_between", end) - _moment("days_between", start)
    return int(delta.total_seconds() / 86400)


# JSON, digests, lists, casts ----------------------------------------------------------

def _parse_json(value: Any) -> Any:
    _need("parse_json", value, str, "a string")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        msg = f"parse_json(): not JSON ({exc})"
        raise RecordError(msg) from None


def _to_json(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_SORT_KEYS).decode()


def _text_bytes(value: Any) -> bytes:
    return (value if isinstance(value, str) else to_string(value)).encode()


def _sha256(value: Any) -> str:
    return hashlib.sha256(_text_bytes(value)).hexdigest()


def _hmac(value: Any, key: Any) -> str:
    """HMAC-SHA256 of ``value`` under ``key``, in hex."""
    _need("hmac", key, str, "a key string")
    return hmac_lib.new(str(key).encode(), _text_bytes(value), hashlib.sha256).hexdigest()


def _first(value: Any) -> Any:
    _need("first", value, (list, str), "a list or a string")
    return value[0] if value else None


def _last(value: Any) -> Any:
    _need("last", value, (list, str), "a list or a string")
    return value[-1] if value else None


def _sum(value: Any) -> Any:
    _need("sum", value, list, "a list")
    total: int | float = 0
    for item in value:
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, int | float):
            msg = f"sum() expects a list of numbers, got an item {_describe(item)}"
            raise RecordError(msg)
        total += item
    return total


_EARTH_RADIUS = {"km": 6371.0088, "m": 6_371_008.8, "mi": 3958.7613}


def _haversine(lat1: Any, lon1: Any, lat2: Any, lon2: Any, unit: Any = "km") -> Any:
    """Great-circle distance between two points given in decimal degrees."""
    coords = (lat1, lon1, lat2, lon2)
    if any(c is None for c in coords):
        return None
    for c in coords:
        _need("haversine", c, (int, float), "coordinates in decimal degrees")
    if unit not in _EARTH_RADIUS:
        msg = f"haversine(): unknown unit {unit!r}; known: {', '.join(_EARTH_RADIUS)}"
        raise RecordError(msg)
    if not (-90 <= lat1 <= 90 and -90 <= lat2 <= 90):
        msg = f"haversine(): latitude out of range [-90, 90] ({lat1!r}, {lat2!r})"
        raise RecordError(msg)
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_RADIUS[unit] * math.asin(min(1.0, math.sqrt(h)))


MORE_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "substring": (_nullable(_substring), 2, 3),
    "slice": (_nullable(_slice), 2, 3),
    "replace": (_nullable(_replace), 3, 3),
    "split": (_nullable(_split), 2, 2),
    "join": (_nullable(_join), 1, 2),
    "regex_match": (_nullable(_regex_match), 2, 2),
    "regex_extract": (_nullable(_regex_extract), 2, 3),
    "regex_replace": (_nullable(_regex_replace), 3, 3),
    "parse_timestamp": (_nullable(_parse_timestamp), 1, 3),
    "format_timestamp": (_nullable(_format_timestamp), 2, 3),
    "to_timezone": (_nullable(_to_timezone), 2, 2),
    "days_between": (_nullable(_days_between), 2, 2),
    "parse_json": (_nullable(_parse_json), 1, 1),
    "to_json": (_to_json, 1, 1),
    "sha256": (_nullable(_sha256), 1, 1),
    "hmac": (_nullable(_hmac), 2, 2),
    "first": (_nullable(_first), 1, 1),
    "last": (_nullable(_last), 1, 1),
    "sum": (_nullable(_sum), 1, 1),
    "int": (_nullable(to_int), 1, 1),
    "float": (_nullable(to_float), 1, 1),
    "string": (_nullable(to_string), 1, 1),
    "bool": (_nullable(to_bool), 1, 1),
    "haversine": (_haversine, 4, 5),
}
"""Functions added to :data:`dataflare.expr.FUNCTIONS`: name -> (function, arguments)."""

REGEX_ARGUMENT = {"regex_match": 1, "regex_extract": 1, "regex_replace": 1}
"""Functions whose argument at this index is a pattern, compiled once when it is a literal."""

ZONE_ARGUMENT = {"to_timezone": 1, "format_timestamp": 2, "parse_timestamp": 2}
"""Functions whose argument at this index is a time zone, checked once when a literal."""

EXAMPLES: dict[str, tuple[str, str]] = {
    "lower": ("lower(email)", "'a@b.c' for 'A@B.C'"),
    "upper": ("upper(country)", "'FR' for 'fr'"),
    "trim": ("trim(name)", "'Ann' for '  Ann '"),
    "len": ("len(items)", "the length of a list, string or object"),
    "abs": ("abs(delta)", "5 for -5"),
    "round": ("round(price, 2)", "9.99 for 9.987"),
    "floor": ("floor(score)", "3 for 3.7"),
    "coalesce": ("coalesce(nickname, name, 'anonymous')", "the first argument not null"),
    "contains": ("contains(tags, 'vip')", "true when the list (or string) holds it"),
    "starts_with": ("starts_with(sku, 'AB')", "true for 'AB-1'"),
    "ends_with": ("ends_with(email, '.org')", "true for 'x@y.org'"),
    "now": ("now() - created_at_epoch > 7d", "the current time in epoch seconds"),
    "substring": ("substring(sku, 0, 3)", "'ABC' for 'ABC-123'"),
    "slice": ("slice(tags, 1)", "['b', 'c'] for ['a', 'b', 'c'] (also strings)"),
    "replace": ("replace(phone, '-', '')", "'5551234' for '555-1234'"),
    "split": ("split(path, '/')", "['a', 'b'] for 'a/b'"),
    "join": ("join(tags, ',')", "'a,b' for ['a', 'b'] (nulls left out)"),
    "regex_match": ("regex_match(email, '@example\\.com$')", "true for 'x@example.com'"),
    "regex_extract": ("regex_extract(url, 'id=(\\d+)')",
                      "'42' for '/p?id=42' (first group, else the whole match; null if none)"),
    "regex_replace": ("regex_replace(card, '\\d(?=\\d{4})', '*')",
                      "'************1234' for '4111111111111234'"),
    "parse_timestamp": ("parse_timestamp(day, '%d/%m/%Y %H:%M', 'Europe/Paris')",
                        "'2024-03-01T09:30:00Z' for '01/03/2024 10:30' (ISO-8601 UTC)"),
    "format_timestamp": ("format_timestamp(ts, '%Y-%m-%d', 'Asia/Tokyo')",
                         "'2024-01-02' for '2024-01-01T20:00:00Z'"),
    "to_timezone": ("to_timezone(ts, 'America/New_York')",
                    "'2024-01-01T07:00:00-05:00' for '2024-01-01T12:00:00Z'"),
    "days_between": ("days_between(last_order_date, 'now')",
                     "whole days from the first to the second ('now': the current time)"),
    "parse_json": ("parse_json(payload)", "the value of the JSON text ({'a': 1} for '{\"a\":1}')"),
    "to_json": ("to_json(customer)", "'{\"id\":1,\"name\":\"a\"}' (keys sorted)"),
    "sha256": ("sha256(email)", "hex SHA-256 of the text"),
    "hmac": ("hmac(email, '${HASH_KEY}')", "hex HMAC-SHA256 of the text under the key"),
    "first": ("first(items)", "the first item (null when empty)"),
    "last": ("last(items)", "the last item (null when empty)"),
    "sum": ("sum(amounts)", "the sum of the numbers (nulls left out)"),
    "int": ("int('42')", "42 (a fractional value is an error)"),
    "float": ("float('2.5')", "2.5"),
    "string": ("string(42)", "'42' (JSON text for lists and objects)"),
    "bool": ("bool('yes')", "true (yes/no, true/false, 1/0, on/off)"),
    "haversine": ("haversine(from.lat, from.lon, to.lat, to.lon, 'km')",
                  "great-circle distance (units km, m, mi); 343.6 from Paris to London"),
}
"""An example of each function, for the reference docs."""
