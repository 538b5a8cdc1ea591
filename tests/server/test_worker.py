"""The worker and the store's run queue: what a server's workers do with queued runs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dataflare.server.store import Store, migrate
from dataflare.server.worker import Worker

QUICK = """
workflow:
  id: quick
  sources: {g: {type: generator, config: {preset: orders, count: 3}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
"""


def test_a_relative_data_dir_runs_workflows(
        sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `dataflare server` without --data-dir uses .dataflare, relative to the cwd; the run
    # starts in its work directory, so every path given to it must be absolute.
    monkeypatch.chdir(tmp_path)
    sqlite_store.put_workflow("quick", None, QUICK, "test", create=True)
    rid = sqlite_store.start_run("quick", "test")
    assert Worker(sqlite_store, Path(".dataflare")).run_one()
    run = sqlite_store.run(rid)
    assert run.status == "succeeded", run.error
    assert len((tmp_path / ".dataflare/work/quick/out.jsonl").read_text().splitlines()) == 3


def put_sync(store: Store, pg_schema: Any) -> str:
    """Workflow ``sync``: an incremental read of a table of two rows (its name) into a file."""
    table = f'"{pg_schema.schema}".items'
    with pg_schema.connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, at int NOT NULL)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 10), (2, 20)")
    store.put_workflow("sync", None, f"""
workflow:
  id: sync
  sources:
    db:
      type: postgres
      mode: incremental
      config: {{host: 127.0.0.1, database: test, username: postgres,
               table: {pg_schema.schema}.items, stop_at_end: true}}
      incremental: {{column: at}}
  destinations:
    out: {{type: file, inputs: [db], config: {{path: out.jsonl}}, write_mode: {{type: append}}}}
""", "test", create=True)
    return table


def test_a_scheduled_incremental_sync_reads_only_what_is_new_at_each_run(
        sqlite_store: Store, tmp_path: Path, pg_schema: Any) -> None:
    # Each run of a bounded workflow had a recovery directory of its own: an incremental
    # sync lost its cursor and read (and appended) the whole table at every run.
    table = put_sync(sqlite_store, pg_schema)
    worker = Worker(sqlite_store, tmp_path / "data")
    out = tmp_path / "data/work/sync/out.jsonl"
    for new_row in ("(3, 30)", None):
        rid = sqlite_store.start_run("sync", "test")
        assert worker.run_one()
        run = sqlite_store.run(rid)
        assert run.status == "succeeded", run.error
        if new_row:
            with pg_schema.connect() as conn:
                conn.execute(f"INSERT INTO {table} VALUES {new_row}")
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 2, 3]
    # Deleted and made again under its id, it is a new workflow: its first run reads the
    # whole table (it resumed the deleted one's cursor: a new target missed every row).
    text = sqlite_store.workflow("sync")["yaml"]
    sqlite_store.delete_workflow("sync", "test")
    sqlite_store.put_workflow("sync", None, text.replace("out.jsonl", "again.jsonl"), "test",
                              create=True)
    rid = sqlite_store.start_run("sync", "test")
    assert worker.run_one()
    assert sqlite_store.run(rid).status == "succeeded"
    again = tmp_path / "data/work/sync/again.jsonl"
    assert [json.loads(x)["id"] for x in again.read_text().splitlines()] == [1, 2, 3]
    assert len(list((tmp_path / "data/recovery").glob("sync.deleted-*"))) == 1


def test_a_position_kept_in_another_data_dir_fails_the_run_instead_of_reading_again(
        sqlite_store: Store, tmp_path: Path, pg_schema: Any) -> None:
    # Server processes with data directories of their own: a run of an incremental sync
    # taken by the other one read the whole table again (25 rows for 15).
    put_sync(sqlite_store, pg_schema)
    here, there = Worker(sqlite_store, tmp_path / "a"), Worker(sqlite_store, tmp_path / "b")
    shared = Worker(sqlite_store, tmp_path / "a")  # another process on the same data dir
    first = sqlite_store.start_run("sync", "test")
    assert here.run_one()
    assert sqlite_store.run(first).status == "succeeded", sqlite_store.run(first).error
    second = sqlite_store.start_run("sync", "test")
    assert there.run_one()
    run = sqlite_store.run(second)
    assert run.status == "failed" and "server processes must share --data-dir" in (
        run.error or "")
    assert not (tmp_path / "b/work/sync/out.jsonl").exists()
    third = sqlite_store.start_run("sync", "test")
    assert shared.run_one() and sqlite_store.run(third).status == "succeeded"
    out = (tmp_path / "a/work/sync/out.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in out] == [1, 2]  # read once
    # A data directory lost for good: the way out the error gives, a workflow made again.
    assert "make the workflow again (delete it, then create it)" in (run.error or "")
    text = sqlite_store.workflow("sync")["yaml"]
    sqlite_store.delete_workflow("sync", "test")
    sqlite_store.put_workflow("sync", None, text, "test", create=True)
    fourth = sqlite_store.start_run("sync", "test")
    assert there.run_one() and sqlite_store.run(fourth).status == "succeeded"
    out = (tmp_path / "b/work/sync/out.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in out] == [1, 2]


def test_concurrent_claims_never_run_one_workflow_twice(store: Store) -> None:
    # Workers of several servers claim at once: of the queued runs of one workflow, one
    # is claimed; the others wait until it ends (runs of one workflow never overlap).
    store.put_workflow("quick", None, QUICK, "test", create=True)
    for _ in range(6):
        store.start_run("quick", "test")

    def claim(i: int, start: threading.Barrier, claimed: list[object]) -> None:
        start.wait()
        got = store.claim(f"worker-{i}", timedelta(minutes=1))
        if got is not None:
            claimed.append(got[0])

    for _ in range(3):
        start = threading.Barrier(6)
        claimed: list[object] = []
        threads = [threading.Thread(target=claim, args=(i, start, claimed)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(claimed) == 1, [getattr(r, "id", r) for r in claimed]
        (run,) = claimed
        store.finish(run.id, run.worker, "succeeded", None, None, "")  # type: ignore[attr-defined]


SLOW = """
workflow:
  id: slow
  sources: {g: {type: generator, config: {preset: orders, count: 100000, rate: 40, batch_size: 10}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
"""


class _Served:
    """A ``dataflare server`` process (SQLite store) running workflow SLOW's first run."""

    def __init__(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        data.mkdir()
        url = f"sqlite:///{data / 'store.sqlite3'}"
        migrate(url)
        self.store = Store(url)
        self.store.put_workflow("slow", None, SLOW, "test", create=True)
        self.rid = self.store.start_run("slow", "test")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = tmp_path / "server.log"
        with self.log.open("wb") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "dataflare", "server", "--store", url, "--data-dir",
                 str(data), "--port", str(port)], stdout=log, stderr=log,
                start_new_session=True)
        self.flow = str(data / "work" / "slow" / "slow.r1.yaml")
        out = data / "work" / "slow" / "out.jsonl"
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size > 0):
            assert time.monotonic() < deadline, self.log.read_text()
            assert self.server.poll() is None, self.log.read_text()
            time.sleep(0.2)
        assert self.running()

    def running(self) -> bool:
        """Whether the run's ``dataflare run`` process is there."""
        return subprocess.run(["pgrep", "-f", self.flow], check=False).returncode == 0

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.kill()
        subprocess.run(["pkill", "-9", "-f", self.flow], check=False)
        self.store.engine.dispose()


def test_sigterm_to_a_server_with_its_api_puts_the_run_back_and_ends_its_process(
        tmp_path: Path) -> None:
    # uvicorn re-raises the signal it handled: the process used to die there, leaving the
    # run's process behind (and the run "running", to be started a second time beside it).
    served = _Served(tmp_path)
    try:
        served.server.send_signal(signal.SIGTERM)
        assert served.server.wait(timeout=90) == 0
        assert served.store.run(served.rid).status == "queued"  # the restart resumes it
        assert not served.running()
        # It keeps the counts of the part that ran, which the next part adds to.
        part = tmp_path / "data" / "work" / "slow" / f"{served.rid}.summary.json"
        summary = served.store.run(served.rid).summary
        assert summary == json.loads(part.read_text()) and summary["steps"]["out"]["records"]
    finally:
        served.close()


def test_a_killed_server_leaves_no_run_process_behind(tmp_path: Path) -> None:
    # SIGKILL gives the server no chance to stop its runs: each run's process stops by
    # itself when the server's process is gone. Left running, it would run beside the
    # process another worker starts for the same run once its lease ends.
    served = _Served(tmp_path)
    try:
        served.server.kill()
        served.server.wait(timeout=30)
        deadline = time.monotonic() + 60
        while served.running():
            assert time.monotonic() < deadline, "the run's process outlived its server"
            time.sleep(0.2)
    finally:
        served.close()


def test_a_resumed_runs_counts_add_up_its_parts() -> None:
    from dataflare.server.worker import added

    first = {"status": "stopped", "duration_s": 1.5, "total": 10, "succeeded": 10, "failed": 1,
             "steps": {"g": {"records": 10, "failed": 1}, "out": {"records": 10, "failed": 0}},
             "quality": {"q": [{"field": "x", "rule": "not_null", "checked": 10, "failed": 1}]},
             "late_dropped": {"w": 2}, "error": None}
    second = {"status": "succeeded", "duration_s": 2.25, "total": 5, "succeeded": 5,
              "failed": 0, "steps": {"g": {"records": 5, "failed": 0},
                                     "out": {"records": 5, "failed": 0, "late": 1}},
              "quality": {"q": [{"field": "x", "rule": "not_null", "checked": 5, "failed": 0}]},
              "late_dropped": {}, "error": None}
    both = added(first, second)
    assert both == {
        "status": "succeeded", "parts": 2, "duration_s": 3.75, "total": 15, "succeeded": 15,
        "failed": 1, "steps": {"g": {"records": 15, "failed": 1},
                               "out": {"records": 15, "failed": 0, "late": 1}},
        "quality": {"q": [{"field": "x", "rule": "not_null", "checked": 15, "failed": 1}]},
        "late_dropped": {"w": 2}, "error": None}
    assert added(both, second)["parts"] == 3  # type: ignore[index]
    assert added(None, second) == second and added(first, None) == first
