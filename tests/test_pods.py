"""A workflow as 3 bytewax processes on 3 hosts (network namespaces), like 3 pods.

Each "pod" is a network namespace with an address of its own, joined by a bridge to a
"services" namespace that runs PostgreSQL, Redis and the Kafka-protocol broker. The run
reads a 6-partition topic into PostgreSQL (append, exactly once by Kafka position) and
Redis; one pod is killed with SIGKILL and the cluster restarted, then it is rescaled
3 -> 2 -> 3 with recovery. Only the namespaces' own addresses are used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netns import Hosts, sh, unavailable

PG_BIN = Path("/usr/lib/postgresql/15/bin")
FLOW = """
workflow:
  id: pods
  sources:
    events:
      type: kafka
      mode: streaming
      config: {{bootstrap_servers: "{svc}:9092", topic: events, consumer_group: pods}}
  destinations:
    table:
      inputs: [events]
      type: postgres
      config: {{dsn: "host={svc} port=5432 user=postgres dbname=postgres", table: events}}
    cache:
      inputs: [events]
      type: redis
      config: {{url: "redis://{svc}:6379/0", key_template: "e:{{{{id}}}}",
               data_structure: string}}
"""


def _netns_available() -> str | None:
    reason = unavailable()
    if reason is None and not (PG_BIN / "initdb").exists():
        return "postgresql 15 binaries not found"
    return reason


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _netns_available()
    if reason:
        pytest.skip(reason)
    h = Hosts()
    root = Path(tempfile.mkdtemp(prefix="dataflare-pods-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        h.up()
        # PostgreSQL, Redis and the broker, in the services namespace.
        data = root / "pg"
        data.mkdir()
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(data, "postgres", "postgres")
        sh("runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(data), "-U",
           "postgres", "-A", "trust", "--no-sync")
        with open(data / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = '{h.addr['svc']}'\nport = 5432\n"
                    f"unix_socket_directories = '{root}'\nfsync = off\n")
        with open(data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {h.subnet}.0/24 trust\n")
        out = subprocess.run(["ip", "netns", "exec", h.names["svc"], "runuser", "-u",
                              "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-l",
                              str(root / "pg.log"), "-w", "start"], capture_output=True)
        assert out.returncode == 0, out.stderr
        redis_bin = shutil.which("redis-server")
        assert redis_bin is not None
        procs.append(h.run("svc", redis_bin, "--bind", h.addr["svc"], "--port", "6379",
                           "--protected-mode", "no",
                           "--save", "", "--dir", str(root), stdout=subprocess.DEVNULL))
        procs.append(h.broker(root))
        h.create_topic("events", 6)
        h.root = root  # type: ignore[attr-defined]
        yield h
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        subprocess.run(["ip", "netns", "exec", h.names["svc"], "runuser", "-u", "postgres",
                        "--", str(PG_BIN / "pg_ctl"), "-D", str(root / "pg"), "-m",
                        "immediate", "stop"], capture_output=True)
        h.down()
        shutil.rmtree(root, ignore_errors=True)


def produce(h: Hosts, start: int, n: int) -> None:
    h.python("svc", f"""
import json
from confluent_kafka import Producer
p = Producer({{"bootstrap.servers": "{h.addr['svc']}:9092", "linger.ms": 20}})
for i in range({start}, {start + n}):
    p.produce("events", json.dumps({{"id": i, "user": f"u{{i % 97}}"}}).encode(),
              key=f"u{{i % 97}}".encode())
    p.poll(0)
assert p.flush(30) == 0
""")


def counts(h: Hosts) -> tuple[int, int, int]:
    """(rows, distinct ids) in PostgreSQL, keys in Redis."""
    out = h.python("svc", f"""
import psycopg, redis
try:
    with psycopg.connect("host={h.addr['svc']} user=postgres dbname=postgres") as c:
        rows, ids = c.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone()
except psycopg.errors.UndefinedTable:
    rows = ids = 0
keys = redis.Redis(host="{h.addr['svc']}").dbsize()
print(rows, ids, keys)
""")
    rows, ids, keys = (int(x) for x in out.split())
    return rows, ids, keys


def test_three_pods_survive_a_kill_and_rescale_3_2_3_with_exact_output(
        hosts: Hosts, tmp_path: Path) -> None:
    h = hosts
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(svc=h.addr["svc"]))
    recovery = tmp_path / "recovery"  # shared, like a ReadWriteMany volume

    def start(n: int) -> dict[str, subprocess.Popen[str]]:
        pods = [f"p{i}" for i in range(n)]
        addresses = ";".join(f"{h.addr[p]}:2101" for p in pods)
        return {p: h.run(p, sys.executable, "-m", "dataflare", "run", str(flow), "-q",
                         "-i", str(i), "-a", addresses, "-r", str(recovery), "-s", "1",
                         stderr=subprocess.PIPE, text=True)
                for i, p in enumerate(pods)}

    def wait_rows(target: int, pods: dict[str, subprocess.Popen[str]]) -> None:
        deadline = time.monotonic() + 180
        while counts(h)[0] < target:
            for name, p in pods.items():
                assert p.poll() is None, f"{name}: {p.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, f"stuck at {counts(h)} of {target}"
            time.sleep(0.5)

    def stop(pods: dict[str, subprocess.Popen[str]]) -> None:
        for p in pods.values():
            p.send_signal(signal.SIGTERM)
        for name, p in pods.items():
            _, err = p.communicate(timeout=120)
            assert p.returncode == 128 + signal.SIGTERM, f"{name}: {err[-2000:]}"

    produce(h, 0, 30_000)
    pods = start(3)
    wait_rows(3_000, pods)
    os.kill(pods["p1"].pid, signal.SIGKILL)  # one pod dies; the others lose their peer
    for p in pods.values():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    pods = start(3)  # the cluster restarts from the last snapshot
    # The two survivors may have written everything before they stopped: new input shows
    # the restarted cluster runs (and can be stopped gracefully).
    produce(h, 30_000, 5_000)
    wait_rows(35_000, pods)
    stop(pods)
    produce(h, 35_000, 10_000)
    pods = start(2)  # rescaled down: 6 Kafka partitions and 3 recovery partitions, 2 pods
    wait_rows(45_000, pods)
    stop(pods)
    produce(h, 45_000, 10_000)
    pods = start(3)
    wait_rows(55_000, pods)
    stop(pods)
    assert counts(h) == (55_000, 55_000, 55_000)
