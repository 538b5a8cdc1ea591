"""PostgreSQL source (``type: postgres``): full snapshots, incremental polling and CDC.

Modes (``mode:`` of the source; ``incremental`` when incremental settings are given,
``full`` otherwise):

- ``full``: one consistent read (``REPEATABLE READ``, server-side cursor) per partition,
  in batches; a large table is split into key ranges (``partitions``, or one range per
  ``partition_rows`` estimated rows; a single integer key is needed), read in parallel
  by the workers, each range in its own snapshot. The ranges are named by their bounds
  (``public.t[1000:2000)``), so a rerun on a table whose key span changed reads it
  again rather than skip rows. The last key read is the partition's resume state.
- ``incremental``: polls rows past the last ``(cursor, key)`` tuple every
  ``incremental.interval``; comparing tuples, rows sharing a cursor value are never lost
  between two batches. The cursor lives in the partition state.
- ``cdc``: logical decoding with ``pgoutput`` through
  ``pg_logical_slot_peek_binary_changes`` (psycopg has no replication protocol), decoded
  by :mod:`dataflare.connectors.pgoutput`. The slot (and the publication) are created when
  absent, *before* the initial snapshot (``cdc.snapshot_mode``), so no change is lost
  (one made while the snapshot runs may come twice: as ``read`` and as its change). A
  publication is not created for a table without a replica identity (PostgreSQL would
  fail the applications' updates and deletes on it).
  Records carry ``_meta`` (``op``: read/insert/update/delete/truncate, ``table``, ``lsn``,
  ``commit_ts``, ``xid``); a delete carries the REPLICA IDENTITY columns (the key), an
  update ``_meta.old`` when the server sends the old row or key. The slot's lag is a
  Prometheus gauge (``dataflare_postgres_slot_lag_bytes``) and a log line. A column
  added to a table comes in the records of its later changes; the value its default gave
  the rows already there is not in the stream: discovery reports it (``filled_with``)
  and a merge mirror gives it to its rows when it gains the column.
- ``hybrid``: the initial phase, then the ongoing one (``cdc`` or ``incremental``).

Delivery and the slot. Changes are *peeked*, never consumed on read: the partition state
holds the end LSN of the last transaction it emitted, and the slot is advanced
(``pg_replication_slot_advance``) only to the LSN of the *previous* snapshot. bytewax
calls ``snapshot()`` for epoch ``e`` only once everything of epoch ``e - 1`` went through
the dataflow and its snapshots were written, so the previous snapshot is durable: after a
crash the dataflow resumes from it or a later one, and everything after it is still in
the slot. A resumed partition skips transactions ending at or below its state LSN, so
nothing is emitted twice. A resume whose slot is gone, invalidated or moved past the
saved position is refused: the changes since are no longer on the server. Without
recovery ``snapshot()`` is never called and the slot is not advanced (every run re-reads
from the slot's position): run CDC with recovery.

Values: as psycopg loads them, made JSON-like (timestamps ISO-8601, ``numeric`` per
``decimal_handling``, ``bytea`` in PostgreSQL's hex text form, arrays as lists, json as
objects); infinite dates and timestamps as the strings ``"infinity"`` and
``"-infinity"``, the time ``24:00:00`` as that string. A value that cannot be converted
(a date before year 1 or after 9999) fails its row alone: a ``Failed`` entry naming the
column and the row, under the step's error policy. A broken connection, a terminated
backend, a deadlock are retried (``workflow.config.retry``); authentication errors, a
connection string libpq cannot read, missing tables, bad SQL are terminal.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, model_validator

from dataflare.config import Duration, LibpqDsn, Secret, Strict
from dataflare.connectors.incremental import (
    IncrementalCursor,
    IncrementalPartition,
    SqlTable,
    utc_start,
)
from dataflare.connectors.pgoutput import (
    ChangeDecoder,
    ValueDecoder,
    int_to_lsn,
    lsn_to_int,
    register_loaders,
)
from dataflare.connectors.schema import (
    DECIMAL_HANDLING,
    DecimalHandling,
    discoverer,
    table_json_schema,
)
from dataflare.connectors.sql_source import (
    Connection,
    cdc_block,
    now,
    query_value,
    read_key,
    row_records,
    selected_tables,
)
from dataflare.lineage import table_dataset
from dataflare.registry import BuildContext, source
from dataflare.retry import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

PSYCOPG_MISSING = "the postgres source needs psycopg: pip install 'psycopg[binary]'"


class PostgresSourceConfig(Strict):
    """Connection and read settings of a PostgreSQL source."""

    dsn: LibpqDsn | None = Field(
        None, description="libpq connection string or URL; the fields below override it."
    )
    host: str = Field("localhost", description="Server host.")
    port: int = Field(5432, ge=1, le=65535, description="Server port.")
    database: str | None = Field(None, description="Database name.")
    username: str | None = Field(None, description="User name.")
    password: Secret | None = Field(None, description="Password.")
    db_schema: str = Field("public", alias="schema", description="Schema of `table`.")
    table: str | None = Field(None, description="Table to read ('name' or 'schema.name').")
    key_columns: list[str] = Field(
        default_factory=list,
        description="Columns ordering reads and resumes (default: the primary key).",
    )
    batch_size: int = Field(1000, ge=1, description="Rows per batch.")
    partitions: int | None = Field(
        None,
        ge=1,
        description="Key ranges a full read is split into (default: one per "
        "`partition_rows` estimated rows; needs a single integer key).",
    )
    partition_rows: int = Field(
        1_000_000, ge=1, description="Estimated rows per key range when `partitions` is unset."
    )
    incremental_column: str | None = Field(
        None, description="Shorthand of `incremental.column` (selects mode incremental)."
    )
    stop_at_end: bool = Field(
        False,
        description="End the input instead of polling forever: CDC once every pending "
        "change was read (a catch-up run); incremental after the rows up to the highest "
        "cursor value seen at start (a scheduled sync; the next run goes on from there).",
    )
    decimal_handling: DecimalHandling = Field("number", description=DECIMAL_HANDLING)
    connect_timeout: Duration = Field(10.0, description="Connection timeout.")
    lag_report_interval: Duration = Field(
        30.0, description="CDC: how often the slot lag is measured and logged."
    )

    @model_validator(mode="after")
    def _check(self) -> PostgresSourceConfig:
        if self.table is not None and self.table.count(".") > 1:
            msg = f"table {self.table!r} must be 'name' or 'schema.name'"
            raise ValueError(msg)
        return self

    def conninfo(self) -> str:
        """The libpq connection string."""
        from psycopg.conninfo import make_conninfo

        given = self.model_fields_set
        kw: dict[str, Any] = {}
        if self.dsn is None or "host" in given:
            kw["host"] = self.host
        if self.dsn is None or "port" in given:
            kw["port"] = self.port
        if self.database:
            kw["dbname"] = self.database
        if self.username:
            kw["user"] = self.username
        if self.password is not None:
            kw["password"] = self.password.get_secret_value()
        kw["connect_timeout"] = max(1, int(self.connect_timeout))
        base = self.dsn.get_secret_value() if self.dsn is not None else ""
        return make_conninfo(base, **kw)

    def qualified(self, name: str | None = None) -> tuple[str, str]:
        """``(schema, table)`` of ``name`` (default: ``table``).

        ``schema.table`` is split when ``schema`` is not given; with ``schema`` given, a
        dot belongs to the table's name.
        """
        name = name or self.table
        if not name:
            msg = "config.table is required"
            raise ValueError(msg)
        if "." in name and "db_schema" not in self.model_fields_set:
            schema, _, table = name.partition(".")
            return schema, table
        return self.db_schema, name


# -- plumbing --------------------------------------------------------------------------------


def _psycopg() -> Any:
    try:
        import psycopg
    except ModuleNotFoundError as exc:  # pragma: no cover - psycopg is a dependency
        raise ModuleNotFoundError(PSYCOPG_MISSING) from exc
    return psycopg


class Database(Connection):
    """A PostgreSQL connection in UTC; connection failures (by SQLSTATE) are transient."""

    def __init__(self, step_id: str, conninfo: str, retry: Any, autocommit: bool = True) -> None:
        self.conninfo, self.autocommit = conninfo, autocommit
        super().__init__(step_id, retry, self._connect, _psycopg().Error, is_transient,
                         is_closed=lambda conn: bool(conn.closed))

    def _connect(self) -> Any:
        conn = _psycopg().connect(self.conninfo, autocommit=self.autocommit)
        register_loaders(conn.adapters)
        conn.execute("SET TIME ZONE 'UTC'")
        if not self.autocommit:
            conn.commit()
        return conn


# SQLSTATE classes worth a retry: connection exceptions, operator intervention (a
# terminated backend, a restarting server), insufficient resources, serialization
# failures, deadlocks and a lock not available.
_TRANSIENT_SQLSTATES = ("08", "57P", "53", "40001", "40P01", "55P03")
_TERMINAL_CONNECT = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "role ",
    # A connection string libpq cannot read (a port that is no number, an unknown sslmode,
    # a password with an unescaped "@" read as part of the host): no retry mends it.
    "connection is bad: invalid",
    "invalid connection option",
    # A startup option the server refuses (options='-c statement_timeout=abc').
    "invalid value for parameter",
    "unrecognized configuration parameter",
)
_STALE_ROWS = ("empty the mirror tables first: a snapshot upserts the rows there are, and "
               "rows deleted meanwhile would stay")
_MISREAD_HOST = re.compile(r"failed to resolve host '[^']*@")


def is_transient(exc: BaseException) -> bool:
    """Whether a psycopg error is worth a retry (a broken connection, a deadlock...)."""
    psycopg = _psycopg()
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith(_TRANSIENT_SQLSTATES)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        text = str(exc)
        return not (any(marker in text for marker in _TERMINAL_CONNECT)
                    or _MISREAD_HOST.search(text))
    return False


def _ident(*parts: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*parts)


def _columns_sql(names: Sequence[str]) -> Any:
    from psycopg import sql

    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def primary_key(conn: Any, schema: str, table: str) -> list[str]:
    """The primary key columns of ``schema.table``, in key order (empty without one)."""
    rows = conn.execute(
        """
        SELECT a.attname
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND i.indisprimary
         ORDER BY array_position(i.indkey::int2[], a.attnum)
        """,
        (schema, table),
    ).fetchall()
    return [r[0] for r in rows]


def _unique(conn: Any, schema: str, table: str, columns: list[str]) -> bool:
    """Whether a unique index (the primary key too) has only columns among ``columns``."""
    row = conn.execute(
        """
        SELECT 1
          FROM pg_index i
         WHERE i.indrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND i.indisunique
           AND i.indpred IS NULL AND NOT EXISTS (
               SELECT 1 FROM unnest(i.indkey::int2[]) k
                WHERE k = 0 OR NOT EXISTS (
                    SELECT 1 FROM pg_attribute a
                     WHERE a.attrelid = i.indrelid AND a.attnum = k
                       AND a.attname = ANY (%s)))
        """,
        (schema, table, columns),
    ).fetchone()
    return row is not None


def table_exists(conn: Any, schema: str, table: str) -> bool:
    """Whether ``schema.table`` exists."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", (schema, table)
    ).fetchone()
    return bool(row and row[0])


