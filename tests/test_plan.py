"""``dataflare plan``: each verdict checked against what a resume then actually does.

Each test runs a Kafka workflow with recovery, stops it gracefully (open windows stay in
the snapshot), changes the workflow, plans the change against the recovery directory, and
resumes: the plan's verdict and exit code must match what the resume does.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

import dataflare
from dataflare import stopping
from dataflare.cli import main
from dataflare.operators.keyed import shard_names
from dataflare.plan import read_snapshots
from tests.test_exactly_once import produce

FLOW = """
workflow:
  id: planned
{config}
  sources:
    events:
      type: kafka
      mode: streaming
      config: {{bootstrap_servers: "{servers}", topic: {topic}, stop_at_end: {stop}}}
  transformations:
    clean:
      type: mapping
      inputs: [events]
      config:
        mappings:
          - {{source: id, destination: id, transform: to_int}}
          - {{source: user_id, destination: user_id}}
{extra}
{window}
  destinations:
    raw:
      type: postgres
      inputs: [clean]
      config: {{dsn: "{dsn}", schema: {schema}, table: raw}}
{windows}
"""

WINDOW = """
    per_minute:
      type: window
      inputs: [events]
      config:
        window: {{type: tumbling, size: {size}}}
        time_field: ts
        time_unit: ms
        group_by: [user_id]
        aggregations: [{{field: amount, operations: [count, sum], as: amount}}]
"""

WINDOWS = """
    windows:
      type: postgres
      inputs: [per_minute]
      config: {{dsn: "{dsn}", schema: {schema}, table: windows}}
