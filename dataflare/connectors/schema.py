"""Schema helpers of the database and API sources: discovery, JSON values and output checks.

- :func:`json_value` turns what a database driver returns (``datetime``, ``Decimal``,
  ``UUID``, ``bytes``...) into the JSON-like values records carry, the same way for a
  snapshot read and for a decoded change, so a row looks alike whichever path it took.
  Every value it returns is one the JSON encoders take (no integer beyond 64 bits).
- :func:`infer_schema` infers a JSON Schema from sample records (REST APIs);
  :func:`column_schema` maps database column types to JSON Schema.
- :class:`OutputSchemaCheck` checks records against a source's ``output_schema`` and turns
  violations into :class:`~dataflare.records.Failed` entries (the source's error policy
  then applies).
- :func:`discover` is the entry point of ``dataflare discover``: for a built source
  context it returns the tables/columns (databases) or the inferred record schema (APIs).
  Connector modules register their discovery function with :func:`discoverer`.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson

from dataflare.records import META, Failed, RecordError

_dumps, _EncodeError = orjson.dumps, orjson.JSONEncodeError

DiscoverFn = Callable[[Any], dict[str, Any]]
_DISCOVERERS: dict[str, DiscoverFn] = {}


def discoverer(type_name: str) -> Callable[[DiscoverFn], DiscoverFn]:
    """Register the schema discovery function of the source type ``type_name``."""

    def deco(fn: DiscoverFn) -> DiscoverFn:
        _DISCOVERERS[type_name] = fn
        return fn

    return deco


def discoverable() -> list[str]:
    """Source types that support discovery."""
    from dataflare import registry

    registry.load()
    return sorted(_DISCOVERERS)


def discover(ctx: Any) -> dict[str, Any]:
    """Describe what the source of ``ctx`` (a ``BuildContext``) would read.

    Databases answer ``{"type", "tables": [{"schema", "name", "primary_key", "columns":
    [{"name", "type", "nullable"}], "json_schema"}]}``; APIs answer ``{"type", "url",
    "sampled", "json_schema"}``. Raises ``ValueError`` for a type without discovery.
    """
    from dataflare import registry

    registry.load()
    type_name = ctx.component.type
    fn = _DISCOVERERS.get(type_name)
    if fn is None:
        msg = (
            f"source '{ctx.step_id}': type '{type_name}' does not support discovery "
            f"(supported: {', '.join(sorted(_DISCOVERERS)) or 'none'})"
        )
        raise ValueError(msg)
    return fn(ctx)


DecimalHandling = Literal["number", "string", "float"]
DECIMAL_HANDLING = (
    "How `numeric`/`decimal` values come. `number`: an integer when written without "
    "decimals and within 64 bits, else a float when its shortest text is the exact value, "
    "else the exact decimal text (nothing is rounded, but a column may mix numbers and "
    "strings; NaN and Infinity come as text). `string`: always the exact decimal text "
    "('12.50'). `float`: always a float (may round)."
)

JSON_NUMBERS = (
    "How the JSON's numbers come. `number`: as JSON parsers read them, except a number a "
    "float would round (an integer beyond 64 bits, a fraction of more than 15 digits), "
    "which comes as its exact text. `string`: every number with a fraction or an exponent "
    "as its exact text ('12.50'). `float`: as floats, rounded where they must be (no check: "
    "the fastest)."
)

_INT64 = range(-(2**63), 2**63)
JSON_INTS = range(-(2**63), 2**64)  # what the JSON encoders (orjson) take
_NUMBERISH = bytes.maketrans(b"0123456789.", b"0" * 11)
_LONG_RUN = b"0" * 16  # 15 significant digits always survive a float
_RUN = re.compile(rb"-?[0-9][0-9.]{15,}")


def json_loader(handling: DecimalHandling = "number") -> Callable[[bytes | str], Any]:
    """``orjson.loads`` with the JSON's numbers as ``handling`` says (``JSON_NUMBERS``).

    orjson reads an integer beyond 64 bits and every fraction as a float. With ``number``
    a text holding a run of 16 digits and dots or more (rare: it costs one ``translate``
    per text to find) is checked, and read again exactly when a float would round one.
    """
    loads = orjson.loads
    if handling == "float":
        return loads
    if handling == "string":
        def load_text(data: bytes | str) -> Any:
            loads(data)  # orjson's errors, as on the fast path
            return _exact_loads(data, str)

        return load_text

    def load(data: bytes | str) -> Any:
        doc = loads(data)
        raw = data.encode() if isinstance(data, str) else data
        if _LONG_RUN in raw.translate(_NUMBERISH) and _rounds(raw):
            return _exact_loads(raw, exact_float)
        return doc

    load.fast = loads  # type: ignore[attr-defined] # see batch_loader
    return load


def batch_loader(loads: Callable[[bytes], Any], texts: list[bytes]) -> Callable[[bytes], Any]:
    """The loader of a batch of JSON ``texts``: ``loads`` (a :func:`json_loader`) or orjson's.

    orjson's where ``loads`` is ``number``'s and no text holds a run of 16 digits or more.
    One scan of the whole batch instead of one per text: the check costs about a third
    of the parse per text, the scan of a joined batch a tenth.
    """
    fast = getattr(loads, "fast", None)
    if fast is not None and _LONG_RUN not in b"\n".join(texts).translate(_NUMBERISH):
        return fast
    return loads


def json_error(exc: ValueError, text: str) -> str:
    """A JSON parse error of ``text`` (``"the line"``) placed in it, other errors as they are.

    The parsers say ``line 1 column 10 (char 9)``, which beside a record's own position
    (a file's line 2) reads as a second, contradicting line number.
    """
    import json

    if not isinstance(exc, json.JSONDecodeError):
        return str(exc)
    if not exc.doc[exc.pos:].strip():
        return f"{exc.msg}, at the end of {text}"
    where = f"line {exc.lineno}, column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
    return f"{exc.msg}, at {where} of {text}"


def _exact_loads(data: bytes | str, parse_float: Callable[[str], Any]) -> Any:
    """JSON ``data`` (which orjson read) with exact numbers: ``parse_float`` for fractions."""
    import json

    return json.loads(data, parse_float=parse_float, parse_int=_exact_int)


def _exact_int(text: str) -> int | str:
    n = int(text)
    return n if n in JSON_INTS else text


def exact_float(text: str) -> float | str:
    """The float of a decimal ``text`` where it is exact, else ``text`` itself."""
    f = float(text)
    return f if f - f == 0 and Decimal(text) == Decimal(repr(f)) else text


def _rounds(raw: bytes) -> bool:
    """Whether a float would round a number of the JSON text ``raw``."""
    for m in _RUN.finditer(raw):
        text = m[0].decode()
        if text.count(".") > 1 or text.endswith("."):
            continue  # no number (a date, a version in a string)
        if isinstance((exact_float if "." in text else _exact_int)(text), str):
            return True
    return False


class UnconvertibleValue(ValueError):
    """A value the database driver could not convert, standing in a row for that value.

    ``text`` is the value as the server sent it. :func:`json_value` raises it, so only the
    record it belongs to fails.
    """

    def __init__(self, text: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.text, self.cause = text, cause


def decimal_value(value: Decimal, handling: DecimalHandling = "number") -> int | float | str:
    """A ``numeric``/``decimal`` value as ``handling`` says (see ``DECIMAL_HANDLING``)."""
    if handling == "float":
        return float(value)
    if handling == "number" and value.is_finite():
        if int(value.as_tuple().exponent) >= 0:
            n = int(value)
            if n in _INT64:
                return n
        else:
            f = float(value)
            if Decimal(repr(f)) == value:
                return f
    return format(value, "f")


def record_line(record: Any) -> bytes:
    """A record as a destination writes it, as one line of JSON: without ``_meta``.

    :func:`json_line` of :func:`~dataflare.records.without_meta`, in one call (this runs
    for every record written).
    """
    if isinstance(record, dict) and META in record:
        record = record.copy()  # a C copy and one delete
        del record[META]
    try:
        return _dumps(record, default=json_value) + b"\n"
    except _EncodeError:
        return json_line(record)


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON, as :func:`json_line` writes it (a big integer as its text)."""
    return json_line(value)[:-1]


def json_line(record: Any, option: int = 0) -> bytes:
    """A record as one line of JSON.

    Values JSON has no form for go through :func:`json_value` (bytes, dates, integers
    beyond 64 bits).
    """
    try:
        return _dumps(record, default=json_value, option=option) + b"\n"
    except _EncodeError:  # a big integer: orjson raises before asking default
        try:
            return orjson.dumps(json_value(record), default=str, option=option) + b"\n"
        except (orjson.JSONEncodeError, RecursionError) as exc:
            if isinstance(record, dict) and "error" in record and "record" in record:
                # A dead letter of such a record keeps the record as text (a repr).
                return json_line({**record, "record": repr(record["record"])[:100_000]}, option)
            msg = f"the record cannot be written as JSON: {exc}"
            if "Recursion" in str(exc) or isinstance(exc, RecursionError):
                msg = "the record is nested too deeply to be written as JSON (over 254 levels)"
            raise RecordError(msg) from None


def json_value(value: Any, decimals: DecimalHandling = "number") -> Any:
    """A driver value as a JSON-like value (timestamps as ISO-8601 text, bytes as hex).

    ``decimals`` is how ``Decimal`` values come (see ``DECIMAL_HANDLING``); an integer
    beyond what JSON encoders take comes as its text. Raises :class:`UnconvertibleValue`
    when it meets one.
    """
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if value in JSON_INTS else str(value)
    if isinstance(value, Decimal):
        return decimal_value(value, decimals)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): json_value(v, decimals) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v, decimals) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(json_value(v, decimals) for v in value)
    if isinstance(value, UnconvertibleValue):
        raise value
    return str(value)