def load_rows(cur: Any, fetch: Callable[[], list[Sequence[Any]]]) -> list[Sequence[Any]]:
    """The rows ``fetch()`` returns from the cursor ``cur``.

    psycopg fails the whole fetch on one value it cannot convert: then the fetched result
    is converted again value by value, each such value an ``UnconvertibleValue`` (its row
    alone fails, see :func:`~dataflare.connectors.sql_source.row_records`).
    """
    psycopg = _psycopg()
    try:
        return fetch()
    except Exception as exc:
        # psycopg's own DataError (no SQLSTATE) is a value it could not convert; its other
        # errors come from the server or the connection.
        if isinstance(exc, psycopg.Error) and not (
            isinstance(exc, psycopg.DataError) and exc.sqlstate is None
        ):
            raise
    res = cur.pgresult
    values = ValueDecoder(cur.connection)
    types = [res.ftype(j) for j in range(res.nfields)]
    return [
        tuple(
            None if (raw := res.get_value(i, j)) is None else values.load(types[j], raw)
            for j in range(res.nfields)
        )
        for i in range(res.ntuples)
    ]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- table reads (full mode and the snapshots of cdc/hybrid) ----------------------------------


class TableRead:
    """One consistent read of a table (or of one key range of it) in key order.

    A ``REPEATABLE READ`` transaction with a server-side cursor; ``after`` (the last key
    read) is where a resumed read starts again. Without a key a resumed read starts over.
    """

    def __init__(
        self,
        db: Database,
        schema: str,
        table: str,
        key: list[str],
        batch_size: int,
        after: list[Any] | None = None,
        lower: Any = None,
        upper: Any = None,
        op: str | None = None,
        decimals: DecimalHandling = "number",
    ) -> None:
        self.db, self.schema, self.table, self.key = db, schema, table, key
        self.batch_size, self.decimals = batch_size, decimals
        self.after = after
        self.rows_read = 0
        self.lower, self.upper = lower, upper
        self.meta: dict[str, Any] = {"table": f"{schema}.{table}"}
        if op:
            self.meta["op"] = op
        self.cursor: Any = None
        self.names: list[str] = []
        self.done = False
        db.on_reconnect.append(self._lost)

    def _lost(self) -> None:
        self.cursor = None

    def _open(self, conn: Any) -> None:
        from psycopg import sql

        conds, params = [], []
        if self.after is not None and self.key:
            conds.append(
                sql.SQL("({}) > ({})").format(
                    _columns_sql(self.key), sql.SQL(", ").join(sql.Placeholder() * len(self.key))
                )
            )
            params.extend(self.after)
        if self.lower is not None:
            conds.append(sql.SQL("{} >= %s").format(_ident(self.key[0])))
            params.append(self.lower)
        if self.upper is not None:
            conds.append(sql.SQL("{} < %s").format(_ident(self.key[0])))
            params.append(self.upper)
        query = sql.SQL("SELECT * FROM {}").format(_ident(self.schema, self.table))
        if conds:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)
        if self.key:
            query += sql.SQL(" ORDER BY ") + _columns_sql(self.key)
        from psycopg import IsolationLevel

        if conn.isolation_level != IsolationLevel.REPEATABLE_READ:
            conn.rollback()
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        cur = conn.cursor(name=f"dataflare_{id(self):x}")
        cur.itersize = self.batch_size
        cur.execute(query, params)
        self.cursor = cur

    def _fetch(self, conn: Any) -> list[Sequence[Any]]:
        if self.cursor is None:
            self._open(conn)
        cur = self.cursor
        rows = load_rows(cur, lambda: cur.fetchmany(self.batch_size))
        if not self.names and cur.description:
            self.names = [d.name for d in cur.description]
        if len(rows) < self.batch_size:
            cur.close()
            self.cursor = None
            conn.commit()
            self.done = True
        return rows

    def read(self) -> list[Any]:
        """The next batch of records and failed rows (empty and ``done`` at the end)."""
        if self.done:
            return []
        rows = self.db.run(f"reading {self.schema}.{self.table}", self._fetch)
        if rows and self.key:
            idx = [self.names.index(k) for k in self.key]
            self.after = [query_value(rows[-1][i]) for i in idx]
        first, self.rows_read = self.rows_read + 1, self.rows_read + len(rows)
        return row_records(self.db.step_id, self.names, rows, self.meta, self.decimals, first)


