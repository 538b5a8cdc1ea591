"""Incremental reads of a SQL table: tie-safe, resumable, optionally bounded.

Shared by the PostgreSQL and MySQL sources, which give only a :class:`SqlTable` (how to
quote a name and run a query). A *pass*
reads the rows whose cursor column is at least the highest value read so far (less
``incremental.lookback``), in ``(cursor, key...)`` order, a page at a time. A row read
before, with the same key and the same content, is not emitted again; so a row updated
without moving its cursor (two updates in one second, a second-precision timestamp) or
committed late within the lookback window is read once, and nothing is read twice. A
pass that returns fewer rows than a page ends; the next starts after ``interval``.

With ``stop_at_end`` the input ends after the pass that reaches the highest cursor value
seen when the run started (the batch-sync model of schedulers); the next run continues
from the saved cursor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from bytewax.inputs import StatefulSourcePartition

from dataflare.connectors.sql_source import Connection, now, row_records

Rows = list[Sequence[Any]]


def utc_start(value: Any) -> Any:
    """A ``start_value`` with a UTC offset (``Z``, ``+02:00``) as the naive UTC time.

    Databases read a naive time column's values as UTC here (the sessions are in UTC), and
    would cast such a text to one with its offset dropped. Anything else is left as it is.
    """
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if parsed.tzinfo is None:
        return value
    return parsed.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Page:
    """What the next page query selects (the dialect writes the SQL)."""

    lower: Any | None  # cursor >= lower (None: no lower bound)
    after: tuple[Any, ...] | None  # (cursor, *key) > after: the rest of a pass
    upper: Any | None  # cursor <= upper: a bounded sync


@dataclass
class IncrementalState:
    """The resume state: the highest cursor read, and the rows read in the window."""

    cursor: Any = None
    seen: dict[str, tuple[str, Any]] = field(default_factory=dict)  # id -> (digest, cursor)
    after: tuple[Any, ...] | None = None


def _at_least(a: Any, b: Any) -> bool:
    """Whether ``a >= b``.

    Values the database orders but Python cannot compare (a timestamp and the text
    'infinity') count as at least: the database's order decided they came later.
    """
    try:
        return bool(a >= b)
    except TypeError:
        return True


def _digest(row: Sequence[Any]) -> str:
    return hashlib.blake2b(repr(tuple(row)).encode(), digest_size=12).hexdigest()


class IncrementalCursor:
    """The tie-safe cursor of one table: which page to read, which rows are new."""

    def __init__(self, column: str, key: list[str], start: Any, lookback: float,
                 batch_size: int, state: Any) -> None:
        self.column, self.key, self.start = column, key, start
        self.lookback, self.batch_size = lookback, batch_size
        if isinstance(state, IncrementalState):
            self.state = state
        elif isinstance(state, dict):  # a state written before the window was kept
            after = state.get("key")
            self.state = IncrementalState(state.get("cursor"), {}, None)
            if after is not None and state.get("cursor") is not None:
                self.state.after = (state["cursor"], *after)
        else:
            self.state = IncrementalState()
        self.upper: Any = None

    def _lower(self) -> Any:
        cursor = self.state.cursor
        if cursor is None:
            return self.start
        if not self.lookback:
            return cursor
        if isinstance(cursor, datetime | date):
            return cursor - timedelta(seconds=self.lookback)
        if isinstance(cursor, int | float):
            return cursor - self.lookback
        msg = (f"incremental.lookback needs a timestamp or number cursor; column "
               f"{self.column!r} holds {type(cursor).__name__} values")
        raise ValueError(msg)

    def page(self) -> Page:
        """The bounds of the next page."""
        return Page(self._lower(), self.state.after, self.upper)

    def accept(self, names: list[str], rows: list[Sequence[Any]],
               value: Any = lambda v: v) -> tuple[list[Sequence[Any]], bool]:
        """The new rows of a page (ordered by cursor and key), and whether the pass ended.

        ``value`` turns a read value into a query parameter (a resume position).
        """
        col = names.index(self.column)
        keys = [names.index(k) for k in self.key]
        st = self.state
        fresh = []
        for row in rows:
            ident = repr([row[i] for i in keys]) if keys else _digest(row)
            digest = _digest(row)
            if st.seen.get(ident, ("",))[0] == digest:
                continue  # read before, unchanged
            st.seen[ident] = (digest, value(row[col]))
            fresh.append(row)
        ended = len(rows) < self.batch_size
        if rows:
            last = rows[-1]
            top = value(last[col])
            if st.cursor is None or _at_least(top, st.cursor):
                st.cursor = top
            st.after = None if ended else (top, *(value(last[i]) for i in keys))
        elif ended:
            st.after = None
        # Only rows the next pass reads again (from the new lower bound) need remembering.
        lower = self._lower()
        if lower is not None:
            st.seen = {k: v for k, v in st.seen.items() if _at_least(v[1], lower)}
        return fresh, ended

    def snapshot(self) -> IncrementalState:
        """The resume state (a copy)."""
        st = self.state
        return IncrementalState(st.cursor, dict(st.seen), st.after)


@dataclass(frozen=True)
class SqlTable:
    """What one database adds to an incremental read: names, quoting and fetching."""

    shown: str  # ``schema.table``, in messages and each record's ``_meta.table``
    quoted: str  # the table as SQL
    quote: Callable[[str], str]  # a column name as SQL
    fetch: Callable[[Any, str, list[Any]], tuple[list[str], Rows]]  # (names, rows) of a query
    value: Callable[[Any], Any] = lambda v: v  # a read value as a query parameter
    convert: Callable[[list[str], Rows], Rows] = lambda names, rows: rows  # rows as records


class IncrementalPartition(StatefulSourcePartition[list[Any], Any]):
    """Polls one table's rows by an incremental cursor, a page at a time."""

    def __init__(self, db: Connection, table: SqlTable, cursor: IncrementalCursor,
                 interval: float, bounded: bool, decimals: Any) -> None:
        self.db, self.table, self.reader = db, table, cursor
        self.interval = timedelta(seconds=interval)
        self.bounded, self.decimals = bounded, decimals
        self.awake: datetime | None = None
        self.rows_read = 0
        self.done = False

    def _name(self, name: str) -> str:
        return self.table.quote(name).replace("%", "%%")  # both drivers format with %

    def _query(self, conn: Any) -> tuple[list[str], Rows]:
        t, page, size = self.table, self.reader.page(), self.reader.batch_size
        key, col = self.reader.key, self._name(self.reader.column)
        order = [self.reader.column, *key]
        where, params = f"{col} IS NOT NULL", []
        if page.lower is not None:
            where += f" AND {col} >= %s"
            params.append(page.lower)
        if page.after is not None:
            cols = order[: len(page.after)]
            where += (f" AND ({', '.join(self._name(c) for c in cols)}) > "
                      f"({', '.join(['%s'] * len(cols))})")
            params.extend(page.after)
        if page.upper is not None:
            where += f" AND {col} <= %s"
            params.append(page.upper)
        names, rows = t.fetch(conn, f"SELECT * FROM {t.quoted} WHERE {where} ORDER BY "
                              f"{', '.join(self._name(c) for c in order)} LIMIT {int(size)}",
                              params)
        if not key and len(rows) == size:
            # Without a key, a page ends between rows sharing a cursor value: read that
            # value's rows whole, so the next page (cursor > that value) loses none.
            i = names.index(self.reader.column)
            last = rows[-1][i]
            rows = [r for r in rows if r[i] != last]
            rows += t.fetch(conn, f"SELECT * FROM {t.quoted} WHERE {col} = %s",
                            [t.value(last)])[1]
        return names, rows

    def _high_water(self, conn: Any) -> Any:
        col = self._name(self.reader.column)
        return self.table.fetch(conn, f"SELECT max({col}) FROM {self.table.quoted}", [])[1][0][0]

    def next_batch(self) -> list[list[Any]]:
        """The next page's new records; the input ends after a bounded sync's last pass."""
        if self.done:
            raise StopIteration
        t = self.table
        if self.bounded and self.reader.upper is None:
            top = self.db.run(f"reading the end of {t.shown}", self._high_water)
            if top is None:
                raise StopIteration  # an empty table: nothing to sync
            self.reader.upper = t.value(top)
        names, rows = self.db.run(f"polling {t.shown}", self._query)
        fresh, ended = self.reader.accept(names, rows, t.value)
        self.awake = now() + self.interval if ended else None
        if ended and self.bounded:
            self.done, self.awake = True, None
        if not fresh:
            return []
        first, self.rows_read = self.rows_read + 1, self.rows_read + len(fresh)
        return [row_records(self.db.step_id, names, t.convert(names, fresh),
                            {"table": t.shown}, self.decimals, first)]

    def next_awake(self) -> datetime | None:
        """When to poll next."""
        return self.awake

    def snapshot(self) -> Any:
        """The resume state."""
        return self.reader.snapshot()

    def close(self) -> None:
        """Close the connection."""
        self.db.close()
