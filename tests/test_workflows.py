"""Workflows end to end: file -> mapping -> filter -> route -> file, error policies, flows/."""

import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from tests.fixtures.workflows import ROOT, read_jsonl, run_cli

FLOWS = sorted((ROOT / "flows").glob("*.yaml"))

PIPELINE = """\
workflow:
  id: pipeline
  sources:
    orders:
      type: file
      config: {path: orders.jsonl}
      error_handling: {strategy: STRATEGY, redirect_to: dead_letter, max_errors: MAX}
  transformations:
    clean:
      inputs: [orders]
      type: mapping
      config:
        mappings:
          - {source: id, destination: id, transform: to_int}
          - {source: email, destination: contact.email, transform: [trim, lowercase]}
          - {source: amount, destination: amount, transform: to_float}
      error_handling: {strategy: STRATEGY, redirect_to: dead_letter, max_errors: MAX}
    positive:
      inputs: [clean]
      type: filter
      config: {condition: "amount > 0"}
    by_size:
      inputs: [positive]
      type: route
      config:
        routes:
          - {name: big, condition: "amount >= 100"}
          - {name: even, condition: "id % 2 == 0"}
  destinations:
    big: {type: file, inputs: [by_size.big], config: {path: out/big.jsonl}}
    even: {type: file, inputs: [by_size.even], config: {path: out/even.jsonl}}
    rest: {type: file, inputs: [by_size._unmatched], config: {path: out/rest.jsonl}}
    dead_letter: {type: file, config: {path: out/dead.jsonl}}
"""

GOOD = [
    '{"id": "1", "email": " A@X.COM ", "amount": "150"}',
    '{"id": "2", "email": "b@x.com", "amount": "20.5"}',
    '{"id": "3", "email": "c@x.com", "amount": "7"}',
    '{"id": "4", "email": "d@x.com", "amount": "400"}',
    '{"id": "5", "email": "e@x.com", "amount": "-1"}',
]
BAD_JSON = '{"id": "6", "email": '
BAD_VALUE = '{"id": "seven", "email": "g@x.com", "amount": "1"}'


def write_pipeline(tmp_path: Path, strategy: str = "skip", max_errors: str = "null",
                   lines: list[str] | None = None) -> Path:
    text = PIPELINE.replace("STRATEGY", strategy).replace("MAX", max_errors)
    if strategy != "redirect":
        text = text.replace("redirect_to: dead_letter, ", "").replace(
            "    dead_letter: {type: file, config: {path: out/dead.jsonl}}\n", "")
    (tmp_path / "flow.yaml").write_text(text)
    (tmp_path / "orders.jsonl").write_text("\n".join(lines or GOOD) + "\n")
    return tmp_path / "flow.yaml"


def outputs(tmp_path: Path) -> dict[str, list[dict]]:
    return {p.stem: read_jsonl(p) for p in sorted((tmp_path / "out").glob("*.jsonl"))}


EXPECTED = {
    "big": [{"id": 1, "contact": {"email": "a@x.com"}, "amount": 150.0},
            {"id": 4, "contact": {"email": "d@x.com"}, "amount": 400.0}],
    "even": [{"id": 2, "contact": {"email": "b@x.com"}, "amount": 20.5},
             {"id": 4, "contact": {"email": "d@x.com"}, "amount": 400.0}],
    "rest": [{"id": 3, "contact": {"email": "c@x.com"}, "amount": 7.0}],
}


def test_pipeline_through_dataflare_run(tmp_path):
    flow = write_pipeline(tmp_path)
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    assert outputs(tmp_path) == EXPECTED
    assert "summary" in result.stderr and "big: 2" in result.stderr