def _key_or_configured(
    db: Database, cfg: PostgresSourceConfig, schema: str, table: str
) -> list[str]:
    """The columns a read orders by and resumes after (see ``sql_source.read_key``)."""

    def find(conn: Any) -> list[str]:
        if not table_exists(conn, schema, table):
            msg = f"table {schema}.{table} does not exist"
            raise LookupError(msg)
        return read_key(db.step_id, f"{schema}.{table}", cfg.key_columns,
                        primary_key(conn, schema, table),
                        lambda cols: _unique(conn, schema, table, cols))

    try:
        return db.run(f"looking up the key of {schema}.{table}", find)
    except LookupError as exc:
        msg = f"step '{db.step_id}': {exc}"
        raise RuntimeError(msg) from None


# -- full mode -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    lower: int | None
    upper: int | None

    def name(self, table: str) -> str:
        lo = "" if self.lower is None else str(self.lower)
        hi = "" if self.upper is None else str(self.upper)
        return f"{table}[{lo}:{hi})"

    @staticmethod
    def parse(name: str) -> _Range:
        inner = name[name.rindex("[") + 1 : -1]
        lo, _, hi = inner.partition(":")
        return _Range(int(lo) if lo else None, int(hi) if hi else None)


class FullPartition(StatefulSourcePartition[list[Any], dict[str, Any]]):
    """One key range of a full read; state: the last key read and whether it is done."""

    def __init__(self, src: PostgresSource, rng: _Range, state: dict[str, Any] | None) -> None:
        self.src = src
        cfg = src.cfg
        schema, table = cfg.qualified()
        self.db = Database(src.step_id, cfg.conninfo(), src.retry, autocommit=False)
        state = state or {}
        self.done = bool(state.get("done"))
        key = _key_or_configured(self.db, cfg, schema, table) if not self.done else []
        self.read = TableRead(
            self.db,
            schema,
            table,
            key,
            cfg.batch_size,
            state.get("after") if key else None,
            rng.lower,
            rng.upper,
            decimals=cfg.decimal_handling,
        )

    def next_batch(self) -> list[list[Any]]:
        """The next batches of records (see the class docs)."""
        if self.done:
            raise StopIteration
        batch = self.read.read()
        if self.read.done:
            self.done = True
        return [batch] if batch else []

    def snapshot(self) -> dict[str, Any]:
        """The resume state."""
        return {"after": self.read.after, "done": self.done}

    def close(self) -> None:
        """Close the connections."""
        self.db.close()


