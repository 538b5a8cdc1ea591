"""DuckDB destination: an embedded warehouse file, written through Arrow batches.

Each flushed batch becomes one Arrow table registered as a view and inserted with one
``INSERT ... SELECT`` (``ON CONFLICT DO UPDATE`` for ``merge``, after one ``DELETE ...
USING`` for CDC deletes), in one transaction. Shape, widening, replay safety and retries
are described in :mod:`dataflare.connectors.sql_writer`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import repeat
from pathlib import Path
from typing import Any

from bytewax.dataflow import Stream
from pydantic import Field

from dataflare.config import Strict
from dataflare.connectors.column_types import SourceColumns, duckdb_type, source_columns
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
from dataflare.lineage import Dataset, file_dataset
from dataflare.records import Failed
from dataflare.registry import BuildContext, destination

SQL_TYPES = {BOOL: "BOOLEAN", INT: "BIGINT", FLOAT: "DOUBLE", TEXT: "VARCHAR", JSON: "JSON"}
LOGICAL = {
    "BOOLEAN": BOOL,
    "BIGINT": INT,
    "INTEGER": INT,
    "SMALLINT": INT,
    "HUGEINT": INT,
    "DOUBLE": FLOAT,
    "FLOAT": FLOAT,
    "REAL": FLOAT,
    "JSON": JSON,
}
_TEXT_AS_IS = frozenset({str, type(None)})
"""Types a text column's Arrow array takes as they are (others: :func:`text_value`)."""


class DuckDBDestinationConfig(Strict):
    """Write records to a DuckDB database file."""

    path: str = Field(
        "warehouse.duckdb",
        description="Database file, relative to the workflow file; created when absent.",
    )
    schema_: str = Field("main", alias="schema", description="Schema of the table.")
    table: str = Field(description="Table to write (created from the records when absent).")