def b64(value: bytes) -> str:
    """Bytes as base64 text."""
    return base64.b64encode(value).decode("ascii")


# -- JSON Schema of database columns and sample records ------------------------------------

_SQL_TYPES: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("bool", "boolean"), {"type": "boolean"}),
    (
        (
            "smallint",
            "integer",
            "bigint",
            "int",
            "int2",
            "int4",
            "int8",
            "tinyint",
            "mediumint",
            "serial",
            "bigserial",
            "smallserial",
            "year",
        ),
        {"type": "integer"},
    ),
    (("real", "double", "float", "float4", "float8"), {"type": "number"}),
    (("timestamp", "timestamptz", "datetime"), {"type": "string", "format": "date-time"}),
    (("date",), {"type": "string", "format": "date"}),
    (("time",), {"type": "string", "format": "time"}),
    (("uuid",), {"type": "string", "format": "uuid"}),
    (("json", "jsonb"), {}),
    (("interval",), {"type": "number"}),
)


_DECIMAL_TYPES = ("numeric", "decimal", "money")
_PRECISION = re.compile(r"\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)")


def _decimal_schema(sql_type: str, handling: DecimalHandling) -> dict[str, Any]:
    if handling == "string":
        return {"type": "string"}
    if handling == "float":
        return {"type": "number"}
    m = _PRECISION.search(sql_type)
    precision, scale = (int(m[1]), int(m[2] or 0)) if m else (None, None)
    if precision is not None and scale == 0 and precision <= 18:
        return {"type": "integer"}
    if precision is not None and precision <= 15:  # a double keeps 15 digits exactly
        return {"type": "number"}
    return {"type": ["number", "string"]}