def test_pipeline_through_bytewax_run_with_two_workers(tmp_path):
    flow = write_pipeline(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run",
         f"dataflare.dsl_compiler:compile_file('{flow}')", "-w", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = outputs(tmp_path)
    assert {k: sorted(v, key=lambda r: r["id"]) for k, v in got.items()} == EXPECTED


def test_pipeline_through_dataflare_test(tmp_path):
    flow = write_pipeline(tmp_path)
    text = flow.read_text() + """
tests:
  - name: routes by amount and parity
    inputs:
      orders:
        - {id: "10", email: "X@Y.Z", amount: "100"}
        - {id: "11", email: "q@y.z", amount: "1"}
        - {id: "13", email: "n@y.z", amount: "-5"}
    expect:
      big: [{id: 10, contact: {email: x@y.z}, amount: 100.0}]
      even: [{id: 10, contact: {email: x@y.z}, amount: 100.0}]
      rest: [{id: 11, contact: {email: q@y.z}, amount: 1.0}]
  - name: a wrong expectation fails with a diff
    inputs:
      orders: [{id: "2", email: "a@b.c", amount: "3"}]
    expect:
      even: [{id: 2, contact: {email: a@b.c}, amount: 4.0}]
"""
    flow.write_text(text)
    result = run_cli("test", str(flow))
    assert result.code == 1
    assert f"PASS {flow}: routes by amount and parity" in result.stdout
    assert f"FAIL {flow}: a wrong expectation fails with a diff" in result.stdout
    assert ('~ expected: {"amount":4,"contact":{"email":"a@b.c"},"id":2}\n'
            '      got:      {"amount":3,"contact":{"email":"a@b.c"},"id":2}\n'
            "      (amount: 3, expected 4)") in result.stdout
    assert "1 passed, 1 failed" in result.stdout


def test_a_test_needs_no_secret_of_the_systems_it_replaces(tmp_path):
    # `dataflare test` in CI without the database's password: it failed with "variable
    # PGPASS is not set", though a test never connects to the source or destination.
    flow = tmp_path / "t.yaml"
    flow.write_text("""
workflow:
  sources:
    db: {type: postgres, config: {dsn: "postgresql://u:${PGPASS_UNSET_X}@db/x", table: t}}
  transformations:
    big: {type: filter, inputs: [db], config: {condition: "amount > ${LIMIT_UNSET_X}"}}
  destinations:
    out: {type: postgres, inputs: [big], config: {dsn: "${DSN_UNSET_X}", table: t}}
tests:
  - name: keeps the big ones
    inputs: {db: [{amount: 5}, {amount: 50}]}
    expect: {out: [{amount: 50}]}
""")
    result = run_cli("test", str(flow))  # a transformation does need its variable
    assert result.code == 1 and "LIMIT_UNSET_X" in result.stderr
    assert "PGPASS_UNSET_X" not in result.stderr and "DSN_UNSET_X" not in result.stderr
    flow.write_text(flow.read_text().replace("${LIMIT_UNSET_X}", "10"))
    result = run_cli("test", str(flow))
    assert result.code == 0, result.stdout + result.stderr
    assert "1 passed, 0 failed" in result.stdout


def test_a_test_expects_dead_letters_by_the_fields_it_gives(tmp_path):
    # A dead letter holds the time it was made: an expected one could never match, so a
    # workflow's redirect path could not be tested.
    flow = tmp_path / "t.yaml"
    flow.write_text("""
workflow:
  sources:
    api: {type: file, config: {path: in.jsonl}}
  transformations:
    m:
      type: mapping
      inputs: [api]
      config: {mappings: [{source: id, destination: id, transform: to_int}]}
      error_handling: {strategy: redirect, redirect_to: dead}
  destinations:
    out: {type: stdout, inputs: [m]}
    dead: {type: stdout}
tests:
  - name: a bad id is a dead letter
    inputs: {api: [{id: "x"}, {id: "2"}]}
    expect:
      out: [{id: 2}]
      dead: [{record: {id: "x"}, error: {step: m, type: RecordError}}]
  - name: a wrong one fails
    inputs: {api: [{id: "x"}]}
    expect: {dead: [{record: {id: "y"}}]}
""")
    result = run_cli("test", str(flow))
    assert f"PASS {flow}: a bad id is a dead letter" in result.stdout, result.stdout
    assert f"FAIL {flow}: a wrong one fails" in result.stdout
    assert ('    - missing: {"record":{"id":"y"}}\n'
            '    + unexpected: {"record":{"id":"x"}}') in result.stdout
    assert "1 passed, 1 failed" in result.stdout


def test_a_diff_pairs_records_that_agree_on_most_expected_fields():
    from dataflare.testing import diff

    expected = [{"user": "a", "n": 1}, {"user": "b", "n": 2}, {"user": "z", "n": 9, "x": 0},
                {"k": 1}, {"k": 1}]
    actual = [{"user": "b", "n": 3, "w": "t"}, {"user": "a", "n": 1}, {"q": 5}, {"k": 2}]
    assert diff(expected, actual) == [
        '    ~ expected: {"n":2,"user":"b"}',
        '      got:      {"n":3,"user":"b","w":"t"}',
        "      (n: 3, expected 2; not expected: w)",
        '    - missing x2: {"k":1}',  # one field, none the same: not paired
        '    - missing: {"n":9,"user":"z","x":0}',
        '    + unexpected: {"k":2}',
        '    + unexpected: {"q":5}',
    ]
    assert diff([{"a": 1}], [{"a": 1.0}]) == []


def test_skip_drops_bad_records_and_keeps_the_rest(tmp_path):
    flow = write_pipeline(tmp_path, "skip", lines=[*GOOD[:2], BAD_JSON, *GOOD[2:], BAD_VALUE])
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    assert outputs(tmp_path) == EXPECTED
    assert "orders: 6, 1 failed" in result.stderr and "clean: 5, 1 failed" in result.stderr


def test_fail_stops_naming_the_step_and_position(tmp_path):
    flow = write_pipeline(tmp_path, "fail", lines=[*GOOD[:2], BAD_JSON, *GOOD[2:]])
    result = run_cli("run", str(flow))
    assert result.code == 1
    assert ("step 'orders' failed on the record at orders.jsonl:3: JSONDecodeError: "
            "unexpected end of data, at the end of the line") in result.stderr
    flow = write_pipeline(tmp_path, "fail", lines=[*GOOD[:3], BAD_VALUE])
    result = run_cli("run", str(flow))
    assert result.code == 1
    assert ("step 'clean' failed on the record at orders.jsonl:4: RecordError: "
            "to_int: 'seven' is not a number") in result.stderr
    assert "panicked" not in result.stderr  # bytewax's worker notice is left out
    # ... also with -v and RUST_BACKTRACE=1 (often set for other work): its Rust frames too
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "1"}
    verbose = subprocess.run([sys.executable, "-m", "dataflare", "run", "-v", str(flow)],
                             env=env, capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 1
    assert "step 'clean' failed on the record at orders.jsonl:4" in verbose.stderr
    for noise in ("panicked", "stack backtrace", "RUST_BACKTRACE", " at src/"):
        assert noise not in verbose.stderr, verbose.stderr


def test_redirect_sends_failures_to_the_dead_letter_destination(tmp_path):
    flow = write_pipeline(tmp_path, "redirect", lines=[*GOOD[:2], BAD_JSON, *GOOD[2:], BAD_VALUE])
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    got = outputs(tmp_path)
    dead = got.pop("dead")
    assert got == EXPECTED
    dead.sort(key=lambda r: r["error"]["step"])
    assert len({letter["error"].pop("run_id") for letter in dead}) == 1  # one run
    for letter in dead:  # when: a time with its zone
        assert datetime.fromisoformat(letter["error"].pop("at")).tzinfo is not None
    assert dead[0]["error"].pop("message") == "to_int: 'seven' is not a number"
    assert "unexpected end of data" in dead[1]["error"].pop("message")
    assert dead == [
        {"error": {"step": "clean", "type": "RecordError"},
         "source": {"component": "orders", "position": {"file": "orders.jsonl", "line": 7}},
         "record": {"id": "seven", "email": "g@x.com", "amount": "1"}},
        {"error": {"step": "orders", "type": "JSONDecodeError"},
         "source": {"component": "orders", "position": {"file": "orders.jsonl", "line": 3}},
         "record": BAD_JSON},
    ]


def test_max_errors_stops_the_run(tmp_path):
    flow = write_pipeline(tmp_path, "skip", "1", lines=[BAD_JSON, *GOOD, BAD_JSON])
    result = run_cli("run", str(flow))
    assert result.code == 1
    assert "step 'orders': 2 failed records, more than max_errors 1" in result.stderr


def test_unset_variables_stop_run_before_starting(tmp_path):
    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    s: {type: file, config: {path: "${INPUT_FILE}"}}
  destinations:
    w: {type: file, inputs: [s], config: {path: out.jsonl}}
""")
    result = run_cli("run", str(flow))
    assert result.code == 1
    assert "sources.s.config.path: variable INPUT_FILE is not set" in result.stderr
    assert run_cli("validate", str(flow)).code == 0


@pytest.mark.parametrize("flow", FLOWS, ids=[f.stem for f in FLOWS])
def test_every_example_flow_validates_and_passes_its_tests(flow, tmp_path):
    result = run_cli("validate", str(flow))
    assert result.code == 0, result.stderr
    result = run_cli("test", str(flow))
    assert result.code == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_quickstart_runs_and_graph_prints(tmp_path):
    work = tmp_path / "flows"
    shutil.copytree(ROOT / "flows", work, ignore=shutil.ignore_patterns("out"))
    result = run_cli("run", str(work / "quickstart.yaml"))
    assert result.code == 0, result.stderr
    assert len(read_jsonl(work / "out" / "large_orders.jsonl")) == 2
    graph = run_cli("graph", str(work / "quickstart.yaml"))
    assert graph.code == 0
    assert "by_size -->|large| large_orders" in graph.stdout


def test_output_schema_violations_follow_the_source_policy(tmp_path):
    (tmp_path / "in.jsonl").write_text(
        '{"id": 1, "qty": 5}\n{"id": 2, "qty": -1}\n{"id": "3", "qty": 1}\n')
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  sources:
    items:
      type: file
      config: {path: in.jsonl}
      output_schema:
        definition:
          type: object
          required: [id, qty]
          properties: {id: {type: integer}, qty: {type: integer, minimum: 0}}
      error_handling: {strategy: redirect, redirect_to: bad}
  destinations:
    good: {type: file, inputs: [items], config: {path: good.jsonl}}
    bad: {type: file, config: {path: bad.jsonl}}
""")
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "good.jsonl") == [{"id": 1, "qty": 5}]
    bad = read_jsonl(tmp_path / "bad.jsonl")
    assert [(b["record"]["id"], b["error"]["type"]) for b in bad] == [
        (2, "SchemaViolation"), ("3", "SchemaViolation")]
    assert "qty: -1 is less than the minimum of 0" in bad[0]["error"]["message"]