class DuckDBDialect(Dialect):
    """duckdb's Python API with Arrow staging."""

    placeholder = "?"

    def __init__(self, path: Path, cfg: DuckDBDestinationConfig,
                 source_types: Callable[[str | None], SourceColumns | None] | None = None
                 ) -> None:
        import duckdb
        import pyarrow as pa

        self.path = path
        self.cfg = cfg
        self.source_types = source_types
        self.transient = (duckdb.IOException, duckdb.ConnectionException)
        # Values that do not fit their columns: in the Arrow staging or in DuckDB.
        self.refusals = (duckdb.DataError, duckdb.IntegrityError, pa.ArrowInvalid,
                         pa.ArrowTypeError, OverflowError)  # an integer beyond 64 bits
        self.conn: Any = None
        self.schema = cfg.schema_
        self.table = cfg.table
        self.target = f"{quote_ident(self.schema)}.{quote_ident(self.table)}"
        self.positions = f"{quote_ident(self.schema)}.{quote_ident(POSITIONS_TABLE)}"
        self.types: dict[str, str] = {}
        self.blobs: set[str] = set()  # BLOB columns: hex text (``\x...``) goes as bytes
        self.dated: set[str] = set()  # DATE and TIMESTAMP columns: a BC text is rewritten

    def describe(self) -> str:
        """``duckdb table path:schema.table``."""
        return f"duckdb table {self.path}:{self.schema}.{self.table}"

    def connect(self) -> None:
        """Open the database file (creating its directory)."""
        import duckdb

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path):
            self.conn = duckdb.connect(str(self.path))
            self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.schema)}")

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN ... COMMIT, ROLLBACK on an exception; one at a time per database file."""
        with _file_lock(self.path):
            self.conn.begin()
            try:
                yield self.conn
            except BaseException:
                self.conn.rollback()
                raise
            self.conn.commit()

    def columns(self) -> dict[str, str] | None:
        """Columns of the table, ``None`` when it does not exist."""
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
            [self.schema, self.table],
        ).fetchall()
        if not rows:
            return None
        self.types = {name: LOGICAL.get(str(dtype).upper(), TEXT) for name, dtype in rows}
        self.blobs = {name for name, dtype in rows if str(dtype).upper() == "BLOB"}
        self.dated = {name for name, dtype in rows if str(dtype).upper().startswith(_DATED)}
        return dict(self.types)

    def _declare(self, name: str, logical: str) -> str:
        """``"name" TYPE`` of a new column: its source column's type when one fits.

        Values of a column typed after its source go as text unless the type is one of
        the logical ones: DuckDB casts the text exactly (a decimal, a timestamp, a uuid).
        """
        hint = self.source_type(name, logical)
        sql_type = None if hint is None else duckdb_type(hint)
        if sql_type is None:
            self.types[name] = logical
            return f"{quote_ident(name)} {SQL_TYPES[logical]}"
        self.types[name] = LOGICAL.get(sql_type, TEXT)
        if sql_type == "BLOB":
            self.blobs.add(name)
        if sql_type.startswith(_DATED):
            self.dated.add(name)
        return f"{quote_ident(name)} {sql_type}"

    def create_table(self, columns: dict[str, str], key: tuple[str, ...]) -> bool:
        """CREATE TABLE IF NOT EXISTS, typed as :meth:`_declare` says, keyed by ``key``."""
        self.types = {}
        cols = [self._declare(n, t) for n, t in columns.items()]
        if key:
            cols.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in key)})")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {self.target} ({', '.join(cols)})")
        return True

    def add_columns(self, columns: dict[str, str], filled: dict[str, str]) -> None:
        """ALTER TABLE ... ADD COLUMN, one per statement; a filled one typed after its source.

        A filled column is added with a DEFAULT, which DuckDB gives the rows already
        there, then dropped.
        """
        for n, t in columns.items():
            column = self._declare(n, t)
            hint = self.source_type(n, t)
            if n in filled and hint is not None and duckdb_type(hint) is not None:
                value = filled[n].replace("'", "''")
                self.conn.execute(f"ALTER TABLE {self.target} ADD COLUMN IF NOT EXISTS {column} "
                                  f"DEFAULT '{value}'")
                self.conn.execute(f"ALTER TABLE {self.target} ALTER {quote_ident(n)} DROP DEFAULT")
            else:
                self.conn.execute(f"ALTER TABLE {self.target} ADD COLUMN IF NOT EXISTS {column}")

    def widen(self, column: str, kind: str) -> None:
        """ALTER ... TYPE."""
        self.conn.execute(
            f"ALTER TABLE {self.target} ALTER {quote_ident(column)} TYPE {SQL_TYPES[kind]}"
        )
        self.types[column] = kind

    def ensure_positions(self) -> None:
        """The mark table of this schema."""
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.positions} (destination VARCHAR NOT NULL, "
            "target VARCHAR NOT NULL, stream VARCHAR NOT NULL, run VARCHAR NOT NULL, "
            "position BIGINT NOT NULL, ordered BOOLEAN NOT NULL, "
            "PRIMARY KEY (destination, target, stream))"
        )

    def load_positions(self, destination: str) -> dict[str, Mark]:
        """Marks of ``destination`` for this table."""
        rows = self.conn.execute(
            f"SELECT stream, run, position, ordered FROM {self.positions} "
            "WHERE destination = ? AND target = ?",
            [destination, self.table],
        ).fetchall()
        return {s: Mark(r, int(p), bool(o)) for s, r, p, o in rows}

    def save_positions(self, destination: str, marks: dict[str, Mark]) -> None:
        """Upsert marks."""
        for stream, m in marks.items():
            self.conn.execute(
                f"INSERT INTO {self.positions} "
                "(destination, target, stream, run, position, ordered) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (destination, target, stream) "
                "DO UPDATE SET run = EXCLUDED.run, position = EXCLUDED.position, "
                "ordered = EXCLUDED.ordered",
                [destination, self.table, stream, m.run, m.position, m.ordered],
            )

    def truncate(self) -> None:
        """DELETE every row."""
        self.conn.execute(f"DELETE FROM {self.target}")

    def _arrow(self, columns: list[str], rows: list[dict[str, Any]]) -> Any:
        import orjson
        import pyarrow as pa

        arrays = []
        for c in columns:
            kind = self.types.get(c, TEXT)
            values = list(map(dict.get, rows, repeat(c)))
            if c in self.blobs:
                arrays.append(pa.array([None if v is None else _bytes(v) for v in values],
                                       pa.binary()))
            elif kind == JSON:
                values = [None if v is None else orjson.dumps(v, default=str).decode()
                          for v in values]
                arrays.append(pa.array(values, pa.string()))
            elif kind == TEXT:
                if not set(map(type, values)) <= _TEXT_AS_IS:
                    values = [None if v is None else text_value(v) for v in values]
                if c in self.dated:
                    values = [_astronomical(v) for v in values]
                arrays.append(pa.array(values, pa.string()))
            else:
                arrow_type = {INT: pa.int64(), FLOAT: pa.float64(), BOOL: pa.bool_()}[kind]
                arrays.append(pa.array(values, arrow_type))
        return pa.Table.from_arrays(arrays, names=columns)

    def _insert(self, columns: list[str], rows: list[dict[str, Any]], suffix: str = "") -> None:
        collist = ", ".join(quote_ident(c) for c in columns)
        with self._staged("_dataflare_stage", self._arrow(columns, rows)):
            self.conn.execute(
                f"INSERT INTO {self.target} ({collist}) SELECT {collist} "
                f"FROM _dataflare_stage {suffix}"
            )

    @contextmanager
    def _staged(self, name: str, table: Any) -> Iterator[None]:
        """``table`` readable as ``name`` for one statement."""
        self.conn.register(name, table)
        yield  # on an error the transaction is aborted: rolled_back() unregisters
        self.conn.unregister(name)

    def append(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Insert the rows from one Arrow table."""
        self._insert(columns, rows)

    def rolled_back(self) -> None:
        """Unregister the staging data of the failed statement."""
        for name in ("_dataflare_stage", "_dataflare_deletes"):
            with suppress(Exception):  # not registered
                self.conn.unregister(name)

    def merge(
        self, columns: list[str], key: tuple[str, ...], upserts: list[dict[str, Any]],
        deletes: list[dict[str, Any]],
    ) -> None:
        """One DELETE ... USING for deletes, one INSERT ... ON CONFLICT for the rest."""
        if deletes:
            match = " AND ".join(f"t.{quote_ident(k)} = d.{quote_ident(k)}" for k in key)
            with self._staged("_dataflare_deletes", self._arrow(list(key), deletes)):
                self.conn.execute(
                    f"DELETE FROM {self.target} AS t USING _dataflare_deletes AS d WHERE {match}"
                )
        if upserts:
            keycols = ", ".join(quote_ident(k) for k in key)
            updates = [c for c in columns if c not in key]
            action = (
                "DO UPDATE SET "
                + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in updates)
                if updates
                else "DO NOTHING"
            )
            self._insert(columns, upserts, f"ON CONFLICT ({keycols}) {action}")


