"""One bad record never stops a run: it follows its step's error_handling, with its position."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.workflows import read_jsonl, run_cli


def run(tmp_path: Path, flow: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "wf.yaml"
    path.write_text(flow)
    return subprocess.run([sys.executable, "-m", "dataflare", "run", str(path)],
                          capture_output=True, text=True, timeout=120)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_window_time_out_of_range_is_an_error_of_its_record(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"u": "a", "ts": 600}\n{"u": "a", "ts": 99999999999999}\n{"u": "a", "ts": 700}\n'
        '{"u": "b", "ts": -1e300}\n')
    out = run(tmp_path, """
workflow:
  sources: {events: {type: file, config: {path: in.jsonl}}}
  transformations:
    w:
      type: window
      inputs: [events]
      config: {window: {type: tumbling, size: 60s}, time_field: ts, group_by: [u],
               aggregations: [{field: u, operations: [count], as: n}]}
      error_handling: {strategy: redirect, redirect_to: dead}
  destinations:
    out: {type: file, inputs: [w], config: {path: out.jsonl}}
    dead: {type: file, config: {path: dead.jsonl}}
""")
    assert out.returncode == 0, out.stderr
    assert [r["n"] for r in lines(tmp_path / "out.jsonl")] == [1, 1]
    dead = lines(tmp_path / "dead.jsonl")
    dead.sort(key=lambda d: d["source"]["position"]["line"])
    assert [d["source"]["position"]["line"] for d in dead] == [2, 4]
    assert "out of range" in dead[0]["error"]["message"]
    assert "epoch milliseconds? set time_unit: ms" in dead[0]["error"]["message"]


def test_a_record_too_deep_for_json_is_refused_alone(tmp_path: Path) -> None:
    deep: dict = {"id": 2}
    for _ in range(300):
        deep = {"n": deep}
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"id": 1}, {"id": 2, "deep": deep}, {"id": 3})) + "\n")
    out = run(tmp_path, """
workflow:
  sources: {events: {type: file, config: {path: in.jsonl}}}
  destinations:
    out: {type: file, inputs: [events], config: {path: out.jsonl},
          error_handling: {strategy: redirect, redirect_to: dead}}
    screen: {type: stdout, inputs: [events], error_handling: {strategy: skip}}
    dead: {type: file, config: {path: dead.jsonl}}
""")
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in lines(tmp_path / "out.jsonl")] == [1, 3]
    assert [json.loads(x)["id"] for x in out.stdout.splitlines()] == [1, 3]
    [dead] = lines(tmp_path / "dead.jsonl")
    assert dead["error"]["step"] == "out" and "nested too deeply" in dead["error"]["message"]
    assert dead["source"]["position"]["line"] == 2
    assert dead["record"].startswith("{'id': 2")  # kept as text: JSON cannot hold it


def test_a_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_bytes(b"\xef\xbb\xbfid,name\n1,ann\n")
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"id": 2}\n')
    out = run(tmp_path, """
workflow:
  sources:
    people: {type: file, config: {path: in.csv}}
    more: {type: file, config: {path: in.jsonl}}
  destinations: {out: {type: file, inputs: [people, more], config: {path: out.jsonl}}}
""")
    assert out.returncode == 0, out.stderr
    got = sorted(lines(tmp_path / "out.jsonl"), key=lambda r: str(r["id"]))
    assert got == [{"id": "1", "name": "ann"}, {"id": 2}]  # "id", not "\ufeffid"


def test_skip_names_the_first_ten_records_and_says_there_are_more(tmp_path: Path) -> None:
    # Only the first record of each batch was named: one line for 12 skipped records.
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"a": "x" if i < 12 else i}) + "\n" for i in range(15)))
    out = run(tmp_path, f"""
workflow:
  sources: {{src: {{type: file, config: {{path: {tmp_path / 'in.jsonl'}}}}}}}
  transformations:
    m:
      type: mapping
      inputs: [src]
      config: {{mappings: [{{source: a, destination: b, transform: to_int}}]}}
      error_handling: {{strategy: skip}}
  destinations:
    out: {{type: file, inputs: [m], config: {{path: {tmp_path / 'out.jsonl'}}}}}
