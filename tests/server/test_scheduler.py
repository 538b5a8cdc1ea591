"""The scheduler: instants (cron across DST, interval, once), catchup, never an instant twice."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from dataflare.dsl_compiler.models import Schedule
from dataflare.server.scheduler import Scheduler, instants
from dataflare.server.store import Store, now


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def iso(ts: list[datetime]) -> list[str]:
    return [t.strftime("%m-%d %H:%M") for t in ts]


def test_a_daily_cron_fires_at_local_time_across_both_dst_changes() -> None:
    s = Schedule(type="cron", expression="30 2 * * *", timezone="Europe/Berlin")
    # Spring: 02:30 does not exist on 03-29 (02:00 -> 03:00): it fires at 03:00 local.
    assert iso(list(instants(s, utc(2026, 3, 27), utc(2026, 3, 31)))) == [
        "03-27 01:30", "03-28 01:30", "03-29 01:00", "03-30 00:30"]
    # Autumn: 02:30 happens twice on 10-25; a daily job fires once.
    assert iso(list(instants(s, utc(2026, 10, 23), utc(2026, 10, 27)))) == [
        "10-23 00:30", "10-24 00:30", "10-25 00:30", "10-26 01:30"]


@pytest.mark.parametrize(("expression", "fired"), [
    ("0,30 2 * * *", ["10-25 00:00", "10-25 00:30"]),
    ("*/20 2 * * *", ["10-25 00:00", "10-25 00:20", "10-25 00:40"]),
])
def test_each_repeated_wall_time_fires_once_also_across_ticks(expression: str,
                                                              fired: list[str]) -> None:
    # Several minutes in the repeated hour fired each twice (02:00, 02:30, 02:00, 02:30):
    # only a wall time equal to the one just before was left out.
    s = Schedule(type="cron", expression=expression, timezone="Europe/Berlin")
    assert iso(list(instants(s, utc(2026, 10, 24, 22), utc(2026, 10, 25, 3)))) == fired
    # A tick that sees only the second 02:00 (the first was in the tick before) skips it.
    assert list(instants(s, utc(2026, 10, 25, 0, 50), utc(2026, 10, 25, 1, 5))) == []


def test_an_hourly_cron_fires_every_real_hour_when_the_clock_goes_back() -> None:
    s = Schedule(type="cron", expression="0 * * * *", timezone="Europe/Berlin")
    assert iso(list(instants(s, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 3, 1)))) == [
        "10-25 00:00", "10-25 01:00", "10-25 02:00", "10-25 03:00"]


def test_interval_once_and_date_bounds() -> None:
    s = Schedule(type="interval", interval=900, start_date=utc(2026, 1, 1),
                 end_date=utc(2026, 1, 1, 1))
    assert iso(list(instants(s, utc(2026, 1, 1, 0, 7), utc(2026, 1, 2)))) == [
        "01-01 00:15", "01-01 00:30", "01-01 00:45", "01-01 01:00"]
    once = Schedule(type="once", start_date=utc(2026, 5, 1, 12))
    assert list(instants(once, utc(2026, 1, 1), utc(2026, 6, 1))) == [utc(2026, 5, 1, 12)]
    assert list(instants(once, utc(2026, 5, 2), utc(2026, 6, 1))) == []


HOURLY = """
workflow:
  id: {wid}
  schedule: {{type: interval, interval: 1h, catchup: {catchup}}}
  sources: {{g: {{type: generator, config: {{preset: orders, count: 1}}}}}}
  destinations: {{o: {{type: stdout, inputs: [g]}}}}
