"""Records, paths, durations and timestamps: the data model every component shares.

A record is a JSON-like ``dict``. Streams between components carry *batches*
(``list[dict]``) so that every operator pays one Python call per batch, not per record.
The reserved key ``_meta`` holds where a record came from (file and line, topic,
partition and offset, CDC operation...); destinations never write it as a column.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from dataflare import secrets

RUN_ID_ENV = "DATAFLARE_RUN_ID"
"""The run's id: kept in the recovery directory by ``dataflare run``; in dead letters."""

META = "_meta"
DEAD_LETTER = "dead_letter"
"""The ``_meta`` key marking a dead letter on its way to its destination."""
INPUT = "input"
"""The ``_meta`` key naming the input component a record reached a destination from
(set for destinations that ask for it, such as a ``{{source}}`` path template)."""

Record = dict[str, Any]
Batch = list[Any]

_MISSING = object()


def get_path(record: Any, path: str, default: Any = None) -> Any:
    """Value at a dotted ``path`` (``customer.email``); ``default`` when any part is missing."""
    if "." not in path:
        if isinstance(record, dict):
            return record.get(path, default)
        return default
    cur = record
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
            if cur is _MISSING:
                return default
        else:
            return default
    return cur


def getter(path: str) -> Callable[[Any], Any]:
    """A fast reader for one dotted path, resolved once instead of per record."""
    if "." not in path:

        def get_flat(record: Any) -> Any:
            return record.get(path) if isinstance(record, dict) else None

        return get_flat
    parts = tuple(path.split("."))
    if len(parts) == 2:  # the common case, without a loop
        outer, inner = parts

        def get_two(record: Any) -> Any:
            if isinstance(record, dict):
                record = record.get(outer)
                if isinstance(record, dict):
                    return record.get(inner)
            return None

        return get_two

    def get_nested(record: Any) -> Any:
        cur = record
        for part in parts:
            if not isinstance(cur, dict):
                return None
            cur = cur.get(part)
        return cur

    return get_nested


def set_path(record: dict[str, Any], path: str, value: Any) -> None:
    """Write ``value`` at a dotted ``path``, creating (or copying) the nested dicts on the way.

    Nested dicts on the path are copied before they are changed, so a record that shares
    sub-dicts with another (a fan-out, a shallow copy) never changes the other.
    """
    if "." not in path:
        record[path] = value
        return
    parts = path.split(".")
    cur = record
    for part in parts[:-1]:
        nxt = cur.get(part)
        nxt = dict(nxt) if isinstance(nxt, dict) else {}
        cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def without_meta(record: Any) -> Any:
    """The record as a destination writes it: without the reserved ``_meta`` key."""
    if isinstance(record, dict) and META in record:
        out = record.copy()  # a C copy and one delete: 3x a comprehension's speed
        del out[META]
        return out
    return record


