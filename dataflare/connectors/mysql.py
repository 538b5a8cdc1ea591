r"""MySQL / MariaDB source (``type: mysql``): full reads, incremental polling, binlog CDC.

- ``full``: one consistent read (``START TRANSACTION WITH CONSISTENT SNAPSHOT``, an
  unbuffered cursor) in key order, in batches; the last key read is the resume state.
- ``incremental``: polls rows past the last ``(cursor, key...)`` tuple every
  ``incremental.interval``; ties on the cursor value are never lost.
- ``cdc``: the row-based binlog read with ``mysql-replication``. The server must have
  ``binlog_format=ROW``, ``binlog_row_image=FULL`` and ``binlog_row_metadata=FULL``
  (MySQL 8.0.14+, MariaDB 10.5+), or the source refuses to start: without the row
  metadata the binlog does not say a column's name, character set or signedness, so
  binary, non-UTF-8 text and unsigned values would come wrong or fail. An event written
  without it (before the setting changed) stops the run with an error naming its table
  and position. Rows are emitted per committed transaction; the partition state holds
  the binlog file and position *after* the last emitted commit, so a resumed partition
  starts on a transaction boundary and emits nothing twice. With
  ``cdc.binlog_position: latest`` (the default) and ``cdc.snapshot_mode`` ``initial`` or
  ``always``, the tables are read first; on MariaDB the stream then starts at the binlog
  position of the snapshot itself (``binlog_snapshot_file/position``), on MySQL at the
  position taken just before it (changes in between may come twice, never lost).
  Records carry ``_meta``: ``op`` (insert/update/delete/truncate), ``table``
  (``db.table``), ``position`` (``file:pos`` of the commit), ``commit_ts``; an update
  carries the previous row in ``_meta.old``.

Values look as ``dataflare discover`` describes them, in every mode: ``tinyint(1)`` and
``bit(1)`` as booleans, ``time`` as ``'[-]HH:MM:SS[.ffffff]'`` text, ``json`` columns
(MariaDB's too: ``longtext`` checked by ``json_valid``) parsed, ``decimal`` per
``decimal_handling``, binary values as ``\x`` and hex (``binary(n)`` padded to ``n``
bytes), zero dates (``'0000-00-00'``, ``'2024-00-10'``: no date has them) as null, as
the binlog gives them, the rest JSON-like as for PostgreSQL. A value that cannot be
converted (invalid JSON) fails its row alone, under the step's error policy.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, field_validator

from dataflare.config import Duration, Secret, Strict
from dataflare.connectors.incremental import (
    IncrementalCursor,
    IncrementalPartition,
    SqlTable,
    utc_start,
)
from dataflare.connectors.postgres import effective_mode
from dataflare.connectors.schema import (
    DECIMAL_HANDLING,
    DecimalHandling,
    UnconvertibleValue,
    column_schema,
    discoverer,
    table_json_schema,
)
from dataflare.connectors.sql_source import (
    Connection,
    cdc_block,
    change_record,
    now,
    row_records,
    say_changed_columns,
    selected_tables,
)
from dataflare.connectors.sql_source import read_key as sql_read_key
from dataflare.dsl_compiler.problems import did_you_mean
from dataflare.lineage import table_dataset
from dataflare.records import META, Failed
from dataflare.registry import BuildContext, source
from dataflare.retry import TransientError, call_with_retry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures worth a retry: cannot connect, server gone, lost connection, connection killed,
# server shutting down, lock wait timeout, deadlock.
TRANSIENT_CODES = frozenset({2002, 2003, 2006, 2013, 2055, 1927, 1053, 4031, 1205, 1213})


class MySqlSourceConfig(Strict):
    """Connection and read settings of a MySQL / MariaDB source."""

    dsn: Secret | None = Field(
        None, description="URL 'mysql://user:password@host:port/database'; fields override it."
    )
    host: str = Field("localhost", description="Server host.")
    port: int = Field(3306, ge=1, le=65535, description="Server port.")
    database: str | None = Field(None, description="Database (schema) name.")
    username: str | None = Field(None, description="User name.")
    password: Secret | None = Field(None, description="Password.")
    db_schema: str | None = Field(
        None, alias="schema", description="Database of `table` (MySQL calls databases schemas)."
    )
    table: str | None = Field(None, description="Table to read ('name' or 'database.name').")
    key_columns: list[str] = Field(
        default_factory=list,
        description="Columns ordering reads and resumes (default: the primary key).",
    )
    batch_size: int = Field(1000, ge=1, description="Rows per batch.")
    incremental_column: str | None = Field(
        None, description="Shorthand of `incremental.column` (selects mode incremental)."
    )
    stop_at_end: bool = Field(
        False,
        description="End the input instead of polling forever: CDC once the binlog has no "
        "further events (a catch-up run); incremental after the rows up to the highest "
        "cursor value seen at start (a scheduled sync; the next run goes on from there).",
    )
    charset: str = Field("utf8mb4", description="Connection character set.")

    @field_validator("charset")
    @classmethod
    def _charset(cls, v: str) -> str:
        from pymysql.charset import charset_by_name

        if charset_by_name(v) is None:  # the connection failed with a bare AttributeError
            msg = f"unknown character set {v!r} (e.g. utf8mb4, latin1)"
            raise ValueError(msg)
        return v
    decimal_handling: DecimalHandling = Field("number", description=DECIMAL_HANDLING)
    connect_timeout: Duration = Field(10.0, description="Connection timeout.")

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of `pymysql.connect`."""
        from urllib.parse import unquote, urlparse

        out: dict[str, Any] = {}
        if self.dsn is not None:
            url = urlparse(self.dsn.get_secret_value())
            if url.hostname:
                out["host"] = url.hostname
            if url.port:
                out["port"] = url.port
            if url.username:
                out["user"] = unquote(url.username)
            if url.password:
                out["password"] = unquote(url.password)
            if url.path.strip("/"):
                out["database"] = url.path.strip("/")
        given = self.model_fields_set
        if self.dsn is None or "host" in given:
            out["host"] = self.host
        if self.dsn is None or "port" in given:
            out["port"] = self.port
        if self.username:
            out["user"] = self.username
        if self.password is not None:
            out["password"] = self.password.get_secret_value()
        database = self.database or self.db_schema
        if database:
            out["database"] = database
        out.setdefault("user", "root")
        out.setdefault("password", "")
        out["charset"] = self.charset
        out["connect_timeout"] = max(1, int(self.connect_timeout))
        return out

    def qualified(self, name: str | None = None) -> tuple[str, str]:
        """``(database, table)`` of ``name`` (default: ``table``).

        ``database.table`` is split when ``schema`` is not given; with ``schema`` given, a
        dot belongs to the table's name.
        """
        name = name or self.table
        if not name:
            msg = "config.table is required"
            raise ValueError(msg)
        if "." in name and "db_schema" not in self.model_fields_set:
            db, _, table = name.partition(".")
            return db, table
        database = self.db_schema or self.database or self.settings().get("database")
        if not database:
            msg = f"table {name!r} needs a database: set config.database or 'database.table'"
            raise ValueError(msg)
        return database, name


