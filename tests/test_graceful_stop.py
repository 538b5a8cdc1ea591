"""SIGTERM stops a run gracefully: writes finish, open windows stay in the snapshot."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.pg_private import free_port
from tests.fixtures.workflows import stop_while_retrying
from tests.test_exactly_once import produce

FLOW = """
workflow:
  id: graceful
  sources:
    events:
      type: kafka
      mode: streaming
      config:
        bootstrap_servers: "{servers}"
        topic: {topic}
        consumer_group: graceful
        stop_at_end: ${{STOP_AT_END}}
  transformations:
    per_minute:
      inputs: [events]
      type: window
      config:
        window: {{type: tumbling, size: 60s}}
        time_field: ts
        time_unit: ms
        group_by: [user_id]
        aggregations: [{{field: amount, operations: [count, sum], as: amount}}]
  destinations:
    raw:
      inputs: [events]
      type: postgres
      config: {{dsn: "{dsn}", schema: {schema}, table: raw}}
    windows:
      inputs: [per_minute]
      type: postgres
      config: {{dsn: "{dsn}", schema: {schema}, table: windows}}
"""


def events(start: int, n: int) -> list[dict[str, Any]]:
    return [{"id": i, "user_id": f"u{i % 7}", "amount": i % 10, "ts": 1_700_000_000_000 + i * 250}
            for i in range(start, start + n)]


def expected(all_events: list[dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    out: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for e in all_events:
        w = e["ts"] // 60_000 * 60
        out[(e["user_id"], w)][0] += 1
        out[(e["user_id"], w)][1] += e["amount"]
    from datetime import UTC, datetime

    return sorted((u, datetime.fromtimestamp(w, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), c, s)
                  for (u, w), (c, s) in out.items())


def test_sigterm_stops_cleanly_and_the_resume_is_exact(
        tmp_path: Path, kafka_broker: Any, kafka_topic: Any, pg_schema: Any) -> None:
    topic = kafka_topic(partitions=3)
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(servers=kafka_broker.bootstrap_servers, topic=topic,
                                dsn=pg_schema.dsn, schema=pg_schema.schema))
    first, second = events(0, 3000), events(3000, 2000)
    produce(kafka_broker.bootstrap_servers, topic, first)
    cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(tmp_path / "rec"),
           "-s", "1", "--summary-json", str(tmp_path / "summary.json")]
    env = {**os.environ, "STOP_AT_END": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def count(table: str) -> int:
        try:
            return pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".{table}')[0][0]
        except Exception:  # noqa: BLE001 - the table appears with the first write
            return 0

    deadline = time.monotonic() + 120
    while count("raw") < len(first):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first run did not read its input"
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped cleanly on SIGTERM (state kept in the final snapshot)" in err
    assert "panicked" not in err and "Traceback" not in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["total"] == len(first)
    emitted_before = count("windows")
    # Every window still open at the stop stayed in the snapshot: none was emitted early.
    assert emitted_before < len(expected(first))

    produce(kafka_broker.bootstrap_servers, topic, second)
    out = subprocess.run(cmd, env={**os.environ, "STOP_AT_END": "true"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert count("raw") == len(first) + len(second)
    rows = pg_schema.rows(f'SELECT user_id, window_start, amount_count, amount_sum '
                          f'FROM "{pg_schema.schema}".windows')
    got = sorted((u, str(w), int(c), int(s)) for u, w, c, s in rows)
    assert got == expected(first + second)


@pytest.mark.parametrize("ignored", [True, False])
def test_sigint_stops_gracefully_also_when_inherited_as_ignored(tmp_path: Path,
                                                                ignored: bool) -> None:
    flow = tmp_path / "wf.yaml"
    flow.write_text("""
workflow:
  sources: {g: {type: generator, config: {preset: orders, count: null, rate: 200}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
""")
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", str(flow)],
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    out = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 0):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped cleanly on SIGINT" in err and "summary" in err
    # a stop may cut the last write short: the count is of records received
    assert re.search(r"  out: \d+ received, not all confirmed written", err), err
    lines = out.read_text().splitlines()
    assert all(json.loads(line)["order_id"] is not None for line in lines)  # whole lines


def test_the_progress_line_is_drawn_while_the_run_goes_on(tmp_path: Path) -> None:
    import pty

    flow = tmp_path / "wf.yaml"
    flow.write_text("""
workflow:
  sources: {g: {type: generator, config: {preset: orders, count: null, rate: 100}}}
  destinations: {out: {type: file, inputs: [g], config: {path: out.jsonl}}}
""")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", str(flow)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=follower)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 60
    while b"\r\x1b[Kg=" not in seen:  # the line redrawn in place, with the source's count
        assert time.monotonic() < deadline and proc.poll() is None, seen
        seen += os.read(leader, 4096)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 128 + signal.SIGTERM


def test_a_stop_while_a_database_write_is_retried_keeps_it_for_the_resume(
        tmp_path: Path, pg_schema: Any) -> None:
    # The database is down (nothing listens at the first run's DSN): the write is being
    # retried when SIGTERM comes. The run stops cleanly and the resumed one writes it all.
    flow = tmp_path / "wf.yaml"
    flow.write_text(f"""
workflow:
  id: retried
  config: {{retry: {{max_attempts: 10, backoff: {{initial: 0.5, multiplier: 20, max: 30}}}}}}
  sources:
    g: {{type: generator, config: {{count: 30, rate: 10, fields: {{n: {{type: sequence}}}}}}}}
  destinations:
    pg: {{type: postgres, inputs: [g], write_mode: {{type: merge, merge_key: [n]}},
         config: {{dsn: "${{PG_DSN}}", schema: {pg_schema.schema}, table: t}}}}
""")
    cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(tmp_path / "rec")]
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    proc = subprocess.Popen(cmd, env={**os.environ, "PG_DSN": down}, stderr=subprocess.PIPE,
                            text=True)
    err = stop_while_retrying(proc)  # the first write failed and waits to be retried
    assert "stopped cleanly on SIGTERM" in err and "run failed" not in err
    out = subprocess.run(cmd, env={**os.environ, "PG_DSN": pg_schema.dsn}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = pg_schema.rows(f'SELECT n FROM "{pg_schema.schema}".t ORDER BY n')
    assert [r[0] for r in rows] == list(range(30))
