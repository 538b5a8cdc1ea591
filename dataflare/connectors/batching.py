"""Write batching of destinations: ``batch: {size, flush_interval}`` as a stateful step.

Records wait in the step's state (snapshotted with the rest of the dataflow) until
``size`` records are buffered or the oldest has waited ``flush_interval``; at the end of
a bounded input everything left is flushed (a destination that must write even when
no record comes, like an ``overwrite`` table, gets one empty flush then). Because the
buffer is recovery state, a crash never loses buffered records and never lets the
source's snapshot run ahead of them. All batches of one destination go to one worker
(one writer), which keeps merges free of write-write conflicts between workers. A write
that a graceful stop cut short (:class:`Unwritten`) is kept in the write step's snapshot
and done first when the run resumes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflare import metrics
from dataflare.records import RUN_ID_ENV, Failed

STOP = threading.Event()
"""Set when the run must stop now (``config.timeout``): writes in flight give up."""


def _new_run() -> str:
    return os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex


@dataclass
class BufferState:
    """Buffered items, when the oldest arrived, flushes so far, and the run's id.

    ``run`` names one recovery lineage: a resumed execution keeps it (it travels in the
    snapshots), a fresh start gets a new one. ``dataflare run --recovery-dir`` takes it
    from the recovery directory, so that a restart after a crash that came before the
    first snapshot is the same run too. Destinations use it to recognise records they
    wrote before a crash (see :mod:`dataflare.connectors.sql_writer`).
    """

    items: list[Any] = field(default_factory=list)
    since: datetime | None = None
    flushes: int = 0
    run: str = field(default_factory=_new_run)


@dataclass(frozen=True)
class Flush:
    """One write: its sequence number in the run, the items, and the run's id."""

    seq: int
    items: list[Any]
    run: str = ""


class _BufferLogic(StatefulBatchLogic[list[Any], Flush, BufferState]):
    def __init__(
        self, size: int, interval: timedelta, state: BufferState | None, always: bool = False
    ) -> None:
        self.size = size
        self.interval = interval
        self.state = state or BufferState()
        self.always = always

    def _flush(self, eof: bool = False) -> list[Flush]:
        st = self.state
        if not st.items and not (eof and self.always and st.flushes == 0):
            return []
        out = Flush(st.flushes, st.items, st.run)
        st.items = []
        st.since = None
        st.flushes += 1
        return [out]

    def on_batch(self, values: list[list[Any]]) -> tuple[list[Flush], bool]:
        st = self.state
        out: list[Flush] = []
        for batch in values:
            if not batch:
                continue
            if st.since is None:
                st.since = datetime.now(UTC)
            st.items.extend(batch)
            if len(st.items) >= self.size:
                out.extend(self._flush())
        return out, False

    def on_notify(self) -> tuple[list[Flush], bool]:
        return self._flush(), False

    def on_eof(self) -> tuple[list[Flush], bool]:
        return self._flush(eof=True), False

    def notify_at(self) -> datetime | None:
        since = self.state.since
        return None if since is None else since + self.interval

    def snapshot(self) -> BufferState:
        st = self.state
        return BufferState(list(st.items), st.since, st.flushes, st.run)


class Unwritten(Exception):
    """Raised by :meth:`Writer.write_flush` when a graceful stop left items unwritten.

    ``flush`` holds those items (same ``seq`` and ``run``), ``refused`` the records of
    the flush that the destination refused before. The write step keeps ``flush`` in its
    snapshot, writes no later flush in this run (the order holds), and writes it first
    when the run resumes.
    """

    def __init__(self, flush: Flush, refused: list[Failed]) -> None:
        super().__init__(f"{len(flush.items)} item(s) left unwritten by a graceful stop")
        self.flush = flush
        self.refused = refused


@dataclass(frozen=True)
class WriteState:
    """A write step's snapshot: refused records not emitted yet, flushes not written yet.

    ``unwritten`` are the flushes a graceful stop left (see :class:`Unwritten`), in order:
    the resumed run writes them before anything else.
    """

    refused: list[Failed] = field(default_factory=list)
    unwritten: list[Flush] = field(default_factory=list)


class Writer(Protocol):
    """What a write step drives: one flush at a time, in order."""

    step: str

    def write_flush(self, flush: Flush) -> list[Failed]:
        """Write ``flush``; the records the destination refused.

        Raises :class:`Unwritten` when a graceful stop left some items unwritten.
        """

    def close(self) -> None:
        """Release connections."""