# -- incremental mode ------------------------------------------------------------------------


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fetch_all(conn: Any, query: str, params: list[Any]) -> tuple[list[str], list[Sequence[Any]]]:
    cur = conn.execute(query, params)
    return [d.name for d in cur.description], load_rows(cur, cur.fetchall)


def incremental_partition(src: PostgresSource, state: Any) -> IncrementalPartition:
    """A poll of the table by its incremental cursor (see ``connectors.incremental``)."""
    cfg = src.cfg
    schema, table = cfg.qualified()
    db = Database(src.step_id, cfg.conninfo(), src.retry)
    column, _, start = src.incremental_settings()
    key = [k for k in _key_or_configured(db, cfg, schema, table) if k != column]
    if state is None and db.run("reading the cursor column", lambda conn: conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND "
            "table_name = %s AND column_name = %s AND is_nullable = 'YES'",
            (schema, table, column)).fetchone()):
        log.warning("step %r: the incremental column %s of %s.%s may be NULL: rows where it "
                    "is NULL are never read (make it NOT NULL, or give those rows a value)",
                    src.step_id, column, schema, table)
    cursor = IncrementalCursor(column, key, start, src.lookback(), cfg.batch_size, state)
    sql_table = SqlTable(f"{schema}.{table}", f"{_quoted(schema)}.{_quoted(table)}", _quoted,
                         _fetch_all, query_value)
    return IncrementalPartition(db, sql_table, cursor, src.poll_interval(), cfg.stop_at_end,
                                cfg.decimal_handling)


# -- cdc and hybrid --------------------------------------------------------------------------

_LAG_GAUGE: Any = None


def slot_lag_gauge() -> Any:
    """The Prometheus gauge of replication slot lag (bytes of WAL not yet acknowledged)."""
    global _LAG_GAUGE
    if _LAG_GAUGE is None:
        from prometheus_client import Gauge

        _LAG_GAUGE = Gauge(
            "dataflare_postgres_slot_lag_bytes",
            "WAL bytes between the server's current position and the slot's confirmed one.",
            ["step", "slot"],
        )
    return _LAG_GAUGE


