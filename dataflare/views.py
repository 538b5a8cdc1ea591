"""Live views: the state of stateful steps with ``serve: true``, readable during a run.

A served step's shards publish their snapshot (the copy bytewax takes at the end
of every epoch that changed a shard, :mod:`dataflare.operators.keyed`) to the step's view;
when the view is read, each snapshot becomes rows, what the step would emit per key
(current aggregates, open windows, keys seen, joined records), once per snapshot. A key
lives in one shard, so the rows of a key are always the state at the end of one epoch,
never half a batch. The run's HTTP server (:mod:`dataflare.live`) reads them at
``GET /views/<step>``.

The workers of a process are threads: they publish into the same :data:`VIEWS`, and one
server sees every shard of the process. In a multi-process run each process holds the
shards of its workers; the process asked gathers the others' rows from their servers
(the same ``--http-port`` on each process's host, :mod:`dataflare.live`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Row = tuple[Any, dict[str, Any]]
RowsOf = Callable[[bytes], list[Row]]
"""Turns a shard's snapshot into rows (``ShardLogic.snapshot_rows``)."""


def key_text(key: Any) -> str:
    """A key as the ``key`` query parameter names it: ``alice``, ``eu,alice`` for a tuple."""
    if isinstance(key, tuple):
        return ",".join(key_text(k) for k in key)
    if key is None:
        return "null"
    value = getattr(key, "value", key)  # a BoolKey (dataflare.operators.keyed)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(key, bytes):
        return key.decode(errors="replace")
    return str(key)


class View:
    """The served state of one step: the rows each shard published last."""

    def __init__(self, step: str, mask: Callable[[dict[str, Any]], dict[str, Any]] | None
                 ) -> None:
        self.step = step
        self.mask = mask
        # slot (a shard's logic) -> [its snapshot, its rows function, its rows once made]
        self._slots: dict[int, list[Any]] = {}
        self._lock = threading.Lock()

    def publish(self, slot: int, snapshot: bytes | None, rows_of: RowsOf) -> None:
        """Replace the state of one shard (``slot``) at once; ``None`` removes it."""
        with self._lock:
            if snapshot is None:
                self._slots.pop(slot, None)
            else:
                self._slots[slot] = [snapshot, rows_of, None]

    def rows(self) -> list[Row]:
        """Every row, ordered by key."""
        with self._lock:
            slots = [(slot, list(entry)) for slot, entry in self._slots.items()]
        rows: list[Row] = []
        for slot, (snapshot, rows_of, made) in slots:
            if made is None:
                made = rows_of(snapshot)
                with self._lock:
                    entry = self._slots.get(slot)
                    if entry is not None and entry[0] is snapshot:
                        entry[2] = made
            rows.extend(made)
        return sorted(rows, key=lambda r: key_text(r[0]))

    def query(self, key: str | None = None, where: str | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
        """The rows of ``key`` (as :func:`key_text` writes it), or all; masked.

        ``where`` is an expression of the DSL (``amount_sum > 100``) over the masked row;
        ``limit`` caps the number of rows. Raises ``ValueError`` on an invalid ``where``.
        """
        return [row for _, row in self.matches(key, where, limit)]

    def matches(self, key: str | None = None, where: str | None = None,
                limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """:meth:`query`'s rows with their keys' text, in key order (to merge with others)."""
        from dataflare.expr import compile_expression

        test = compile_expression(where).test if where else None
        out: list[tuple[str, dict[str, Any]]] = []
        for k, row in self.rows():
            text = key_text(k)
            if key is not None and text != key:
                continue
            shown = self.mask(row) if self.mask is not None else row
            if test is not None and not test(shown):
                continue
            out.append((text, shown))
            if limit is not None and len(out) >= limit:
                break
        return out


VIEWS: dict[str, View] = {}
"""The views of the steps served by this process, by step id (the last compiled run's)."""


def serve(step: str, mask: Callable[[dict[str, Any]], dict[str, Any]] | None) -> View:
    """A new, empty view of ``step`` (replacing one of an earlier run in this process)."""
    view = VIEWS[step] = View(step, mask)
    return view
