"""Live views: ``serve: true`` steps read at ``GET /views/<step>`` during a Kafka run.

The values read while windows are open must be what the destination receives when they
close; with one worker and with two (the shards of a step spread over both).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from dataflare.dsl_compiler import validate_text
from tests.fixtures.pg_private import free_port
from tests.test_exactly_once import produce
from tests.test_live import wait

FLOW = """
workflow:
  id: views
  sources:
    events:
      type: kafka
      mode: streaming
      config: {{bootstrap_servers: "{servers}", topic: {topic}}}
  transformations:
    per_minute:
      type: window
      inputs: [events]
      serve: true
      config:
        window: {{type: tumbling, size: 60s}}
        time_field: ts
        time_unit: ms
        group_by: [user_id]
        aggregations:
          - {{field: amount, operations: [count, sum], as: amount}}
          - {{field: email, operations: [last], as: email}}
    totals:
      type: aggregation
      inputs: [events]
      serve: true
      config:
        group_by: [user_id]
        aggregations: [{{field: amount, operations: [count, sum], as: amount}}]
    plain:
      type: filter
      inputs: [events]
      config: {{condition: "amount >= 0"}}
  destinations:
    windows: {{type: file, inputs: [per_minute], config: {{path: windows.jsonl}}}}
    updates: {{type: file, inputs: [totals], config: {{path: totals.jsonl}}}}
    rest: {{type: file, inputs: [plain], config: {{path: rest.jsonl}}}}
  data_protection:
    masking_rules: [{{field: email, method: partial, show_chars: 3}}]
"""

T0 = 1_700_000_040_000  # the start of a minute, in ms


def events(start: int, n: int, t0: int) -> list[dict[str, Any]]:
    return [{"id": i, "user_id": f"u{i % 8}", "amount": i % 10, "ts": t0 + (i - start) * 10,
             "email": f"user{i}@example.org"} for i in range(start, start + n)]


def expected(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"amount_count": 0, "amount_sum": 0})
    for r in records:
        g = out[r["user_id"]]
        g["amount_count"] += 1
        g["amount_sum"] += r["amount"]
        g["email"] = r["email"][:3] + "****"
    return dict(out)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start(flow: Path, port: int, layout: str) -> list[subprocess.Popen[str]]:
    """One process with 1 or 2 workers, or two processes (on 127.0.0.1 and 127.0.0.2)."""
    cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "--http-port", str(port),
           "-s", "0.3"]
    if layout != "2 processes":
        workers = layout.split()[0]
        return [subprocess.Popen([*cmd, "-w", workers], stderr=subprocess.PIPE, text=True,
                                 cwd=flow.parent)]
    hosts = ["127.0.0.1", "127.0.0.2"]
    addresses = ";".join(f"{h}:{free_port()}" for h in hosts)
    return [subprocess.Popen([*cmd, "-i", str(i), "-a", addresses, "--http-host", host],
                             stderr=subprocess.PIPE, text=True, cwd=flow.parent)
            for i, host in enumerate(hosts)]


@pytest.mark.parametrize("layout", ["1 worker", "2 workers", "2 processes"])
def test_views_during_a_kafka_run_equal_what_the_destination_receives(
        tmp_path: Path, kafka_broker: Any, kafka_topic: Any, layout: str) -> None:
    topic = kafka_topic(partitions=2)
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(servers=kafka_broker.bootstrap_servers, topic=topic))
    first = events(0, 400, T0)  # all in the minute starting at T0
    produce(kafka_broker.bootstrap_servers, topic, first)
    port = free_port()
    procs = start(flow, port, layout)
    urls = [f"http://127.0.0.{i + 1}:{port}" for i in range(len(procs))]

    def view(step: str, at: int = 0, **query: Any) -> httpx.Response:
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx.get(f"{urls[at]}/views/{step}", params=query, timeout=10)
        except httpx.HTTPError:
            return httpx.Response(599)

    def counted(step: str, n: int) -> list[dict[str, Any]] | None:
        r = view(step)
        if r.status_code != 200:
            return None
        rows = r.json()["rows"]
        return rows if sum(row["amount_count"] for row in rows) == n else None

    try:
        # While the minute is open: the window's state is every record read so far.
        rows = wait(lambda: counted("per_minute", len(first)), "the window's view", 120)
        want = expected(first)
        window_start = "2023-11-14T22:14:00Z"
        assert {r["user_id"]: {k: r[k] for k in ("amount_count", "amount_sum", "email")}
                for r in rows} == want
        assert all(r["window_start"] == window_start for r in rows)
        totals = wait(lambda: counted("totals", len(first)), "the aggregation's view", 60)
        assert {r["user_id"]: r["amount_sum"] for r in totals} == \
            {u: g["amount_sum"] for u, g in want.items()}
        # Every process answers for the whole run (the others' keys gathered from them).
        assert [view("per_minute", at).json()["rows"] for at in range(len(procs))] == \
            [rows] * len(procs)
        if len(procs) > 1:  # each process holds some of the keys
            held = [view("per_minute", at, local=1).json()["rows"] for at in range(len(procs))]
            assert all(held) and sorted(r["user_id"] for part in held for r in part) == \
                [r["user_id"] for r in rows]
        # One key, a filter over the rows, a limit.
        one = view("totals", key="u1").json()
        assert one["key"] == "u1" and [r["user_id"] for r in one["rows"]] == ["u1"]
        where = view("totals", where="user_id in ['u1', 'u3'] and amount_count > 0").json()
        assert where["rows"] == [r for r in totals if r["user_id"] in ("u1", "u3")]
        assert len(view("per_minute", limit=2).json()["rows"]) == 2
        assert view("totals", key="nobody").status_code == 404
        missing = view("plain")
        assert missing.status_code == 404
        assert missing.json()["views"] == ["per_minute", "totals"]
        assert view("totals", where="amount_sum >").status_code == 400

        # Records ten minutes later close the minute: the destination receives the window
        # as the view showed it.
        later = events(400, 8, T0 + 600_000)
        produce(kafka_broker.bootstrap_servers, topic, later)
        out = tmp_path / "windows.jsonl"
        closed = wait(lambda: len(read_jsonl(out)) >= len(want) and read_jsonl(out),
                      "the closed windows", 120)
        assert sorted(closed, key=lambda r: r["user_id"]) == rows
        # The view now holds the next minute's windows only.
        after = wait(lambda: counted("per_minute", len(later)), "the next minute", 60)
        assert {r["window_start"] for r in after} == {"2023-11-14T22:24:00Z"}
        totals = wait(lambda: counted("totals", len(first) + len(later)), "totals", 60)
        # The aggregation's last update per group is its state.
        last: dict[str, dict[str, Any]] = {}
        wait(lambda: [last.update({r["user_id"]: r}) for r in read_jsonl(
            tmp_path / "totals.jsonl")] and {u: r["amount_count"] for u, r in last.items()}
            == {r["user_id"]: r["amount_count"] for r in totals}, "the last updates", 60)
        assert sorted(last.values(), key=lambda r: r["user_id"]) == totals
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        errs = [proc.communicate(timeout=120)[1] for proc in procs]
    for proc, err in zip(procs, errs, strict=True):
        assert proc.returncode == 128 + signal.SIGTERM, err


def test_serve_on_a_step_without_state_is_refused_and_without_a_port_warned(
        tmp_path: Path) -> None:
    text = """
