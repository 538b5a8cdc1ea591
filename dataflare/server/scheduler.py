"""The scheduler role: turn each workflow's ``schedule`` into runs, exactly once per instant.

Every tick reads the live workflows, computes the instants due since the workflow's
scheduler position (``scheduled_until``) and inserts one run per instant. The database's
unique (workflow, instant) key makes a second scheduler's insert of the same instant a
no-op, and the position moves in the same transaction, so neither a restart nor a second
scheduler fires an instant twice or loses one. Instants missed while no scheduler ran
follow ``catchup``: ``latest`` (default) runs the newest, ``all`` runs each, ``none``
runs none. Runs of one workflow never overlap (the workers see to it); outside
``catchup: all`` an instant that comes while a run of the workflow still waits in the
queue is skipped (logged), so a run longer than the period leaves at most one run
waiting rather than a queue that only grows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from dataflare.dsl_compiler.models import Schedule
from dataflare.records import parse_duration
from dataflare.server.store import Store, now, schedule_block

log = logging.getLogger(__name__)
MAX_CATCHUP = 1000  # instants one tick turns into runs at most (catchup: all)
GRACE = timedelta(minutes=1)  # catchup none: an instant this recent is not "missed"


def schedule_of(text: str, wid: str = "") -> Schedule | None:
    """The ``schedule`` of a stored workflow text (validated when it was stored).

    One stored by an earlier version may not validate now (a 6-field cron): it is not
    scheduled, and said so (here, and as ``schedule_error`` by the API).
    """
    schedule, problem = read_schedule(text)
    if problem is not None:
        log.error("workflow %r is not scheduled: %s", wid, problem)
    return schedule


def read_schedule(text: str) -> tuple[Schedule | None, str | None]:
    """The ``schedule`` of a stored workflow text, or why it does not validate now."""
    raw = schedule_block(text)
    if not raw:
        return None, None
    try:
        return Schedule.model_validate(raw), None
    except ValidationError as exc:
        said = exc.errors()[0]["msg"].removeprefix("Value error, ")
        return None, f"its schedule does not validate ({said}); store it again with a valid one"


def instants(schedule: Schedule, after: datetime, until: datetime) -> Iterator[datetime]:
    """The schedule's instants in ``(after, until]``, oldest first (UTC)."""
    start, end = schedule.start_date, schedule.end_date  # aware: a naive one is read as UTC
    if end is not None:
        until = min(until, end)
    if schedule.type == "once":
        if start is not None and after < start <= until:
            yield start
        return
    if schedule.type == "interval":
        period = schedule.interval or parse_duration(schedule.expression or "")
        # Instants are aligned to start_date, or to the Unix epoch (a 15m interval fires at
        # :00, :15, :30, :45), so every scheduler and backfill agrees on them.
        anchor = start or datetime(1970, 1, 1, tzinfo=ZoneInfo("UTC"))
        step = timedelta(seconds=period)
        k = max(0, int((after - anchor) / step) + 1) if after >= anchor else 0
        t = anchor + k * step
        while t <= after:
            t += step
        while t <= until:
            yield t
            t += step
        return
    if schedule.type == "cron":
        from croniter import CroniterBadDateError, croniter

        zone = ZoneInfo(schedule.timezone)
        base = max(after, start - timedelta(microseconds=1)) if start else after
        it = croniter(schedule.expression, base.astimezone(zone))
        # A job at fixed hours fires once when its wall-clock time happens twice (the hour
        # repeated when DST ends), as cron does; a job of every hour fires every real hour.
        fields = schedule.expression.split() if schedule.expression else []
        hourly = schedule.expression == "@hourly" or (
            len(fields) >= 5 and fields[1].split("/")[0] in ("*", "0-23"))
        while True:
            try:
                t = it.get_next(datetime)
            except CroniterBadDateError:  # an expression with no date (Feb 30)
                return
            if t > until:
                return
            if hourly or not _repeated(t, zone):
                yield t.astimezone(ZoneInfo("UTC"))


def _repeated(t: datetime, zone: ZoneInfo) -> bool:
    """Whether ``t`` is the second time its wall-clock time happens (the hour DST repeats).

    Told by the instant alone, so a tick that sees only the second time (the first was in
    the tick before) does not fire it either.
    """
    wall = t.replace(tzinfo=None)
    first, second = wall.replace(tzinfo=zone, fold=0), wall.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and t.astimezone(UTC) == second.astimezone(UTC)