# Destinations writing one DuckDB file write on threads of their own (one each): their
# connections share one database, whose Python scans of registered Arrow tables failed
# now and then when two wrote at once ("Table Function with name python_arrow_scan does
# not exist"). DuckDB commits one writer at a time anyway.
_FILE_LOCKS: dict[Path, threading.RLock] = {}
_LOCKS_LOCK = threading.Lock()


_DATED = ("DATE", "TIMESTAMP")
_BC = re.compile(r"(\d{4,})(-.*) BC")


def _astronomical(value: str | None) -> str | None:
    """PostgreSQL's text of a BC date or time (``0044-03-15 10:00:00 BC``) as DuckDB reads it.

    DuckDB takes a year before 1 as a negative number (``-0043-03-15``: 1 BC is year 0);
    the ``BC`` text it refuses as a date and reads, as a timestamp, as the year AD.
    """
    m = _BC.fullmatch(value) if value is not None and value.endswith(" BC") else None
    return value if m is None else f"-{int(m.group(1)) - 1:04d}{m.group(2)}"


def _file_lock(path: Path) -> threading.RLock:
    with _LOCKS_LOCK:
        return _FILE_LOCKS.setdefault(path.resolve(), threading.RLock())


def _bytes(value: Any) -> bytes:
    """A BLOB column's value: PostgreSQL's hex text of bytes (as sources give them) decoded.

    Other text is its UTF-8 bytes; hex text that is not hex is refused (its record fails).
    """
    import pyarrow as pa

    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    text = value if isinstance(value, str) else text_value(value)
    if not text.startswith("\\x"):
        return text.encode()
    try:
        return bytes.fromhex(text[2:])
    except ValueError:
        msg = f"{text[:40]!r} is not hex text of bytes (\\x followed by pairs of hex digits)"
        raise pa.ArrowInvalid(msg) from None


@destination(
    "duckdb",
    config=DuckDBDestinationConfig,
    datasets=lambda cfg, base: [Dataset(f"duckdb://{file_dataset(cfg.path, base)[0].name}",
                                        f"{cfg.schema_}.{cfg.table}")],
    description="A DuckDB database file: append, overwrite or merge; replay-safe appends.",
    blocks=("write_mode", "batch"),
    requires=("duckdb", "pyarrow"), extra="duckdb",
)
def build_duckdb_destination(ctx: BuildContext, up: Stream[list[Any]]) -> Stream[list[Failed]]:
    """The output steps of a ``duckdb`` destination (scoped under its id)."""
    cfg: DuckDBDestinationConfig = ctx.config
    path = ctx.path(cfg.path)
    return table_destination(
        ctx, up, lambda: DuckDBDialect(path, cfg, lambda table: source_columns(ctx, table)))