def _pymysql() -> Any:
    try:
        import pymysql
    except ModuleNotFoundError as exc:
        msg = "the mysql source needs pymysql: pip install pymysql mysql-replication"
        raise ModuleNotFoundError(msg) from exc
    return pymysql


def q(name: str) -> str:
    """A quoted MySQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def is_transient(exc: BaseException) -> bool:
    """Whether a pymysql error is worth a retry (lost connection, deadlock, lock timeout)."""
    pymysql = _pymysql()
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InternalError):
        code = exc.args[0] if exc.args else None
        return code in TRANSIENT_CODES
    return False


class MySqlDatabase(Connection):
    """A MySQL/MariaDB connection in UTC; lost connections and deadlocks are transient."""

    def __init__(self, step_id: str, settings: dict[str, Any], retry: Any) -> None:
        self.settings = settings
        super().__init__(step_id, retry, self._connect, _pymysql().err.Error, is_transient)

    def _connect(self) -> Any:
        conn = _pymysql().connect(**self.settings, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+00:00'")
        return conn


def primary_key(conn: Any, database: str, table: str) -> list[str]:
    """Primary key columns of ``database.table`` in key order."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
            (database, table),
        )
        if cur.fetchone()[0] == 0:
            msg = f"table {database}.{table} does not exist"
            raise LookupError(msg)
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' "
            "ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        return [r[0] for r in cur.fetchall()]


_ESCAPES = {"0": "\0", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}
_QUOTED = re.compile(r"'((?:[^'\\]|''|\\.)*)'")


def _with_default(col: dict[str, Any], default: str | None, extra: str,
                  mariadb: bool) -> dict[str, Any]:
    """``col`` with its DEFAULT and the value its rows that predate it hold.

    A column added to a table with rows gives them its default (``filled_with``); a NOT
    NULL column without one gives numbers 0, text '' and an ENUM its first member. An
    expression (``CURRENT_TIMESTAMP``) was evaluated at the adding: not known here.
    MariaDB shows a literal default quoted and a DEFAULT NULL as ``NULL``; MySQL shows
    literals bare and marks expressions ``DEFAULT_GENERATED``.
    """
    if default is None or (mariadb and default == "NULL"):
        if col["nullable"] or "auto_increment" in extra.lower():
            return col
        kind = col["type"].lower()
        if kind.startswith("enum("):
            member = _QUOTED.search(col["type"])
            implicit = None if member is None else _unquoted(member[0])
        elif re.match(r"(tiny|small|medium|big)?int|integer|decimal|numeric|float|double"
                      r"|bit|year", kind):
            implicit = "0"
        elif re.match(r"(var)?char|(tiny|medium|long)?text", kind):
            implicit = ""
        else:
            implicit = None
        if implicit is not None:
            col["filled_with"] = implicit
        return col
    col["default"] = default
    if mariadb:
        if _QUOTED.fullmatch(default):
            col["filled_with"] = _unquoted(default)
        elif re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", default, re.IGNORECASE):
            col["filled_with"] = default
    elif "DEFAULT_GENERATED" not in extra.upper() and not default.upper().startswith(
            "CURRENT_TIMESTAMP"):
        col["filled_with"] = default
    return col


def _unquoted(literal: str) -> str:
    r"""The text of a quoted SQL string literal as MariaDB shows it ('it''s', 'a\\b')."""
    return re.sub(r"''|\\(.)", lambda m: "'" if m[0] == "''" else _ESCAPES.get(m[1], m[1]),
                  literal[1:-1])


_JSON_CHECK = re.compile(r"json_valid\(`((?:[^`]|``)+)`\)", re.IGNORECASE)


