"""The worker and the store's run queue: what a server's workers do with queued runs."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from dataflare.server.store import Store
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
