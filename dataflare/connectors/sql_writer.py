"""What the PostgreSQL and DuckDB destinations share: table shape, write modes, replay safety.

A write is one transaction per flushed batch:

- the table is created from the records' shape when absent (``bool`` -> boolean,
  ``int`` -> bigint, ``float`` -> double, ``str`` -> text, dicts and lists -> JSON) and
  widened with ``ADD COLUMN`` when new fields appear; ``_meta`` is never a column;
- a new column's type is decided by the batch's values: integers and fractional numbers
  make a double, other mixtures JSON; an integer column that later receives a
  fractional number becomes a double; in a ``merge`` table, the rows already there take
  the value their source table gave its rows that predate a column it gained (its
  default: a change stream does not carry it, :meth:`Dialect.filled`);
- ``append`` copies the rows in; ``overwrite`` empties the table in the transaction of the
  destination's first write (also when the run writes nothing), then appends; ``merge``
  upserts on ``merge_key`` and sets the fields a record has: fields it lacks keep their
  stored values (a CDC update leaves out unchanged TOASTed columns). Within a batch the
  records of a key are folded in order: a CDC delete (``_meta.op == "delete"``) deletes
  the row, later records set their fields. A CDC update that changes the key
  (``_meta.old`` holds the old key) deletes the old row, or, when it leaves out unchanged
  TOASTed columns (``_meta.unchanged``), moves it to the new key. Rows are written with one
  set-based statement per set of fields. A CDC truncate (``_meta.op == "truncate"``)
  empties the table first (append and overwrite ignore it: the rows they wrote stay);
- **replay safety of appends**: records that carry a source position (Kafka
  topic/partition/offset, file/line) leave a per-stream mark in the
  ``_dataflare_positions`` table, written in the same transaction as the rows, together
  with the id of the run (the recovery lineage, carried in the batching step's
  snapshots and kept in the recovery directory). When bytewax resumes a run after a
  crash it replays from the last snapshot (or from the start, when the crash came before
  the first one); records of that run at or below a stream's mark were committed before
  the crash and are skipped, so appends are exactly-once. A record the database refused
  leaves a row of its own there (committed before the mark passes it): a replay tries it
  again rather than skip it, so its dead letter is sent at least once across crashes.
  This needs positions that grow
  along each stream as the destination receives them, which holds for sources followed
  by stateless steps. When the destination sees a stream's positions repeat or go back
  within one execution (a join fanning one record out, two routes merged again), it
  marks that stream unordered and writes it at-least-once from then on. A fresh run
  (a new recovery directory, or none) never skips anything. Records without a position (aggregates,
  generated records, CDC changes) are appended at-least-once. Merges are idempotent by nature.

Transient failures (a lost connection) roll the transaction back, reconnect and retry the
whole batch per the workflow's ``retry`` policy. Records whose values the database refuses
(a value that does not fit its column, a violated constraint) fail alone when the
destination's ``error_handling`` skips or redirects them. An append finds them in one
pass where the dialect can (``Dialect.append_sifting``: PostgreSQL stages the rows as
text and inserts each in a subtransaction of one server-side loop); otherwise, and for
merges, the batch is written in halves until they stand alone. A run that must stop
(``config.timeout``) ends the search at its next write. With ``fail`` (the default),
like other database errors, the batch is rolled back and the run stops naming the step:
a resume writes it again.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, TypeVar

from bytewax.dataflow import Stream

from dataflare import metrics
from dataflare.connectors.batching import Flush, Unwritten, buffered_output
from dataflare.records import META, Failed, describe_position, getter, message_of
from dataflare.retry import Interrupted, call_with_retry

if TYPE_CHECKING:
    from dataflare.connectors.column_types import SourceColumns

log = logging.getLogger(__name__)
T = TypeVar("T")

POSITIONS_TABLE = "_dataflare_positions"

# Logical column types; each dialect maps them to its own SQL types.
BOOL, INT, FLOAT, TEXT, JSON = "bool", "int", "float", "text", "json"


def column_type(kinds: set[str | None]) -> str | None:
    """The type of a new column holding values of ``kinds`` (``None``: undecided)."""
    kinds = kinds - {None}
    if len(kinds) <= 1:
        return next(iter(kinds), None)
    return FLOAT if kinds == {INT, FLOAT} else JSON


def logical_type(value: Any) -> str | None:
    """The column type a value calls for (``None`` for a null: undecided)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, dict | list | tuple):
        return JSON
    return TEXT


@dataclass(slots=True)
class Item:
    """A record ready to write: its columns, whether it deletes, and its source position."""

    row: dict[str, Any]
    delete: bool
    stream: str | None
    position: int | None
    truncate: bool = False
    meta: Any = None
    parts: list[Item] | None = None
    """The records a merge folded into this one, in order."""
    moved_from: dict[str, Any] | None = None
    """The old key of a CDC update that changed the key and left out unchanged (TOASTed)
    columns: the stored row is moved to the new key, keeping them."""

    def refused(self, step: str, exc: BaseException) -> Failed:
        """The failure of this record, refused by the database with ``exc``."""
        return Failed(step, type(exc).__name__, message_of(exc), self.row, self.meta or {})