def test_windows_take_the_time_unit_of_their_source():
    from dataflare.dsl_compiler import validate_text
    from dataflare.testing import run_case

    text = """\
workflow:
  sources:
    clicks: {type: generator, time_unit: ms, config: {preset: clickstream}}
  transformations:
    per_minute:
      inputs: [clicks]
      type: window
      config:
        window: {type: tumbling, size: 1m}
        time_field: ts
        aggregations: [{field: amount, operations: [count]}]
  destinations:
    out: {type: stdout, inputs: [per_minute]}
tests:
  - name: ms
    inputs:
      clicks: [{amount: 1, ts: 1700000000000}, {amount: 2, ts: 1700000030000}]
"""
    v = validate_text(text)
    out = run_case(v, v.tests[0])["out"]
    assert [(r["window_start"], r["amount_count"]) for r in out] == [("2023-11-14T22:13:00Z", 2)]
    seconds = validate_text(text.replace("time_unit: ms, ", ""))  # read as seconds: year 55,800
    with pytest.raises(Exception):  # noqa: B017 - out of the datetime range, whatever the type
        run_case(seconds, seconds.tests[0])


def test_dead_letters_carry_their_records_masked(tmp_path):
    (tmp_path / "in.jsonl").write_text(
        '{"email": "alice@example.com", "card": "4111111111111111"}\n'
        '{"email": "bob@example.com", "card": "4222 2222 2222 2222"}\n')
    flow = tmp_path / "flow.yaml"
    flow.write_text("""\
workflow:
  id: masked
  data_protection:
    hash_key: "k3y-for-the-tests"
    masking_rules:
      - {field: email, method: hash}
      - {field: card, method: partial, show_chars: 4}
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    m:
      inputs: [src]
      type: mapping
      config:
        keep_unmapped: true
        mappings: [{source: card, destination: card, transform: to_int}]
      error_handling: {strategy: redirect, redirect_to: errs}
  destinations:
    o: {type: file, inputs: [m], config: {path: o.jsonl}}
    errs: {type: file, config: {path: errs.jsonl}}
""")
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    text = (tmp_path / "errs.jsonl").read_text() + (tmp_path / "o.jsonl").read_text()
    for secret in ("alice@example.com", "bob@example.com", "4111111111111111", "4222 2222"):
        assert secret not in text
    (dead,) = read_jsonl(tmp_path / "errs.jsonl")
    assert dead["record"]["card"] == "4222****" and len(dead["record"]["email"]) == 64
    assert "'4222****'" in dead["error"]["message"]  # the message quoted the value


