"""The platform server: API requests/s, scheduler tick time, instant-to-process latency.

    .venv/bin/python bench/server.py                 # SQLite and PostgreSQL stores
    .venv/bin/python bench/server.py --workflows 1000 --requests 2000

- **API**: a real ``dataflare server --role api`` process (uvicorn, one process) on each
  store; ``--clients`` threads issue ``GET /api/v1/runs?limit=20`` and
  ``GET /api/v1/workflows/{id}`` with a token; requests/s over ``--requests`` requests.
- **Scheduler tick**: ``--workflows`` interval workflows stored, one ``Scheduler.tick()``
  timed after the first (which parses each schedule once), median of 5.
- **Instant to start**: a workflow scheduled every 6 s (a run ends before the next
  instant), a scheduler and a worker process; the time from each scheduled instant to its
  run's ``started_at`` (the worker's claim, just before the ``dataflare run`` process
  starts), median over the instants after the first.
Target (BENCHMARKS.md): >= 200 requests/s on each store, a tick under 100 ms with 1,000
workflows, a run's process started within 1 s of its instant.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from dataflare.server.scheduler import Scheduler
from dataflare.server.store import Store, migrate

FLOW = """
workflow:
  id: {wid}
  schedule: {{type: interval, interval: {every}}}
  sources: {{g: {{type: generator, config: {{preset: orders, count: 5}}}}}}
  destinations: {{out: {{type: file, inputs: [g], config: {{path: out.jsonl}}}}}}
"""
PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def stores(tmp: Path) -> list[tuple[str, str, str]]:
    """(label, url, schema to drop) of a SQLite file and a fresh PostgreSQL schema."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
    return [("sqlite", f"sqlite:///{tmp / 'store.sqlite3'}", ""),
            ("postgresql", "postgresql://postgres@127.0.0.1:5432/test"
             f"?options=-csearch_path%3D{schema}", schema)]


def api_rate(url: str, tmp: Path, requests: int, clients: int) -> float:
    store = Store(url)
    for i in range(20):
        store.put_workflow(f"wf{i}", None, FLOW.format(wid=f"wf{i}", every="1h"), "b", True)
        store.start_run(f"wf{i}", "b")
    port = 18000 + int(uuid.uuid4().int % 1000)
    data = tmp / f"api-{port}"
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "server", "--role", "api",
                             "--store", url, "--port", str(port), "--data-dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        token = (data / "admin-token").read_text().strip()
        per = requests // clients
        errors: list[int] = []

        def client(n: int) -> None:
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
                for i in range(per):
                    path = "/api/v1/runs?limit=20" if i % 2 else f"/api/v1/workflows/wf{n % 20}"
                    if c.get(path).status_code != 200:
                        errors.append(1)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        assert not errors, f"{len(errors)} failed requests"
        return per * clients / elapsed
    finally:
        proc.terminate()
        proc.wait()


def tick_time(url: str, workflows: int) -> float:
    store = Store(url)
    for i in range(workflows):
        store.put_workflow(f"s{i}", None, FLOW.format(wid=f"s{i}", every="1h"), "b", True)
    sched = Scheduler(store)
    sched.tick()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        sched.tick()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def start_latency(url: str, tmp: Path) -> float:
    store = Store(url)
    store.put_workflow("lat", None, FLOW.format(wid="lat", every="6s"), "b", True)
    data = tmp / "lat"
    procs = [subprocess.Popen([sys.executable, "-m", "dataflare", "server", "--role", role,
                               "--store", url, "--data-dir", str(data)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for role in ("scheduler", "worker")]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = [r for r in store.runs("lat", limit=100) if r.started_at]
            if len(done) >= 5:
                break
            time.sleep(0.5)
        done.sort(key=lambda r: r.scheduled_for)
        # The first instant may come before the worker process is up: left out.
        lags = [(r.started_at - r.scheduled_for).total_seconds()  # type: ignore[operator]
                for r in done[1:]]
        return statistics.median(lags)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workflows", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        made = stores(tmp)
        try:
            for label, url, _ in made:
                migrate(url)
                rate = api_rate(url, tmp, args.requests, args.clients)
                tick = tick_time(url, args.workflows)
                lag = start_latency(url, tmp)
                print(f"{label:<10}  API {rate:7.0f} requests/s (target >= 200)  "
                      f"tick {tick * 1000:6.1f} ms with {args.workflows} workflows "
                      f"(target < 100)  instant->start {lag:5.2f} s (target < 1)", flush=True)
        finally:
            for _, _, schema in made:
                if schema:
                    with psycopg.connect(PG, autocommit=True) as c:
                        c.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    sys.exit(main())