class _WriteLogic(StatefulBatchLogic[Flush, list[Failed], WriteState]):
    """Writes flushes on a thread of its own, one at a time and in order.

    While the destination works on one flush, the dataflow prepares the next. A snapshot
    waits for the write in flight, so every flush of a snapshotted epoch is written, or
    kept in the snapshot when a graceful stop cut it short (:class:`Unwritten`); the
    records the destination refused are emitted (or kept in the snapshot until they
    are). A failed write raises at the next flush, notification or snapshot.
    """

    def __init__(self, writer: Writer, state: WriteState | list[Failed] | None) -> None:
        if isinstance(state, list):  # the snapshot of an earlier version: refused only
            state = WriteState(state)
        state = state or WriteState()
        self.writer = writer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"dataflare-{writer.step}")
        self.pending: Future[list[Failed]] | None = None
        self.refused: list[Failed] = list(state.refused)
        self.resumed: list[Flush] = list(state.unwritten)  # written first by this run
        self.unwritten: list[Flush] = []  # left by a graceful stop of this run

    def _collect(self, wait: bool) -> None:
        fut = self.pending
        if fut is not None and (wait or fut.done()):
            try:
                # In slices: a stop (config.timeout, Ctrl-C) is noticed while a write runs.
                while not fut.done():
                    futures_wait([fut], timeout=_POLL.total_seconds())
                    if STOP.is_set():
                        msg = f"step {self.writer.step!r}: stopped while a write was running"
                        raise RuntimeError(msg)
            except BaseException:
                stop = getattr(self.writer, "stop", None)
                if stop is not None:
                    stop.set()  # the write in flight gives up at its next step
                raise
            self.pending = None
            try:
                self.refused.extend(fut.result())
            except Unwritten as exc:
                self.refused.extend(exc.refused)
                self.unwritten.append(exc.flush)

    def _write(self, flushes: list[Flush]) -> None:
        for flush in flushes:
            self._collect(wait=True)
            if self.unwritten:  # a stop cut an earlier flush short: keep the order
                self.unwritten.append(flush)
            else:
                self.pending = self.pool.submit(self._timed, flush)

    def _resume(self) -> None:
        """Write the flushes the stopped run left, before anything else."""
        resumed, self.resumed = self.resumed, []
        self._write(resumed)

    def _emit(self) -> list[list[Failed]]:
        out, self.refused = self.refused, []
        return [out] if out else []

    def on_batch(self, values: list[Flush]) -> tuple[list[list[Failed]], bool]:
        self._resume()
        self._write(values)
        return self._emit(), False

    def _timed(self, flush: Flush) -> list[Failed]:
        start = time.perf_counter()
        refused = self.writer.write_flush(flush)
        metrics.observe_write(self.writer.step, time.perf_counter() - start, len(flush.items))
        return refused

    def on_notify(self) -> tuple[list[list[Failed]], bool]:
        self._resume()
        self._collect(wait=False)
        return self._emit(), False

    def notify_at(self) -> datetime | None:
        if self.refused or self.resumed:
            return datetime.now(UTC)
        return None if self.pending is None else datetime.now(UTC) + _POLL

    def on_eof(self) -> tuple[list[list[Failed]], bool]:
        try:
            self._resume()
            self._collect(wait=True)
        finally:
            self.pool.shutdown()
            self.writer.close()
        # Flushes a graceful stop left unwritten stay in the final snapshot.
        return self._emit(), not self.unwritten

    def snapshot(self) -> WriteState:
        self._collect(wait=True)
        return WriteState(list(self.refused), [*self.resumed, *self.unwritten])


_POLL = timedelta(milliseconds=200)


class Discard(DynamicSink[Any]):
    """The end of a destination that writes in a step of its own: drops what it gets."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DiscardPartition:
        """A partition that drops what it gets."""
        return _DiscardPartition()


class _DiscardPartition(StatelessSinkPartition[Any]):
    def write_batch(self, items: list[Any]) -> None:
        pass


class Once(DynamicSource[list[Any]]):
    """One empty batch per worker: it starts the buffer of a run that gets no record."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _OncePartition:
        """A partition giving one empty batch."""
        return _OncePartition()


class _OncePartition(StatelessSourcePartition[list[Any]]):
    def __init__(self) -> None:
        self.done = False

    def next_batch(self) -> list[list[Any]]:
        if self.done:
            raise StopIteration
        self.done = True
        return [[]]


@operator
def buffer(
    step_id: str, up: Stream[list[Any]], size: int, flush_interval: float, always: bool = False
) -> Stream[Flush]:
    """Regroup batches into writes of ``size`` items, or fewer after ``flush_interval``.

    ``always``: a run that buffers nothing still flushes once (empty) at the end.
    """
    interval = timedelta(seconds=flush_interval)
    if always:
        up = op.merge("started", up, op.input("start", up.flow(), Once()))
    keyed = op.key_on("key", up, lambda _batch: "0")
    flushed = op.stateful_batch(
        "buffer", keyed, lambda state: _BufferLogic(size, interval, state, always)
    )
    return op.map("unkey", flushed, lambda kv: kv[1])


@operator
def buffered_output(
    step_id: str,
    up: Stream[list[Any]],
    prepare: Callable[[list[Any]], tuple[list[Any], list[Failed]]],
    batch: Any,
    writer: Callable[[], Writer],
    always: bool = False,
) -> Stream[list[Failed]]:
    """The output of a batching destination; returns the records it rejected or refused.

    ``prepare`` turns each incoming batch into writable items and rejects; the items are
    regrouped per the ``batch`` settings (``size``, ``flush_interval``) and written, one
    flush at a time, by the :class:`Writer` that ``writer`` makes, which returns the
    records the target refused; ``always``: one empty flush when the run writes nothing.
    """
    prepared = op.map("prepare", up, prepare)
    items = op.filter_map("items", prepared, lambda p: p[0] or None)
    flushed: Stream[Any] = buffer("batch", items, batch.size, batch.flush_interval, always)
    rejected = op.filter_map("errors", prepared, lambda p: p[1] or None)
    keyed = op.key_on("writer", flushed, lambda _flush: "0")  # one writer
    written = op.stateful_batch("write", keyed, lambda state: _WriteLogic(writer(), state))
    refused = op.map("refused", written, lambda kv: kv[1])
    # bytewax runs a dataflow until its outputs are done: the write step ends in one.
    op.output("done", refused, Discard())
    return op.merge("failed", rejected, refused)