""")
    assert out.returncode == 0, out.stderr
    named = [line.split(" at ")[1].split(":")[:2] for line in out.stderr.splitlines()
             if "skipped record at" in line]
    assert named == [["in.jsonl", str(i)] for i in range(1, 11)]
    assert "step 'm': more records skipped than the first 10 listed" in out.stderr
    assert "m: 3, 12 failed" in out.stderr


@pytest.mark.parametrize("batches", [[13], [10, 3], [5, 5, 3], [3, 9, 1], [10], [4, 6]])
def test_skip_names_ten_records_then_says_once_that_more_followed(
        batches: list[int], caplog: pytest.LogCaptureFixture) -> None:
    # Ten failures in the first batches and more after: the "more" line was left out.
    from dataflare.dsl_compiler.compiler import _policy
    from dataflare.dsl_compiler.models import ErrorHandling
    from dataflare.records import Failed

    handle = _policy("m", ErrorHandling(strategy="skip"), None, "src")
    line = 0
    with caplog.at_level(logging.WARNING, logger="dataflare.dsl_compiler.compiler"):
        for size in batches:
            assert handle([Failed("m", "RecordError", "bad", {"a": line + i},
                                  {"file": "in.jsonl", "line": line + i + 1})
                           for i in range(size)]) is None
            line += size
    said = [r.getMessage() for r in caplog.records]
    named = [m for m in said if "skipped record at" in m]
    assert named == [f"step 'm': skipped record at in.jsonl:{i}: RecordError: bad"
                     for i in range(1, min(line, 10) + 1)]
    more = [m for m in said if "more records skipped" in m]
    assert more == (["step 'm': more records skipped than the first 10 listed; the run's "
                     "summary counts them all"] if line > 10 else [])


def test_an_event_time_whose_window_cannot_be_dated_fails_alone(tmp_path: Path) -> None:
    # 9999-12-31 (a common "no end" date) is a valid time, but its window's end is not: the
    # run stopped with "year 10000 is out of range", naming no step nor record.
    (tmp_path / "in.jsonl").write_text(
        '{"k": "a", "ts": "0001-01-01T00:10:00Z"}\n{"k": "b", "ts": "9999-12-31T23:59:30Z"}\n'
        '{"k": "c", "ts": "2024-01-01T00:00:00Z"}\n')
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    t:
      type: window
      inputs: [src]
      config:
        window: {type: sliding, size: 1h, slide: 30m}
        time_field: ts
        group_by: [k]
        aggregations: [{field: ts, operations: [count], as: n}]
      error_handling: {strategy: redirect, redirect_to: dl}
  destinations:
    out: {type: file, inputs: [t], config: {path: out.jsonl}}
    dl: {type: file, config: {path: dl.jsonl}}
""")
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    assert {r["k"] for r in read_jsonl(tmp_path / "out.jsonl")} == {"c"}
    dead = read_jsonl(tmp_path / "dl.jsonl")
    assert [d["source"]["position"]["line"] for d in dead] == [1, 2]
    assert "is within 3601s of the years 1 and 9999: its window cannot be dated" in \
        dead[1]["error"]["message"]


def test_true_and_1_are_two_keys_as_json_has_them(tmp_path: Path) -> None:
    # Python's True == 1: dedupe dropped {"k": 1} as a repeat of {"k": true}, and groups
    # of 1 were reported under true.
    (tmp_path / "in.jsonl").write_text("".join(
        f'{{"k": {k}, "ts": 0}}\n' for k in ("true", "1", "1.0", "false", "0", "true")))
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    dd: {type: dedupe, inputs: [src], config: {keys: [k]}}
    agg:
      type: aggregation
      inputs: [src]
      config: {group_by: [k], aggregations: [{field: ts, operations: [count], as: n}]}
    win:
      type: window
      inputs: [src]
      config:
        window: {type: tumbling, size: 1m}
        time_field: ts
        group_by: [k]
        aggregations: [{field: ts, operations: [count], as: n}]
  destinations:
    d: {type: file, inputs: [dd], config: {path: d.jsonl}}
    a: {type: file, inputs: [agg], config: {path: a.jsonl}}
    w: {type: file, inputs: [win], config: {path: w.jsonl}}
""")
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    # 1 and 1.0 are one number (as SQL has them); true is not a number
    assert sorted((type(r["k"]).__name__, r["k"]) for r in read_jsonl(tmp_path / "d.jsonl")
                  ) == [("bool", False), ("bool", True), ("int", 0), ("int", 1)]
    for out in ("a.jsonl", "w.jsonl"):
        got = sorted(((type(r["k"]).__name__, r["k"], r["n"]) for r in read_jsonl(
            tmp_path / out)), key=repr)
        assert got == [("bool", False, 1), ("bool", True, 2), ("int", 0, 1), ("int", 1, 2)]