workflow:
  sources: {s: {type: file, config: {path: in.jsonl}}}
  transformations:
    f: {type: filter, inputs: [s], serve: true, config: {condition: "true"}}
  destinations: {out: {type: file, inputs: [f], config: {path: out.jsonl}}}
"""
    v = validate_text(text, "wf.yaml")
    assert [p.render(False) for p in v.errors()] == [
        "wf.yaml:5:36: transformations.f.serve: a filter step has no state to serve; "
        "'serve' works on: aggregation, dedupe, join, window"]
    (tmp_path / "in.jsonl").write_text('{"k": "a"}\n')
    flow = tmp_path / "wf.yaml"
    flow.write_text(text.replace("type: filter", "type: dedupe").replace(
        'config: {condition: "true"}', "config: {keys: [k]}"))
    out = subprocess.run([sys.executable, "-m", "dataflare", "run", str(flow)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "serve: true on 'f' has no effect without --http-port" in out.stderr


def test_join_and_dedupe_views_show_their_state_as_of_the_last_snapshot() -> None:
    from dataflare.operators.dedupe import DedupeConfig, _DedupeOp
    from dataflare.operators.join import LEFT, RIGHT, JoinConfig, _JoinOp
    from dataflare.views import View

    def masked(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "email": "***"} if "email" in row else row

    join = _JoinOp("orders_users", JoinConfig.model_validate(
        {"join_key": ["region", "user"], "join_type": "left"}), 4).build(None)
    view = View("orders_users", masked)
    join.view = view
    join.process([(LEFT, [{"region": "eu", "user": "a", "order": 1},
                          {"region": "us", "user": "b", "order": 2}]),
                  (RIGHT, [{"region": "eu", "user": "a", "email": "a@x.org"}])])
    assert view.query() == []  # nothing before the epoch's end
    join.snapshot()
    join.process([(LEFT, [{"region": "eu", "user": "a", "order": 3}])])
    assert view.query(key="eu,a") == [  # a tuple key; as of the snapshot: one order
        {"region": "eu", "user": "a", "order": 1, "email": "***"}]
    assert view.query(key="us,b") == [{"region": "us", "user": "b", "order": 2}]
    join.snapshot()
    assert [r["order"] for r in view.query(key="eu,a")] == [1, 3]
    assert view.query(where="order > 1", limit=1) == [
        {"region": "eu", "user": "a", "order": 3, "email": "***"}]
    join.on_eof()  # the end of input: the shard is emitted and discarded
    assert view.query() == []

    dedupe = _DedupeOp("once", DedupeConfig.model_validate(
        {"keys": ["id"], "time_field": "ts"}), 4).build(None)
    dedupe.view = seen = View("once", None)
    dedupe.process([[{"id": 7, "ts": 60}, {"id": 7, "ts": 61}, {"id": 8, "ts": 120}]])
    dedupe.snapshot()
    assert seen.query() == [{"id": 7, "first_seen": "1970-01-01T00:01:00Z"},
                            {"id": 8, "first_seen": "1970-01-01T00:02:00Z"}]


def test_a_process_that_does_not_answer_is_named_not_left_out() -> None:
    from dataflare.live import Live

    v = validate_text("""
workflow:
  sources: {s: {type: file, config: {path: in.jsonl}}}
  transformations: {a: {type: aggregation, inputs: [s], serve: true, config: {group_by: [k]}}}
  destinations: {out: {type: file, inputs: [a], config: {path: out.jsonl}}}
""", "wf.yaml")
    peer = f"http://127.0.0.1:{free_port()}"
    live = Live(v.workflow, None, [peer])
    mine = [("a", {"k": "a", "count": 1})]
    with pytest.raises(OSError, match=f"the process at {peer} did not answer for view 'a'"):
        live.gathered("a", mine, None, None, "")
    assert Live(v.workflow, None).gathered("a", mine, None, None, "") == mine
