"""Server processes sharing one PostgreSQL store: schedulers and workers, killed, restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dataflare.server.store import Store, migrate
from tests.server.conftest import pg_url

EVERY_2S = """
workflow:
  id: tick
  schedule: {type: interval, interval: 2s}
  sources: {g: {type: generator, config: {preset: orders, count: 5}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
"""

SLOW = """
workflow:
  id: slow
  sources: {g: {type: generator, config: {preset: orders, count: 400, rate: 40, batch_size: 10}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
"""


class Cluster:
    """``dataflare server --role ...`` processes sharing a store and a data directory."""

    def __init__(self, url: str, data: Path) -> None:
        self.url, self.data = url, data
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, role: str) -> subprocess.Popen[bytes]:
        log = (self.data / f"{role}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataflare", "server", "--store", self.url, "--role", role,
             "--data-dir", str(self.data), "--lease", "4"], stdout=log, stderr=log,
            start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and the run it carries out
        proc.wait()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def cluster(pg_schema: Any, tmp_path: Path) -> Any:
    url = pg_url(pg_schema.schema)
    migrate(url)
    data = tmp_path / "data"
    data.mkdir()
    c = Cluster(url, data)
    yield c, Store(url)
    c.stop()


def test_two_schedulers_and_two_workers_run_each_period_exactly_once(cluster: Any) -> None:
    c, store = cluster
    store.put_workflow("tick", None, EVERY_2S, "test", create=True)
    schedulers = [c.start("scheduler"), c.start("scheduler")]
    workers = [c.start("worker"), c.start("worker")]

    def succeeded(n: int) -> Callable[[], bool]:
        return lambda: len(store.runs("tick", "succeeded", 1000)) >= n

    wait_for(succeeded(4), 120, "4 scheduled runs")
    # One scheduler and one worker die; the others carry on, then replacements join.
    c.kill(schedulers[0])
    c.kill(workers[0])
    done = len(store.runs("tick", "succeeded", 1000))
    wait_for(succeeded(done + 3), 120, "3 more runs with one of each role")
    c.start("scheduler")
    c.start("worker")
    wait_for(succeeded(done + 6), 120, "3 more runs after the restart")
    c.stop()
    runs = store.runs("tick", limit=1000)
    instants = sorted(r.scheduled_for for r in runs)
    assert len(instants) == len(set(instants)), "an instant fired twice"
    gaps = {b - a for a, b in zip(instants, instants[1:], strict=False)}
    assert gaps == {timedelta(seconds=2)}, f"instants lost: {sorted(gaps)}"
    assert {r.status for r in runs} <= {"succeeded", "queued", "running"}
    assert len({r.worker for r in runs if r.status == "succeeded"}) >= 2
    starts = [a for a in store.audit(5000) if a["action"] == "run.start"]
    assert sorted(a["detail"]["run"] for a in starts) == sorted(r.id for r in runs)


def test_a_run_whose_worker_is_killed_resumes_on_another_worker(cluster: Any) -> None:
    c, store = cluster
    store.put_workflow("slow", None, SLOW, "test", create=True)
    first = c.start("worker")
    rid = store.start_run("slow", "test")
    out = c.data / "work/slow/out.jsonl"
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 60, 120,
             "the first worker to write some records")
    wait_for(lambda: any((c.data / "recovery/slow" / rid).glob("*.sqlite3")), 30, "recovery")
    # While it runs, the run's per-step counts are live in the store (API and console).
    live = wait_for(lambda: (s := store.run(rid).summary) and s["steps"]["g"]["records"] and s,
                    30, "live counts")
    assert live["status"] == "running" and live["steps"]["out"]["records"] > 0
    c.kill(first)
    assert store.run(rid).status == "running"
    before = store.run(rid).summary  # the counts of the first part, as last heard
    c.start("worker")
    run = wait_for(lambda: (r := store.run(rid)).status in ("succeeded", "failed") and r,
                   180, "the run to end on the second worker")
    assert run.status == "succeeded", store.log(rid)
    assert run.attempt == 1
    # The run's counts are those of both parts (they were the second part's alone).
    part = json.loads((c.data / f"work/slow/{rid}.summary.json").read_text())
    assert run.summary is not None and before is not None and run.summary["parts"] == 2
    for step in ("g", "out"):
        assert run.summary["steps"][step]["records"] == (
            before["steps"][step]["records"] + part["steps"][step]["records"])
    assert run.summary["status"] == "succeeded"
    ids = [json.loads(line)["order_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 400, "records lost or doubled"