"""


def _put(store: Store, wid: str, catchup: str = "latest") -> datetime:
    store.put_workflow(wid, None, HOURLY.format(wid=wid, catchup=catchup), "t", create=True)
    created = store.scheduled()[0][4] if len(store.scheduled()) == 1 else None
    for w, _, _, _, c in store.scheduled():
        if w == wid:
            created = c
    assert created is not None
    return created


@pytest.mark.parametrize(("catchup", "expected"), [("latest", 1), ("all", 5), ("none", 0)])
def test_instants_missed_while_down_follow_catchup(sqlite_store: Store, catchup: str,
                                                   expected: int) -> None:
    created = _put(sqlite_store, "wf", catchup)
    hour = created.replace(minute=0, second=0, microsecond=0)
    clock = [hour + timedelta(hours=5, minutes=3)]
    Scheduler(sqlite_store, clock=lambda: clock[0]).tick()
    runs = sqlite_store.runs("wf")
    assert len(runs) == expected
    if catchup == "latest":
        assert runs[0].scheduled_for == hour + timedelta(hours=5)
    # The position moved past every missed instant: the next tick adds only new ones.
    for _ in sqlite_store.runs("wf", status="queued"):  # a worker carried them out
        claimed = sqlite_store.claim("w", timedelta(minutes=1))
        assert claimed is not None
        sqlite_store.finish(claimed[0].id, "w", "success", None, None, "")
    clock[0] += timedelta(hours=1)
    Scheduler(sqlite_store, clock=lambda: clock[0]).tick()
    assert len(sqlite_store.runs("wf")) == expected + (1 if catchup != "none" else 0)


def test_catchup_latest_after_days_down_runs_the_newest_instant_once(sqlite_store: Store
                                                                      ) -> None:
    # Only the 1,000 oldest missed instants were looked at: after two days down an
    # every-minute cron ran the 1,000th oldest (a day old), then more runs at later ticks.
    sqlite_store.put_workflow("m", None, HOURLY.format(wid="m", catchup="latest").replace(
        "type: interval, interval: 1h,", "type: cron, expression: '* * * * *',"), "t",
        create=True)
    created = next(c for w, _, _, _, c in sqlite_store.scheduled() if w == "m")
    down = created.replace(second=0, microsecond=0) + timedelta(days=2, seconds=30)
    scheduler = Scheduler(sqlite_store, clock=lambda: down)
    scheduler.tick()
    scheduler.tick()
    assert [r.scheduled_for for r in sqlite_store.runs("m")] == [
        down.replace(second=0)]


@pytest.mark.parametrize("catchup", ["latest", "all"])
def test_an_instant_is_skipped_while_a_run_still_waits(sqlite_store: Store, catchup: str
                                                       ) -> None:
    # A run longer than the period: the runs of the instants meanwhile do not pile up
    # behind it (catchup: all asks for every one).
    created = _put(sqlite_store, "wf", catchup).replace(minute=0, second=0, microsecond=0)
    clock = [created + timedelta(hours=1, seconds=1)]
    scheduler = Scheduler(sqlite_store, clock=lambda: clock[0])
    scheduler.tick()
    claimed = sqlite_store.claim("w", timedelta(hours=9))  # the first run goes on for hours
    assert claimed is not None
    for hour in range(2, 6):
        clock[0] = created + timedelta(hours=hour, seconds=1)
        scheduler.tick()
    waiting = sqlite_store.runs("wf", status="queued", limit=100)
    assert [r.scheduled_for for r in waiting] == (
        [created + timedelta(hours=2)] if catchup == "latest"
        else [created + timedelta(hours=h) for h in range(5, 1, -1)])
    sqlite_store.finish(claimed[0].id, "w", "success", None, None, "")
    for _ in waiting:
        taken = sqlite_store.claim("w", timedelta(minutes=1))
        assert taken is not None
        sqlite_store.finish(taken[0].id, "w", "success", None, None, "")
    clock[0] = created + timedelta(hours=6, seconds=1)
    assert len(scheduler.tick()) == 1  # nothing waits: the next instant runs


def test_instants_of_a_start_date_with_an_offset_run_on_time(store: Store) -> None:
    # SQLite kept no offset: an instant at +08:00 was read back as UTC, 8 hours later, so
    # the workflow did not run again for 8 hours (or, at -01:00 with catchup: all, ran
    # every instant of the hour before it existed).
    start = (now() + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=8))).replace(
        microsecond=0)
    store.put_workflow("tz", None, HOURLY.format(wid="tz", catchup="all").replace(
        "interval: 1h,", f"interval: 90s, start_date: '{start.isoformat()}',"), "t",
        create=True)
    clock = [start + timedelta(seconds=91)]
    scheduler = Scheduler(store, clock=lambda: clock[0])
    for _ in range(3):
        scheduler.tick()
        clock[0] += timedelta(seconds=90)
    assert [r.scheduled_for for r in store.runs("tz")][::-1] == [
        start + timedelta(seconds=90 * k) for k in range(4)]


def test_two_schedulers_and_restarts_never_fire_an_instant_twice(store: Store) -> None:
    created = _put(store, "wf", "all").replace(minute=0, second=0, microsecond=0)
    clock = [created]
    schedulers = [Scheduler(store, clock=lambda: clock[0]) for _ in range(2)]
    for hour in range(1, 13):
        clock[0] = created + timedelta(hours=hour, seconds=1)
        threads = [threading.Thread(target=s.tick) for s in schedulers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if hour % 4 == 0:  # a restart: new scheduler objects, nothing kept in memory
            schedulers = [Scheduler(store, clock=lambda: clock[0]) for _ in range(2)]
    instants_fired = sorted(r.scheduled_for for r in store.runs("wf", limit=1000))
    assert instants_fired == [created + timedelta(hours=h) for h in range(1, 13)]
    starts = [a for a in store.audit(1000) if a["action"] == "run.start"]
    assert len(starts) == 12  # an instant another scheduler took leaves no audit record


def test_a_run_another_scheduler_made_of_the_same_instant_is_no_skip(
        sqlite_store: Store, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Scheduler B read the workflows before A made the run of an instant, then found that
    # run queued and warned that the instant was skipped: nothing was.
    created = _put(sqlite_store, "wf").replace(minute=0, second=0, microsecond=0)
    clock = [created + timedelta(hours=1, seconds=1)]
    stale = sqlite_store.scheduled()  # B's read, before A's tick
    assert len(Scheduler(sqlite_store, clock=lambda: clock[0]).tick()) == 1
    monkeypatch.setattr(sqlite_store, "scheduled", lambda: stale)
    assert Scheduler(sqlite_store, clock=lambda: clock[0]).tick() == []
    assert "skipped" not in caplog.text
    assert len(sqlite_store.runs("wf")) == 1


def test_backfill_creates_one_run_per_instant_once(store: Store) -> None:
    created = _put(store, "wf", "none")
    s = Scheduler(store)
    start = created.replace(minute=0, second=0, microsecond=0) - timedelta(hours=10)
    ids = s.backfill("wf", start, start + timedelta(hours=3), "ops")
    assert len(ids) == 4  # hourly instants (aligned to the epoch), both ends included
    assert sorted(r.scheduled_for for r in store.runs("wf")) == [
        start + timedelta(hours=h) for h in range(4)]
    again = s.backfill("wf", start, start + timedelta(hours=3), "ops")
    assert again == []
    # An instant to come: its backfill run started at once and took the scheduled one's
    # place (one run per instant).
    with pytest.raises(ValueError, match="is in the future"):
        s.backfill("wf", start, now() + timedelta(hours=1), "ops")
    assert {r.trigger for r in store.runs("wf")} == {"backfill"}


@pytest.mark.parametrize(("schedule", "message"), [
    ({"type": "cron", "expression": "61 * * * *"}, "invalid cron expression"),
    ({"type": "cron", "expression": "* * * *"}, "has 4 fields: it needs 5"),
    # croniter reads a 6th field as seconds: Quartz's "0 0 1 * * *" fired 60 times.
    ({"type": "cron", "expression": "0 0 1 * * *"}, "has 6 fields: it needs 5 .*no seconds"),
    ({"type": "cron", "expression": "0 0 * * *", "timezone": "Mars/Base"},
     "unknown time zone 'Mars/Base'"),
    ({"type": "interval", "expression": "soon"}, "is not a duration"),
    ({"type": "interval"}, "needs 'interval'"),
])
def test_schedules_are_checked_at_validate(schedule: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule.model_validate(schedule)


def test_nicknames_and_the_seeds_interval_expression_are_accepted() -> None:
    daily = Schedule(type="cron", expression="@daily", timezone="America/New_York")
    assert iso(list(instants(daily, utc(2026, 3, 7), utc(2026, 3, 10)))) == [
        "03-07 05:00", "03-08 05:00", "03-09 04:00"]  # EST, then EDT
    assert Schedule(type="interval", expression="15m").interval == 900


def test_no_instant_before_a_schedule_was_set_or_a_workflow_made_again_fires(
        sqlite_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = utc(2026, 1, 1)
    clock = [t0]
    monkeypatch.setattr("dataflare.server.store.now", lambda: clock[0])
    scheduled = HOURLY.format(wid="wf", catchup="all")
    unscheduled = "\n".join(ln for ln in scheduled.splitlines() if "schedule:" not in ln)
    sqlite_store.put_workflow("wf", None, unscheduled, "t", create=True)
    clock[0] = t0 + timedelta(hours=10)  # the schedule is set ten hours later
    sqlite_store.put_workflow("wf", None, scheduled, "t", create=False)
    Scheduler(sqlite_store, clock=lambda: t0 + timedelta(hours=12, seconds=1)).tick()
    assert sorted(r.scheduled_for for r in sqlite_store.runs("wf")) == [
        t0 + timedelta(hours=11), t0 + timedelta(hours=12)]
    clock[0] = t0 + timedelta(hours=13)  # an edit that keeps the schedule keeps its position
    sqlite_store.put_workflow("wf", None, scheduled + "\n", "t", create=False)
    sqlite_store.delete_workflow("wf", "t")
    clock[0] = t0 + timedelta(hours=20)  # deleted, then made again
    sqlite_store.put_workflow("wf", None, scheduled, "t", create=True)
    Scheduler(sqlite_store, clock=lambda: t0 + timedelta(hours=21, seconds=1)).tick()
    assert sorted(r.scheduled_for for r in sqlite_store.runs("wf"))[2:] == [
        t0 + timedelta(hours=21)]
    actions = [a["action"] for a in sqlite_store.audit() if a["action"].startswith("workflow")]
    assert actions[0] == "workflow.create"  # the newest first: made again, not updated
