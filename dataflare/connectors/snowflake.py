"""Snowflake destination: each batch staged as JSON documents, then loaded by one statement.

Connection: ``snowflake-connector-python`` with the seed's fields (``account``,
``warehouse``, ``database``, ``schema``, ``table``, ``role``, ``username``, ``password``);
``host``, ``port`` and ``protocol`` reach an account through a proxy or private endpoint.

A write is one transaction per flushed batch (``AUTOCOMMIT`` off):

- the records of a batch go, as one JSON document each, into a temporary staging table
  of the session (``executemany`` with array binding, 2,000 documents per round trip);
- ``append`` and ``overwrite`` load them with one ``INSERT INTO ... SELECT`` that casts
  each field to its column's type (``PARSE_JSON(doc)['field']::NUMBER``); ``merge`` runs
  one ``DELETE ... USING`` for CDC deletes and one ``MERGE INTO ... USING`` per set of
  fields (a record sets the fields it has; fields it lacks keep their stored values);
- the table is created from the records (``bool`` -> BOOLEAN, ``int`` -> NUMBER(38,0),
  ``float`` -> FLOAT, ``str`` -> VARCHAR, dicts and lists -> VARIANT), or with the types
  the workflow declares (:func:`dataflare.connectors.sql_writer.declared_types`), and
  widened when new fields appear. Snowflake cannot change a NUMBER column to FLOAT in
  place: an integer column that receives a fractional number is rebuilt (add, copy,
  drop, rename);
- names are quoted identifiers, kept exactly as written: a field ``email`` is the column
  ``"email"`` (Snowflake folds unquoted names to upper case, so query it quoted, or map the
  field to ``EMAIL`` in a mapping step).

Snowflake commits the open transaction at every DDL statement, so every DDL of a write
(the staging table and the positions table at connect, table creation and widening at
the start of a write) runs before its first DML statement: the rows, the ``overwrite``
emptying and the replay marks (:mod:`dataflare.connectors.sql_writer`) commit together.

A value the table refuses (SQLSTATE class 22 or 23, e.g. ``'abc'`` for a NUMBER column)
fails its record alone per ``error_handling`` (the batch is written in halves until the
refused records stand alone); lost connections are retried per the workflow's ``retry``.

Verified only against ``fakesnow`` (the connector's HTTP protocol served by DuckDB): the
SQL above is Snowflake's documented syntax, but no Snowflake account was reachable, so
its behaviour on Snowflake itself (the SQLSTATE of refused values, array binding, DDL
commit points, quoted identifiers in ``information_schema``) is untested here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from bytewax.dataflow import Stream
from pydantic import Field

from dataflare.config import Secret, Strict
from dataflare.connectors.schema import json_bytes
from dataflare.connectors.sql_writer import (
    BOOL,
    FLOAT,
    INT,
    JSON,
    POSITIONS_TABLE,
    TEXT,
    Dialect,
    Mark,
    quote_ident,
    table_destination,
    text_value,
)
from dataflare.lineage import Dataset, table_dataset
from dataflare.records import Failed
from dataflare.registry import BuildContext, destination

SQL_TYPES = {BOOL: "BOOLEAN", INT: "NUMBER(38,0)", FLOAT: "FLOAT", TEXT: "VARCHAR",
             JSON: "VARIANT"}
STAGE_ROWS = 2_000
"""Documents bound per ``executemany`` round trip."""


class SnowflakeConfig(Strict):
    """Write records to a Snowflake table."""

    account: str | None = Field(
        None, description="Account identifier (``orgname-account`` or a locator); required "
        "to run.")
    warehouse: str | None = Field(None, description="Virtual warehouse of the session.")
    database: str | None = Field(None, description="Database of the table; required to run.")
    schema_: str | None = Field(
        None, alias="schema", description="Schema of the table (the user's default when "
        "absent; created when missing).")
    table: str = Field(description="Table to write, a quoted identifier kept as written "
                       "(created from the records when absent).")
    role: str | None = Field(None, description="Role of the session.")
    username: str | None = Field(None, description="User name; required to run.")
    password: Secret | None = Field(None, description="Password.")
    host: str | None = Field(
        None, description="Host to connect to instead of the account's default "
        "(a proxy or private endpoint).")
    port: int | None = Field(None, ge=1, le=65535, description="Port (default 443).")
    protocol: Literal["https", "http"] = Field(
        "https", description="Protocol of the connection (http only for a local stand-in).")
    login_timeout: int = Field(60, ge=1, description="Seconds to wait for a login.")


def check_connection(cfg: SnowflakeConfig, step: str) -> None:
    """Refuse a config that lacks what a login needs (the seed's examples give only tables)."""
    missing = [name for name, value in (("account", cfg.account), ("database", cfg.database),
                                         ("username", cfg.username)) if not value]
    if missing:
        msg = (f"step {step!r}: a snowflake destination needs "
               f"{', '.join(repr(m) for m in missing)} in its config")
        raise ValueError(msg)


class SnowflakeDataError(Exception):
    """Snowflake refused a record's values (SQLSTATE class 22 or 23)."""


def sql_string(text: str) -> str:
    """A Snowflake string literal (quotes doubled, backslashes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _logical(data_type: str, scale: Any) -> str:
    kind = data_type.upper()
    if kind in ("NUMBER", "DECIMAL", "NUMERIC", "INT", "INTEGER", "BIGINT", "SMALLINT"):
        return INT if not scale else FLOAT
    if kind in ("FLOAT", "FLOAT4", "FLOAT8", "DOUBLE", "DOUBLE PRECISION", "REAL"):
        return FLOAT
    if kind == "BOOLEAN":
        return BOOL
    if kind in ("VARIANT", "OBJECT", "ARRAY"):
        return JSON
    return TEXT


class SnowflakeDialect(Dialect):
    """snowflake-connector-python: JSON staging, INSERT ... SELECT and MERGE."""

    def __init__(self, cfg: SnowflakeConfig, step: str, patience: float | None = 60.0
                 ) -> None:
        """A dialect of ``cfg``; ``patience``: how long a statement may wait on the network.

        It is ``config.retry``'s ``max_elapsed``: the connector's own retries of a query
        whose answer is lost otherwise go on for many minutes.
        """
        from snowflake.connector import errors

        self.cfg = cfg
        self.step = step
        self.patience = patience
        self.transient = (errors.OperationalError, errors.InterfaceError)
        self.refusals = (SnowflakeDataError,)
        self.conn: Any = None
        self.table = cfg.table
        self.schema = cfg.schema_
        prefix = f"{quote_ident(self.schema)}." if self.schema else ""
        self.target = prefix + quote_ident(self.table)
        self.positions = prefix + quote_ident(POSITIONS_TABLE)
        # A session's temporary table; the suffix keeps two writers of one session apart.
        self.stage = quote_ident(f"_dataflare_stage_{uuid.uuid4().hex[:12]}")
        self.types: dict[str, str] = {}

    def describe(self) -> str:
        """``snowflake table DATABASE.SCHEMA.TABLE``."""
        parts = [p for p in (self.cfg.database, self.schema, self.table) if p]
        return f"snowflake table {'.'.join(parts)}"

    def connect(self) -> None:
        """Log in (AUTOCOMMIT off), then create the schema, staging and positions tables."""
        import snowflake.connector

        cfg = self.cfg
        check_connection(cfg, self.step)
        kwargs: dict[str, Any] = {
            "account": cfg.account, "user": cfg.username, "database": cfg.database,
            "autocommit": False, "paramstyle": "qmark", "login_timeout": cfg.login_timeout,
            "network_timeout": self.patience,
            "protocol": cfg.protocol, "application": "DataFlare",
            "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
        }
        for name, value in (("password", cfg.password and cfg.password.get_secret_value()),
                            ("warehouse", cfg.warehouse), ("role", cfg.role),
                            ("schema", self.schema), ("host", cfg.host), ("port", cfg.port)):
            if value is not None and value != "":  # "${SF_HOST:-}": the account's default
                kwargs[name] = value
        self.conn = snowflake.connector.connect(**kwargs)
        cur = self.conn.cursor()
        if self.schema and not cur.execute(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = ?", (self.schema,)
        ).fetchall():
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)}")
        cur.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {self.stage} "
                    '("i" NUMBER(38,0), "del" BOOLEAN, "doc" VARCHAR)')
        self.ensure_positions()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """The statements up to COMMIT; ROLLBACK on an exception."""
        try:
            yield self.conn
        except BaseException:
            try:
                self.conn.rollback()
            except Exception:  # noqa: BLE001 - the original error matters, not this one
                pass
            raise
        self.conn.commit()

    def rolled_back(self) -> None:
        """Nothing to forget: the staging table is emptied before every use."""

    placeholder = "?"  # qmark

    def statement(self, sql: str, params: list[Any]) -> None:
        """Execute one statement with ``params``."""
        self._run(sql, params)

    def _run(self, sql: str, params: Any = None) -> Any:
        """Execute one statement; refused values become :class:`SnowflakeDataError`."""
        from snowflake.connector import errors

        try:
            return self.conn.cursor().execute(sql, params)
        except errors.ProgrammingError as exc:
            if (exc.sqlstate or "")[:2] in ("22", "23"):
                raise SnowflakeDataError(str(exc)) from exc
            raise

    def columns(self) -> dict[str, str] | None:
        """Columns of the table and their logical types, ``None`` when it does not exist."""
        schema_cond = "table_schema = ?" if self.schema else "table_schema = CURRENT_SCHEMA()"
        params = (self.schema, self.table) if self.schema else (self.table,)
        rows = self._run(
            "SELECT column_name, data_type, numeric_scale FROM information_schema.columns "
            f"WHERE {schema_cond} AND table_name = ? ORDER BY ordinal_position", params,
        ).fetchall()
        if not rows:
            return None
        self.types = {name: _logical(str(dtype), scale) for name, dtype, scale in rows}
        return dict(self.types)

    def create_table(self, columns: dict[str, str], key: tuple[str, ...]) -> bool:
        """CREATE TABLE IF NOT EXISTS, with ``key`` (when given) as primary key.

        Snowflake records the key but does not enforce it: the MERGE keeps keys unique.
        """
        cols = [f"{quote_ident(n)} {SQL_TYPES[t]}" for n, t in columns.items()]
        if key:
            cols.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in key)})")
        self._run(f"CREATE TABLE IF NOT EXISTS {self.target} ({', '.join(cols)})")
        self.types = dict(columns)
        return True

    def add_columns(self, columns: dict[str, str], filled: dict[str, str]) -> None:
        """ALTER TABLE ... ADD COLUMN IF NOT EXISTS, one per statement.

        ``filled`` is empty: Snowflake tables are not typed after a source table.
        """
        for n, t in columns.items():
            self._run(f"ALTER TABLE {self.target} ADD COLUMN IF NOT EXISTS "
                      f"{quote_ident(n)} {SQL_TYPES[t]}")
            self.types[n] = t

    def widen(self, column: str, kind: str) -> None:
        """Rebuild ``column`` with the wider type: add, copy, drop, rename."""
        col, tmp = quote_ident(column), quote_ident(f"{column}__dataflare_widen")
        self._run(f"ALTER TABLE {self.target} ADD COLUMN IF NOT EXISTS {tmp} {SQL_TYPES[kind]}")
        self._run(f"UPDATE {self.target} SET {tmp} = {col}")
        self._run(f"ALTER TABLE {self.target} DROP COLUMN {col}")
        self._run(f"ALTER TABLE {self.target} RENAME COLUMN {tmp} TO {col}")
        self.types[column] = kind

    def ensure_positions(self) -> None:
        """The mark table of this schema (created at connect: DDL would commit a write)."""
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self.positions} (destination VARCHAR NOT NULL, "
            "target VARCHAR NOT NULL, stream VARCHAR NOT NULL, run VARCHAR NOT NULL, "
            "position NUMBER(38,0) NOT NULL, ordered BOOLEAN NOT NULL, "
            "PRIMARY KEY (destination, target, stream))"
        )

    def load_positions(self, destination: str) -> dict[str, Mark]:
        """Marks of ``destination`` for this table."""
        rows = self._run(
            f"SELECT stream, run, position, ordered FROM {self.positions} "
            "WHERE destination = ? AND target = ?", (destination, self.table),
        ).fetchall()
        return {s: Mark(r, int(p), bool(o)) for s, r, p, o in rows}

    def save_positions(self, destination: str, marks: dict[str, Mark]) -> None:
        """Upsert marks with one MERGE each."""
        for stream, m in marks.items():
            self._run(
                f"MERGE INTO {self.positions} AS p USING (SELECT ? AS destination, ? AS target, "
                "? AS stream, ? AS run, ? AS position, ? AS ordered) AS s "
                "ON p.destination = s.destination AND p.target = s.target "
                "AND p.stream = s.stream "
                "WHEN MATCHED THEN UPDATE SET p.run = s.run, p.position = s.position, "
                "p.ordered = s.ordered "
                "WHEN NOT MATCHED THEN INSERT (destination, target, stream, run, position, "
                "ordered) VALUES (s.destination, s.target, s.stream, s.run, s.position, "
                "s.ordered)",
                (destination, self.table, stream, m.run, m.position, m.ordered),
            )

    def truncate(self) -> None:
        """DELETE every row (DML: it commits with the batch, unlike TRUNCATE)."""
        self._run(f"DELETE FROM {self.target}")

    # -- staging ------------------------------------------------------------------------
    def _doc(self, columns: list[str], row: dict[str, Any]) -> str:
        """The JSON document of a row: values of text columns as text, nulls left out."""
        doc: dict[str, Any] = {}
        for c in columns:
            v = row.get(c)
            if v is None:
                continue
            kind = self.types.get(c, TEXT)
            if v.__class__ is bool and kind in (INT, FLOAT):  # the cast would make it 1
                msg = f"column {c!r} is {SQL_TYPES[kind]}: {v!r} is no number"
                raise SnowflakeDataError(msg)
            doc[c] = text_value(v) if kind == TEXT else v
        return json_bytes(doc).decode()  # bytes as hex text (not a Python repr)

    def _stage_rows(self, columns: list[str], upserts: list[dict[str, Any]],
                    deletes: list[dict[str, Any]]) -> None:
        """Empty the staging table and bind the rows into it as documents."""
        self._run(f"DELETE FROM {self.stage}")
        docs = [(i, False, self._doc(columns, r)) for i, r in enumerate(upserts)]
        docs += [(len(docs) + i, True, self._doc(columns, r)) for i, r in enumerate(deletes)]
        cur = self.conn.cursor()
        for start in range(0, len(docs), STAGE_ROWS):
            cur.executemany(f'INSERT INTO {self.stage} ("i", "del", "doc") VALUES (?, ?, ?)',
                            docs[start:start + STAGE_ROWS])

    def _staged(self, columns: list[str], deletes: bool) -> str:
        """A query of the staged rows (``deletes``: the deleted ones), typed as the columns."""
        values = []
        for c in columns:
            field = f"d[{sql_string(c)}]"
            kind = self.types.get(c, TEXT)
            values.append(f"{field if kind == JSON else f'{field}::{SQL_TYPES[kind]}'} "
                          f"AS {quote_ident(c)}")
        where = '"del"' if deletes else 'NOT "del"'
        return (f"SELECT {', '.join(values)} FROM (SELECT \"i\", PARSE_JSON(\"doc\") AS d "
                f"FROM {self.stage} WHERE {where}) ORDER BY \"i\"")

    def append(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Stage the rows, then one INSERT ... SELECT casting them to the columns' types."""
        self._stage_rows(columns, rows, [])
        collist = ", ".join(quote_ident(c) for c in columns)
        self._run(f"INSERT INTO {self.target} ({collist}) {self._staged(columns, False)}")

    def merge(
        self, columns: list[str], key: tuple[str, ...], upserts: list[dict[str, Any]],
        deletes: list[dict[str, Any]],
    ) -> None:
        """Stage, then one DELETE ... USING for deletes and one MERGE for the rest."""
        self._stage_rows(columns, upserts, deletes)
        match = " AND ".join(f"t.{quote_ident(k)} = s.{quote_ident(k)}" for k in key)
        if deletes:
            self._run(f"DELETE FROM {self.target} AS t USING ({self._staged(list(key), True)}) "
                      f"AS s WHERE {match}")
        if upserts:
            updates = [c for c in columns if c not in key]
            matched = (" WHEN MATCHED THEN UPDATE SET "
                       + ", ".join(f"t.{quote_ident(c)} = s.{quote_ident(c)}" for c in updates)
                       if updates else "")
            collist = ", ".join(quote_ident(c) for c in columns)
            self._run(
                f"MERGE INTO {self.target} AS t USING ({self._staged(columns, False)}) AS s "
                f"ON {match}{matched} WHEN NOT MATCHED THEN INSERT ({collist}) VALUES ("
                + ", ".join(f"s.{quote_ident(c)}" for c in columns) + ")"
            )



@destination(
    "snowflake",
    config=SnowflakeConfig,
    description="A Snowflake table: append, overwrite or merge (staged, one MERGE per batch); "
    "CDC deletes; replay-safe appends.",
    blocks=("write_mode", "batch"),
    requires=("snowflake.connector",), extra="snowflake",
    datasets=lambda cfg, base: [Dataset(f"snowflake://{cfg.account or 'account'}", d.name)
                                for d in table_dataset("snowflake", cfg)],
)
def build_snowflake_destination(
    ctx: BuildContext[SnowflakeConfig], up: Stream[list[Any]]
) -> Stream[list[Failed]]:
    """The output steps of a ``snowflake`` destination (scoped under its id)."""
    cfg = ctx.config
    step = ctx.step_id
    check_connection(cfg, step)  # before the run starts, not at its first write
    patience = ctx.workflow.config.retry.max_elapsed
    return table_destination(ctx, up, lambda: SnowflakeDialect(cfg, step, patience))
