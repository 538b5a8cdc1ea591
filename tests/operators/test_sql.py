"""The ``sql`` transformation: DuckDB per batch, per closed window, over the whole input."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from pydantic import ValidationError

from dataflare.operators.keyed import iso_us
from dataflare.operators.sql import SqlConfig, build_sql, columns_read
from dataflare.operators.window import WindowConfig, window
from dataflare.registry import BuildContext
from tests.fixtures.workflows import read_jsonl, run_cli
from tests.operators.test_window import canon, run_flow

RECORDS = [
    {"u": i % 3, "ts": i * 2 + (i % 4 == 3) * -9, "v": i, "_meta": {"line": i + 1}}
    for i in range(60)
]
BATCHES = [RECORDS[i : i + 4] for i in range(0, 60, 4)]


def ctx(cfg: dict[str, Any], inputs: list[str] | None = None) -> BuildContext:
    return BuildContext(
        step_id="q",
        kind="transformation",
        component=SimpleNamespace(inputs=inputs or ["src"]),
        config=SqlConfig.model_validate(cfg),
        workflow=None,
        base_dir=Path("."),
    )


def sql_flow(cfg: dict[str, Any]) -> Any:
    def build(flow: Dataflow, src: Any) -> dict[str, Any]:
        out = build_sql(ctx(cfg), [src])
        outs = {"down": out.down, "errs": out.errs}
        outs.update(out.named)
        return outs

    return build


def without_meta(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "_meta"} for r in records]


@pytest.mark.parametrize("workers", [1, 2])
def test_per_batch_query_matches_python(workers):
    cfg = {"query": "select u, v * 2 as w, v > 30 as big from input where v % 5 <> 0"}
    out = run_flow(sql_flow(cfg), BATCHES, workers=workers)
    expected = [
        {"u": r["u"], "w": r["v"] * 2, "big": r["v"] > 30} for r in RECORDS if r["v"] % 5
    ]
    assert canon(out["down"]) == canon(expected)
    assert out["errs"] == []


WINDOWED = {
    "query": "select count(*) as n, sum(v) as total, max(v) as top, min(ts) as first_ts "
    "from input",
    "window": {"type": "tumbling", "size": "10s"},
    "time_field": "ts",
    "group_by": ["u"],
    "allowed_lateness": "2s",
}


def window_reference() -> dict[str, list[Any]]:
    """The same aggregates from the ``window`` operator (an independent computation)."""
    cfg = WindowConfig.model_validate(
        {
            "window": {"type": "tumbling", "size": "10s"},
            "time_field": "ts",
            "group_by": ["u"],
            "allowed_lateness": "2s",
            "aggregations": [
                {"operations": ["count"], "as": "n"},
                {"field": "v", "operations": ["sum"], "as": "total"},
                {"field": "v", "operations": ["max"], "as": "top"},
                {"field": "ts", "operations": ["min"], "as": "first_ts"},
            ],
        }
    )

    def build(flow: Dataflow, src: Any) -> dict[str, Any]:
        w = window("win", src, cfg)
        return {"down": w.down, "late": w.late}

    return run_flow(build, BATCHES)


def python_windows() -> list[dict[str, Any]]:
    """The windows by hand: per-group watermark, 2 s lateness, 10 s tumbling windows."""
    wins: dict[tuple[int, int], list[int]] = defaultdict(list)
    high: dict[int, int] = {}
    for r in RECORDS:
        u, t = r["u"], r["ts"]
        if u in high and t < high[u] - 2:
            continue
        high[u] = max(high.get(u, t), t)
        wins[(u, t - t % 10)].append(r)
    return [
        {
            "u": u,
            "window_start": iso_us(s * 1_000_000),
            "window_end": iso_us((s + 10) * 1_000_000),
            "n": len(rs),
            "total": sum(r["v"] for r in rs),
            "top": max(r["v"] for r in rs),
            "first_ts": min(r["ts"] for r in rs),
        }
        for (u, s), rs in wins.items()
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_query_per_window_equals_window_operator_and_python(workers):
    out = run_flow(sql_flow(WINDOWED), BATCHES, workers=workers)
    ref = window_reference()
    assert out["down"], "no window emitted"
    assert canon(out["down"]) == canon(ref["down"]) == canon(python_windows())
    assert canon(out["late"]) == canon(ref["late"])
    assert out["late"], "the input has late records"
    assert out["errs"] == []


@pytest.mark.parametrize("abort_at", [0, 1, 3, 7, 14])
def test_resume_after_abort_gives_the_uninterrupted_windows(tmp_path, abort_at):
    full = run_flow(sql_flow(WINDOWED), BATCHES)
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*BATCHES[:abort_at], TestingSource.ABORT(), *BATCHES[abort_at:]]
    first = run_flow(sql_flow(WINDOWED), items, epoch_interval=timedelta(0), recovery_config=rc)
    second = run_flow(sql_flow(WINDOWED), items, epoch_interval=timedelta(0), recovery_config=rc)
    for name in ("down", "late"):
        assert canon(first[name] + second[name]) == canon(full[name])


def test_resume_with_changed_query_is_refused(tmp_path):
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*BATCHES[:5], TestingSource.ABORT(), *BATCHES[5:]]
    run_flow(sql_flow(WINDOWED), items, epoch_interval=timedelta(0), recovery_config=rc)
    changed = {**WINDOWED, "query": "select count(*) as n from input"}
    with pytest.raises(Exception, match="different definition of the step"):
        run_flow(sql_flow(changed), items, epoch_interval=timedelta(0), recovery_config=rc)


def test_sql_error_on_one_window_goes_to_errors_with_its_position():
    records = [
        {"k": "a", "ts": 1, "s": "12", "_meta": {"file": "x.jsonl", "line": 1}},
        {"k": "a", "ts": 2, "s": "30", "_meta": {"file": "x.jsonl", "line": 2}},
        {"k": "a", "ts": 12, "s": "oops", "_meta": {"file": "x.jsonl", "line": 3}},
        {"k": "a", "ts": 25, "s": "5", "_meta": {"file": "x.jsonl", "line": 4}},
    ]
    cfg = {
        "query": "select sum(cast(s as integer)) as total from input",
        "window": {"type": "tumbling", "size": "10s"},
        "time_field": "ts",
        "group_by": "k",
    }
    out = run_flow(sql_flow(cfg), [records])
    assert sorted(r["total"] for r in out["down"]) == [5, 42]
    [failed] = out["errs"]
    assert failed.step == "q" and failed.meta == {"file": "x.jsonl", "line": 3}
    assert failed.message.startswith("step 'q': sql query failed on window 1970-01-01T00:00:10")
    assert failed.record["records"] == [{"k": "a", "ts": 12, "s": "oops"}]
    assert "x.jsonl" in failed.position()


def test_bad_batch_sends_its_records_to_errors():
    batches = [[{"v": 1}, {"v": 2}], [{"v": "x", "_meta": {"line": 9}}], [{"v": 3}]]
    out = run_flow(sql_flow({"query": "select v + 1 as w from input"}), batches)
    assert sorted(r["w"] for r in out["down"]) == [2, 3, 4]
    [failed] = out["errs"]
    assert failed.step == "q" and failed.meta == {"line": 9}
    assert "sql query failed on a batch" in failed.message


def test_a_batch_of_mostly_text_does_not_fail_its_numbers():
    # The column took the type most records had (text): "amount > 5" then failed to bind,
    # and every record of the batch went to dead letters, the numbers too.
    batch = [{"u": "a", "amount": "30"}, {"u": "b", "amount": "40"}, {"u": "c", "amount": 7},
             {"u": "d", "amount": 8}, {"u": "e", "amount": "x"}]
    out = run_flow(sql_flow({"query": "select u, amount * 2 as a2 from input "
                                      "where amount > 5"}), [batch])
    assert sorted(out["down"], key=lambda r: r["u"]) == [{"u": "c", "a2": 14},
                                                         {"u": "d", "a2": 16}]
    assert sorted(f.record["u"] for f in out["errs"]) == ["a", "b", "e"]
    assert all("sql query failed on a batch" in f.message for f in out["errs"])


@pytest.mark.parametrize("workers", [1, 2])
def test_over_all_joins_two_inputs_at_the_end(workers):
    orders = [{"id": i, "cust": i % 4, "amount": i * 1.5} for i in range(40)]
    customers = [{"cust": c, "name": f"c{c}"} for c in range(3)]
    cfg = {
        "query": "select c.name, count(*) as n, sum(o.amount) as total from orders o "
        "join customers c using (cust) group by c.name",
        "over": "all",
    }
    flow = Dataflow("t")
    a = op.input("a", flow, TestingSource([orders[i : i + 7] for i in range(0, 40, 7)]))
    b = op.input("b", flow, TestingSource([customers]))
    out = build_sql(ctx(cfg, ["orders", "customers"]), [a, b])
    got: list[Any] = []
    op.output("o", out.down, TestingSink(got))
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    expected = [
        {
            "name": f"c{c}",
            "n": sum(1 for o in orders if o["cust"] == c),
            "total": sum(o["amount"] for o in orders if o["cust"] == c),
        }
        for c in range(3)
    ]
    assert canon([r for b in got for r in b]) == canon(expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"query": "selec 1"}, 'syntax error at or near "selec"'),
        ({"query": "select 1; select 2"}, "must be one statement"),
        ({"query": "drop table input"}, "must be a SELECT query"),
        ({"over": "all", "window": {"type": "tumbling", "size": "1m"}}, "exclude each other"),
        ({"time_field": "ts"}, "'time_field' only apply with 'window'"),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        SqlConfig.model_validate({"query": "select * from input", **change})


def test_workflow_runs_and_bad_query_is_located_by_validate(tmp_path):
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"k": i % 2, "ts": i, "v": i}) + "\n" for i in range(30))
    )
    flow = tmp_path / "f.yaml"
    text = """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    q:
      inputs: [src]
      type: sql
      config:
        query: "select k, count(*) as n, sum(v) as total from input group by k"
        window: {type: tumbling, size: 10s}
        time_field: ts
  destinations:
    out: {type: file, inputs: [q], config: {path: out.jsonl}}