class ChangePartition(StatefulSourcePartition[list[Any], dict[str, Any]]):
    """The change stream of one replication slot, after an optional snapshot of the tables.

    State: ``phase`` (``snapshot``/``stream``), ``lsn`` (end of the last emitted
    transaction; the slot's position before a snapshot), and during a snapshot the table
    being read and its last key.
    """

    def __init__(self, src: PostgresSource, state: dict[str, Any] | None) -> None:
        self.src = src
        cfg, cdc = src.cfg, src.cdc_settings()
        self.slot = cdc.slot_name or f"dataflare_{src.step_id}".lower().replace("-", "_")
        self.publication = cdc.publication_name or f"dataflare_{src.step_id}".lower().replace(
            "-", "_"
        )
        self.batch_size = cfg.batch_size
        self.poll = timedelta(seconds=cdc.poll_interval)
        self.heartbeat = (timedelta(seconds=cdc.heartbeat_interval)
                          if cdc.heartbeat_interval is not None else None)
        self.last_heartbeat: datetime | None = None
        self.db = Database(src.step_id, cfg.conninfo(), src.retry)
        self.tables = src.cdc_tables()
        self.excluded = src.cdc_excluded()
        resumed = None if state is None else int(state["lsn"])
        snapshot_mode, streams = src.snapshot_plan()
        # A one-time read (hybrid, transition_after: never) makes no slot: one nobody
        # reads would keep the server's WAL for ever.
        start_lsn = self.db.run("preparing the replication slot",
                                lambda conn: self._prepare(conn, resumed)) if streams else 0
        self.decoder = ChangeDecoder(
            src.step_id,
            ValueDecoder(self.db.connection(), cfg.decimal_handling),
            self.tables or None,
            self.excluded,
        )
        self.streams = streams
        self.not_before = src.stream_not_before()
        # The tables a snapshot reads, fixed when it starts (its place is an index in them).
        self.snapshot_list: list[str] = list((state or {}).get("tables") or [])
        if state is None:
            self.lsn = start_lsn
            self.phase = "snapshot" if snapshot_mode in ("initial", "always") else "stream"
            self.table_index, self.after = 0, None
        else:
            self.lsn = int(state["lsn"])
            self.phase = state["phase"]
            self.table_index, self.after = state.get("table_index", 0), state.get("after")
            if snapshot_mode == "always" and self.phase == "stream":
                self.phase, self.table_index, self.after = "snapshot", 0, None
                self.snapshot_list = []
        if self.phase == "snapshot" and not self.snapshot_list:
            self.snapshot_list = self.tables or self.db.run(
                "listing the tables", self._published if streams else self._user_tables)
        # The state we resumed from is durable: the slot may move up to it at once.
        self.durable_lsn: int | None = self.lsn if state is not None else None
        self.advanced = 0
        self.read: TableRead | None = None
        self.read_db: Database | None = None
        self.skip_rows = 0
        self.awake: datetime | None = None
        self.ended = False
        self.last_lag_report: datetime | None = None
        self.snapshots_seen = state is not None
        self.first_emit: datetime | None = None
        self.warned_no_recovery = False
        if self.durable_lsn is not None:
            self._advance(self.durable_lsn)

    # set-up

    def _prepare(self, conn: Any, resumed: int | None) -> int:
        """Check or create the publication and the slot; the slot's position.

        ``resumed``: the position of the state resumed from, which the slot must not
        have passed (a slot dropped and made again, or moved by another reader, no longer
        holds the changes since).
        """
        cdc = self.src.cdc_settings()
        row = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
        ).fetchone()
        if row is None:
            if not cdc.create_publication:
                msg = (
                    f"step '{self.src.step_id}': publication '{self.publication}' does not "
                    "exist (create it or set cdc.create_publication: true)"
                )
                raise LookupError(msg)
            from psycopg import sql

            self._refuse_unidentified(conn)
            if self.tables:
                targets = sql.SQL(", ").join(_ident(*t.split(".", 1)) for t in sorted(self.tables))
                conn.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                        _ident(self.publication), targets
                    )
                )
            elif self.excluded:  # every table but those: the ones there now
                targets = sql.SQL(", ").join(_ident(*t.split(".", 1))
                                             for t in self._user_tables(conn))
                conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    _ident(self.publication), targets))
                log.warning("step '%s': publication %s lists every table but "
                            "cdc.exclude_tables, as they are now: a table created later is "
                            "not read (ALTER PUBLICATION %s ADD TABLE ...)", self.src.step_id,
                            self.publication, self.publication)
            else:
                conn.execute(
                    sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(_ident(self.publication))
                )
                log.warning("step '%s': publication %s publishes every table, also those "
                            "created later: PostgreSQL refuses UPDATE and DELETE on one "
                            "without a primary key or replica identity; list the tables "
                            "(cdc.include_tables) to avoid that", self.src.step_id,
                            self.publication)
            log.info("step '%s': created publication %s", self.src.step_id, self.publication)
        elif self.tables:
            published = {
                f"{r[0]}.{r[1]}"
                for r in conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                    (self.publication,),
                ).fetchall()
            }
            missing = sorted(set(self.tables) - published)
            if missing:  # a snapshot would read them, and then no change would come
                msg = (f"step '{self.src.step_id}': publication '{self.publication}' does not "
                       f"publish {', '.join(missing)}, so their changes would never be read: "
                       f"ALTER PUBLICATION {self.publication} ADD TABLE {', '.join(missing)} "
                       "(or leave them out of the source's tables)")
                raise LookupError(msg)
        lost = "wal_status = 'lost'" if conn.info.server_version >= 130000 else "false"
        row = conn.execute(
            f"SELECT plugin, confirmed_flush_lsn::text, {lost} FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (self.slot,),
        ).fetchone()
        gone = (
            "the server no longer holds the changes since the saved position "
            f"{int_to_lsn(resumed or 0)}, so the target would silently miss them; to start "
            "again from a new snapshot of the tables, run with a fresh recovery directory "
            f"(and cdc.snapshot_mode: initial; {_STALE_ROWS})"
        )
        reader = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s "
                              "AND active", (self.slot,)).fetchone()
        if reader is not None:  # retried: a crashed run's reader may take a moment to go
            msg = (f"replication slot '{self.slot}' is in use by another reader (server "
                   f"process {reader[0]}): two runs on one slot each miss the changes the "
                   "other reads; stop the other run, or give this one its own cdc.slot_name")
            raise TransientError(msg)
        if row is None and resumed is not None:
            msg = (f"step '{self.src.step_id}': cannot resume: replication slot "
                   f"'{self.slot}' no longer exists (dropped, or removed by the server); "
                   + gone)
            raise LookupError(msg)
        if row is not None and row[2]:
            msg = (f"step '{self.src.step_id}': replication slot '{self.slot}' was "
                   "invalidated by the server (max_slot_wal_keep_size): it lost changes it "
                   "had not delivered; drop the slot, then run with a fresh recovery "
                   "directory (and cdc.snapshot_mode: initial) to start from a new snapshot "
                   f"({_STALE_ROWS})")
            raise LookupError(msg)
        if row is not None and resumed is not None and lsn_to_int(row[1]) > resumed:
            msg = (f"step '{self.src.step_id}': cannot resume: replication slot "
                   f"'{self.slot}' was moved to {row[1]} by another reader; " + gone)
            raise LookupError(msg)
        if row is None:
            row = conn.execute(
                "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                (self.slot,),
            ).fetchone()
            log.info(
                "step '%s': created replication slot %s at %s", self.src.step_id, self.slot, row[0]
            )
            return lsn_to_int(row[0])
        if row[0] != "pgoutput":
            msg = (
                f"step '{self.src.step_id}': replication slot '{self.slot}' uses plugin "
                f"'{row[0]}', expected 'pgoutput'"
            )
            raise ValueError(msg)
        return lsn_to_int(row[1])

    def _published(self, conn: Any) -> list[str]:
        """The tables of the publication (all of them, or all but cdc.exclude_tables)."""
        return [r[0] for r in conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables "
            "WHERE pubname = %s ORDER BY 1", (self.publication,)).fetchall()
            if r[0] not in self.excluded]

    def _user_tables(self, conn: Any) -> list[str]:
        """The database's tables outside the system schemas, less cdc.exclude_tables."""
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY 1").fetchall()
        tables = [r[0] for r in rows if r[0] not in self.excluded]
        if not tables:
            msg = (f"step '{self.src.step_id}': cdc.exclude_tables leaves no table to "
                   f"publish in '{self.publication}'")
            raise ValueError(msg)
        return tables

    def _refuse_unidentified(self, conn: Any) -> None:
        """Refuse to publish a table whose updates and deletes could not be published.

        PostgreSQL fails every UPDATE and DELETE on a published table without a replica
        identity (no primary key, default identity): a new publication would break the
        applications writing to it.
        """
        rows = conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%%' "
            "AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS ("
            "  SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) "
            "AND (%(all)s OR n.nspname || '.' || c.relname = ANY(%(tables)s)) "
            "AND NOT n.nspname || '.' || c.relname = ANY(%(excluded)s) "
            "ORDER BY 1",
            {"all": not self.tables, "tables": sorted(self.tables),
             "excluded": sorted(self.excluded)},
        ).fetchall()
        if rows:
            names = ", ".join(r[0] for r in rows[:5]) + (" ..." if len(rows) > 5 else "")
            msg = (
                f"step '{self.src.step_id}': publication '{self.publication}' is not created: "
                f"{names} {'has' if len(rows) == 1 else 'have'} no primary key or replica "
                "identity, and PostgreSQL would fail every UPDATE and DELETE on a published "
                "table without one, breaking the applications that write to it; run ALTER "
                f"TABLE {rows[0][0]} REPLICA IDENTITY FULL (or add a primary key), or leave "
                "it out of cdc.include_tables"
            )
            raise ValueError(msg)

    # snapshot phase

    def _snapshot_batch(self) -> list[Any]:
        tables = self.snapshot_list
        while self.table_index < len(tables):
            if self.read is None:
                schema, table = tables[self.table_index].split(".", 1)
                self.read_db = Database(
                    self.src.step_id, self.src.cfg.conninfo(), self.src.retry, autocommit=False
                )
                key = _key_or_configured(self.read_db, self.src.cfg, schema, table)
                self.read = TableRead(
                    self.read_db, schema, table, key, self.batch_size, self.after, op="read",
                    decimals=self.src.cfg.decimal_handling,
                )
            batch = self.read.read()
            self.after = self.read.after
            if self.read.done:
                assert self.read_db is not None
                self.read_db.close()
                self.read, self.read_db = None, None
                self.table_index, self.after = self.table_index + 1, None
            if batch:
                return batch
        self.phase = "stream" if self.streams else "done"
        return []

    # stream phase

    def _requested(self) -> int:
        # The rows already read come first again until the slot moves at the next
        # snapshot; asking for as many new rows as old ones (up to 100 batches) keeps the
        # re-decoding of a long epoch linear rather than quadratic.
        return self.skip_rows + min(max(self.batch_size, self.skip_rows), 100 * self.batch_size)

    def _heartbeat_due(self) -> bool:
        if self.heartbeat is None:
            return False
        return self.last_heartbeat is None or now() - self.last_heartbeat >= self.heartbeat

    def _peek(self, conn: Any) -> tuple[int | None, list[tuple[str, bytes]]]:
        # The WAL flushed before the peek: when the peek finds nothing pending, nothing up
        # to there concerns the publication (a transaction committing later has a later
        # commit LSN and still comes), so the position may move there.
        flushed = None
        if self._heartbeat_due():
            flushed = lsn_to_int(
                conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]
            )
        try:
            rows = conn.execute(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                "%s, NULL, %s, 'proto_version', '1', 'publication_names', %s)",
                (self.slot, self._requested(), self.publication),
            ).fetchall()
        except _psycopg().errors.UndefinedObject as exc:
            if "publication" not in str(exc):
                raise
            # The slot decodes with the catalog as it was at each change: a publication
            # dropped and made again is missing there for good.
            msg = (f"step '{self.src.step_id}': slot '{self.slot}' cannot be read: "
                   f"publication '{self.publication}' was dropped while the slot held "
                   "changes, and the slot decodes them with the publication as it was; "
                   f"drop the slot (SELECT pg_drop_replication_slot('{self.slot}')), then "
                   "run with a fresh recovery directory to start from a new snapshot "
                   "(" + _STALE_ROWS + ")")
            raise LookupError(msg) from None
        return flushed, [(r[0], bytes(r[1])) for r in rows]

    def _stream_batch(self) -> list[Any]:
        requested = self._requested()
        flushed, rows = self.db.run(f"reading changes of slot '{self.slot}'", self._peek)
        records: list[Any] = []
        self.decoder.skip_below = self.lsn
        # Rows of the whole transactions read: the next peek returns them first again.
        consumed = 0
        for n, (lsn_text, data) in enumerate(rows, 1):
            tx = self.decoder.feed(data, lsn_to_int(lsn_text))
            if tx is None:
                continue
            consumed = n
            if tx.end_lsn > self.lsn:
                records.extend(tx.records)
                self.lsn = tx.end_lsn
        self.skip_rows = consumed
        if flushed is not None:
            self.last_heartbeat = now()
            if len(rows) < requested and consumed == len(rows) and flushed > self.lsn:
                # Idle: nothing pending up to the flushed WAL. Moving there lets the slot
                # advance at the next snapshot instead of holding every byte written since
                # the last change of the published tables (Debezium's heartbeat).
                log.debug("step '%s': idle, position moves to %s", self.src.step_id,
                          int_to_lsn(flushed))
                self.lsn = flushed
        if len(rows) < requested:
            if self.src.cfg.stop_at_end:
                self.ended = True
            self.awake = now() + self.poll
        else:
            self.awake = None
        return records

    def next_batch(self) -> list[list[Any]]:
        """The next batches of records (see the class docs)."""
        if self.phase == "done" or (self.ended and self.phase == "stream"):
            raise StopIteration
        if self.phase == "snapshot":
            batch = self._snapshot_batch()
            self.awake = None
            return [batch] if batch else []
        if self.not_before is not None and now() < self.not_before:
            self.awake = self.not_before
            return []
        records = self._stream_batch()
        self._report_lag()
        self._warn_without_recovery(bool(records))
        return [chunk for chunk in _chunks(records, self.batch_size)]

    def _warn_without_recovery(self, emitted: bool) -> None:
        if self.snapshots_seen or self.warned_no_recovery:
            return
        current = now()
        if emitted and self.first_emit is None:
            self.first_emit = current
        if self.first_emit is not None and current - self.first_emit > timedelta(minutes=2):
            self.warned_no_recovery = True
            log.warning(
                "step '%s': no snapshot yet: replication slot %s only moves with recovery "
                "on (dataflare run --recovery-dir DIR); until then the server keeps its WAL",
                self.src.step_id,
                self.slot,
            )

    def next_awake(self) -> datetime | None:
        """When to poll next."""
        return self.awake

    # acknowledgement

    def _advance(self, lsn: int) -> None:
        if lsn <= self.advanced:
            return

        def advance(conn: Any) -> None:
            conn.execute(
                "SELECT pg_replication_slot_advance(slot_name, %s::pg_lsn) "
                "FROM pg_replication_slots WHERE slot_name = %s "
                "AND confirmed_flush_lsn < %s::pg_lsn",
                (int_to_lsn(lsn), self.slot, int_to_lsn(lsn)),
            )

        try:
            self.db.run(f"advancing slot '{self.slot}' to {int_to_lsn(lsn)}", advance)
        except RuntimeError:
            # Not advancing only keeps WAL longer; the next snapshot tries again.
            log.warning(
                "step '%s': could not advance slot %s", self.src.step_id, self.slot, exc_info=True
            )
            return
        self.advanced = lsn
        self._report_lag(force=True)

    def _report_lag(self, force: bool = False) -> None:
        current = now()
        every = timedelta(seconds=self.src.cfg.lag_report_interval)
        if (not force and self.last_lag_report is not None
                and current - self.last_lag_report < every):
            return
        self.last_lag_report = current

        def lag(conn: Any) -> int | None:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
                "FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        try:
            value = self.db.run(f"measuring the lag of slot '{self.slot}'", lag)
        except RuntimeError:
            log.warning("step '%s': could not measure slot lag", self.src.step_id, exc_info=True)
            return
        if value is not None:
            slot_lag_gauge().labels(step=self.src.step_id, slot=self.slot).set(value)
            log.info(
                "step '%s': replication slot %s lag %d bytes", self.src.step_id, self.slot, value
            )

    def snapshot(self) -> dict[str, Any]:
        """The resume state."""
        self.snapshots_seen = True
        # Everything up to the previous snapshot is durable now (see the module docs).
        if self.durable_lsn is not None:
            self._advance(self.durable_lsn)
        state = {
            "phase": self.phase,
            "lsn": self.lsn,
            "table_index": self.table_index,
            "after": self.after,
            "tables": self.snapshot_list if self.phase == "snapshot" else [],
        }
        self.durable_lsn = self.lsn
        return state

    def close(self) -> None:
        """Close the connections."""
        if self.read_db is not None:
            self.read_db.close()
        self.db.close()