def column_schema(sql_type: str, decimals: DecimalHandling = "number") -> dict[str, Any]:
    """The JSON Schema of the values a column of ``sql_type`` produces in records."""
    t = sql_type.lower().strip()
    if t.endswith("[]") or t.startswith("_") or t == "array":
        return {"type": "array"}
    if t in ("bit(1)", "tinyint(1)"):
        return {"type": "boolean"}
    base = t.split("(")[0].strip()
    if base.split(" ")[0] in _DECIMAL_TYPES:
        return _decimal_schema(t, decimals)
    for names, schema in _SQL_TYPES:
        for name in names:
            if base == name or base.startswith(name + " "):
                return dict(schema)
    return {"type": "string"}


def table_json_schema(
    columns: Iterable[dict[str, Any]], decimals: DecimalHandling = "number"
) -> dict[str, Any]:
    """A JSON Schema of a table's records from its discovered columns."""
    props: dict[str, Any] = {}
    required = []
    for col in columns:
        schema = column_schema(col["type"], decimals)
        if col.get("nullable", True) and "type" in schema:
            types = schema["type"]
            schema["type"] = [*(types if isinstance(types, list) else [types]), "null"]
        elif not col.get("nullable", True):
            required.append(col["name"])
        props[col["name"]] = schema
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def _value_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    types_a = a.get("type", [])
    types_b = b.get("type", [])
    types = sorted(
        set(types_a if isinstance(types_a, list) else [types_a])
        | set(types_b if isinstance(types_b, list) else [types_b])
    )
    if "integer" in types and "number" in types:
        types.remove("integer")
    out: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
    if "object" in types:
        props = dict(a.get("properties", {}))
        for k, v in b.get("properties", {}).items():
            props[k] = _merge(props[k], v) if k in props else v
        out["properties"] = props
    if "array" in types:
        items_a, items_b = a.get("items"), b.get("items")
        if items_a and items_b:
            out["items"] = _merge(items_a, items_b)
        elif items_a or items_b:
            out["items"] = items_a or items_b
    return out