BRANCHES = """
workflow:
  sources:
    ev: {type: file, config: {path: events.jsonl}}
  transformations:
    purchases: {type: filter, inputs: [ev], config: {condition: "kind == 'purchase'"}}
    refunds: {type: filter, inputs: [ev], config: {condition: "kind == 'refund'"}}
    win:
      type: window
      inputs: [purchases, refunds]
      config:
        window: {type: tumbling, size: 30m}
        time_field: ts
        allowed_lateness: 1h
        group_by: [cid]
        aggregations: [{field: cid, operations: [count], as: n}]
        late_to: late
    pairs:
      type: join
      inputs: [purchases, refunds]
      config: {join_key: cid, window: {type: tumbling, size: 30m}, time_field: ts,
               allowed_lateness: 1h, output_prefix: {left: p, right: r}, late_to: late}
    visits:
      type: join
      inputs: [purchases, refunds]
      config: {join_key: cid, window: {type: session, gap: 10m}, time_field: ts,
               allowed_lateness: 1h, output_prefix: {left: p, right: r}, late_to: late}
  destinations:
    windows: {type: file, inputs: [win], config: {path: windows.jsonl}}
    tumbling: {type: file, inputs: [pairs], config: {path: pairs.jsonl}}
    sessions: {type: file, inputs: [visits], config: {path: visits.jsonl}}
    late: {type: file, config: {path: late.jsonl}}
"""


