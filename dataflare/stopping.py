"""Graceful stop: a signal ends every source's input; nothing open is lost.

``dataflare run`` installs :func:`install` for SIGTERM (how Docker and Kubernetes stop a
process) and SIGINT. The first signal sets :data:`REQUESTED`: every source (wrapped by
:func:`stoppable` in the compiler) ends its input at its next poll, so the dataflow drains:
batches in flight are written, destinations flush their buffers, and stateful steps keep
their open windows, joins and aggregates in the final snapshot instead of emitting them
(:func:`requested` is what they ask). With recovery on, the next run resumes from there.
A second signal stops at once.

A run of several processes stops as one (:func:`spread`): the process that got the signal
tells every other process through the dataflow, and each stops as if signalled. A
dataflow cannot end while another process's sources still read, so one signalled process
alone would wait for the others' input to end (for ever, when it is a stream).

A run started by a server's worker also stops so when the worker's process dies, even by
SIGKILL (:func:`stop_with_parent`): its run is then claimed again by another worker, and
two processes must never run it at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax.inputs import (
    DynamicSource,
    FixedPartitionedSource,
    Source,
    StatefulSourcePartition,
    StatelessSourcePartition,
)

PARENT_ENV = "DATAFLARE_STOP_WITH_PARENT"
"""Set by a server's worker to its process id: the run stops when that process dies."""
REQUESTED = threading.Event()
SIGNAL: list[int] = []  # the signal that asked for the stop
PEER: list[tuple[int, int]] = []  # (process, signal) when another process asked for it
FAILED: list[str] = []  # why the whole run must fail (it stops as on a signal, then fails)
_POLL = timedelta(milliseconds=500)  # how soon an idle source notices a stop


def requested() -> bool:
    """Whether a graceful stop was asked: input ends, open state is kept, not emitted."""
    return REQUESTED.is_set()