def tie_to_row(exc: BaseException, row: dict[str, Any], text: str) -> None:
    """Note on a database error the row it refused, and its message for users.

    The message leaves out the statement's own context: a COPY line says nothing to them.
    """
    exc.dataflare_row = row  # type: ignore[attr-defined]
    exc.dataflare_text = text  # type: ignore[attr-defined]


def _where(item: Item, index: int, items: list[Item]) -> str:
    """Where a record of a write came from: its source position, else its place in it."""
    return (describe_position(item.meta) if item.meta else
            f"record {index + 1} of the {len(items)}")


@dataclass(frozen=True, slots=True)
class Mark:
    """How far a run wrote one stream, and whether its positions arrived in order."""

    run: str
    position: int
    ordered: bool = True


def position_of(meta: Any) -> tuple[str | None, int | None]:
    """``(stream, position)`` of a record from its ``_meta``, if it has a numeric one."""
    if not isinstance(meta, dict):
        return None, None
    if "topic" in meta and isinstance(meta.get("offset"), int):
        return f"kafka:{meta['topic']}/{meta.get('partition')}", meta["offset"]
    if "file" in meta:
        for name in ("line", "index"):
            if isinstance(meta.get(name), int):
                return f"file:{meta['file']}", meta[name]
    return None, None


def _origin(items: list[Item]) -> str | None:
    """The one source table (``_meta.table``, as CDC records carry) of ``items``, if one."""
    tables = {it.meta.get("table") if isinstance(it.meta, dict) else None for it in items}
    return tables.pop() if len(tables) == 1 else None


def _key_field(name: str) -> Callable[[dict[str, Any]], Any]:
    """The reader of merge key ``name``: the field of that name, else the dotted path."""
    if "." not in name:
        return getter(name)
    path = getter(name)
    return lambda rec: rec[name] if name in rec else path(rec)


def refusal_stream(stream: str, position: int) -> str:
    """The positions-table row noting that the record at ``position`` was refused."""
    return f"{stream}#refused@{position}"


def prepare(
    batch: list[Any], step: str, merge_key: tuple[str, ...]
) -> tuple[list[Item], list[Failed]]:
    """Strip ``_meta``, extract dotted merge keys as columns, note positions and deletes.

    A dotted merge key is a path into the record, unless the record has a field of that
    very name (a column named ``a.b``): then it is that field.
    """
    if _plain(batch, merge_key):
        return list(map(Item, batch, repeat(False), repeat(None), repeat(None))), []
    items: list[Item] = []
    errs: list[Failed] = []
    append = items.append
    keys = [(k, _key_field(k)) for k in merge_key]
    dotted = [(k, get) for k, get in keys if "." in k]
    for rec in batch:
        if not isinstance(rec, dict):
            msg = f"step {step!r}: expected a record (dict), got {type(rec).__name__}: {rec!r}"
            errs.append(Failed(step, "RecordError", msg, rec))
            continue
        meta = rec.get(META)
        if isinstance(meta, dict) and meta.get("op") == "truncate":
            stream, pos = position_of(meta)
            append(Item({}, False, stream, pos, truncate=True))
            continue
        if meta is not None:
            row = dict(rec)
            del row[META]
        elif dotted:
            row = dict(rec)
        else:
            row = rec  # never changed below: no copy needed
        for name, get in dotted:
            row[name] = get(rec)
        if "" in row:  # JSON allows it (some APIs send one); no SQL column is named so
            msg = f"step {step!r}: a field named '' cannot be a column, in record {row!r}"
            errs.append(Failed(step, "RecordError", msg, rec, meta or {}))
            continue
        if merge_key:
            missing = [k for k in merge_key if row.get(k) is None]
            if missing:
                said = ", ".join(f"{k} is null" if k in row else f"{k} is missing"
                                 for k in missing)
                msg = (f"step {step!r}: a merge key cannot be null ({said}) in record "
                       f"{row!r}")
                errs.append(Failed(step, "RecordError", msg, rec, meta or {}))
                continue
        if meta is None:
            append(Item(row, False, None, None))
            continue
        stream, pos = position_of(meta)
        if not isinstance(meta, dict):
            append(Item(row, False, stream, pos, meta=meta))
            continue
        op = meta.get("op")
        old = meta.get("old")
        if op == "update" and merge_key and isinstance(old, dict):
            # A changed key: the row under the old key goes (the old key has every part).
            before = {k: get(old) for k, get in keys}
            if None not in before.values() and any(before[k] != row[k] for k in merge_key):
                append(Item(before, True, stream, pos, meta=meta))
                if meta.get("unchanged"):
                    append(Item(row, False, stream, pos, meta=meta, moved_from=before))
                    continue
        append(Item(row, op == "delete", stream, pos, meta=meta))
    return items, errs