def table_columns(conn: Any, database: str, table: str) -> list[dict[str, Any]]:
    """``{"name", "type", "nullable"}`` of each column of ``database.table``, in order.

    MariaDB's ``json`` is ``longtext`` with a ``json_valid`` check: such columns are ``json``.
    """
    mariadb = "mariadb" in conn.get_server_info().lower()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA "
            "FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (database, table),
        )
        cols = [_with_default({"name": r[0], "type": r[1], "nullable": r[2] == "YES"},
                              r[3], r[4] or "", mariadb) for r in cur.fetchall()]
        if mariadb:
            cur.execute(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
                "WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s",
                (database, table),
            )
            checked = {
                m[1].replace("``", "`") for (clause,) in cur.fetchall()
                if (m := _JSON_CHECK.fullmatch(clause.strip()))
            }
            for col in cols:
                if col["name"] in checked and col["type"].endswith("text"):
                    col["type"] = "json"
    return cols


Converters = dict[str, Callable[[Any], Any]]


def _boolean(value: Any) -> bool:
    if isinstance(value, bytes):  # bit(1) as a query returns it
        return any(value)
    if isinstance(value, str):  # bit(1) from the binlog: '0' or '1'
        return "1" in value
    return bool(value)


def _time_text(value: Any) -> Any:
    if not isinstance(value, timedelta):
        return value
    micros = value // timedelta(microseconds=1)
    seconds, fraction = divmod(abs(micros), 1_000_000)
    text = f"{'-' if micros < 0 else ''}{seconds // 3600:02d}:{seconds // 60 % 60:02d}:"
    text += f"{seconds % 60:02d}"
    return f"{text}.{fraction:06d}" if fraction else text


def _zero_date(value: Any) -> Any:
    """Null for a zero date ('0000-00-00', '2024-00-10'), as the binlog and Debezium give it.

    The driver returns the text of a date it cannot make, and a zero date has no date value.
    """
    return None if isinstance(value, str) else value


_DATES = ("date", "datetime", "timestamp")  # column types whose zero dates come as null
# The binlog gives a zero TIMESTAMP as the epoch, which a TIMESTAMP cannot otherwise hold
# (its range starts one second later).
_EPOCH = datetime(1970, 1, 1)


def _binlog_timestamp(value: Any) -> Any:
    return None if value == _EPOCH else value


def _parsed_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def converters(columns: list[dict[str, Any]]) -> Converters:
    """Per column needing one, what turns a driver value into the value discovery promises."""
    out: Converters = {}
    for col in columns:
        schema = column_schema(col["type"])
        if col["type"] == "json":
            out[col["name"]] = _parsed_json
        elif schema.get("type") == "boolean":
            out[col["name"]] = _boolean
        elif schema.get("format") == "time":
            out[col["name"]] = _time_text
        elif col["type"].lower().startswith(_DATES):
            out[col["name"]] = _zero_date
    return out


_BINARY = re.compile(r"(var)?binary\((\d+)\)|(tiny|medium|long)?blob")


def _binlog_binary(size: int | None) -> Callable[[Any], Any]:
    """Bytes of a binary column as a query returns them, from the binlog's value.

    The binlog drops the zero padding of ``binary(n)``; and mysql-replication gives an
    empty value as ``''`` (decoding ``b''`` with the unknown codec 'binary' does not fail).
    """

    def convert(value: Any) -> Any:
        data = value.encode() if isinstance(value, str) else value
        return data.ljust(size, b"\0") if size else data

    return convert