"""

EXTRA = "          - {source: amount, destination: amount, transform: to_float}"


def events(start: int, n: int) -> list[dict[str, Any]]:
    return [{"id": i, "user_id": f"u{i % 5}", "amount": i % 10, "ts": 1_700_000_000_000 + i * 100}
            for i in range(start, start + n)]


class Case:
    """A workflow file in ``tmp``, its recovery directory and its PostgreSQL schema."""

    def __init__(self, tmp: Path, broker: Any, topic: str, pg: Any) -> None:
        self.tmp, self.broker, self.topic, self.pg = tmp, broker, topic, pg
        self.flow = tmp / "wf.yaml"
        self.rec = tmp / "rec"

    def write(self, *, topic: str | None = None, size: str = "60s", extra: bool = False,
              window: bool = True, stop: bool = False, shards: int | None = None) -> Path:
        fmt = {"dsn": self.pg.dsn, "schema": self.pg.schema, "size": size}
        self.flow.write_text(FLOW.format(
            servers=self.broker.bootstrap_servers, topic=topic or self.topic,
            stop="true" if stop else "false", extra=EXTRA if extra else "",
            window=WINDOW.format(**fmt) if window else "",
            windows=WINDOWS.format(**fmt) if window else "",
            config=f"  config: {{state_shards: {shards}}}" if shards else "", **fmt))
        return self.flow

    def count(self, table: str) -> int:
        try:
            return int(self.pg.rows(f'SELECT count(*) FROM "{self.pg.schema}".{table}')[0][0])
        except Exception:  # noqa: BLE001 - the table appears with the first write
            return 0

    def run_until(self, done: Callable[[], bool]) -> dataflare.RunResult:
        """Run in this process; a graceful stop once ``done()`` holds (state kept)."""
        def watch() -> None:
            deadline = time.monotonic() + 120
            while not done() and time.monotonic() < deadline:
                time.sleep(0.2)
            stopping.REQUESTED.set()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = dataflare.run(self.flow, recovery_dir=self.rec, snapshot_interval=0.5,
                               quiet=True)
        watcher.join()
        return result

    def first_run(self, records: list[dict[str, Any]], shards: int | None = None) -> None:
        self.write(shards=shards)
        produce(self.broker.bootstrap_servers, self.topic, records)
        result = self.run_until(lambda: self.count("raw") >= len(records))
        assert result.status == "stopped", result.error
        assert self.count("windows") == 0  # every window is still open, in the snapshot

    def plan(self, *extra: str) -> tuple[int, dict[str, Any]]:
        out = plan_cli(str(self.flow), "--recovery-dir", str(self.rec), "--format", "json", *extra)
        assert out.returncode in (0, 2, 3), out.stderr
        return out.returncode, json.loads(out.stdout)

    def resume(self) -> dataflare.RunResult:
        return dataflare.run(self.flow, recovery_dir=self.rec, quiet=True)


def plan_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``dataflare plan ARGS`` run in this process, as the console script runs it."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["plan", *args])
    return subprocess.CompletedProcess(["dataflare", "plan", *args], code, out.getvalue(),
                                       err.getvalue())


def changes(plan: dict[str, Any], what: str) -> dict[str, dict[str, Any]]:
    return {c["component"]: c for c in plan["changes"] if c["what"] == what}


@pytest.fixture
def case(tmp_path: Path, kafka_broker: Any, kafka_topic: Any, pg_schema: Any) -> Case:
    return Case(tmp_path, kafka_broker, kafka_topic(), pg_schema)


FIRST = events(0, 300)


def test_a_changed_window_size_blocks_the_resume(case: Case) -> None:
    case.first_run(FIRST)
    code, plan = case.plan()
    assert code == 0 and plan["verdict"] == "no change"  # the same workflow resumes
    assert changes(plan, "state")["per_minute"]["verdict"] == "resumes"

    case.write(size="120s", stop=True)
    code, plan = case.plan()
    state = changes(plan, "state")["per_minute"]
    assert (code, plan["verdict"], state["verdict"]) == (3, "unsafe change", "blocks")
    assert "window.size: 60.0 -> 120.0" in state["detail"]
    assert changes(plan, "step")["per_minute"]["detail"] == \
        "config.window.size: 60.0 -> 120.0"
    human = plan_cli(str(case.flow), "-r", str(case.rec))  # as `run -r`
    assert human.returncode == 3
    assert "! state 'per_minute' blocks" in human.stdout
    assert human.stdout.rstrip().endswith("unsafe change (exit 3)")

    result = case.resume()  # what the plan said: refused, naming the same change
    assert result.status == "failed"
    assert "cannot resume from recovery state" in str(result.error)
    assert "size: 60.0 -> 120.0" in str(result.error)
    # The refused resume left the record of the state's workflow: the plan is unchanged.
    assert case.plan()[1]["changes"] == plan["changes"]


def test_state_in_16_shards_resumes_as_16_shards_only(case: Case) -> None:
    # config.state_shards: 16 keeps state as DataFlare did before 2026-12-04: shards
    # "000".."015" holding the keys of crc32 % 16, definitions with "shards": 16.
    case.first_run(FIRST, shards=16)
    saved = read_snapshots(case.rec)
    (step,) = [s for s in saved if s.endswith(".windows")]
    assert set(saved[step]) <= set(shard_names(16))
    assert {state[0]["shards"] for state in saved[step].values()} == {16}

    case.write(stop=True)  # state_shards unset: 24 shards
    code, plan = case.plan()
    state = changes(plan, "state")["per_minute"]
    assert (code, state["verdict"]) == (3, "blocks")
    assert "shards: 16 -> 24" in state["detail"]
    assert "set config.state_shards: 16 in the workflow to resume it" in state["detail"]
    result = case.resume()  # what the plan said: refused, saying how to resume
    assert result.status == "failed"
    assert "shards: 16 -> 24" in str(result.error)
    assert "set config.state_shards: 16" in str(result.error)

    case.write(stop=True, shards=16)
    code, plan = case.plan()
    assert (code, changes(plan, "state")["per_minute"]["verdict"]) == (2, "resumes")
    second = events(300, 200)
    produce(case.broker.bootstrap_servers, case.topic, second)
    result = case.resume()
    assert result.ok, result.error
    # Every key met its state: the first run's records are in the windows.
    total = case.pg.rows(f'SELECT sum(amount_count) FROM "{case.pg.schema}".windows')[0][0]
    assert total == len(FIRST) + len(second)


def test_a_new_destination_column_is_a_safe_change(case: Case) -> None:
    case.first_run(FIRST)
    case.write(extra=True, stop=True)
    code, plan = case.plan()
    assert (code, plan["verdict"]) == (2, "safe change")
    shape = changes(plan, "destination")["raw"]
    assert shape["verdict"] == "shape" and not shape["unsafe"]
    assert shape["detail"] == "new column(s) amount (double)"
    assert changes(plan, "state")["per_minute"]["verdict"] == "resumes"

    second = events(300, 200)
    produce(case.broker.bootstrap_servers, case.topic, second)
    result = case.resume()
    assert result.ok, result.error
    columns = case.pg.rows(
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_schema = '{case.pg.schema}' AND table_name = 'raw'")
    assert ("amount", "double precision") in columns
    assert case.count("raw") == len(FIRST) + len(second)
    # The windows resumed: the first run's records are in them.
    total = case.pg.rows(f'SELECT sum(amount_count) FROM "{case.pg.schema}".windows')[0][0]
    assert total == len(FIRST) + len(second)


def test_a_removed_stateful_step_drops_its_state(case: Case) -> None:
    case.first_run(FIRST)
    case.write(window=False, stop=True)
    code, plan = case.plan()
    assert (code, plan["verdict"]) == (3, "unsafe change")
    assert changes(plan, "state")["per_minute"]["verdict"] == "dropped"
    steps = changes(plan, "step")
    assert steps["per_minute"]["verdict"] == "removed"
    assert steps["windows"]["verdict"] == "removed"

    second = events(300, 100)
    produce(case.broker.bootstrap_servers, case.topic, second)
    result = case.resume()  # not refused: the state is dropped, the rest resumes
    assert result.ok, result.error
    assert case.count("raw") == len(FIRST) + len(second)
    assert case.count("windows") == 0  # the open windows were never emitted


def test_a_changed_source_topic_blocks_the_resume(case: Case, kafka_topic: Any) -> None:
    case.first_run(FIRST)
    other = kafka_topic()
    produce(case.broker.bootstrap_servers, other, events(1000, 50))
    case.write(topic=other, stop=True)
    code, plan = case.plan()
    assert (code, plan["verdict"]) == (3, "unsafe change")
    source = changes(plan, "source")["events"]
    assert source["verdict"] == "blocks" and source["unsafe"]
    assert source["detail"].startswith(f"config.topic: '{case.topic}' -> '{other}': the saved "
                                        f"state of {case.topic}#0 belongs to partitions it no "
                                        f"longer has ({other}#0)")
    assert changes(plan, "state")["per_minute"]["verdict"] == "resumes"

    result = case.resume()  # what the plan said, before bytewax would panic on the key
    assert result.status == "failed"
    assert f"source 'events': the saved state of {case.topic}#0 belongs to partitions it " \
        f"no longer has ({other}#0)" in str(result.error)
    assert "StateKey" not in str(result.error)
    assert case.count("raw") == len(FIRST)


def test_a_source_setting_that_keeps_its_partitions_reuses_their_positions(
        case: Case, kafka_broker: Any) -> None:
    case.first_run(FIRST)
    text = case.flow.read_text()
    case.flow.write_text(text.replace("stop_at_end: false",
                                      "stop_at_end: true, consumer_group: analytics"))
    code, plan = case.plan()
    source = changes(plan, "source")["events"]
    assert (code, source["verdict"]) == (3, "reused")
    assert source["detail"] == ("config.consumer_group: None -> 'analytics': the saved "
                                f"positions of {case.topic}#0 are applied to what it now reads")
    result = case.resume()  # the saved offsets carry over: nothing is read again
    assert result.ok, result.error
    assert case.count("raw") == len(FIRST)


def test_plan_against_a_workflow_file(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("""
workflow:
  id: files
  sources:
    s: {type: file, config: {path: in.jsonl}}
  transformations:
    m: {type: mapping, inputs: [s], config: {mappings: [{source: n, destination: n,
        transform: to_int}]}}
    agg: {type: aggregation, inputs: [s], config: {group_by: [k]}}
  destinations:
    out: {type: file, inputs: [m], config: {path: out.jsonl}}
    counts: {type: file, inputs: [agg], config: {path: counts.jsonl}}