def a_or_an(word: str) -> str:
    """``word`` after its indefinite article: "an int", "a str"."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


_JSON_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def exact_number_hint(*values: Any) -> str:
    """A hint for a value a number was expected as, when it is a JSON number's exact text.

    Sources give a number a float would round (17 digits, beyond 64 bits) as its text.
    """
    if not any(isinstance(v, str) and _JSON_NUMBER.fullmatch(v) for v in values):
        return ""
    return ("; a number's text: convert it (to_float), or, for a JSON number a float would "
            "round (kept as its exact text), set the source's decimal_handling: float")


def message_of(exc: BaseException) -> str:
    """An exception's message as users read it.

    Its ``dataflare_text`` when one was set (a driver's error tied to the record it
    refused), else ``str(exc)``.
    """
    return getattr(exc, "dataflare_text", None) or str(exc)


def describe_position(meta: Any) -> str:
    """Human-readable position of a record from its ``_meta`` (``orders.jsonl:17``)."""
    if not isinstance(meta, dict):
        return "unknown position"
    if "file" in meta:
        if "line" in meta:
            return f"{meta['file']}:{meta['line']}"
        if "index" in meta:
            return f"{meta['file']} record {meta['index']}"
        return str(meta["file"])
    if "topic" in meta:
        return f"{meta['topic']}[{meta.get('partition')}]@{meta.get('offset')}"
    if "lsn" in meta:
        return f"{meta.get('table', '?')} lsn {meta['lsn']}"
    parts = [f"{k}={v}" for k, v in meta.items() if k not in ("key", "headers", "source")]
    return ", ".join(parts) if parts else "unknown position"


@dataclass(slots=True)
class Failed:
    """A record that a step could not handle, on its way to the step's error policy.

    ``record`` is the original record (for an undecodable source record: its raw text);
    ``meta`` is its position (``_meta``), kept apart because raw text has no ``_meta``.
    """

    step: str
    type: str
    message: str
    record: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, step: str, exc: BaseException, record: Any) -> Failed:
        """The failure of ``record`` in ``step`` by the exception ``exc``."""
        meta = record.get(META, {}) if isinstance(record, dict) else {}
        return cls(step, type(exc).__name__, str(exc), record, meta)

    def position(self) -> str:
        """Where the failed record came from."""
        return describe_position(self.meta)

    def as_record(
        self,
        mask: Mask | None = None,
        *,
        component: str | None = None,
        run_id: str | None = None,
        at: str | None = None,
    ) -> Record:
        """The dead letter: ``{"error": {...}, "source": {component, position}, "record"}``.

        ``error`` holds ``step, type, message, at, run_id``; ``source.position`` is the
        record's ``_meta`` where it entered (file and line, topic, partition, offset and
        key, table and LSN), ``source.component`` the source step when known. ``mask``
        (masking rules) applies to the original, a record or raw text, and to the values
        the message quotes; no secret reaches the message or the position. Undecodable
        input stays text, or base64 of its bytes (then ``record_encoding: base64``); bytes
        nested in the record or its position become base64 text, so every destination can
        write the dead letter as JSON.
        """
        record, message = without_meta(self.record), self.message_masked(mask)
        if mask is not None and isinstance(record, dict):
            record = mask(record)
        elif mask is not None and isinstance(record, str):
            record = mask.text(record)
        meta = dict(self.meta or {})
        component = component or meta.pop("source", None)
        meta.pop("source", None)
        out: Record = {
            "error": {
                "step": self.step,
                "type": self.type,
                "message": message,
                "at": at or datetime.now(UTC).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "run_id": run_id or os.environ.get(RUN_ID_ENV),
            },
            "source": {"component": component,
                       "position": _json_safe(_scrubbed(meta)) if meta else None},
            "record": _json_safe(record),
        }
        if isinstance(record, bytes | bytearray | memoryview):
            out["record_encoding"] = "base64"
        out[META] = {DEAD_LETTER: True}  # told from a record of that shape (not written)
        return out

    def message_masked(self, mask: Mask | None) -> str:
        """The message, without secrets nor the clear values the masking rules hide."""
        message = self.message
        if mask is not None:
            message = mask.message(message, without_meta(self.record))
        return secrets.scrub(message)


def _scrubbed(value: Any) -> Any:
    """A JSON-like value with every string passed through the secret scrubber."""
    if isinstance(value, str):
        return secrets.scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    """``value`` with bytes (at any depth) as base64 text; copies only what changes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        out = {k: _json_safe(v) for k, v in value.items()}
        return value if all(out[k] is v for k, v in value.items()) else out
    if isinstance(value, list | tuple):
        items = [_json_safe(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


class Mask(Protocol):
    """Masking rules (``dataflare.masking.Masker``)."""

    def __call__(self, record: Record) -> Record:
        """A masked copy of ``record``."""

    def text(self, raw: str) -> str:
        """Masked raw text."""

    def message(self, message: str, record: Any) -> str:
        """``message`` without the clear values of ``record``."""


class RecordError(ValueError):
    """A record-level problem (bad value, bad type): handled by the step's error policy."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration such as ``100ms``, ``30s``, ``5m``, ``2h``, ``7d``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        msg = f"invalid duration {text!r} (expected e.g. '100ms', '30s', '5m', '2h', '7d')"
        raise ValueError(msg)
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


EPOCH_MIN, EPOCH_MAX = -62135596800, 253402300799  # epoch seconds of the years 1 to 9999


def _in_range(seconds: float, value: Any) -> float:
    """``seconds``, if it is a time a date can hold; a record error otherwise."""
    if not EPOCH_MIN <= seconds <= EPOCH_MAX:  # also NaN
        hint = " (epoch milliseconds? set time_unit: ms)" if seconds == seconds and \
            EPOCH_MAX < seconds <= EPOCH_MAX * 1000 else ""
        msg = f"timestamp {value!r} is out of range: not between the years 1 and 9999{hint}"
        raise RecordError(msg)
    return seconds


def to_epoch_seconds(value: Any, time_unit: str = "s") -> float:
    """Event time of ``value`` in epoch seconds.

    ISO-8601 strings (naive means UTC) or epoch numbers, in seconds or, with
    ``time_unit='ms'``, milliseconds.
    """
    if isinstance(value, bool) or value is None:
        msg = f"timestamp is {value!r}, expected an ISO-8601 string or epoch number"
        raise RecordError(msg)
    if isinstance(value, int | float):
        return _in_range(value / 1000.0 if time_unit == "ms" else float(value), value)
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                num = float(value)
            except ValueError:
                msg = f"timestamp {value!r} is not ISO-8601 nor an epoch number"
                raise RecordError(msg) from None
            return _in_range(num / 1000.0 if time_unit == "ms" else num, value)
    else:
        msg = (f"timestamp is {a_or_an(type(value).__name__)} ({value!r}), expected a string "
               "or number")
        raise RecordError(msg)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def iso_utc(epoch_seconds: float) -> str:
    """ISO-8601 UTC text for epoch seconds (``2024-01-01T00:00:00Z``)."""
    dt = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    text = dt.isoformat(timespec="milliseconds" if dt.microsecond else "seconds")
    return text.replace("+00:00", "Z")