def _binlog_bits(size: int) -> Callable[[Any], Any]:
    """The bytes of a ``bit(n)`` value as a query returns them, from the binlog's '0101'."""

    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return int(value or "0", 2).to_bytes((size + 7) // 8, "big")
        return value

    return convert


def _binlog_set(members: list[str]) -> Callable[[Any], Any]:
    """A ``set(...)`` value as a query returns it ('a,b' in the definition's order)."""
    order = {m: i for i, m in enumerate(members)}

    def convert(value: Any) -> Any:
        if isinstance(value, set | frozenset | list | tuple):
            return ",".join(sorted(value, key=lambda m: order.get(m, len(order))))
        return value

    return convert


def _with_empty_sets(values: dict[str, Any], nones: dict[str, str] | None) -> dict[str, Any]:
    """A binlog row image with its empty sets as ``''``, as a query gives them (not null)."""
    empty = [k for k, why in (nones or {}).items() if why == "empty set"]
    return {**values, **dict.fromkeys(empty, "")} if empty else values


def binlog_converters(columns: list[dict[str, Any]]) -> Converters:
    """:func:`converters`, and what makes binlog values of binary, bit and set columns as queried.

    The binlog reader gives '0101' for a bit(4) and the members of a set as a set.
    """
    out = converters(columns)
    for col in columns:
        kind = col["type"].lower()
        m = _BINARY.fullmatch(kind)
        if m:
            out[col["name"]] = _binlog_binary(int(m[2]) if m[2] and not m[1] else None)
        elif (bits := re.fullmatch(r"bit\((\d+)\)", kind)) and int(bits[1]) > 1:
            out[col["name"]] = _binlog_bits(int(bits[1]))
        elif kind.startswith("set("):
            out[col["name"]] = _binlog_set([_unquoted(q[0]) for q in
                                            _QUOTED.finditer(col["type"][4:-1])])
        elif kind.startswith("timestamp"):
            out[col["name"]] = _binlog_timestamp
    return out


def _convert(fn: Callable[[Any], Any] | None, value: Any) -> Any:
    if fn is None or value is None:
        return value
    try:
        return fn(value)
    except ValueError as exc:  # its row fails alone (see row_records)
        return UnconvertibleValue(str(value), exc)


def converted_rows(
    names: Sequence[str], rows: list[Sequence[Any]], convert: Converters
) -> list[Sequence[Any]]:
    """Rows of a query with the values of ``convert``'s columns converted."""
    if not convert:
        return rows
    fns = [convert.get(n) for n in names]
    return [tuple(_convert(f, v) for f, v in zip(fns, row, strict=True)) for row in rows]


def _table_converters(db: MySqlDatabase, database: str, table: str,
                      make: Callable[[list[dict[str, Any]]], Converters] = converters
                      ) -> Converters:
    return make(
        db.run(
            f"reading the columns of {database}.{table}",
            lambda conn: table_columns(conn, database, table),
        )
    )


def _key(db: MySqlDatabase, cfg: MySqlSourceConfig, database: str, table: str) -> list[str]:
    try:
        return db.run(f"looking up the key of {database}.{table}",
                      lambda conn: read_key(conn, db.step_id, cfg, database, table))
    except LookupError as exc:
        msg = f"step '{db.step_id}': {exc}"
        raise RuntimeError(msg) from None


def read_key(conn: Any, step: str, cfg: MySqlSourceConfig, database: str, table: str
             ) -> list[str]:
    """The columns a read orders by and resumes after (see ``sql_source.read_key``)."""
    configured = column_names(conn, database, table, cfg.key_columns, "key_columns")
    return sql_read_key(step, f"{database}.{table}", configured,
                        primary_key(conn, database, table),
                        lambda cols: _unique(conn, database, table, set(cols)))


def column_names(conn: Any, database: str, table: str, names: Sequence[str], setting: str
                 ) -> list[str]:
    """``names`` as the table spells its columns: MySQL compares them without case."""
    if not names:
        return []
    with conn.cursor() as cur:
        cur.execute("SELECT COLUMN_NAME FROM information_schema.COLUMNS "
                    "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s", (database, table))
        spelled = {r[0].lower(): r[0] for r in cur.fetchall()}
    out = []
    for name in names:
        if name.lower() not in spelled:
            hint = did_you_mean(name, list(spelled.values()))
            msg = f"{setting} {name!r} is not a column of {database}.{table}{hint}"
            raise LookupError(msg)
        out.append(spelled[name.lower()])
    return out


def _unique(conn: Any, database: str, table: str, columns: set[str]) -> bool:
    """Whether a unique index (the primary key too) has only columns among ``columns``."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND NON_UNIQUE = 0",
            (database, table))
        indexes: dict[str, set[str]] = {}
        for name, column in cur.fetchall():
            indexes.setdefault(name, set()).add(column)
    return any(cols <= columns for cols in indexes.values())


class SnapshotRead:
    """A consistent read of tables in key order, resumable by (table index, last key)."""

    def __init__(
        self,
        src: MySqlSource,
        tables: list[str],
        index: int,
        after: list[Any] | None,
        op: str | None,
    ) -> None:
        self.src, self.tables, self.index, self.after, self.op = src, tables, index, after, op
        self.db = MySqlDatabase(src.step_id, src.cfg.settings(), src.retry)
        self.db.on_reconnect.append(self._lost)
        self.cursor: Any = None
        self.names: list[str] = []
        self.key: list[str] = []
        self.convert: Converters = {}
        self.rows_read = 0
        self.position: tuple[str, int] | None = None
        self.in_transaction = False
        self.done_table = False

    def _lost(self) -> None:
        self.cursor = None
        self.in_transaction = False

    def _open(self, conn: Any) -> None:
        pymysql = _pymysql()
        database, table = self.tables[self.index].split(".", 1)
        self.key = read_key(conn, self.src.step_id, self.src.cfg, database, table)
        self.convert = converters(table_columns(conn, database, table))
        if not self.in_transaction:
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%%'")
                status = dict(cur.fetchall())
            self.in_transaction = True
            if status.get("Binlog_snapshot_file"):
                self.position = (
                    status["Binlog_snapshot_file"],
                    int(status["Binlog_snapshot_position"]),
                )
        sql = f"SELECT * FROM {q(database)}.{q(table)}"
        params: list[Any] = []
        if self.key:
            if self.after is not None:
                cols = ", ".join(q(k) for k in self.key)
                sql += f" WHERE ({cols}) > ({', '.join(['%s'] * len(self.key))})"
                params = list(self.after)
            sql += " ORDER BY " + ", ".join(q(k) for k in self.key)
        cur = conn.cursor(pymysql.cursors.SSCursor)
        cur.execute(sql, params)
        self.names = [d[0] for d in cur.description]
        self.cursor = cur

    def _fetch(self, conn: Any) -> list[Sequence[Any]]:
        if self.cursor is None:
            self._open(conn)
        rows: list[Sequence[Any]] = list(self.cursor.fetchmany(self.src.cfg.batch_size))
        self.done_table = len(rows) < self.src.cfg.batch_size
        if self.done_table:
            self.cursor.close()
            self.cursor = None
            if self.index + 1 >= len(self.tables):  # one transaction reads every table
                conn.commit()
                self.in_transaction = False
            # Only now, with nothing left to fail: a retry reads the table again from
            # `after` instead of skipping it.
            self.index += 1
        return rows

    @property
    def done(self) -> bool:
        """Whether every table was read."""
        return self.index >= len(self.tables)

    def read(self) -> list[Any]:
        """The next batch of records and failed rows (empty once ``done``)."""
        while not self.done:
            table = self.tables[self.index]
            try:
                rows = self.db.run(f"reading {table}", self._fetch)
            except LookupError as exc:  # a missing table
                msg = f"step '{self.src.step_id}': {exc}"
                raise RuntimeError(msg) from None
            meta: dict[str, Any] = {"table": table}
            if self.op:
                meta["op"] = self.op
            batch = row_records(
                self.src.step_id,
                self.names,
                converted_rows(self.names, rows, self.convert),
                meta,
                self.src.cfg.decimal_handling,
                self.rows_read + 1,
            )
            self.rows_read += len(rows)
            if self.done_table:
                self.after, self.rows_read = None, 0
            elif rows and self.key:
                idx = [self.names.index(k) for k in self.key]
                self.after = [rows[-1][i] for i in idx]
            if batch:
                return batch
        return []

    def close(self) -> None:
        """Close the cursor and the connection."""
        if self.cursor is not None:
            try:
                self.cursor.close()
            except Exception:  # noqa: BLE001 - an unread result may fail to drain
                log.debug("closing the snapshot cursor failed", exc_info=True)
            self.cursor = None
        self.db.close()


class FullPartition(StatefulSourcePartition[list[Any], dict[str, Any]]):
    """A full read of the table; state: the last key read and whether it is done."""

    def __init__(self, src: MySqlSource, state: dict[str, Any] | None) -> None:
        state = state or {}
        table = ".".join(src.cfg.qualified())
        self.read = SnapshotRead(
            src, [table], 1 if state.get("done") else 0, state.get("after"), None
        )

    def next_batch(self) -> list[list[Any]]:
        """The next batch of rows."""
        if self.read.done:
            raise StopIteration
        batch = self.read.read()
        return [batch] if batch else []

    def snapshot(self) -> dict[str, Any]:
        """Last key read and whether the read is done."""
        return {"after": self.read.after, "done": self.read.done}

    def close(self) -> None:
        """Close the connection."""
        self.read.close()


def _fetch_all(conn: Any, query: str, params: list[Any]) -> tuple[list[str], list[Sequence[Any]]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return [d[0] for d in cur.description], list(cur.fetchall())


def incremental_partition(src: MySqlSource, state: Any) -> IncrementalPartition:
    """A poll of the table by its incremental cursor (see ``connectors.incremental``)."""
    database, table = src.cfg.qualified()
    db = MySqlDatabase(src.step_id, src.cfg.settings(), src.retry)
    column, start, interval = src.incremental_settings()
    try:
        column = db.run("reading the cursor column", lambda conn: column_names(
            conn, database, table, [column], "incremental column")[0])
    except LookupError as exc:
        msg = f"step '{src.step_id}': {exc}"
        raise RuntimeError(msg) from None
    key = [k for k in _key(db, src.cfg, database, table) if k != column]
    if state is None and db.run("reading the cursor column", lambda conn: _fetch_all(
            conn, "SELECT 1 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND "
            "TABLE_NAME = %s AND COLUMN_NAME = %s AND IS_NULLABLE = 'YES'",
            [database, table, column])[1]):
        log.warning("step %r: the incremental column %s of %s.%s may be NULL: rows where it "
                    "is NULL are never read (make it NOT NULL, or give those rows a value)",
                    src.step_id, column, database, table)
    convert = _table_converters(db, database, table)
    inc = src.component.incremental
    cursor = IncrementalCursor(column, key, start, float(inc.lookback) if inc else 0.0,
                               src.cfg.batch_size, state)
    sql_table = SqlTable(f"{database}.{table}", f"{q(database)}.{q(table)}", q, _fetch_all,
                         convert=lambda names, rows: converted_rows(names, rows, convert))
    return IncrementalPartition(db, sql_table, cursor, interval, src.cfg.stop_at_end,
                                src.cfg.decimal_handling)


# What the binlog must hold for its rows to be read as the tables hold them.
BINLOG_SETTINGS = {"binlog_format": "ROW", "binlog_row_image": "FULL",
                   "binlog_row_metadata": "FULL"}


def binlog_settings_problems(conn: Any) -> list[str]:
    """How the server's binlog settings differ from :data:`BINLOG_SETTINGS` (all of them)."""
    with conn.cursor() as cur:
        cur.execute(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN (%s, %s, %s)", tuple(BINLOG_SETTINGS)
        )
        have = {str(k).lower(): str(v) for k, v in cur.fetchall()}
    return [
        f"{name}={have.get(name, 'unsupported by this server version')}"
        for name, want in BINLOG_SETTINGS.items()
        if have.get(name, "").upper() != want
    ]


class _RowMetadataNotice(logging.Filter):
    """Drops mysql-replication's warning about ``binlog_row_metadata``, logged per reader.

    The source checks the setting itself, once, and refuses to start without it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "BINLOG_ROW_METADATA" not in str(record.msg)


_ROW_METADATA_NOTICE = _RowMetadataNotice()


_TRUNCATE = re.compile(r"^\s*truncate\s+(?:table\s+)?([`\w.]+)", re.IGNORECASE)


class BinlogPartition(StatefulSourcePartition[list[Any], dict[str, Any]]):
    """Row changes from the binlog; state: file and position after the last commit."""

    def __init__(self, src: MySqlSource, state: dict[str, Any] | None) -> None:
        self.src = src
        cdc = src.cdc_settings()
        self.tables = src.cdc_tables()
        self.poll = timedelta(seconds=cdc.poll_interval)
        self.db = MySqlDatabase(src.step_id, src.cfg.settings(), src.retry)
        self.server_id = cdc.server_id or 1000 + zlib.crc32(src.step_id.encode()) % 100000
        self.awake: datetime | None = None
        self.ended = False
        logging.getLogger("pymysqlreplication").addFilter(_ROW_METADATA_NOTICE)
        self.db.run("checking the binlog settings", self._check_settings)
        self.snap: SnapshotRead | None = None
        self.convert: dict[str, Converters] = {}
        self.columns: dict[str, list[str]] = {}  # per table, as its last binlog event had them
        snapshot = cdc.binlog_position == "latest" and (
            cdc.snapshot_mode == "always" or (cdc.snapshot_mode == "initial" and state is None)
        )
        if state is not None and state.get("phase") == "snapshot":
            snapshot = True
        if state is not None:
            self.file, self.pos = state["file"], int(state["pos"])
        else:
            self.file, self.pos = self.db.run("finding the binlog position", self._start)
        self.fresh_snapshot = snapshot and (state is None or state.get("phase") != "snapshot")
        if snapshot:
            s = state if state is not None and state.get("phase") == "snapshot" else {}
            self.snap = SnapshotRead(
                src, self.tables, s.get("table_index", 0), s.get("after"), "read"
            )

    def _check_settings(self, conn: Any) -> None:
        problems = binlog_settings_problems(conn)
        if not problems:
            return
        wanted = ", ".join(f"{k}={v}" for k, v in BINLOG_SETTINGS.items())
        names = [p.split("=")[0] for p in problems]
        run = "; ".join(f"SET GLOBAL {n} = {BINLOG_SETTINGS[n]}" for n in names)
        cnf = ", ".join(f"`{n} = {BINLOG_SETTINGS[n]}`" for n in names)
        msg = (
            f"step '{self.src.step_id}': binlog CDC needs {wanted}; the server has "
            f"{', '.join(problems)}. Run `{run}` and add {cnf} under [mysqld] in my.cnf "
            "so a restart keeps it. Events written before the change still lack it: start "
            "at a position after it (cdc.binlog_position 'latest' without the recovery "
            "state; cdc.snapshot_mode 'initial' reads the tables first)"
        )
        raise ValueError(msg)

    def _start(self, conn: Any) -> tuple[str, int]:
        where = self.src.cdc_settings().binlog_position
        with conn.cursor() as cur:
            if where == "earliest":
                cur.execute("SHOW BINARY LOGS")
                rows = cur.fetchall()
                if not rows:
                    msg = f"step '{self.src.step_id}': the server has no binary logs (log_bin off?)"
                    raise LookupError(msg)
                return rows[0][0], 4
            if where != "latest":
                file, _, pos = where.rpartition(":")
                if not file or not pos.isdigit():
                    msg = (
                        f"step '{self.src.step_id}': cdc.binlog_position {where!r} is not "
                        "'latest', 'earliest' or 'file:position'"
                    )
                    raise ValueError(msg)
                return file, int(pos)
            cur.execute("SHOW MASTER STATUS")
            row = cur.fetchone()
            if row is None:
                msg = f"step '{self.src.step_id}': binary logging is off (SHOW MASTER STATUS)"
                raise LookupError(msg)
            return row[0], int(row[1])

    def _stream(self) -> tuple[list[Any], str, int, bool]:
        """Read committed changes: ``(records, file, pos after them, caught up)``.

        Touches no partition state, so a failed attempt is retried from the same position.
        """
        from pymysqlreplication import BinLogStreamReader
        from pymysqlreplication.event import QueryEvent, RotateEvent, XidEvent
        from pymysqlreplication.row_event import (
            DeleteRowsEvent,
            TableMapEvent,
            UpdateRowsEvent,
            WriteRowsEvent,
        )

        settings = self.src.cfg.settings()
        conn_settings = {
            k: settings[k] for k in ("host", "port", "user", "password") if k in settings
        }
        schemas = sorted({t.split(".", 1)[0] for t in self.tables}) or None
        names = sorted({t.split(".", 1)[1] for t in self.tables}) or None
        reader = BinLogStreamReader(
            connection_settings=conn_settings,
            server_id=self.server_id,
            blocking=False,
            resume_stream=True,
            log_file=self.file,
            log_pos=self.pos,
            only_events=[
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
                XidEvent,
                QueryEvent,
                RotateEvent,
                TableMapEvent,
            ],
            only_schemas=schemas,
            only_tables=names,
            # File and position on MariaDB too: the library's MariaDB mode streams by GTID
            # and would ignore the position.
            is_mariadb=False,
            enable_logging=False,
        )
        out: list[Any] = []
        pending: list[dict[str, Any]] = []
        limit = self.src.cfg.batch_size
        file, pos = self.file, self.pos
        table = ""
        try:
            for event in reader:
                if isinstance(event, RotateEvent):
                    continue
                if isinstance(event, TableMapEvent):
                    table = f"{event.schema}.{event.table}"
                    if self.tables and table not in self.tables:
                        continue
                    columns = [c.name for c in event.columns]
                    if None in columns:
                        raise self._unreadable(table, file, pos, "has no row metadata")
                    before = self.columns.get(table)
                    if before is not None and before != columns:
                        say_changed_columns(self.src.step_id, table, before, columns)
                    self.columns[table] = columns
                    continue
                if isinstance(event, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                    table = f"{event.schema}.{event.table}"
                    if self.tables and table not in self.tables:
                        continue
                    for row in event.rows:
                        pending.append(self._record(event, row, table))
                    continue
                commit = isinstance(event, XidEvent)
                if isinstance(event, QueryEvent):
                    text = event.query.decode() if isinstance(event.query, bytes) else event.query
                    if text.strip().upper() == "BEGIN":
                        continue
                    commit = True
                    self.convert.clear()  # the statement may have changed a table's columns
                    m = _TRUNCATE.match(text)
                    if m:
                        name = m.group(1).replace("`", "")
                        schema = (
                            event.schema.decode()
                            if isinstance(event.schema, bytes)
                            else (event.schema)
                        )
                        table = name if "." in name else f"{schema}.{name}"
                        if not self.tables or table in self.tables:
                            pending.append({META: {"op": "truncate", "table": table}})
                if commit:
                    position = f"{reader.log_file}:{reader.log_pos}"
                    ts = datetime.fromtimestamp(event.timestamp, UTC).isoformat()
                    for rec in pending:
                        meta = rec.meta if isinstance(rec, Failed) else rec[META]
                        meta["position"], meta["commit_ts"] = position, ts
                    out.extend(pending)
                    pending = []
                    file, pos = reader.log_file, int(reader.log_pos)
                    if len(out) >= limit:
                        return out, file, pos, False
        except UnicodeDecodeError as exc:
            raise self._unreadable(table, file, pos, f"cannot be decoded ({exc})") from exc
        finally:
            reader.close()
        # The binlog ended: caught up (a transaction not yet whole is read again next time).
        return out, file, pos, True

    def _unreadable(self, table: str, file: str, pos: int, what: str) -> RuntimeError:
        """The terminal error of a change in the binlog that cannot be read exactly."""
        msg = (
            f"step '{self.src.step_id}': the change of {table or 'a table'} in the "
            f"transaction at binlog {file}:{pos} {what}: it was written while "
            "binlog_row_metadata was not FULL (or the server's setting changed since the "
            "start). Set binlog_row_metadata = FULL (SET GLOBAL and my.cnf) and start at a "
            "position written after that (cdc.binlog_position 'latest' without the "
            "recovery state, with cdc.snapshot_mode 'initial' to read the tables again)"
        )
        return RuntimeError(msg)

    def _record(self, event: Any, row: dict[str, Any], table: str) -> Any:
        """The record of one row change, or its failure when a value cannot be converted."""
        from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent

        if table not in self.convert:
            database, name = table.split(".", 1)
            self.convert[table] = _table_converters(self.db, database, name, binlog_converters)
        convert, decimals = self.convert[table], self.src.cfg.decimal_handling
        if isinstance(event, UpdateRowsEvent):
            op, images = "update", [_with_empty_sets(row["after_values"],
                                                     row.get("after_none_sources")),
                                    _with_empty_sets(row["before_values"],
                                                     row.get("before_none_sources"))]
        else:
            op = "delete" if isinstance(event, DeleteRowsEvent) else "insert"
            images = [_with_empty_sets(row["values"], row.get("none_sources"))]
        new, *old = [{k: _convert(convert.get(k), v) for k, v in i.items()} for i in images]
        meta: dict[str, Any] = {"op": op, "table": table}
        return change_record(self.src.step_id, new, old[0] if old else None, meta, op, decimals)

    def next_batch(self) -> list[list[Any]]:
        """A snapshot batch, or the changes committed since the state position."""
        if self.snap is not None:
            batch = self.snap.read()
            if self.fresh_snapshot and self.snap.position is not None:
                # MariaDB: the binlog position of the snapshot itself, exactly.
                self.file, self.pos = self.snap.position
                self.fresh_snapshot = False
            if self.snap.done:
                self.snap.close()
                self.snap = None
            self.awake = None
            return [batch] if batch else []
        if self.ended:
            raise StopIteration
        self.awake = None
        pymysql = _pymysql()
        what = f"reading the binlog at {self.file}:{self.pos}"

        def attempt() -> tuple[list[Any], str, int, bool]:
            try:
                return self._stream()
            except pymysql.err.Error as exc:
                if is_transient(exc):
                    msg = f"{what}: {type(exc).__name__}: {exc}"
                    raise TransientError(msg) from exc
                raise

        try:
            records, self.file, self.pos, caught_up = call_with_retry(
                f"step '{self.src.step_id}': {what}", attempt, self.src.retry
            )
        except (pymysql.err.Error, TransientError) as exc:
            cause = exc.__cause__ if isinstance(exc, TransientError) and exc.__cause__ else exc
            msg = f"step '{self.src.step_id}': {what} failed: {type(cause).__name__}: {cause}"
            raise RuntimeError(msg) from exc
        if caught_up:
            if self.src.cfg.stop_at_end:
                self.ended = True
            self.awake = now() + self.poll
        size = self.src.cfg.batch_size
        return [records[i : i + size] for i in range(0, len(records), size)]

    def next_awake(self) -> datetime | None:
        """When to read the binlog next."""
        return self.awake

    def snapshot(self) -> dict[str, Any]:
        """Binlog position after the last emitted commit (and the snapshot's progress)."""
        state: dict[str, Any] = {"file": self.file, "pos": self.pos, "phase": "stream"}
        if self.snap is not None:
            state.update(phase="snapshot", table_index=self.snap.index, after=self.snap.after)
        return state

    def close(self) -> None:
        """Close the connections."""
        if self.snap is not None:
            self.snap.close()
        self.db.close()


class MySqlSource(FixedPartitionedSource[list[Any], dict[str, Any]]):
    """A bytewax source reading one MySQL / MariaDB table or its binlog (see module docs)."""

    def __init__(self, ctx: BuildContext) -> None:
        self.step_id = ctx.step_id
        self.cfg: MySqlSourceConfig = ctx.config
        self.component = ctx.component
        self.retry = ctx.workflow.config.retry
        self.mode = effective_mode(ctx.component)
        if self.mode == "hybrid":
            msg = f"source '{ctx.step_id}': type 'mysql' supports modes full, incremental, cdc"
            raise ValueError(msg)

    def incremental_settings(self) -> tuple[str, Any, float]:
        """``(column, start_value, interval)`` of incremental reads."""
        inc = self.component.incremental
        column = (inc and (inc.column or inc.cursor_field)) or self.cfg.incremental_column
        if not column:
            msg = (
                f"source '{self.step_id}': mode incremental needs incremental.column "
                "(or config.incremental_column)"
            )
            raise ValueError(msg)
        start = inc.start_value if inc else None
        if start is not None and inc is not None:
            if inc.cursor_type == "integer":
                start = int(start)
            elif inc.cursor_type == "timestamp" and isinstance(start, str):
                start = utc_start(start)
                if isinstance(start, str):  # naive: as written
                    start = datetime.fromisoformat(start)
            else:  # a time with an offset is one whatever cursor_type says
                start = utc_start(start)
        return column, start, float(inc.interval) if inc else 10.0

    def cdc_settings(self) -> Any:
        """The component's ``cdc`` block (defaults when absent)."""
        return cdc_block(self.component)

    def cdc_tables(self) -> list[str]:
        """``database.table`` names whose changes are read."""
        cdc = self.cdc_settings()
        return selected_tables(cdc.include_tables, cdc.exclude_tables, self.cfg.table,
                               lambda t: ".".join(self.cfg.qualified(t)))

    def list_parts(self) -> list[str]:
        """One partition: the table, or the binlog."""
        if self.mode == "cdc":
            return ["binlog"]
        return [f"{self.mode}:{'.'.join(self.cfg.qualified())}"]

    def build_part(
        self, step_id: str, for_part: str, resume_state: dict[str, Any] | None
    ) -> StatefulSourcePartition[list[Any], dict[str, Any]]:
        """Build (or resume) the partition."""
        if for_part == "binlog":
            return BinlogPartition(self, resume_state)
        if for_part.startswith("incremental:"):
            return incremental_partition(self, resume_state)
        return FullPartition(self, resume_state)


@source(
    "mysql",
    config=MySqlSourceConfig,
    datasets=lambda cfg, base: table_dataset("mysql", cfg, 3306),
    description="MySQL / MariaDB table: full read, incremental polling, or binlog CDC "
    "(the server needs binlog_format=ROW, binlog_row_image=FULL, binlog_row_metadata=FULL).",
    blocks=("mode", "incremental", "cdc"),
    requires=("pymysql", "pymysqlreplication"), extra="mysql",
)
def build_mysql_source(ctx: BuildContext) -> MySqlSource:
    """Build the MySQL source of ``ctx``."""
    src = MySqlSource(ctx)
    if src.mode != "cdc" and not ctx.config.table:
        msg = f"source '{ctx.step_id}': config.table is required for mode '{src.mode}'"
        raise ValueError(msg)
    if src.mode == "incremental":
        src.incremental_settings()
    return src


@discoverer("mysql")
def discover_mysql(ctx: BuildContext) -> dict[str, Any]:
    """Columns, types and keys of the source's tables (all tables of the database if none)."""
    cfg: MySqlSourceConfig = ctx.config
    db = MySqlDatabase(ctx.step_id, cfg.settings(), ctx.workflow.config.retry)
    cdc = getattr(ctx.component, "cdc", None)
    names = list(cdc.include_tables) if cdc is not None and cdc.include_tables else []
    if cfg.table:
        names.append(cfg.table)

    def describe(conn: Any) -> list[dict[str, Any]]:
        tables = [cfg.qualified(n) for n in names]
        with conn.cursor() as cur:
            if not tables:
                database = cfg.settings().get("database")
                cur.execute(
                    "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
                    (database,),
                )
                tables = [(r[0], r[1]) for r in cur.fetchall()]
            out = []
            for database, table in dict.fromkeys(tables):
                cols = table_columns(conn, database, table)
                schema = table_json_schema(cols, cfg.decimal_handling)
                for col in cols:  # a TIME is a duration, not a time of day
                    if col["type"].lower().split("(")[0] == "time":
                        prop = schema["properties"][col["name"]]
                        prop.pop("format", None)
                        prop["pattern"] = r"^-?\d{2,3}:\d{2}:\d{2}(\.\d{1,6})?$"
                out.append(
                    {
                        "schema": database,
                        "name": table,
                        "primary_key": primary_key(conn, database, table),
                        "columns": cols,
                        "json_schema": schema,
                    }
                )
        return out

    try:
        return {"type": "mysql", "tables": db.run("discovering tables", describe)}
    except LookupError as exc:
        msg = f"source '{ctx.step_id}': {exc}"
        raise ValueError(msg) from None
    finally:
        db.close()
