"""The worker and the store's run queue: what a server's workers do with queued runs."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

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
  sources: {g: {type: generator, config: {preset: orders, count: 2000, rate: 40, batch_size: 10}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
"""


def test_sigterm_to_a_server_with_its_api_puts_the_run_back_and_ends_its_process(
        tmp_path: Path) -> None:
    # uvicorn re-raises the signal it handled: the process used to die there, leaving the
    # run's process behind (and the run "running", to be started a second time beside it).
    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'store.sqlite3'}"
    migrate(url)
    store = Store(url)
    store.put_workflow("slow", None, SLOW, "test", create=True)
    rid = store.start_run("slow", "test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "dataflare", "server", "--store", url, "--data-dir", str(data),
         "--port", str(port)], stdout=log, stderr=log, start_new_session=True)
    out = data / "work" / "slow" / "out.jsonl"
    flow = str(data / "work" / "slow" / "slow.r1.yaml")
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size > 0):
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        assert subprocess.run(["pgrep", "-f", flow], check=False).returncode == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 0
        assert store.run(rid).status == "queued"  # another worker, or the restart, resumes it
        assert subprocess.run(["pgrep", "-f", flow], check=False).returncode == 1
    finally:
        if server.poll() is None:
            server.kill()
        subprocess.run(["pkill", "-9", "-f", flow], check=False)
        store.engine.dispose()