def infer_value_schema(value: Any) -> dict[str, Any]:
    """The JSON Schema of one value (objects and arrays recursively)."""
    t = _value_type(value)
    out: dict[str, Any] = {"type": t}
    if t == "object":
        out["properties"] = {str(k): infer_value_schema(v) for k, v in value.items()}
    elif t == "array" and value:
        items = infer_value_schema(value[0])
        for v in value[1:]:
            items = _merge(items, infer_value_schema(v))
        out["items"] = items
    return out


def infer_schema(records: Iterable[Any]) -> dict[str, Any]:
    """A JSON Schema covering every sample record; fields missing somewhere become optional."""
    schema: dict[str, Any] | None = None
    seen: dict[str, int] = {}
    count = 0
    for record in records:
        if not isinstance(record, dict):
            continue
        count += 1
        body = {k: v for k, v in record.items() if k != META}
        for k in body:
            seen[k] = seen.get(k, 0) + 1
        s = infer_value_schema(body)
        schema = s if schema is None else _merge(schema, s)
    if schema is None:
        return {"type": "object", "properties": {}}
    required = sorted(k for k, n in seen.items() if n == count)
    if required:
        schema["required"] = required
    return schema


# -- output_schema checks -------------------------------------------------------------------


class OutputSchemaCheck:
    """Checks records against a source's ``output_schema`` (JSON Schema).

    The compiler applies it to every source that declares one. Records that violate the
    schema become :class:`Failed` entries of the step; ``_meta`` is not checked.
    """

    def __init__(self, step_id: str, definition: dict[str, Any]) -> None:
        try:
            import jsonschema
        except ModuleNotFoundError as exc:  # pragma: no cover - jsonschema is a dependency
            msg = "output_schema needs the 'jsonschema' package: pip install jsonschema"
            raise ModuleNotFoundError(msg) from exc
        cls = jsonschema.validators.validator_for(definition)
        try:
            cls.check_schema(definition)
        except jsonschema.SchemaError as exc:
            msg = (
                f"source '{step_id}': output_schema.definition is not a valid JSON Schema: "
                f"{exc.message}"
            )
            raise ValueError(msg) from None
        self.step_id = step_id
        self._validator = cls(definition, format_checker=cls.FORMAT_CHECKER)

    @classmethod
    def of(cls, step_id: str, component: Any) -> OutputSchemaCheck | None:
        """The check of a source component, or ``None`` when it declares no output_schema."""
        schema = getattr(component, "output_schema", None)
        if schema is None:
            return None
        return cls(step_id, schema.definition)

    def violation(self, record: dict[str, Any]) -> str | None:
        """The first violation of ``record`` as text, or ``None`` when it conforms."""
        body = {k: v for k, v in record.items() if k != META}
        errors = sorted(self._validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if not errors:
            return None
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "record"
        return f"{where}: {err.message}"

    def check(self, batch: list[Any]) -> list[Any]:
        """The batch with every non-conforming record replaced by a ``Failed`` entry."""
        out: list[Any] = []
        for item in batch:
            if isinstance(item, dict):
                problem = self.violation(item)
                if problem is not None:
                    meta = item.get(META, {})
                    item = Failed(
                        self.step_id,
                        "SchemaViolation",
                        f"source '{self.step_id}': record does not match output_schema: {problem}",
                        item,
                        dict(meta) if isinstance(meta, dict) else {},
                    )
            out.append(item)
        return out