""")
    new = tmp_path / "new.yaml"

    def plan(text: str) -> tuple[int, dict[str, Any]]:
        new.write_text(text)
        out = plan_cli(str(new), "--against", str(old), "--format", "json")
        return out.returncode, json.loads(out.stdout)

    text = old.read_text()
    assert plan(text)[0] == 0
    code, p = plan(text.replace("transform: to_int", "transform: to_float"))
    assert code == 2
    assert changes(p, "destination")["out"]["detail"] == "column n widens integer -> double"
    code, p = plan(text.replace("transform: to_int", "transform: to_string"))
    assert code == 3
    assert "column n changes integer -> text" in changes(p, "destination")["out"]["detail"]
    code, p = plan(text.replace("group_by: [k]", "group_by: [k, j]"))
    assert code == 3 and changes(p, "state")["agg"]["verdict"] == "blocks"
    assert "new column(s) j" in changes(p, "destination")["counts"]["detail"]
    code, p = plan(text.replace("path: in.jsonl", "path: other.jsonl"))
    assert code == 3 and changes(p, "source")["s"]["verdict"] == "resets"
    counts = "    counts: {type: file, inputs: [agg], config: {path: counts.jsonl}}\n"
    code, p = plan(text.replace(counts, ""))
    assert code == 2  # a removed stateless step: safe (the aggregation now feeds nothing)
    assert changes(p, "step")["counts"]["verdict"] == "removed"
    # Whether the next run empties the file was "no change".
    code, p = plan(text.replace("config: {path: out.jsonl}}",
                                "config: {path: out.jsonl}, write_mode: {type: append}}"))
    assert code == 2 and changes(p, "destination")["out"]["detail"] == (
        "the file rewritten at each run -> append")
    # A generator's partitions: each then makes other records (73 duplicates in a trial).
    old.write_text(text.replace("{type: file, config: {path: in.jsonl}}",
                                "{type: generator, config: {preset: orders, count: 9}}"))
    code, p = plan(old.read_text().replace("count: 9", "count: 9, partitions: 2"))
    assert code == 3 and changes(p, "source")["s"]["verdict"] == "resets"


def test_swapped_join_inputs_block_the_resume(tmp_path: Path) -> None:
    # Called safe, the resume joined a-records held on the left with new a-records on
    # the right: wrong pairs, and right pairs lost.
    from dataflare.operators.keyed import resumable

    old = tmp_path / "old.yaml"
    old.write_text("""