# -- the source ------------------------------------------------------------------------------


class PostgresSource(FixedPartitionedSource[list[Any], dict[str, Any]]):
    """A bytewax source reading one PostgreSQL table or change stream (see module docs)."""

    def __init__(self, ctx: BuildContext) -> None:
        self.step_id = ctx.step_id
        self.cfg: PostgresSourceConfig = ctx.config
        self.component = ctx.component
        self.retry = ctx.workflow.config.retry
        self.mode = effective_mode(ctx.component)

    # settings

    def incremental_settings(self) -> tuple[str, str, Any]:
        """``(column, cursor_field, start_value)`` of incremental reads."""
        inc = self.component.incremental
        column = (inc and (inc.column or inc.cursor_field)) or self.cfg.incremental_column
        if not column:
            msg = (
                f"source '{self.step_id}': mode incremental needs incremental.column "
                "(or config.incremental_column)"
            )
            raise ValueError(msg)
        field = (inc and inc.cursor_field) or column
        start = inc.start_value if inc else None
        if start is not None and inc is not None and inc.cursor_type == "integer":
            start = int(start)
        utc = utc_start(start)  # as text: the server casts it to the column's type
        return column, field, utc.isoformat() if isinstance(utc, datetime) else utc

    def poll_interval(self) -> float:
        """Seconds between incremental polls."""
        inc = self.component.incremental
        return float(inc.interval) if inc is not None else 10.0

    def lookback(self) -> float:
        """Seconds each incremental pass re-reads behind the last cursor value."""
        inc = self.component.incremental
        return float(inc.lookback) if inc is not None else 0.0

    def cdc_settings(self) -> Any:
        """The component's ``cdc`` block (defaults when absent)."""
        return cdc_block(self.component)

    def cdc_tables(self) -> list[str]:
        """``schema.table`` names whose changes are read."""
        cdc = self.cdc_settings()
        return selected_tables(cdc.include_tables, cdc.exclude_tables, self.cfg.table,
                               lambda t: ".".join(self.cfg.qualified(t)))

    def cdc_excluded(self) -> set[str]:
        """``schema.table`` names of ``cdc.exclude_tables``: never read nor published."""
        return {t if "." in t else ".".join(self.cfg.qualified(t))
                for t in self.cdc_settings().exclude_tables}

    def snapshot_plan(self) -> tuple[str, bool]:
        """``(snapshot_mode, streams)``: the snapshot policy and whether changes follow."""
        if self.mode == "hybrid":
            hybrid = self.component.hybrid
            never = hybrid is not None and hybrid.transition_after == "never"
            return "initial", not never
        return self.cdc_settings().snapshot_mode, True

    def stream_not_before(self) -> datetime | None:
        """The time a hybrid source switches to changes (``transition_after: timestamp``)."""
        hybrid = self.component.hybrid
        if self.mode != "hybrid" or hybrid is None or hybrid.transition_after != "timestamp":
            return None
        ts = hybrid.transition_timestamp
        if ts is None:
            msg = (
                f"source '{self.step_id}': hybrid.transition_after 'timestamp' needs "
                "hybrid.transition_timestamp"
            )
            raise ValueError(msg)
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)

    def ongoing_mode(self) -> str:
        """The mode after the initial phase: cdc, incremental or full."""
        if self.mode == "hybrid":
            hybrid = self.component.hybrid
            return hybrid.ongoing_mode if hybrid is not None else "cdc"
        return self.mode

    # bytewax

    def list_parts(self) -> list[str]:
        """Partitions: key ranges (full), the table (incremental) or the slot (cdc)."""
        mode = self.ongoing_mode()
        if mode == "cdc":
            return [f"cdc:{self.cdc_settings().slot_name or self.step_id}"]
        schema, table = self.cfg.qualified()
        if mode == "incremental":
            return [f"incremental:{schema}.{table}"]
        return [r.name(f"{schema}.{table}") for r in self._ranges(schema, table)]

    def _ranges(self, schema: str, table: str) -> list[_Range]:
        if self.cfg.partitions == 1:
            return [_Range(None, None)]
        db = Database(self.step_id, self.cfg.conninfo(), self.retry)
        try:
            key = _key_or_configured(db, self.cfg, schema, table)

            def bounds(conn: Any) -> tuple[Any, Any, float]:
                from psycopg import sql

                row = conn.execute(
                    sql.SQL("SELECT min({k}), max({k}) FROM {t}").format(
                        k=_ident(key[0]), t=_ident(schema, table)
                    )
                ).fetchone()
                est = conn.execute(
                    "SELECT reltuples FROM pg_class WHERE oid = "
                    "format('%%I.%%I', %s::text, %s::text)::regclass",
                    (schema, table),
                ).fetchone()
                return row[0], row[1], float(est[0] if est else 0)

            if len(key) != 1:
                return [_Range(None, None)]
            lo, hi, est = db.run(f"measuring {schema}.{table}", bounds)
        finally:
            db.close()
        if not isinstance(lo, int) or not isinstance(hi, int) or hi <= lo:
            return [_Range(None, None)]
        n = self.cfg.partitions or max(1, min(64, math.ceil(est / self.cfg.partition_rows)))
        n = min(n, hi - lo + 1)
        if n <= 1:
            return [_Range(None, None)]
        step = (hi - lo + 1) / n
        cuts = [lo + int(step * i) for i in range(1, n)]
        edges: list[int | None] = [None, *cuts, None]
        return [_Range(edges[i], edges[i + 1]) for i in range(n)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: dict[str, Any] | None
    ) -> StatefulSourcePartition[list[Any], dict[str, Any]]:
        """Build (or resume) one partition."""
        if for_part.startswith("cdc:"):
            return ChangePartition(self, resume_state)
        if for_part.startswith("incremental:"):
            return incremental_partition(self, resume_state)
        return FullPartition(self, _Range.parse(for_part), resume_state)