def latest_instant(schedule: Schedule, after: datetime, until: datetime) -> datetime | None:
    """The schedule's last instant in ``(after, until]``.

    Looked for in growing spans back from ``until``: an outage of days holds thousands of a
    cron's instants.
    """
    span = timedelta(hours=1)
    while True:
        low = max(after, until - span)
        last = None
        for last in instants(schedule, low, until):  # noqa: B007 - the last one is kept
            pass
        if last is not None or low == after:
            return last
        span *= 24


def next_instants(schedule: Schedule, count: int = 5, at: datetime | None = None
                  ) -> list[datetime]:
    """The next ``count`` instants of a schedule (for the console and the API)."""
    at = at or now()
    out = []
    for t in instants(schedule, at, at + timedelta(days=3660)):
        out.append(t)
        if len(out) == count:
            break
    return out


class Scheduler:
    """Ticks over the store; ``clock`` is injectable for tests."""

    def __init__(self, store: Store, clock: Callable[[], datetime] = now) -> None:
        self.store, self.clock = store, clock
        self._cache: dict[tuple[str, int], Schedule | None] = {}
        self.next_due: datetime | None = None  # the earliest instant after the last tick

    def schedule(self, wid: str, revision: int, text: str) -> Schedule | None:
        """The schedule of a workflow revision (parsed once)."""
        key = (wid, revision)
        if key not in self._cache:
            self._cache[key] = schedule_of(text, wid)
        return self._cache[key]

    def tick(self) -> list[str]:
        """Create the runs due now; their ids."""
        at = self.clock()
        started: list[str] = []
        self.next_due = None
        for wid, revision, text, until, created in self.store.scheduled():
            sched = self.schedule(wid, revision, text)
            if sched is None or sched.type == "event":
                continue
            after = until or created
            if sched.catchup == "all":  # the oldest first; the rest at the next ticks
                due = list(islice(instants(sched, after, at), MAX_CATCHUP))
            else:
                last = latest_instant(sched, after, at)
                due = [] if last is None else [last]
            upcoming = next(instants(sched, max(at, after), at + timedelta(minutes=1)), None)
            if upcoming is not None and (self.next_due is None or upcoming < self.next_due):
                self.next_due = upcoming
            if not due:
                continue
            if sched.catchup == "latest":
                fire = due[-1:]
            elif sched.catchup == "none":
                fire = [t for t in due[-1:] if at - t <= GRACE]
            else:
                fire = due
            with self.store.tx() as c:
                if sched.catchup != "all" and fire and (
                        waiting := self.store.queued_run(wid, conn=c)) is not None:
                    if waiting[1] != fire[-1]:  # else another scheduler made this very run
                        log.warning("workflow %r: the run of %s is skipped, run %s still "
                                    "waits for its turn", wid, fire[-1].isoformat(), waiting[0])
                    fire = []
                for t in fire:
                    rid = self.store.start_run(wid, "scheduler", "schedule", t, conn=c)
                    if rid is not None:
                        started.append(rid)
                self.store.set_scheduled_until(c, wid, due[-1])
        return started

    def backfill(self, wid: str, start: datetime, end: datetime, user: str) -> list[str]:
        """One run per instant of the workflow's schedule in ``[start, end]``, all past.

        An instant to come runs at its time: a backfill run of it would start now, before
        its data, and take the place of the scheduled one (one run per instant).
        """
        at = self.clock()
        if end > at:
            msg = (f"end {end.isoformat()} is in the future (now {at.isoformat()}): a backfill "
                   "runs past instants, those to come run at their time")
            raise ValueError(msg)
        with self.store.engine.connect():
            wf = self.store.workflow(wid)
        sched = schedule_of(wf["yaml"])
        if sched is None or sched.type == "event":
            msg = f"workflow {wid!r} has no time schedule to backfill"
            raise ValueError(msg)
        ids = []
        with self.store.tx() as c:
            for i, t in enumerate(instants(sched, start - timedelta(microseconds=1), end)):
                if i >= MAX_CATCHUP:
                    msg = f"more than {MAX_CATCHUP} instants between {start} and {end}"
                    raise ValueError(msg)
                rid = self.store.start_run(wid, user, "backfill", t, conn=c)
                if rid is not None:
                    ids.append(rid)
        return ids

    def run_forever(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Tick until ``stop`` is set: every ``interval`` seconds, or at the next instant due."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a failed tick is logged and retried
                log.exception("scheduler tick failed")
            wait = interval
            if self.next_due is not None:
                wait = min(interval, max(0.01, (self.next_due - self.clock()).total_seconds()))
            stop.wait(wait)