def install(on_first: Callable[[int], None] | None = None) -> None:
    """Handle SIGTERM and SIGINT (also when SIGINT was inherited as ignored)."""

    def handler(signum: int, _frame: Any) -> None:
        if REQUESTED.is_set():
            print("\nstopping at once (second signal)", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        SIGNAL.append(signum)
        REQUESTED.set()
        if on_first is not None:
            on_first(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def stop_with_parent() -> None:
    """Ask for SIGTERM when the process that started this one dies (``PARENT_ENV``).

    Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``); elsewhere nothing is asked.
    If that process is already gone (it died before this call), the stop starts now.
    """
    parent = os.environ.pop(PARENT_ENV, None)  # not for processes this one starts
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


_READING = [0, 0]  # this process's source partitions: built, and still reading
_READING_LOCK = threading.Lock()


class _Stoppable:
    """A partition's input that ends when a stop is asked; polled at least every 0.5 s.

    A stop that cut a read's retries short (:class:`~dataflare.retry.Interrupted`) ends the
    input too, the partition's position still before that read.
    """

    inner: Any
    awake: datetime | None
    reading = False

    def _started(self) -> None:
        with _READING_LOCK:
            _READING[0] += 1
            _READING[1] += 1
        self.reading = True

    def _ended(self) -> None:
        if self.reading:
            self.reading = False
            with _READING_LOCK:
                _READING[1] -= 1

    def next_batch(self) -> Any:
        try:
            return self._next_batch()
        except StopIteration:
            self._ended()
            raise

    def _next_batch(self) -> Any:
        if REQUESTED.is_set():
            raise StopIteration
        if self.awake is not None and datetime.now(UTC) < self.awake:
            return []  # woken early to look for a stop: the source is not due yet
        try:
            batch = self.inner.next_batch()
        except Exception as exc:
            from dataflare.retry import interrupted

            if REQUESTED.is_set() and interrupted(exc) is not None:
                raise StopIteration from None  # the read is left to the resumed run
            raise
        self.awake = self.inner.next_awake()
        return batch

    def next_awake(self) -> datetime | None:
        if self.awake is None:
            return None  # the source is ready at once (and looks for a stop each batch)
        return min(self.awake, datetime.now(UTC) + _POLL)

    def close(self) -> None:
        self._ended()
        self.inner.close()


class _Partition(_Stoppable, StatefulSourcePartition[Any, Any]):
    """A resumable partition whose input ends when a stop is asked; its position is kept."""

    def __init__(self, inner: StatefulSourcePartition[Any, Any]) -> None:
        self.inner, self.awake = inner, None
        self._started()

    def snapshot(self) -> Any:
        return self.inner.snapshot()


class _StatelessPartition(_Stoppable, StatelessSourcePartition[Any]):
    def __init__(self, inner: StatelessSourcePartition[Any]) -> None:
        self.inner, self.awake = inner, None
        self._started()


class _Fixed(FixedPartitionedSource[Any, Any]):
    def __init__(self, inner: FixedPartitionedSource[Any, Any]) -> None:
        self.inner = inner

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _Partition:
        return _Partition(self.inner.build_part(step_id, for_part, resume_state))


class _Dynamic(DynamicSource[Any]):
    def __init__(self, inner: DynamicSource[Any]) -> None:
        self.inner = inner

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _StatelessPartition:
        return _StatelessPartition(self.inner.build(step_id, worker_index, worker_count))


def stoppable(source: Source[Any]) -> Source[Any]:
    """``source`` whose input ends when a graceful stop is asked."""
    if isinstance(source, FixedPartitionedSource):
        return _Fixed(source)
    if isinstance(source, DynamicSource):
        return _Dynamic(source)
    return source


# -- one stop for every process of a run ---------------------------------------------------

_FAN_OUT = 64
"""Keys per worker a stop is sent under: bytewax routes a key to ``hash % workers``, so
enough keys reach every worker (the chance that one gets none is below 1e-25)."""
_NO_SOURCE_GRACE = timedelta(seconds=5)
_TOLD = threading.Event()  # this process told the others of its stop


class _StopSignalPartition(StatelessSourcePartition[Any]):
    """Emits ``(process, signal)`` once this process is asked to stop (not by a peer).

    It ends then, or once this process's sources have all ended (it has nothing left to
    stop; a process given no partition at all waits :data:`_NO_SOURCE_GRACE` for them).
    """

    def __init__(self, process: int, keys: int) -> None:
        self.process, self.keys = process, keys
        self.built = datetime.now(UTC)

    def next_batch(self) -> list[Any]:
        if REQUESTED.is_set():
            with _READING_LOCK:  # one worker of the process tells, once
                if PEER or _TOLD.is_set():
                    raise StopIteration
                _TOLD.set()
            why: int | str = FAILED[0] if FAILED else (SIGNAL[0] if SIGNAL else signal.SIGTERM)
            return [(f"stop-{self.process}-{i}", (self.process, why))
                    for i in range(self.keys)]
        with _READING_LOCK:
            built, reading = _READING
        if not reading and (built or datetime.now(UTC) - self.built > _NO_SOURCE_GRACE):
            raise StopIteration
        return []

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + _POLL


class _StopSignal(DynamicSource[Any]):
    def __init__(self, process: int) -> None:
        self.process = process

    def build(self, step_id: str, worker_index: int, worker_count: int
              ) -> _StopSignalPartition:
        return _StopSignalPartition(self.process, _FAN_OUT * worker_count)


def _told(_state: None, told: tuple[int, int | str]) -> tuple[None, None]:
    """A process of the run was asked to stop (a signal, or why it fails): this one too."""
    if not REQUESTED.is_set():
        process, why = told
        if isinstance(why, str):
            FAILED.append(why)
        else:
            PEER.append((process, why))
        REQUESTED.set()
    return None, None


class _DigestPartition(StatelessSourcePartition[Any]):
    """Emits once the workflow this process runs, as ``("workflow", (process, digest))``."""

    def __init__(self, told: tuple[int, str]) -> None:
        self.items: list[Any] = [("workflow", told)]

    def next_batch(self) -> list[Any]:
        if not self.items:
            raise StopIteration
        out, self.items = self.items, []
        return out


class _Digest(DynamicSource[Any]):
    def __init__(self, told: tuple[int, str]) -> None:
        self.told = told

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DigestPartition:
        return _DigestPartition(self.told)


_FIRST: list[tuple[int, str]] = []  # the first workflow told, in the process that compares


def _same(_state: None, told: tuple[int, str]) -> tuple[None, None]:
    """Compare each process's workflow with the first told; one that differs fails the run.

    Kept out of the step's state (a resume may run an edited workflow, which ``plan`` and
    the resume checks judge): only this execution's processes are compared.
    """
    if not _FIRST:
        _FIRST.append(told)
    first = _FIRST[0]
    if told[1] != first[1] and not FAILED:  # the run stops, then fails (see runner)
        FAILED.append(f"process {told[0]} runs another workflow than process {first[0]} (a "
                      "file edited between their starts, or other variables): every process "
                      "of a run must run the same one")
        REQUESTED.set()
    return None, None


def agree(flow: Any, process: int, digest: str) -> None:
    """Add to ``flow`` the steps that stop a run whose processes run different workflows.

    Two definitions would mix silently (half the windows of one size, half of another).
    """
    import bytewax.operators as op

    _FIRST.clear()
    FAILED.clear()
    told = op.input("dataflare_workflow", flow, _Digest((process, digest)))
    op.stateful_map("dataflare_same_workflow", told, _same)


def spread(flow: Any, process: int) -> None:
    """Add to ``flow`` the steps that make one process's stop every process's stop."""
    import bytewax.operators as op

    with _READING_LOCK:
        _READING[:] = [0, 0]
        _TOLD.clear()

    told = op.input("dataflare_stop", flow, _StopSignal(process))
    op.stateful_map("dataflare_stop_told", told, _told)


def stopped_by() -> str:
    """What stopped this process: ``on SIGTERM``, ``with process 1, which got SIGTERM``."""
    if SIGNAL or not PEER:
        return f"on {signal.Signals(SIGNAL[0] if SIGNAL else signal.SIGTERM).name}"
    process, signum = PEER[0]
    return f"with process {process}, which got {signal.Signals(signum).name}"