Mode = Literal["full", "incremental", "cdc", "hybrid"]


def effective_mode(component: Any) -> Mode:
    """The source's mode: as written, else incremental with incremental settings, else full."""
    mode = component.runs_as()
    if mode == "streaming":
        msg = (
            f"mode 'streaming' is not supported by type '{component.type}' "
            "(use 'cdc' for a change stream, or 'incremental')"
        )
        raise ValueError(msg)
    return cast(Mode, mode)


@source(
    "postgres",
    config=PostgresSourceConfig,
    datasets=lambda cfg, base: table_dataset("postgres", cfg, 5432),
    description="PostgreSQL table: full snapshot, incremental polling, or CDC (pgoutput; "
    "wal_level=logical, and published tables need a primary key or replica identity).",
    blocks=("mode", "incremental", "cdc", "hybrid"),
    requires=("psycopg",), extra="postgres",
)
def build_postgres_source(ctx: BuildContext) -> PostgresSource:
    """Build the PostgreSQL source of ``ctx``."""
    src = PostgresSource(ctx)
    if src.ongoing_mode() != "cdc" and not ctx.config.table:
        msg = f"source '{ctx.step_id}': config.table is required for mode '{src.mode}'"
        raise ValueError(msg)
    if src.ongoing_mode() == "incremental":
        src.incremental_settings()
    src.stream_not_before()  # a hybrid's switch time, when it switches at one
    return src