workflow:
  id: pairs
  sources:
    a: {type: file, config: {path: a.jsonl}}
    b: {type: file, config: {path: b.jsonl}}
  transformations:
    j: {type: join, inputs: [a, b], config: {join_key: k}}
  destinations:
    out: {type: file, inputs: [j], config: {path: out.jsonl}}
""")
    new = tmp_path / "new.yaml"
    new.write_text(old.read_text().replace("inputs: [a, b]", "inputs: [b, a]"))
    out = plan_cli(str(new), "--against", str(old), "--format", "json")
    assert out.returncode == 3, out.stdout
    assert changes(json.loads(out.stdout), "state")["j"]["verdict"] == "blocks"
    # State written before the inputs were kept in it resumes as before.
    new_def = {"left_key": ["k"], "inputs": ["b", "a"], "shards": 24}
    assert resumable({"left_key": ["k"], "shards": 24}, new_def)
    assert not resumable({"left_key": ["k"], "inputs": ["a", "b"], "shards": 24}, new_def)


def test_a_plan_shows_no_secret(tmp_path: Path) -> None:
    text = """
workflow:
  sources: {s: {type: file, config: {path: in.jsonl}}}
  destinations:
    db: {type: postgres, inputs: [s], config: {host: db.internal, password: "%s",
         table: t}}