"""
    flow.write_text(text)
    assert run_cli("validate", str(flow)).code == 0
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = [
        {"k": k, "n": 5, "total": sum(v for v in range(s, s + 10) if v % 2 == k),
         "window_start": iso_us(s * 1_000_000), "window_end": iso_us((s + 10) * 1_000_000)}
        for s in (0, 10, 20) for k in (0, 1)
    ]
    assert canon(rows) == canon(expected)
    flow.write_text(text.replace("count(*) as n", "count(*) as n,, 1"))
    bad = run_cli("validate", str(flow))
    assert bad.code == 1
    assert "f.yaml:9:16:" in bad.stderr and "transformations.q.config.query" in bad.stderr
    assert "syntax error at or near" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_over_all_on_an_unbounded_input_is_warned(tmp_path):
    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    src:
      type: kafka
      mode: streaming
      config: {bootstrap_servers: "127.0.0.1:1", topic: t}
  transformations:
    q: {inputs: [src], type: sql, config: {query: "select count(*) as n from input", over: all}}
  destinations:
    out: {type: stdout, inputs: [q]}
""")
    result = run_cli("validate", str(flow))
    assert "transformations.q.config: warning: 'over: all' runs the query when the inputs" in (
        result.stderr), result.stderr


def test_per_batch_with_two_inputs_reads_them_as_one_relation():
    flow = Dataflow("t")
    a = op.input("a", flow, TestingSource([[{"v": 1}, {"v": 2}], [{"v": 3}]]))
    b = op.input("b", flow, TestingSource([[{"v": 10}]]))
    out = build_sql(ctx({"query": "select v * 2 as w from input"}, ["a", "b"]), [a, b])
    got: list[Any] = []
    op.output("o", out.down, TestingSink(got))
    run_main(flow)
    assert sorted(r["w"] for b in got for r in b) == [2, 4, 6, 20]