# -- discovery -------------------------------------------------------------------------------


_PG_LITERAL = re.compile(
    r"'((?:[^']|'')*)'(::[\w\s\[\](),.\"]+)?|(-?[\d.]+(e[-+]?\d+)?|true|false)")


def with_default(col: dict[str, Any], default: str | None, missing: str | None) -> dict[str, Any]:
    """``col`` with its DEFAULT expression and the value its rows that predate it hold.

    ``filled_with`` is PostgreSQL's "missing value" of a column added with a default to a
    table that had rows (kept until the table is rewritten), else the default itself when
    it is a constant; a volatile default (``clock_timestamp()``) gave each row its own.
    """
    if default is None:
        return col
    col["default"] = default
    if missing is None and (m := _PG_LITERAL.fullmatch(default)):
        missing = m[1].replace("''", "'") if m[1] is not None else m[3]
    if missing is not None:
        col["filled_with"] = missing
    return col


@discoverer("postgres")
def discover_postgres(ctx: BuildContext) -> dict[str, Any]:
    """Columns, types and keys of the source's tables.

    Without a table or CDC table list: every table of the configured schema.
    """
    cfg: PostgresSourceConfig = ctx.config
    db = Database(ctx.step_id, cfg.conninfo(), ctx.workflow.config.retry)
    try:
        cdc = getattr(ctx.component, "cdc", None)
        names = list(cdc.include_tables) if cdc is not None and cdc.include_tables else []
        wanted = [cfg.qualified(n) for n in names] + ([cfg.qualified()] if cfg.table else [])

        def describe(conn: Any) -> list[dict[str, Any]]:
            tables = list(wanted)
            if not tables:
                tables = [
                    (r[0], r[1])
                    for r in conn.execute(
                        "SELECT table_schema, table_name FROM information_schema.tables "
                        "WHERE table_schema = %s AND table_type = 'BASE TABLE' "
                        "ORDER BY table_name",
                        (cfg.db_schema,),
                    ).fetchall()
                ]
            out = []
            for schema, table in dict.fromkeys(tables):
                cols = [
                    with_default({"name": r[0], "type": r[1], "nullable": r[2] == "YES"},
                                 r[3], r[4])
                    for r in conn.execute(
                        "SELECT column_name, format_type(a.atttypid, a.atttypmod), is_nullable, "
                        "pg_get_expr(d.adbin, d.adrelid), "
                        "CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END "
                        "FROM information_schema.columns c "
                        "JOIN pg_attribute a ON a.attrelid = "
                        "format('%%I.%%I', c.table_schema, c.table_name)::regclass "
                        "AND a.attname = c.column_name "
                        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                        "WHERE c.table_schema = %s AND c.table_name = %s "
                        "ORDER BY c.ordinal_position",
                        (schema, table),
                    ).fetchall()
                ]
                if not cols:
                    msg = f"table {schema}.{table} does not exist"
                    raise LookupError(msg)
                out.append(
                    {
                        "schema": schema,
                        "name": table,
                        "primary_key": primary_key(conn, schema, table),
                        "columns": cols,
                        "json_schema": table_json_schema(cols, cfg.decimal_handling),
                    }
                )
            return out

        try:
            tables = db.run("discovering tables", describe)
        except LookupError as exc:
            msg = f"source '{ctx.step_id}': {exc}"
            raise ValueError(msg) from None
        return {"type": "postgres", "tables": tables}
    finally:
        db.close()