"""
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(text % "s3cret-Old-pw")
    new.write_text(text % "s3cret-New-pw")
    out = plan_cli(str(new), "--against", str(old))
    assert out.returncode == 2, out.stderr
    assert "~ step 'db' changed: config.password: a secret changed" in out.stdout
    assert "s3cret" not in out.stdout + out.stderr


FILES_FLOW = """
workflow:
  id: files
  sources: {s: {type: file, config: {path: in.jsonl}}}
  destinations: {out: {type: file, inputs: [s], config: {path: out.jsonl}}}
"""


def files_run(tmp_path: Path) -> tuple[Path, Path]:
    """FILES_FLOW run to its end with a recovery directory: the workflow file and it."""
    for name in ("in.jsonl", "in2.jsonl"):
        (tmp_path / name).write_text('{"k": "a"}\n{"k": "b"}\n')
    flow, rec = tmp_path / "wf.yaml", tmp_path / "rec"
    flow.write_text(FILES_FLOW)
    assert dataflare.run(flow, recovery_dir=rec, quiet=True).ok
    return flow, rec


def test_a_changed_output_file_blocks_the_resume(tmp_path: Path) -> None:
    flow, rec = files_run(tmp_path)
    flow.write_text(FILES_FLOW.replace("out.jsonl", "out2.jsonl"))
    out = plan_cli(str(flow), "--recovery-dir", str(rec))
    assert out.returncode == 3, out.stdout + out.stderr
    assert (f"! destination 'out' blocks: the saved state of {tmp_path}/out.jsonl belongs "
            f"to partitions it no longer has ({tmp_path}/out2.jsonl)") in out.stdout
    result = dataflare.run(flow, recovery_dir=rec, quiet=True)
    assert result.status == "failed"
    assert str(result.error) == (
        f"cannot resume from {rec}: destination 'out': the saved state of "
        f"{tmp_path}/out.jsonl belongs to partitions it no longer has "
        f"({tmp_path}/out2.jsonl): the resume is refused; restore the previous setting, or "
        "start with a fresh recovery directory (a new run then starts from the beginning)")
    flow.write_text(FILES_FLOW)  # the previous setting resumes
    assert dataflare.run(flow, recovery_dir=rec, quiet=True).ok


def test_a_changed_input_file_blocks_the_resume_once(tmp_path: Path) -> None:
    flow, rec = files_run(tmp_path)
    flow.write_text(FILES_FLOW.replace("in.jsonl", "in2.jsonl"))
    out = plan_cli(str(flow), "--recovery-dir", str(rec), "--format", "json")
    plan = json.loads(out.stdout)
    sources = [c for c in plan["changes"] if c["what"] == "source"]
    assert [c["verdict"] for c in sources] == ["blocks"], sources  # not also "resets"
    result = dataflare.run(flow, recovery_dir=rec, quiet=True)
    assert "source 's': the saved state of in.jsonl belongs to partitions it no longer has " \
        "(in2.jsonl)" in str(result.error)


def test_a_plan_that_cannot_be_made_says_why(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("""
workflow:
  sources: {s: {type: file, config: {path: in.jsonl}}}
  transformations:
    a: {type: aggregation, inputs: [s], config: {group_by: [k]}}
  destinations: {out: {type: file, inputs: [a], config: {path: out.jsonl}}}
""")
    new = tmp_path / "new.yaml"
    new.write_text(old.read_text().replace(
        "group_by: [k]", "group_by: [k], aggregations: [{field: v, operations: [sum], "
        "window: last_7d}]"))
    out = plan_cli(str(new), "--against", str(old))
    assert out.returncode == 1
    assert out.stderr.strip() == (f"{new}:5:65: transformations.a.config.aggregations: the "
                                  "trailing 'window' of 'v' is measured on the event time "
                                  "'time_field', which is not set")
    out = plan_cli(str(old), "--recovery-dir", str(tmp_path / "none"))
    assert out.returncode == 1 and "is not a recovery directory" in out.stderr
