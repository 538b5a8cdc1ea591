"""PostgreSQL destination: COPY into the table or a staging table, one transaction per batch.

``append`` and ``overwrite`` COPY straight into the table (through the staging table
when it has row-level security, which ``COPY FROM`` does not support); ``merge`` COPYs into a
temporary staging table and runs one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (and
one ``DELETE ... USING`` for CDC deletes) per batch; a row the record would not change
is left as it is (no new row version, no ``UPDATE`` trigger) where the columns' types
allow the comparison (``_IDENTITY_EQUALITY``). A merge whose keys are all new (a
window's results, say) is COPYed straight into the table, at the rate of an append: each
batch is first tried that way in a savepoint, and on a key already there that COPY is
rolled back and the batch staged. After such a miss the next ``4**misses`` batches (at
most 64) are staged without a try, so a stream of updates wastes one COPY in 64 batches
(ADR 24). A batch is COPYed as text built column by column (:func:`copy_column`), in
parts of :data:`COPY_PART` rows. Shape, widening, replay safety and retries are
described in :mod:`dataflare.connectors.sql_writer`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import repeat
from typing import Any

from bytewax.dataflow import Stream
from pydantic import Field, model_validator

from dataflare.config import LibpqDsn, Secret, Strict
from dataflare.connectors.column_types import SourceColumns, source_columns
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
    tie_to_row,
)
from dataflare.lineage import table_dataset
from dataflare.records import Failed
from dataflare.registry import BuildContext, destination

SQL_TYPES = {
    BOOL: "boolean",
    INT: "bigint",
    FLOAT: "double precision",
    TEXT: "text",
    JSON: "jsonb",
}
LOGICAL = {
    "boolean": BOOL,
    "bigint": INT,
    "integer": INT,
    "smallint": INT,
    "double precision": FLOAT,
    "real": FLOAT,
    "numeric": FLOAT,
    "jsonb": JSON,
    "json": JSON,
}


_SQL_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?[A-Za-z ]*"
                       r"(\[\])*")


class PostgresDestinationConfig(Strict):
    """Write records to a PostgreSQL table."""

    dsn: LibpqDsn | None = Field(
        None, description="libpq connection string or URL (instead of host/port/...)."
    )
    host: str = Field("localhost", description="Server host.")
    port: int = Field(5432, description="Server port.")
    database: str = Field("postgres", description="Database name.")
    username: str = Field("postgres", description="User name.")
    password: Secret | None = Field(None, description="Password.")
    schema_: str = Field("public", alias="schema", description="Schema of the table.")
    table: str = Field(
        description="Table to write (created from the records when absent); 'schema.table' "
        "when `schema` is not given (with `schema`, a dot is part of the table's name)."
    )
    connect_timeout: int = Field(10, ge=1, description="Seconds to wait for a connection.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="SQL types of columns of the table when it is created or widened, e.g. "
        "{amount: 'numeric(12,2)', seen: timestamptz}; other columns take the type of the "
        "upstream database table's column (when the records come from one: a source's "
        "table, or the table of a change stream the records carry in _meta.table) or one "
        "inferred from the values.",
    )

    @model_validator(mode="after")
    def _check(self) -> PostgresDestinationConfig:
        if not self.table:
            msg = "a postgres destination needs 'table'"
            raise ValueError(msg)
        for name, sql_type in self.columns.items():
            if not _SQL_TYPE.fullmatch(sql_type):
                msg = f"columns.{name}: {sql_type!r} is not a SQL type (e.g. 'numeric(12,2)')"
                raise ValueError(msg)
        return self

    def qualified(self) -> tuple[str, str]:
        """``(schema, table)``: ``table`` split at its first dot unless ``schema`` is given."""
        if "." in self.table and "schema_" not in self.model_fields_set:
            schema, _, table = self.table.partition(".")
            return schema, table
        return self.schema_, self.table

    def conninfo(self) -> str:
        """The libpq connection string."""
        from psycopg.conninfo import make_conninfo

        if self.dsn is not None:
            return make_conninfo(self.dsn.get_secret_value(), connect_timeout=self.connect_timeout)
        return make_conninfo(
            host=self.host,
            port=self.port,
            dbname=self.database,
            user=self.username,
            password=self.password.get_secret_value() if self.password else None,
            connect_timeout=self.connect_timeout,
        )


class PostgresDialect(Dialect):
    """psycopg 3: COPY, staging tables and ON CONFLICT.

    A created table takes ``config.columns`` types, else the types (and primary key) of
    the database table upstream (``carried``, asked for when the table is created), else
    types inferred from the values. Array columns receive lists as arrays.
    """

    def __init__(self, cfg: PostgresDestinationConfig,
                 source_types: Callable[[str | None], SourceColumns | None] | None = None
                 ) -> None:
        import psycopg

        self.cfg = cfg
        self.source_types = source_types
        self.arrays: set[str] = set()
        self.transient = (psycopg.OperationalError, psycopg.InterfaceError)
        self.refusals = (psycopg.DataError, psycopg.IntegrityError)  # SQLSTATE 22, 23
        self._unprivileged = psycopg.errors.InsufficientPrivilege  # 42501, see refuses()
        self.conn: Any = None
        self.schema, self.table = cfg.qualified()
        self.target = f"{quote_ident(self.schema)}.{quote_ident(self.table)}"
        self.positions = f"{quote_ident(self.schema)}.{quote_ident(POSITIONS_TABLE)}"
        self._staged: frozenset[str] | None = None
        """Once the staging table exists: the target's columns whose equality is identity."""
        self._stage_filled = False
        """Whether this transaction put rows in the staging table (a commit empties it)."""
        self._arbiter = False
        """Whether the target has an immediate unique index on exactly the merge key."""
        self._secured: bool | None = None
        """Whether the target has row-level security (``None``: not asked yet)."""
        self._may_update = False
        """Whether the role's privileges on the target were found to allow a merge."""
        self._misses = 0
        """Tries in a row of a COPY straight into the target that met a key already there."""
        self._staging = 0
        """Batches to stage before the next try of a COPY straight into the target."""
        self.types: dict[str, str] = {}

    def refuses(self, exc: BaseException) -> bool:
        """A bad value or violated constraint (SQLSTATE 22, 23), or a row a policy refuses.

        A row-level security policy refuses a row with 42501, as a missing privilege does:
        told apart by the message, so where the server's messages are not in English such
        a row stops the run as a missing privilege does.
        """
        return super().refuses(exc) or (isinstance(exc, self._unprivileged)
                                        and _ROW_SECURITY in str(exc))

    def worth_retry(self, exc: BaseException) -> bool:
        """A lost connection, a restarting server; not a wrong password or database."""
        from dataflare.connectors.postgres import is_transient

        return is_transient(exc)

    def describe(self) -> str:
        """``postgres table schema.table``."""
        return f"postgres table {self.schema}.{self.table}"

    def connect(self) -> None:
        """Connect (autocommit off: every write is one explicit transaction)."""
        import psycopg

        self.conn = psycopg.connect(self.cfg.conninfo(), autocommit=True)
        self._staged = self._secured = None
        self._may_update = False

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """One transaction on the connection."""
        try:
            with self.conn.transaction():
                yield self.conn
        finally:
            self._stage_filled = False  # emptied by the commit, or rolled back

    def rolled_back(self) -> None:
        """The staging table may have gone with the transaction."""
        self._staged = self._secured = None

    def _sql_type(self, name: str, logical: str) -> str:
        if name in self.cfg.columns:
            return self.cfg.columns[name]
        return self.source_type(name, logical) or SQL_TYPES[logical]

    def _declare(self, columns: dict[str, str]) -> list[str]:
        """``"name" type`` of each column; notes the arrays and JSON columns."""
        out = []
        for name, logical in columns.items():
            sql_type = self._sql_type(name, logical)
            if sql_type.endswith("[]"):
                self.arrays.add(name)
            elif sql_type.lower().startswith("json"):
                logical = JSON
            elif logical == JSON:  # numbers and text mixed, for a numeric column
                logical = TEXT
            self.types[name] = logical
            out.append(f"{quote_ident(name)} {sql_type}")
        return out

    def _lock_schema(self) -> None:
        """Hold the schema's DataFlare lock to the transaction's end.

        Two writers' ``CREATE ... IF NOT EXISTS`` of one schema or table at once make the
        second fail on a unique index of the catalog (both checked before either
        committed); under the lock the second finds the first's.
        """
        self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                          (f"dataflare.schema:{self.schema}",))

    def create_table(self, columns: dict[str, str], key: tuple[str, ...]) -> bool:
        """CREATE SCHEMA and TABLE IF NOT EXISTS, typed and keyed as the class docs say.

        ``False``: another writer made the table meanwhile.
        """
        self._lock_schema()
        if self.conn.execute("SELECT to_regclass(%s)", (self.target,)).fetchone()[0]:
            return False
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)}")
        self.types = {}
        # every column the configuration types is created, present in the records or not
        columns = {**columns, **{n: TEXT for n in self.cfg.columns if n not in columns}}
        cols = self._declare(columns)
        carried = self.carried()
        if not key and carried is not None and carried.primary_key and not carried.unbounded \
                and all(k in columns for k in carried.primary_key):
            key = carried.primary_key  # a change stream repeats keys: appends keep no key
        if key:
            cols.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in key)})")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self.target} ({', '.join(cols)})")
        return True

    def columns(self) -> dict[str, str] | None:
        """Columns of the table, ``None`` when it does not exist."""
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (self.schema, self.table),
        ).fetchall()
        if not rows:
            return None
        self.types = {name: LOGICAL.get(dtype, TEXT) for name, dtype in rows}
        self.arrays = {name for name, dtype in rows if dtype == "ARRAY"}
        return dict(self.types)

    def add_columns(self, columns: dict[str, str], filled: dict[str, str]) -> None:
        """ALTER TABLE ... ADD COLUMN IF NOT EXISTS; a filled one with a DEFAULT, then dropped.

        PostgreSQL keeps such a default as the value of the rows already there, without
        rewriting the table.
        """
        from psycopg.sql import SQL, Literal

        adds = [SQL("ADD COLUMN IF NOT EXISTS {} DEFAULT {}").format(SQL(decl), Literal(
            filled[name])) if name in filled else SQL(f"ADD COLUMN IF NOT EXISTS {decl}")
            for name, decl in zip(columns, self._declare(columns), strict=True)]
        self.conn.execute(SQL("ALTER TABLE {} {}").format(SQL(self.target), SQL(", ").join(adds)))
        if filled:
            drops = ", ".join(f"ALTER COLUMN {quote_ident(name)} DROP DEFAULT" for name in filled)
            self.conn.execute(f"ALTER TABLE {self.target} {drops}")
        self._staged = None

    def widen(self, column: str, kind: str) -> None:
        """ALTER COLUMN ... TYPE."""
        self.conn.execute(
            f"ALTER TABLE {self.target} ALTER COLUMN {quote_ident(column)} TYPE {SQL_TYPES[kind]}"
        )
        self.types[column] = kind
        self._staged = None

    def ensure_positions(self) -> None:
        """The mark table of this schema."""
        self._lock_schema()
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.positions} (destination text NOT NULL, "
            "target text NOT NULL, stream text NOT NULL, run text NOT NULL, "
            "position bigint NOT NULL, ordered boolean NOT NULL, "
            "PRIMARY KEY (destination, target, stream))"
        )

    def load_positions(self, destination: str) -> dict[str, Mark]:
        """Marks of ``destination`` for this table."""
        rows = self.conn.execute(
            f"SELECT stream, run, position, ordered FROM {self.positions} "
            "WHERE destination = %s AND target = %s",
            (destination, self.table),
        ).fetchall()
        return {s: Mark(r, int(p), bool(o)) for s, r, p, o in rows}

    def save_positions(self, destination: str, marks: dict[str, Mark]) -> None:
        """Upsert marks."""
        with self.conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {self.positions} "
                "(destination, target, stream, run, position, ordered) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (destination, target, stream) "
                "DO UPDATE SET run = EXCLUDED.run, position = EXCLUDED.position, "
                "ordered = EXCLUDED.ordered",
                [(destination, self.table, s, m.run, m.position, m.ordered)
                 for s, m in marks.items()],
            )

    def truncate(self) -> None:
        """DELETE every row (transactional, unlike a concurrent-unsafe TRUNCATE)."""
        self.conn.execute(f"DELETE FROM {self.target}")

    def _copy(self, table: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """COPY ``rows`` into ``table`` as text, formatted column by column.

        The text is made and sent in parts of :data:`COPY_PART` rows, so the server
        inserts one part while the next is made.
        """
        import psycopg
        from psycopg.adapt import Transformer

        tx = Transformer.from_context(self.conn)
        encoding = self.conn.info.encoding
        kinds = [(c, "array" if c in self.arrays else self.types.get(c)) for c in columns]
        collist = ", ".join(quote_ident(c) for c in columns)
        try:
            with (self.conn.cursor() as cur,
                  cur.copy(f"COPY {table} ({collist}) FROM STDIN") as cp):
                for i in range(0, len(rows), COPY_PART):
                    part = rows[i:i + COPY_PART]
                    fields = [copy_column(list(map(dict.get, part, repeat(c))), kind, tx,
                                          encoding) for c, kind in kinds]
                    lines = map("\t".join, zip(*fields, strict=True))
                    cp.write(("\n".join(lines) + "\n").encode(encoding))
        except psycopg.Error as exc:
            _name_row(exc, rows)
            raise

    def append(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """COPY the rows into the table.

        A table with row-level security is written through the staging table: ``COPY
        FROM`` refuses it to a role its policies apply to.
        """
        if not self._row_security():
            self._copy(self.target, columns, rows)
            return
        self._stage(())
        self._fill_stage(columns, rows)
        collist = ", ".join(quote_ident(c) for c in columns)
        self.conn.execute(f"INSERT INTO {self.target} ({collist}) SELECT {collist} "
                          "FROM _dataflare_stage")

    def _row_security(self) -> bool:
        """Whether the target has row-level security (asked once per connection)."""
        if self._secured is None:
            row = self.conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = "
                                    "%s::regclass", (self.target,)).fetchone()
            self._secured = bool(row and row[0])
        return self._secured

    def append_sifting(
        self, columns: list[str], rows: list[dict[str, Any]]
    ) -> list[tuple[int, str, str]] | None:
        """COPY the rows as text into a scratch table, then insert each in a subtransaction.

        One server-side loop (a ``DO`` block) casts each row as COPY would and catches what
        the table refuses (SQLSTATE classes 22 and 23, and rows a row-level security policy
        refuses), so finding 2,000 refused rows is
        one pass, not a bisection of COPYs. Returns ``(index, error type, message)`` of
        each refused row.
        """
        import psycopg

        types = dict(self.conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (self.target,),
        ).fetchall())
        names = [quote_ident(c) for c in columns]
        self.conn.execute("DROP TABLE IF EXISTS pg_temp._dataflare_sift")
        self.conn.execute("DROP TABLE IF EXISTS pg_temp._dataflare_refused")
        self.conn.execute(
            "CREATE TEMP TABLE _dataflare_sift (_i integer, "
            + ", ".join(f"{n} text" for n in names) + ") ON COMMIT DROP")
        self.conn.execute("CREATE TEMP TABLE _dataflare_refused (i integer, state text, "
                          "message text) ON COMMIT DROP")
        self._copy("_dataflare_sift", ["_i", *columns],
                   [{**row, "_i": i} for i, row in enumerate(rows)])
        values = ", ".join(f"r.{n}::{types.get(c, 'text')}" for n, c in zip(
            names, columns, strict=True))
        body = (
            "DECLARE r record; BEGIN FOR r IN SELECT * FROM _dataflare_sift ORDER BY _i LOOP "
            f"BEGIN INSERT INTO {self.target} ({', '.join(names)}) VALUES ({values}); "
            "EXCEPTION WHEN data_exception OR integrity_constraint_violation THEN "
            "INSERT INTO _dataflare_refused VALUES (r._i, SQLSTATE, SQLERRM); "
            "WHEN insufficient_privilege THEN "
            f"IF strpos(SQLERRM, '{_ROW_SECURITY}') = 0 THEN RAISE; END IF; "
            "INSERT INTO _dataflare_refused VALUES (r._i, SQLSTATE, SQLERRM); END; "
            "END LOOP; END"
        )
        self.conn.execute("DO " + _dollar_quoted(body))
        refused = self.conn.execute(
            "SELECT i, state, message FROM _dataflare_refused ORDER BY i").fetchall()
        return [(i, psycopg.errors.lookup(state).__name__, message)
                for i, state, message in refused]

    def _stage(self, key: tuple[str, ...]) -> frozenset[str]:
        """Create the staging table; the columns a merge may leave alone when unchanged.

        Also notes whether ``key`` has a unique index that refuses a key already there at
        once (not deferred, not partial): ``ON CONFLICT`` would use it, and a COPY
        straight into the table relies on it (not tried with row-level security, which
        COPY FROM does not support).
        """
        if self._staged is None:
            # The target's columns without its constraints: deletes stage only the key. It
            # is made again after the target widens.
            self.conn.execute("DROP TABLE IF EXISTS _dataflare_stage")
            self.conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _dataflare_stage ON COMMIT DELETE ROWS "
                f"AS SELECT * FROM {self.target} WITH NO DATA"
            )
            rows = self.conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "LEFT JOIN pg_collation c ON c.oid = a.attcollation WHERE a.attrelid = "
                "%s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
                "AND coalesce(c.collisdeterministic, true)",
                (self.target,),
            ).fetchall()
            self._staged = frozenset(name for name, sql_type in rows
                                     if _IDENTITY_EQUALITY.fullmatch(sql_type))
            self._arbiter = bool(self.conn.execute(
                "SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisunique "
                "AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL "
                "AND i.indexprs IS NULL AND (SELECT array_agg(a.attname::text ORDER BY "
                "a.attname::text) FROM pg_attribute a WHERE a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey)) = %s",
                (self.target, sorted(key)),
            ).fetchone())
        return self._staged

    def _check_update_privileges(self) -> None:
        """Refuse a merge the role could only do while every key is new.

        ``ON CONFLICT DO UPDATE`` needs SELECT and UPDATE on the table; a batch of new keys
        goes in by COPY without them, so a missing grant would show only at the first
        update, maybe days later. Asked once per connection (column grants count).
        """
        if self._may_update:
            return
        select, update = self.conn.execute(
            "SELECT has_any_column_privilege(%s::regclass, 'SELECT'), "
            "has_any_column_privilege(%s::regclass, 'UPDATE')", (self.target, self.target),
        ).fetchone()
        missing = [name for name, held in (("SELECT", select), ("UPDATE", update)) if not held]
        if missing:
            msg = (f"{self.describe()}: the role lacks {' and '.join(missing)} on the table, "
                   "which a merge needs (INSERT ... ON CONFLICT DO UPDATE reads and updates "
                   f"the rows whose key is already there); grant {', '.join(missing)}")
            raise RuntimeError(msg)
        self._may_update = True

    def _copied_straight(self, columns: list[str], rows: list[dict[str, Any]]) -> bool:
        """Whether ``rows`` went into the target by COPY, none of their keys being there.

        Tried in a savepoint (see the module docs); a refusal other than a key already
        there is raised, as the staged merge would raise it.
        """
        import psycopg

        # COPY FROM refuses a table with row-level security (INSERT does not).
        if not self._arbiter or self._row_security() or self._staging:
            self._staging = max(self._staging - 1, 0)
            return False
        try:
            with self.conn.transaction():
                self._copy(self.target, columns, rows)
        except psycopg.errors.UniqueViolation:
            self._misses = min(self._misses + 1, 3)
            self._staging = 4 ** self._misses
            return False
        self._misses = 0
        return True

    def merge(
        self, columns: list[str], key: tuple[str, ...], upserts: list[dict[str, Any]],
        deletes: list[dict[str, Any]],
    ) -> None:
        """One DELETE ... USING, then a COPY of new keys or one INSERT ... ON CONFLICT."""
        import psycopg

        comparable = self._stage(key)
        if upserts and any(c not in key for c in columns):
            self._check_update_privileges()
        stage = "_dataflare_stage"
        keycols = ", ".join(quote_ident(k) for k in key)
        if deletes:
            self._fill_stage(list(key), deletes)
            match = " AND ".join(f"t.{quote_ident(k)} = s.{quote_ident(k)}" for k in key)
            self.conn.execute(f"DELETE FROM {self.target} AS t USING {stage} AS s WHERE {match}")
        if upserts and not self._copied_straight(columns, upserts):
            self._fill_stage(columns, upserts)
            collist = ", ".join(quote_ident(c) for c in columns)
            updates = [quote_ident(c) for c in columns if c not in key]
            action = (
                "DO UPDATE SET "
                + ", ".join(f"{c} = EXCLUDED.{c}" for c in updates)
                if updates
                else "DO NOTHING"
            )
            if updates and comparable.issuperset(c for c in columns if c not in key):
                # A row the record leaves as it is stays untouched (no new row version).
                action += (f" WHERE (t.{', t.'.join(updates)}) IS DISTINCT FROM "
                           f"(EXCLUDED.{', EXCLUDED.'.join(updates)})")
            # Inserting in key order keeps the primary key index's pages hot.
            try:
                self.conn.execute(
                    f"INSERT INTO {self.target} AS t ({collist}) SELECT {collist} FROM {stage} "
                    f"ORDER BY {keycols} ON CONFLICT ({keycols}) {action}"
                )
            except psycopg.errors.InvalidColumnReference as exc:
                msg = (f"{self.describe()} has no primary key or unique index on "
                       f"({', '.join(key)}), which merge_key needs")
                raise RuntimeError(msg) from exc
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:  # not transient
                msg = (f"{self.describe()}: the unique constraint on ({', '.join(key)}) is "
                       "DEFERRABLE, which a merge cannot use (PostgreSQL's ON CONFLICT "
                       "needs an immediate one); make it NOT DEFERRABLE or add a unique "
                       f"index on ({', '.join(key)})")
                raise RuntimeError(msg) from exc

    def _fill_stage(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """COPY ``rows`` into the staging table, emptied first when this transaction used it."""
        if self._stage_filled:
            self.conn.execute("DELETE FROM _dataflare_stage")
        self._copy("_dataflare_stage", columns, rows)
        self._stage_filled = True


_ROW_SECURITY = "row-level security policy"
"""In PostgreSQL's message for a row a policy refuses (42501, like a missing privilege)."""

COPY_PART = 2_000
"""Rows of a COPY made and sent at a time (see :meth:`PostgresDialect._copy`)."""

# Types whose equality (IS DISTINCT FROM) holds between identical values only: a merge
# leaves a row alone when the record would not change it. Floats too, where 0.0 = -0.0
# is the one exception (a stored 0.0 stays when -0.0 arrives). Not numeric without a
# scale (1.0 = 1.00), jsonb (its numbers likewise), json (no equality), intervals, arrays.
_IDENTITY_EQUALITY = re.compile(
    r"boolean|smallint|integer|bigint|real|double precision|text|uuid|date|bytea"
    r"|character varying(\(\d+\))?|character\(\d+\)|numeric\(\d+,\d+\)"
    r"|timestamp(\(\d\))? with(out)? time zone|time(\(\d\))? without time zone"
)

# COPY's text format: fields split by tabs, rows by newlines, NULL as \N, and these escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                               "\v": "\\v", "\f": "\\f", "\r": "\\r"})
_COPY_SPECIAL = re.compile("[\\\\\b\t\n\v\f\r]")
_NULL = "\\N"
_PLAIN = frozenset({str, int, float, type(None)})
"""Types whose COPY text is ``str(value)`` (psycopg's text dumpers write the same)."""


_COPY_CONTEXT = re.compile(r"COPY [^,]+, line (\d+)(?:, column ([^:]+))?")


def _name_row(exc: Any, rows: list[dict[str, Any]]) -> None:
    """Tie a refused COPY to its row: PostgreSQL names the COPY's line and column.

    The message then names the column instead of a line number nobody can look up.
    """
    m = _COPY_CONTEXT.match(getattr(exc.diag, "context", None) or "")
    if m is None or not 0 < int(m[1]) <= len(rows):
        return
    lines = [line for line in str(exc).splitlines() if not line.startswith("CONTEXT:")]
    if m[2] and lines:
        lines[0] += f" (column {m[2]})"
    tie_to_row(exc, rows[int(m[1]) - 1], "\n".join(lines))


def copy_column(values: list[Any], kind: str | None, tx: Any, encoding: str) -> list[str]:
    """The COPY text of each value of one column of logical type ``kind``.

    Text, integers and floats are formatted here in bulk; other values (booleans, dates,
    decimals, JSON, arrays) through psycopg's dumpers (``tx``), as ``write_row`` would:
    a JSON column receives every value as JSON, an array column lists as arrays, other
    columns dicts and lists as JSON. Text holding a NUL goes to psycopg too, which
    refuses it.
    """
    kinds = set(map(type, values))
    if kind not in (JSON, "array") and kinds <= _PLAIN:
        if str not in kinds:
            escape = False
        else:
            text = "".join(values) if len(kinds) == 1 else "".join(
                [v for v in values if v.__class__ is str])
            escape = _COPY_SPECIAL.search(text) is not None
            if "\x00" in text:
                kinds = set()  # to psycopg, which raises a DataError for it
        if kinds == {str} and not escape:
            return values
        if kinds and escape:
            return [_NULL if v is None else str(v).translate(_COPY_ESCAPES) for v in values]
        if kinds and type(None) in kinds:
            return [_NULL if v is None else str(v) for v in values]
        if kinds:
            return list(map(str, values))
    from psycopg.adapt import PyFormat
    from psycopg.types.json import Jsonb

    if kind == JSON:
        values = [None if v is None else Jsonb(v) for v in values]
    elif kind != "array" and kinds & {dict, list, tuple}:
        values = [Jsonb(v) if isinstance(v, dict | list | tuple) else v for v in values]
    dumped = tx.dump_sequence(values, [PyFormat.TEXT] * len(values))
    return [_NULL if b is None else bytes(b).decode(encoding).translate(_COPY_ESCAPES)
            for b in dumped]


@destination(
    "postgres",
    config=PostgresDestinationConfig,
    datasets=lambda cfg, base: table_dataset("postgres", cfg, 5432),
    description="A PostgreSQL table: append, overwrite or merge; COPY-based, replay-safe.",
    blocks=("write_mode", "batch"),
    requires=("psycopg",), extra="postgres",
)
def build_postgres_destination(
    ctx: BuildContext, up: Stream[list[Any]]
) -> Stream[list[Failed]]:
    """The output steps of a ``postgres`` destination (scoped under its id)."""
    cfg: PostgresDestinationConfig = ctx.config
    return table_destination(
        ctx, up, lambda: PostgresDialect(cfg, lambda table: source_columns(ctx, table)))


def _dollar_quoted(body: str) -> str:
    """``body`` as a dollar-quoted string whose tag does not occur in it."""
    tag = "df"
    while f"${tag}$" in body:
        tag += "_"
    return f"${tag}${body}${tag}$"