@pytest.mark.parametrize("workers", ["1", "2"])
def test_branches_of_one_source_meet_again_in_the_order_they_were_read(tmp_path, workers):
    # Each filter passes on its part of a source batch in turn: a refund read before a
    # purchase reached the window and the joins after it, and in-order records were late.
    rng = __import__("random").Random(7)
    events = [{"cid": f"c{rng.randint(1, 20)}", "ts": 1_700_000_000 + i * 60,
               "kind": "purchase" if rng.random() < 0.7 else "refund"} for i in range(3000)]
    (tmp_path / "events.jsonl").write_text("".join(orjson.dumps(e).decode() + "\n"
                                                   for e in events))
    (tmp_path / "wf.yaml").write_text(BRANCHES)
    result = run_cli("run", "-w", workers, "wf.yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "late.jsonl") == []

    per_window: dict[tuple[str, int], list[str]] = {}
    for e in events:
        per_window.setdefault((e["cid"], e["ts"] // 1800), []).append(e["kind"])
    got = {(r["cid"], r["window_start"]): r["n"] for r in read_jsonl(tmp_path / "windows.jsonl")}
    assert sorted(got.values()) == sorted(len(k) for k in per_window.values())
    pairs = sum(k.count("purchase") * k.count("refund") for k in per_window.values())
    assert len(read_jsonl(tmp_path / "pairs.jsonl")) == pairs

    visits = 0
    for cid in {e["cid"] for e in events}:
        mine = [e for e in events if e["cid"] == cid]
        start = 0
        for i in range(1, len(mine) + 1):
            if i == len(mine) or mine[i]["ts"] - mine[i - 1]["ts"] >= 600:
                kinds = [e["kind"] for e in mine[start:i]]
                visits += kinds.count("purchase") * kinds.count("refund")
                start = i
    assert len(read_jsonl(tmp_path / "visits.jsonl")) == visits
