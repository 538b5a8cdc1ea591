"""The SQL column types a destination creates from its source's discovered schema.

A destination that creates its table infers each column's type from the values of the
first records (``bigint``, ``double precision``, ``text``, ``jsonb``...). When the records
come from a database table, that loses what the source knew: ``numeric(12,2)``,
``timestamptz``, ``uuid``, ``bytea``, ``text[]``, the primary key. :func:`source_columns`
finds the one database table upstream of a destination (a source's ``table``, or the one
table of a change stream that a batch's records carry in ``_meta.table``) and describes it
in PostgreSQL types (a PostgreSQL source's types as they are, a MySQL source's mapped);
:func:`compatible` tells whether the values a batch holds fit such a type (a
transformation may have changed a field), so a column only takes the source's type when
its values do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from dataflare.connectors.sql_writer import BOOL, FLOAT, INT, JSON, TEXT

log = logging.getLogger(__name__)

# PostgreSQL types a copied table may use (anything else, e.g. a user-defined enum of the
# source database, becomes the inferred type).
_PG_BUILTIN = re.compile(
    r"(boolean|smallint|integer|bigint|real|double precision|numeric(\(\d+(,\d+)?\))?|money"
    r"|text|character varying(\(\d+\))?|character(\(\d+\))?|date|time(stamp)?(\(\d\))?"
    r"( with(out)? time zone)?|interval|uuid|bytea|jsonb?|inet|cidr|macaddr|xml)(\[\])*"
)

_MYSQL_INTS = {"tinyint": "smallint", "smallint": "integer", "mediumint": "integer",
               "int": "bigint", "integer": "bigint", "bigint": "numeric(20)"}
_MYSQL_SIGNED = {"tinyint": "smallint", "smallint": "smallint", "mediumint": "integer",
                 "int": "integer", "integer": "integer", "bigint": "bigint"}
_MYSQL_OTHER = {
    "float": "real", "double": "double precision", "real": "double precision",
    # a MySQL TIME is a duration (-838:59:59 to 838:59:59), not a time of day
    "date": "date", "time": "interval", "datetime": "timestamp", "timestamp": "timestamp",
    "year": "smallint", "json": "jsonb", "bit": "bytea",
    "char": "text", "varchar": "text", "tinytext": "text", "text": "text",
    "mediumtext": "text", "longtext": "text", "enum": "text", "set": "text",
    "binary": "bytea", "varbinary": "bytea", "tinyblob": "bytea", "blob": "bytea",
    "mediumblob": "bytea", "longblob": "bytea",
}


def mysql_to_postgres(column_type: str) -> str | None:
    """The PostgreSQL type of a MySQL/MariaDB ``COLUMN_TYPE`` (None: no faithful one)."""
    t = column_type.lower().strip()
    if t in ("tinyint(1)", "bit(1)", "bool", "boolean"):
        return "boolean"
    m = re.match(r"([a-z]+)\s*(\(([\d,\s]+)\))?", t)
    if m is None:
        return None
    base, args = m[1], (m[3] or "").replace(" ", "")
    if base in _MYSQL_SIGNED:
        return (_MYSQL_INTS if "unsigned" in t else _MYSQL_SIGNED)[base]
    if base in ("decimal", "numeric", "dec", "fixed"):
        return f"numeric({args})" if args else "numeric"
    if base in ("char", "varchar") and args:
        return f"character varying({args})"
    return _MYSQL_OTHER.get(base)


def postgres_type(source_type: str, column_type: str) -> str | None:
    """A column of a ``source_type`` (postgres, mysql) database as a PostgreSQL type."""
    if source_type == "postgres":
        t = column_type.lower().strip()
        return t if _PG_BUILTIN.fullmatch(t) else None
    if source_type == "mysql":
        return mysql_to_postgres(column_type)
    return None


_DUCKDB_SAME = {"boolean": "BOOLEAN", "smallint": "SMALLINT", "integer": "INTEGER",
                "bigint": "BIGINT", "real": "REAL", "double precision": "DOUBLE",
                "text": "VARCHAR", "date": "DATE", "uuid": "UUID", "json": "JSON",
                "jsonb": "JSON", "timestamp without time zone": "TIMESTAMP",
                "timestamp": "TIMESTAMP", "timestamp with time zone": "TIMESTAMPTZ",
                "time without time zone": "TIME", "time": "TIME", "bytea": "BLOB"}


def duckdb_type(pg_type: str) -> str | None:
    """The DuckDB type of a PostgreSQL type (:func:`postgres_type`'s), if one is faithful.

    ``numeric(p,s)`` is ``DECIMAL(p,s)`` up to DuckDB's 38 digits, a bare or wider
    ``numeric`` ``VARCHAR`` (the exact text: its values come as numbers or, where a float
    would round them, text), ``bytea`` a ``BLOB``; arrays and the rest are typed from the
    values.
    """
    t = pg_type.lower()
    if t in _DUCKDB_SAME:
        return _DUCKDB_SAME[t]
    if t.startswith(("character varying", "character")) and not t.endswith("]"):
        return "VARCHAR"
    m = re.fullmatch(r"numeric(\((\d+)(,(\d+))?\))?", t)
    if m and m[2] and int(m[2]) <= 38:
        return f"DECIMAL({m[2]},{m[4] or 0})"
    if m:
        return "VARCHAR"
    return None


def compatible(sql_type: str, logical: str | None) -> bool:
    """Whether values of a ``logical`` type (:mod:`sql_writer`'s) fit ``sql_type``."""
    t = sql_type.lower()
    if logical is None or t.startswith("json"):
        return True
    if t.endswith("[]"):
        return logical == JSON  # records carry arrays as lists
    if t == "boolean":
        return logical == BOOL
    if t in ("smallint", "integer", "bigint"):
        return logical == INT
    if t.startswith(("numeric", "real", "double", "money", "interval")):
        # big or exact decimals come as text, so a batch may mix numbers and text (JSON)
        return logical in (INT, FLOAT, TEXT, JSON)
    return logical == TEXT


@dataclass(frozen=True)
class SourceColumns:
    """A source table's columns as PostgreSQL types, and its primary key."""

    source: str
    table: str
    types: dict[str, str]
    primary_key: tuple[str, ...]
    unbounded: bool  # a change stream (cdc, hybrid): the same key comes more than once
    filled: dict[str, str | None] = field(default_factory=dict)
    """Columns with a default: the value (as text) the rows that predate the column were
    given when it was added, ``None`` when not known (a volatile default)."""


def source_columns(ctx: Any, table: str | None = None) -> SourceColumns | None:
    """The database table upstream of destination ``ctx`` (None: not exactly one).

    ``table``: the records' source table (``schema.table``), which picks one of the tables
    of a change stream; else the source's configured ``table``. Asks the source's database
    (its discovery); a failure to reach it only loses the types (a warning), the write
    itself will report an unreachable database.
    """
    from dataflare.connectors.schema import discover
    from dataflare.registry import BuildContext

    wf = ctx.workflow
    ids = wf.upstream_sources(list(ctx.component.inputs or []))
    if len(ids) != 1:
        return None
    sid = ids[0]
    comp = wf.sources[sid]
    if comp.type not in ("postgres", "mysql") or not (
            table or getattr(comp.config, "table", None)):
        return None
    src = BuildContext(sid, "source", comp, comp.config, wf, ctx.base_dir)
    try:
        tables = discover(src)["tables"]
    except Exception as exc:  # noqa: BLE001 - any failure only loses the hints
        log.warning("step %r: cannot read the column types of source %r (%s); the table's "
                    "columns are typed from the records", ctx.step_id, sid, exc)
        return None
    if table is not None:
        tables = [t for t in tables if f"{t['schema']}.{t['name']}" == table]
    if len(tables) != 1:
        return None
    (found,) = tables
    types = {}
    filled = {}
    for col in found["columns"]:
        pg = postgres_type(comp.type, col["type"])
        if pg is not None:
            types[col["name"]] = pg
        if "filled_with" in col or "default" in col:
            filled[col["name"]] = col.get("filled_with")
    return SourceColumns(sid, f"{found['schema']}.{found['name']}", types,
                         tuple(found.get("primary_key") or ()),
                         comp.mode in ("cdc", "hybrid"), filled)