def _plain(batch: list[Any], merge_key: tuple[str, ...]) -> bool:
    """Whether every record of ``batch`` is a dict without ``_meta`` with its whole key.

    Such records are written as they are (the common case, checked column-wise).
    """
    if not batch or set(map(type, batch)) != {dict}:
        return False
    if any(map(dict.__contains__, batch, repeat(META))) or \
            any(map(dict.__contains__, batch, repeat(""))):
        return False
    for k in merge_key:
        if "." in k or None in map(dict.get, batch, repeat(k)):
            return False
    return True


def key_values(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[Any]:
    """The key value of each row (a tuple for a composite key), computed column-wise.

    An integer and its text are one key (the database casts both to the column's type).
    """
    cols: list[list[Any]] = []
    for k in key:
        col = list(map(dict.get, rows, repeat(k)))
        if int in set(map(type, col)):
            col = [str(v) if v.__class__ is int else v for v in col]
        cols.append(col)
    return cols[0] if len(cols) == 1 else list(zip(*cols, strict=True))


def _hashable_key(value: Any) -> Any:
    """A key value with its dicts and lists made hashable."""
    return tuple(_hashable(v) for v in value) if isinstance(value, tuple) else _hashable(value)


def _distinct(keys: list[Any]) -> bool:
    """Whether no key value repeats (``False`` too when one cannot be hashed as it is)."""
    try:
        return len(set(keys)) == len(keys)
    except TypeError:
        return False


def last_per_key(items: list[Item], key: tuple[str, ...]) -> list[Item]:
    """The last item of each key value (keys are top-level columns of the rows)."""
    keys = key_values([it.row for it in items], key)
    if _distinct(keys):
        return items
    last: dict[Any, Item] = {}
    for it, k in zip(items, keys, strict=True):
        try:
            last[k] = it
        except TypeError:
            last[_hashable_key(k)] = it
    return list(last.values())


def fold_per_key(items: list[Item], key: tuple[str, ...]) -> list[Item]:
    """What a batch leaves of each key value, in order.

    A delete when the key was deleted, then an upsert of the fields set after it (later
    values over earlier ones).
    """
    keys = key_values([it.row for it in items], key)
    if not any(it.delete for it in items) and _distinct(keys):
        return items  # nothing to fold
    folded: dict[Any, list[Item | None]] = {}
    gone: dict[Any, Item] = {}  # upserts a delete of their key undid, by key
    for it, k in zip(items, keys, strict=True):
        try:
            slot = folded.get(k)
        except TypeError:
            k = _hashable_key(k)
            slot = folded.get(k)
        if it.moved_from is not None:  # the old key's fields written in this very batch
            old = key_values([it.moved_from], key)[0]
            try:
                undone = gone.get(old)
            except TypeError:
                undone = gone.get(_hashable_key(old))
            if undone is not None:
                it = replace(it, row={**undone.row, **it.row})
        if it.delete:
            if slot is not None and slot[1] is not None:
                gone[k] = slot[1]
            folded[k] = [it, None]
        elif slot is None:
            folded[k] = [None, it]
        elif slot[1] is None:
            slot[1] = it
        else:
            prev = slot[1]
            slot[1] = Item({**prev.row, **it.row}, False, it.stream, it.position,
                           meta=it.meta, parts=[*(prev.parts or [prev]), it],
                           moved_from=prev.moved_from or it.moved_from)
    return [it for slot in folded.values() for it in slot if it is not None]


def text_value(value: Any) -> str:
    """A non-null value as the text of a text column (dicts and lists as JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        import orjson

        return orjson.dumps(value, default=str).decode()
    return str(value)


def quote_ident(name: str) -> str:
    """A SQL identifier in double quotes (PostgreSQL and DuckDB)."""
    return '"' + name.replace('"', '""') + '"'


class Dialect(ABC):
    """One database: connection, catalog, and the statements of a write."""

    transient: tuple[type[BaseException], ...] = ()
    """Errors worth a retry (a lost connection)."""
    refusals: tuple[type[BaseException], ...] = ()
    """Errors a record's values cause (bad value, constraint): the record fails alone."""
    conn: Any
    target: str
    types: dict[str, str]
    source_types: Callable[[str | None], SourceColumns | None] | None = None
    """The columns of a source table (``None``: the source's one ``table``), for a
    dialect that types new columns after them (asked once per table, and again when a
    record brings a column the answer lacks)."""
    _carried: dict[str | None, SourceColumns | None] | None = None
    origin: str | None = None
    """The source table of the records whose columns are made next (:meth:`note_origin`)."""

    def refuses(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a refusal of a record's values (see :attr:`refusals`)."""
        return isinstance(exc, self.refusals)

    def worth_retry(self, exc: BaseException) -> bool:
        """Whether a :attr:`transient` error may pass (not a wrong password, say)."""
        return True

    @abstractmethod
    def connect(self) -> None:
        """Open (or reopen) the connection."""

    def close(self) -> None:
        """Close the connection, ignoring errors (it may already be broken)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                log.debug("closing %s failed", self.target, exc_info=True)

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A transaction: committed on exit, rolled back on an exception."""

    @abstractmethod
    def rolled_back(self) -> None:
        """Forget what a rolled-back transaction created (a staging table)."""

    @abstractmethod
    def columns(self) -> dict[str, str] | None:
        """Columns of the target table and their logical types; ``None`` if absent."""

    def note_origin(self, table: str | None) -> None:
        """The source table (``_meta.table``) of the records whose columns are made next."""
        self.origin = table

    def carried(self, fresh: bool = False) -> SourceColumns | None:
        """The columns of the records' source table (see :attr:`source_types`).

        ``fresh``: asked again (the source table may have gained columns).
        """
        if self.source_types is None:
            return None
        if self._carried is None:
            self._carried = {}
        if fresh or self.origin not in self._carried:
            self._carried[self.origin] = self.source_types(self.origin)
        return self._carried[self.origin]

    def filled(self, columns: dict[str, str]) -> dict[str, str]:
        """The values (as text) the source table gave its rows that predate new ``columns``.

        ``columns``: name -> logical type of the columns a mirror table is about to gain.
        Only columns that take their source column's type are filled; a source default
        whose value for those rows is not known (a volatile one) is warned of.
        """
        carried = self.carried()
        if carried is None:
            return {}
        if any(name not in carried.types for name in columns):
            carried = self.carried(fresh=True)  # added to the source since it was asked
            if carried is None:
                return {}
        out = {}
        for name, logical in columns.items():
            if name not in carried.filled or self.source_type(name, logical) is None:
                continue
            value = carried.filled[name]
            if value is None:
                log.warning("%s gains column %r: its rows stay NULL there, while in the "
                            "source table %s the rows that predate the column took its "
                            "default's value when it was added; take a new snapshot of "
                            "that table to copy them", self.describe(), name, carried.table)
            else:
                out[name] = value
        return out

    def source_type(self, name: str, logical: str) -> str | None:
        """Column ``name``'s type in the records' source table (in PostgreSQL's terms).

        ``None`` unless values of type ``logical`` fit it: a transformation may have
        changed the field.
        """
        from dataflare.connectors.column_types import compatible  # it imports this module

        carried = self.carried()
        hint = None if carried is None else carried.types.get(name)
        return hint if hint is not None and compatible(hint, logical) else None

    @abstractmethod
    def create_table(self, columns: dict[str, str], key: tuple[str, ...]) -> bool:
        """CREATE TABLE IF NOT EXISTS, with ``key`` (when given) as primary key.

        ``False``: another writer made the table meanwhile (its columns are to be read).
        """

    @abstractmethod
    def add_columns(self, columns: dict[str, str], filled: dict[str, str]) -> None:
        """Widen the target table; its rows take the ``filled`` columns' values (text)."""

    @abstractmethod
    def widen(self, column: str, kind: str) -> None:
        """Change the type of ``column`` to the wider logical type ``kind``."""

    @abstractmethod
    def ensure_positions(self) -> None:
        """Create the positions table when absent."""

    @abstractmethod
    def load_positions(self, destination: str) -> dict[str, Mark]:
        """Marks of ``destination`` per stream."""

    @abstractmethod
    def save_positions(self, destination: str, marks: dict[str, Mark]) -> None:
        """Upsert marks."""

    placeholder = "%s"
    """The parameter marker of the driver's statements."""

    def statement(self, sql: str, params: list[Any]) -> None:
        """Execute one statement with ``params``."""
        self.conn.execute(sql, params)

    def move(self, key: tuple[str, ...],
             moves: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Give stored rows new keys (``(old, new)`` rows holding the key), keeping the rest."""
        sets = ", ".join(f"{quote_ident(k)} = {self.placeholder}" for k in key)
        where = " AND ".join(f"{quote_ident(k)} = {self.placeholder}" for k in key)
        for old, new in moves:
            self.statement(f"UPDATE {self.target} SET {sets} WHERE {where}",
                           [*(new[k] for k in key), *(old[k] for k in key)])

    @abstractmethod
    def truncate(self) -> None:
        """Delete every row of the target table."""

    @abstractmethod
    def append(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Insert rows (values of ``columns``)."""

    def append_sifting(
        self, columns: list[str], rows: list[dict[str, Any]]
    ) -> list[tuple[int, str, str]] | None:
        """Insert the rows the table accepts, each alone, in a constant number of round trips.

        The indexes of the rows it refuses, with the error's type and message; ``None``
        when the database cannot (the writer then writes the batch in halves).
        """
        return None

    @abstractmethod
    def merge(
        self, columns: list[str], key: tuple[str, ...], upserts: list[dict[str, Any]],
        deletes: list[dict[str, Any]],
    ) -> None:
        """Delete ``deletes`` by key, then upsert ``upserts`` on ``key``."""

    @abstractmethod
    def describe(self) -> str:
        """The target for messages (``postgres table public.orders``)."""


class TableWriter:
    """Writes flushed batches to one table with one dialect, per ``write_mode``."""

    def __init__(
        self,
        step: str,
        dialect: Dialect,
        mode: str,
        merge_key: tuple[str, ...],
        deduplicate: bool,
        retry: Any,
        split_refusals: bool = True,
        declared: dict[str, str] | None = None,
    ) -> None:
        self.step = step
        self.split_refusals = split_refusals
        self.db = dialect
        self.mode = mode
        self.key = merge_key
        self.deduplicate = deduplicate
        self.retry = retry
        self.cols: dict[str, str] | None = None
        self.declared = declared or {}
        """Logical types the workflow declares for columns (:func:`declared_types`)."""
        self.marks: dict[str, Mark] | None = None
        self.live: set[str] = set()  # streams this execution has written
        self.connected = False
        self.stop = threading.Event()
        """Set when the run stops: a search for refused records ends at its next write."""

    # -- connection ---------------------------------------------------------------
    def _reconnect(self, _exc: BaseException | None = None) -> None:
        self.db.close()
        self.connected = False
        self.cols = None
        self.marks = None

    def _ensure_connected(self) -> None:
        if not self.connected:
            self.db.connect()
            self.connected = True

    # -- writes -------------------------------------------------------------------
    def write(self, items: list[Item], first: bool, run: str = "") -> tuple[int, list[Failed]]:
        """Write one flushed batch in one transaction (retrying transient failures).

        ``first`` marks the run's first flush (``overwrite`` empties the table then);
        ``run`` is the run's id, which scopes the skipping of replayed appends. When the
        database refuses a record's values, the batch is written in halves until the
        records it refuses stand alone: those come back as failures, the rest is written.
        Returns how many records were written, and the failures.
        """
        if not items and not (first and self.mode == "overwrite"):
            return 0, []
        empty = first and self.mode == "overwrite"
        if any(it.truncate for it in items):
            # A CDC TRUNCATE empties a merged mirror: only what follows the last one counts.
            # Append and overwrite keep what they wrote (the source's truncate is not data).
            last = max(i for i, it in enumerate(items) if it.truncate)
            empty = empty or self.mode == "merge"
            items = [it for it in (items[last + 1:] if self.mode == "merge" else items)
                     if not it.truncate]
        if self.mode == "merge":
            items = fold_per_key(items, self.key)
        elif self.deduplicate and self.key:
            items = last_per_key(items, self.key)
        return self._write_or_split(items, empty, run)

    def _write_or_split(
        self, items: list[Item], empty: bool, run: str
    ) -> tuple[int, list[Failed]]:
        if self.stop.is_set():
            msg = f"step {self.step!r}: stopped while writing to {self.db.describe()}"
            raise RuntimeError(msg)
        try:
            written = self._retried("write to", lambda: self._commit(items, empty, run))
        except _Refused as exc:
            if not self.split_refusals:  # the run stops: the batch waits for the resume
                tied = hasattr(exc.__cause__, "dataflare_row")  # the record is named
                where = "" if tied else self._first_refused(items, empty, run)
                raise RuntimeError(str(exc) + where) from exc.__cause__
            if len(items) > 1 and self.mode != "merge":
                sifted = self._sift(items, empty, run)
                if sifted is not None:
                    return sifted
            if len(items) == 1:
                parts = items[0].parts
                if parts:  # folded records: each alone, in order, so only the bad one fails
                    return self._write_each(parts, empty, run)
                if empty:  # the table is emptied even when nothing of the batch is written
                    self._commit([], True, run)
                self._note_refusal(items[0], run)
                return 0, [items[0].refused(self.step, exc.__cause__ or exc)]
            if not items:
                raise
            mid = len(items) // 2
            n1, failed1 = self._write_or_split(items[:mid], empty, run)
            emptied = len(failed1) < mid  # a part of the first half was written
            n2, failed2 = self._write_or_split(items[mid:], empty and not emptied, run)
            return n1 + n2, failed1 + failed2
        return written, []

    def _sift(self, items: list[Item], empty: bool, run: str
              ) -> tuple[int, list[Failed]] | None:
        """Write ``items`` but those the database refuses, found each alone in one pass.

        ``None`` when the dialect cannot (then the batch is written in halves).
        """
        refused: list[Failed] = []
        try:
            written = self._retried("write to",
                                    lambda: self._commit(items, empty, run, refused))
        except _Refused:
            return None  # refused as a whole (a deferred constraint): halves find it
        if written < 0:
            return None
        return written, refused

    def _retried(self, doing: str, fn: Callable[[], T]) -> T:
        """``fn``, retried on transient failures per the workflow's ``retry`` policy.

        When every try failed, the run stops naming the step and the table: ``doing`` it.
        """
        what = f"step {self.step!r}: {doing} {self.db.describe()}"

        def failed(exc: BaseException) -> RuntimeError:
            return RuntimeError(f"{what} failed: {type(exc).__name__}: {exc}")

        def attempt() -> T:
            try:
                return fn()
            except self.db.transient as exc:
                if self.db.worth_retry(exc):
                    raise
                raise failed(exc) from exc  # not retried: a wrong password...

        try:
            return call_with_retry(what, attempt, self.retry, transient=self.db.transient,
                                   on_retry=self._reconnect)
        except self.db.transient as exc:
            raise failed(exc) from exc

    def _first_refused(self, items: list[Item], empty: bool, run: str) -> str:
        """``; the first record refused: <position>``, found without writing anything.

        For appends where the dialect sifts (one pass, rolled back); ``""`` otherwise, or
        when that pass fails: the batch's own error is what the run reports.
        """
        if self.mode == "merge" or len(items) < 2:
            return ""
        refused: list[Failed] = []
        try:
            self._commit(items, empty, run, refused, dry=True)
        except Exception:  # noqa: BLE001 - only to say where
            return ""
        if not refused:
            return ""
        first = refused[0]
        index = next((i for i, it in enumerate(items) if it.row is first.record), None)
        where = ("a record" if index is None and not first.meta else
                 describe_position(first.meta) if index is None else
                 _where(items[index], index, items))
        return f"; the first record refused: {where} ({first.type}: {first.message})"

    def _note_refusal(self, item: Item, run: str) -> None:
        """Record a refused record's position before any mark can pass it.

        A replay after a crash skips what a mark covers; a refused position among them is
        tried again (and refused again), so its dead letter arrives at least once.
        """
        if not run or item.stream is None or item.position is None or self.mode == "merge":
            return
        refused = {refusal_stream(item.stream, item.position): Mark(run, item.position)}

        def save() -> None:
            self._ensure_connected()
            with self.db.transaction():
                self.db.ensure_positions()
                self.db.save_positions(self.step, refused)

        self._retried("note a refused record in", save)
        if self.marks is not None:
            self.marks.update(refused)

    def _write_each(self, items: list[Item], empty: bool, run: str) -> tuple[int, list[Failed]]:
        written = 0
        failed: list[Failed] = []
        for it in items:
            n, f = self._write_or_split([it], empty and not written, run)
            written, failed = written + n, failed + f
        return written, failed

    def _commit(self, items: list[Item], empty: bool, run: str,
                refused: list[Failed] | None = None, dry: bool = False) -> int:
        """One transaction: shape the table, empty it when ``empty``, write ``items``.

        With ``refused`` (appends), each record is written alone in one pass and those
        the database refuses are added to it, their positions noted with the marks;
        ``-1`` when the dialect cannot. ``dry``: the transaction is rolled back.
        """
        self._ensure_connected()
        changed: dict[str, Mark] = {}
        if refused is not None:
            refused.clear()  # a retried transaction starts over
        try:
            with self.db.transaction():
                if not self._shape(items):
                    return 0  # no table yet, and nothing to write: emptying it is moot
                if empty:
                    self.db.truncate()
                if self.mode == "merge":
                    written = self._merge(items)
                else:
                    written, changed = self._append(items, run, refused)
                    if written < 0:
                        return -1
                if dry:
                    raise _RolledBack
            if changed:  # committed: the marks and live streams may move on
                assert self.marks is not None
                self.marks.update(changed)
                self.live.update(s for s, m in changed.items() if m.ordered)
        except self.db.transient:
            raise
        except _RolledBack:
            self.cols = None  # a table created or widened went with the transaction
            self.db.rolled_back()
            return 0
        except Exception as exc:
            self.cols = None
            self.marks = None
            self.db.rolled_back()
            row = getattr(exc, "dataflare_row", None)
            at = next((f" on {_where(it, i, items)}" for i, it in enumerate(items)
                       if it.row is row), "") if row is not None else ""
            msg = (
                f"step {self.step!r}: writing {len(items)} record(s) to {self.db.describe()} "
                f"failed{at}: {type(exc).__name__}: {message_of(exc)}"
            )
            if self.db.refuses(exc):
                raise _Refused(msg) from exc
            raise RuntimeError(msg) from exc
        return written

    def _shape(self, items: list[Item]) -> bool:
        """Create or widen the table for ``items``.

        ``False`` when the table does not exist yet and ``items`` hold no values to decide
        its column types by.
        """
        if self.cols is None:
            self.cols = self.db.columns()
        names = self._columns_of([it.row for it in items])
        if self.cols is None and not names:
            return False
        known = self.cols or {}
        wanted: dict[str, str | None] = {}
        for name in names:
            if name in known:
                continue
            wanted[name] = self.declared.get(name) or column_type(
                {logical_type(it.row.get(name)) for it in items})
        if self.cols is None or wanted:  # columns are made: typed after their source table
            self.db.note_origin(_origin(items))
        if self.cols is None:
            cols = {k: (t or TEXT) for k, t in wanted.items()}
            for k in self.key:
                cols.setdefault(k, TEXT)
            if self.db.create_table(cols, self.key if self.mode == "merge" else ()):
                self.cols = dict(cols)
                return True
            self.cols = self.db.columns() or {}  # made meanwhile by another writer
        new = {k: (t or TEXT) for k, t in wanted.items() if k not in self.cols}
        if new:
            # A mirror's rows are the source's rows: those that predate a column the source
            # gained take the value the source gave them (a change stream does not carry it).
            filled = self.db.filled(new) if self.mode == "merge" else {}
            log.info("step %r: adding column(s) %s to %s%s", self.step, new,
                     self.db.describe(), "".join(
                         f"; its rows take {k} = {v!r} as their source rows did"
                         for k, v in filled.items()))
            self.db.add_columns(new, filled)
            self.cols.update(new)
        # An integer column that receives a fractional number becomes a double.
        rows = [it.row for it in items]
        for name in names:
            if self.cols.get(name) == INT and float in set(map(type, map(
                dict.get, rows, repeat(name)))):
                log.info("step %r: widening column %r of %s to a double", self.step, name,
                         self.db.describe())
                self.db.widen(name, FLOAT)
                self.cols[name] = FLOAT
        return True

    def _append(self, items: list[Item], run: str, refused: list[Failed] | None = None
                ) -> tuple[int, dict[str, Mark]]:
        positioned = bool(run) and any(it.stream is not None for it in items)
        changed: dict[str, Mark] = {}
        if positioned:
            if self.marks is None:
                self.db.ensure_positions()
                self.marks = self.db.load_positions(self.step)
            marks = self.marks
            live = set(self.live)
            keep: list[Item] = []
            for it in items:
                stream, pos = it.stream, it.position
                if stream is None or pos is None:
                    keep.append(it)
                    continue
                mark = changed.get(stream) or marks.get(stream)
                if mark is None or mark.run != run:
                    changed[stream] = Mark(run, pos)  # a new stream, or a new run
                    live.add(stream)
                elif not mark.ordered:
                    pass  # at-least-once for this stream
                elif pos > mark.position:
                    changed[stream] = Mark(run, pos)
                    live.add(stream)
                elif stream not in live:
                    refusal = marks.get(refusal_stream(stream, pos))
                    if refusal is None or refusal.run != run:
                        continue  # written by this run before the restart: a replay
                    # refused before the restart: tried again, its dead letter sent again
                    keep.append(it)
                    continue
                else:
                    log.warning(
                        "step %r: positions of %s repeat or go back (%d after %d); "
                        "writing it at-least-once from now on",
                        self.step, stream, pos, mark.position,
                    )
                    changed[stream] = Mark(run, mark.position, ordered=False)
                keep.append(it)
            skipped = len(items) - len(keep)
            if skipped:
                metrics.ALREADY_WRITTEN.labels(self.step).inc(skipped)
                log.warning(
                    "step %r: skipped %d record(s) already written to %s (a replay after "
                    "a restart)", self.step, skipped, self.db.describe(),
                )
            items = keep
        rows = [it.row for it in items]
        written = len(rows)
        if rows and refused is not None:
            sifted = self.db.append_sifting(self._columns_of(rows), rows)
            if sifted is None:
                return -1, {}
            for i, kind, message in sifted:
                it = items[i]
                refused.append(Failed(self.step, kind, message, it.row, it.meta or {}))
                if run and it.stream is not None and it.position is not None:
                    changed[refusal_stream(it.stream, it.position)] = Mark(run, it.position)
            rows = []
            written = len(items) - len(sifted)
        elif rows:
            self.db.append(self._columns_of(rows), rows)
        if changed:
            self.db.save_positions(self.step, changed)
        return written, changed

    def _merge(self, items: list[Item]) -> int:
        moves = [(it.moved_from, it.row) for it in items if it.moved_from is not None]
        if moves:  # before the old keys' deletes, which then find nothing
            self.db.move(self.key, moves)
        deletes = [it.row for it in items if it.delete]
        upserts = [it.row for it in items if not it.delete]
        shapes = list(map(tuple, upserts))
        by_fields: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        if len(set(shapes)) == 1:  # every record sets the same fields
            by_fields[shapes[0]] = upserts
        else:
            for fields, row in zip(shapes, upserts, strict=True):
                by_fields.setdefault(fields, []).append(row)
        if not by_fields:
            self.db.merge(list(self.key), self.key, [], deletes)
        for cols, rows in by_fields.items():  # deletes go first, with the first statement
            self.db.merge(list(cols), self.key, rows, deletes)
            deletes = []
        return len(items)

    @staticmethod
    def _columns_of(rows: list[dict[str, Any]]) -> list[str]:
        """The fields of ``rows``, in the order they first appear."""
        if rows and len(set().union(*rows)) == len(rows[0]):
            return list(rows[0])  # every row has (at most) the first one's fields
        return list(dict.fromkeys(chain.from_iterable(rows)))

    def write_flush(self, flush: Flush) -> list[Failed]:
        """Write a flush of the buffer; the records the database refused.

        A graceful stop during the retries leaves the flush to the resumed run
        (:class:`Unwritten`): what a part of it committed is written again, which appends
        (by their marks) and merges (by their keys) make harmless.
        """
        try:
            return self.write(flush.items, flush.seq == 0, flush.run)[1]
        except Interrupted:
            raise Unwritten(flush, []) from None

    def close(self) -> None:
        """Close the connection."""
        self.db.close()
        self.connected = False


def _hashable(value: Any) -> Any:
    if isinstance(value, dict | list):
        import json

        return json.dumps(value, sort_keys=True, default=str)
    return value


def iter_rows(columns: list[str], rows: list[dict[str, Any]],
              encode: Callable[[Any], Any]) -> Iterator[list[Any]]:
    """Rows as lists in ``columns`` order; nested values (dicts, lists) through ``encode``."""
    nested = (dict, list, tuple)
    for row in rows:
        values = [row.get(c) for c in columns]
        for i, v in enumerate(values):
            if isinstance(v, nested):
                values[i] = encode(v)
        yield values


SCHEMA_TYPES = {"integer": INT, "number": FLOAT, "boolean": BOOL, "string": TEXT,
                "object": JSON, "array": JSON}
PASS_THROUGH = frozenset({"filter", "route", "dedupe"})
"""Transformations whose records keep the fields and types they received."""


def declared_types(workflow: Any, inputs: list[str]) -> dict[str, str]:
    """Column types the sources feeding a destination declare in their ``output_schema``.

    Followed from the destination's inputs through steps that pass records on unchanged
    (filter, route, dedupe) to sources with a JSON Schema whose ``properties`` give a
    ``type`` (``["string", "null"]`` counts as ``string``). A field two sources declare
    differently is left to its values. A new column takes the declared type before the
    type its values call for.
    """
    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = [i.split(".", 1)[0] for i in inputs]
    while todo:
        cid = todo.pop()
        if cid in seen:
            continue
        seen.add(cid)
        step = workflow.transformations.get(cid)
        if step is not None:
            if step.type in PASS_THROUGH:
                todo.extend(i.split(".", 1)[0] for i in step.inputs)
            continue
        source = workflow.sources.get(cid)
        schema = source.output_schema if source is not None else None
        props = schema.definition.get("properties") if schema is not None else None
        for name, spec in (props or {}).items():
            kinds = spec.get("type") if isinstance(spec, dict) else None
            kinds = [kinds] if isinstance(kinds, str) else kinds or []
            known = {SCHEMA_TYPES[k] for k in kinds if k in SCHEMA_TYPES}
            found.setdefault(name, set()).update(known if len(known) == 1 else {""})
    return {name: next(iter(k)) for name, k in found.items() if len(k) == 1 and "" not in k}


class _RolledBack(Exception):
    """Ends a transaction that only looked (``TableWriter._commit(dry=True)``)."""


class _Refused(Exception):
    """The database refused a record's values (see ``Dialect.refusals``)."""


def table_destination(
    ctx: Any, up: Stream[list[Any]], make_dialect: Callable[[], Dialect]
) -> Stream[list[Failed]]:
    """The steps of a SQL table destination; returns the records rejected or refused.

    Records are prepared, buffered and written per the component's ``write_mode``,
    ``batch`` and ``error_handling``.
    """
    wm = ctx.component.write_mode
    mode, key, dedupe = wm.type, tuple(wm.merge_key or ()), bool(wm.deduplicate)
    retry = ctx.workflow.config.retry
    # Refused records fail alone only when they are skipped or redirected (module docs).
    split = ctx.component.error_handling.strategy != "fail"
    step = ctx.step_id
    declared = declared_types(ctx.workflow, ctx.component.inputs)

    def make_writer() -> TableWriter:
        return TableWriter(step, make_dialect(), mode, key, dedupe, retry, split, declared)

    # A table of dead letters only must hold them, whatever they hold.
    letters_only = not ctx.component.inputs

    def prepared(batch: list[Any]) -> tuple[list[Item], list[Failed]]:
        return prepare(list(map(_without_nul, batch)) if letters_only else batch, step, key)

    return buffered_output("write", up, prepared, ctx.component.batch,
                           make_writer, always=mode == "overwrite")


def _without_nul(value: Any) -> Any:
    """``value`` with U+FFFD for each NUL character, which PostgreSQL text never holds."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
