"""Incremental reads of a SQL table: tie-safe, resumable, optionally bounded.

Shared by the PostgreSQL and MySQL sources, which only build the page query. A *pass*
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any


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