MODES = {
    "batch": {},
    "window": {"window": {"type": "tumbling", "size": "10s"}, "time_field": "ts",
               "group_by": ["k"]},
    "all": {"over": "all"},
}
HEAD = {"batch": {}, "all": {},
        "window": {"k": "a", "window_start": iso_us(0), "window_end": iso_us(10_000_000)}}


def mixed(column: str, values: list[Any]) -> list[dict[str, Any]]:
    """Records of one group and window whose ``column`` takes ``values`` (1 to 4 elsewhere)."""
    return [
        {"k": "a", "ts": i, "v": i, "note": i, "_meta": {"file": "x.jsonl", "line": i}}
        | {column: value}
        for i, value in enumerate(values, 1)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_column_of_mixed_types_the_query_does_not_read_does_not_matter(mode):
    records = mixed("note", [7, "call back", None, {"by": "phone"}])
    cfg = {"query": "select count(*) as n, sum(v) as total from input", **MODES[mode]}
    out = run_flow(sql_flow(cfg), [records])
    assert out["errs"] == []
    assert out["down"] == [{**HEAD[mode], "n": 4, "total": 10}]


@pytest.mark.parametrize("mode", MODES)
def test_a_value_of_another_type_in_a_column_the_query_reads_fails_its_record(mode):
    records = mixed("v", [1, 2.5, "3", None])
    cfg = {"query": "select count(*) as n, sum(v) as total from input", **MODES[mode]}
    out = run_flow(sql_flow(cfg), [records])
    assert out["down"] == [{**HEAD[mode], "n": 3, "total": 3.5}]
    [failed] = out["errs"]
    assert failed.record == records[2] and failed.position() == "x.jsonl:3"
    assert failed.message == (
        "step 'q': column 'v' holds str '3', expected double like the other records")


@pytest.mark.parametrize(
    ("query", "read"),
    [
        ("select k, sum(v) from input group by k", ["k", "v"]),
        ("select i.v, NOTE.x from input i", ["v", "note", "x"]),
        ("select * exclude (note) from input", ["k", "v", "x"]),
        ("select count(*) as n from input", []),
        ("select to_json(i) from input i", ["k", "v", "note", "x"]),
        ("select columns('v.*') from input", ["k", "v", "note", "x"]),
    ],
)
def test_columns_read(query, read):
    reads = columns_read(query)
    assert [c for c in ("k", "v", "note", "x") if reads(c)] == read


def test_records_with_a_value_of_another_type_go_to_dead_letters(tmp_path):
    rows = [{"k": 1, "ts": 1, "v": 5, "note": 1}, {"k": 1, "ts": 2, "v": "6", "note": "a"},
            {"k": 1, "ts": 3, "v": 7, "note": [1]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    q:
      inputs: [src]
      type: sql
      config:
        query: "select sum(v) as total from input"
        window: {type: tumbling, size: 10s}
        time_field: ts
      error_handling: {strategy: redirect, redirect_to: dead}
  destinations:
    out: {type: file, inputs: [q], config: {path: out.jsonl}}
    dead: {type: file, config: {path: dead.jsonl}}
""")
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    assert [r["total"] for r in read_jsonl(tmp_path / "out.jsonl")] == [12]
    [dead] = read_jsonl(tmp_path / "dead.jsonl")
    assert dead["record"] == rows[1] and dead["source"]["position"]["line"] == 2
    assert dead["error"]["message"] == (
        "step 'q': column 'v' holds str '6', expected int64 like the other records")
