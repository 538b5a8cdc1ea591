"""DuckDB destination on a database file in a temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bytewax.operators as op
import duckdb
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflare.connectors.duckdb import (
    DuckDBDestinationConfig,
    DuckDBDialect,
    build_duckdb_destination,
)
from dataflare.connectors.sql_writer import TableWriter, prepare
from dataflare.dsl_compiler import models
from dataflare.registry import BuildContext

FAST_RETRY = models.Retry(max_attempts=3, backoff=models.Backoff(initial=0.01, max=0.05))


def ctx_for(base: Path, write_mode: dict[str, Any] | None = None,
            batch: dict[str, Any] | None = None, on_error: str = "fail") -> BuildContext:
    config = {"path": "dw/warehouse.duckdb", "table": "events"}
    component = models.Destination(type="duckdb", config=config,
                                   write_mode=models.WriteMode(**(write_mode or {})),
                                   batch=models.BatchSettings(**(batch or {})),
                                   error_handling=models.ErrorHandling(strategy=on_error))
    workflow = models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY))
    return BuildContext("dw", "destination", component, DuckDBDestinationConfig(**config),
                        workflow, base)


def run(ctx: BuildContext, batches: list[list[Any]]) -> list[Any]:
    flow = Dataflow("duck")
    up = op.input("in", flow, TestingSource(batches))
    errors: list[Any] = []
    op.output("failed", build_duckdb_destination(ctx, up), TestingSink(errors))
    run_main(flow)
    return [f for batch in errors for f in batch]


def query(base: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(base / "dw" / "warehouse.duckdb"), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def test_append_creates_widens_and_resolves_the_path(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, batch={"size": 2})
    run(ctx, [[{"id": 1, "user": {"id": "u1"}, "amount": 2.5}, {"id": 2, "amount": 3}],
              [{"id": 3, "ok": True, "_meta": {"file": "a", "line": 1}}]])
    assert query(tmp_path, "SELECT column_name, data_type FROM information_schema.columns "
                 "WHERE table_name = 'events' ORDER BY ordinal_position") == [
        ("id", "BIGINT"), ("user", "JSON"), ("amount", "DOUBLE"), ("ok", "BOOLEAN")]
    assert query(tmp_path, "SELECT id, user->>'$.id', amount, ok FROM events ORDER BY id") == [
        (1, "u1", 2.5, None), (2, None, 3.0, None), (3, None, None, True)]


def test_integer_columns_widen(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    run(ctx, [[{"id": 1, "amount": 3}]])
    run(ctx, [[{"id": 2, "amount": 2.5}]])
    assert query(tmp_path, "SELECT id, amount FROM events ORDER BY id") == [(1, 3.0), (2, 2.5)]


def test_merge_with_cdc_deletes(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, write_mode={"type": "merge", "merge_key": ["user_id", "window"]})
    run(ctx, [[{"user_id": "a", "window": 1, "n": 1}, {"user_id": "b", "window": 1, "n": 2},
               {"user_id": "a", "window": 1, "n": 3}]])
    run(ctx, [[{"user_id": "b", "window": 1, "_meta": {"op": "delete"}},
               {"user_id": "a", "window": 2, "n": 9}]])
    assert query(tmp_path, "SELECT user_id, \"window\", n FROM events ORDER BY 1, 2") == [
        ("a", 1, 3), ("a", 2, 9)]


def test_overwrite_empties_the_table_once_per_run(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, write_mode={"type": "overwrite"}, batch={"size": 2})
    run(ctx, [[{"id": 0}]])
    run(ctx, [[{"id": i} for i in range(1, 6)]])
    assert query(tmp_path, "SELECT id FROM events ORDER BY id") == [(i,) for i in range(1, 6)]


def test_a_resumed_run_skips_replayed_appends(tmp_path: Path) -> None:
    cfg = DuckDBDestinationConfig(path="x.duckdb", table="events")
    recs = [{"id": i, "_meta": {"file": "in.jsonl", "line": i}} for i in range(1, 7)]
    writer = TableWriter("dw", DuckDBDialect(tmp_path / "x.duckdb", cfg), "append", (), False,
                         FAST_RETRY)
    writer.write(prepare(recs[:4], "dw", ())[0], True, "run-1")
    writer.close()
    resumed = TableWriter("dw", DuckDBDialect(tmp_path / "x.duckdb", cfg), "append", (),
                          False, FAST_RETRY)
    assert resumed.write(prepare(recs[2:], "dw", ())[0], False, "run-1") == (2, [])
    resumed.close()
    with duckdb.connect(str(tmp_path / "x.duckdb")) as conn:
        assert conn.execute("SELECT id FROM events ORDER BY id").fetchall() == [
            (i,) for i in range(1, 7)]


def test_reopens_a_closed_connection_without_losing_the_batch(tmp_path: Path) -> None:
    cfg = DuckDBDestinationConfig(path="x.duckdb", table="events")
    writer = TableWriter("dw", DuckDBDialect(tmp_path / "x.duckdb", cfg), "append", (), False,
                         FAST_RETRY)
    items, _ = prepare([{"id": 1}], "dw", ())
    writer.write(items, first=True, run="r")
    writer.db.conn.close()  # type: ignore[attr-defined]
    items, _ = prepare([{"id": 2}], "dw", ())
    writer.write(items, first=False, run="r")
    writer.close()
    with duckdb.connect(str(tmp_path / "x.duckdb")) as conn:
        assert conn.execute("SELECT id FROM events ORDER BY id").fetchall() == [(1,), (2,)]


def test_a_value_that_does_not_fit_its_column_fails_alone(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, on_error="skip")
    run(ctx, [[{"id": 1}]])
    errors = run(ctx, [[{"id": 2}, {"id": "x1", "_meta": {"file": "in.jsonl", "line": 7}},
                        {"id": 3}]])
    assert [(e.step, e.record, e.position()) for e in errors] == [
        ("dw", {"id": "x1"}, "in.jsonl:7")]
    assert query(tmp_path, "SELECT id FROM events ORDER BY id") == [(1,), (2,), (3,)]
    # An integer beyond 64 bits (a sum past 2**63) stopped the run with an OverflowError.
    errors = run(ctx, [[{"id": 4}, {"id": 2**64, "_meta": {"file": "in.jsonl", "line": 9}}]])
    assert [(e.type, e.position()) for e in errors] == [("OverflowError", "in.jsonl:9")]
    assert query(tmp_path, "SELECT max(id) FROM events") == [(4,)]
    # A field named "" (legal JSON) made the table's DDL fail: the run stopped.
    errors = run(ctx, [[{"id": 5}, {"id": 6, "": "x", "_meta": {"file": "in.jsonl", "line": 8}}]])
    assert [(e.message.split(", in")[0], e.position()) for e in errors] == [
        ("step 'dw': a field named '' cannot be a column", "in.jsonl:8")]
    assert query(tmp_path, "SELECT max(id) FROM events") == [(5,)]


def test_merge_sets_only_the_fields_a_record_has(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path, write_mode={"type": "merge", "merge_key": "id"})
    run(ctx, [[{"id": 1, "a": 1, "b": 1}, {"id": 2, "a": 1, "b": 1}]])
    run(ctx, [[{"id": 2, "a": 2}, {"id": 3, "b": 5}],
              [{"id": 4, "v": 1.5, "_meta": {"op": "update", "old": {"id": 1}}}]])
    assert query(tmp_path, "SELECT id, a, b, v FROM events ORDER BY id") == [
        (2, 2, 1, None), (3, None, 5, None), (4, None, None, 1.5)]


def test_a_new_column_of_integers_and_fractions_is_a_double(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    run(ctx, [[{"id": 1, "price": 10}, {"id": 2, "price": 10.5}]])
    assert query(tmp_path, "SELECT price FROM events ORDER BY id") == [(10.0,), (10.5,)]


def test_a_constraint_violation_fails_its_record_alone(tmp_path: Path) -> None:
    (tmp_path / "dw").mkdir()
    with duckdb.connect(str(tmp_path / "dw" / "warehouse.duckdb")) as conn:
        conn.execute("CREATE TABLE events (id BIGINT PRIMARY KEY, qty INT CHECK (qty >= 0))")
    for mode in ({"type": "append"}, {"type": "merge", "merge_key": "id"}):
        ctx = ctx_for(tmp_path, write_mode=mode, on_error="skip")
        errors = run(ctx, [[{"id": 1, "qty": 1}, {"id": 2, "qty": -2}, {"id": 3, "qty": 3}]])
        assert [(e.type, e.record["id"]) for e in errors] == [("ConstraintException", 2)]
        if mode["type"] == "append":
            query_rows = query(tmp_path, "SELECT id, qty FROM events ORDER BY id")
            assert query_rows == [(1, 1), (3, 3)]
            with duckdb.connect(str(tmp_path / "dw" / "warehouse.duckdb")) as conn:
                conn.execute("DELETE FROM events")
    assert query(tmp_path, "SELECT id, qty FROM events ORDER BY id") == [(1, 1), (3, 3)]


def test_a_text_column_takes_other_values_as_text(tmp_path: Path) -> None:
    ctx = ctx_for(tmp_path)
    run(ctx, [[{"id": 1, "note": "plain"}]])
    run(ctx, [[{"id": 2, "note": 5}, {"id": 3, "note": {"a": [1]}}, {"id": 4, "note": None},
               {"id": 5, "note": True}, {"id": 6}]])
    assert query(tmp_path, "SELECT id, note FROM events ORDER BY id") == [
        (1, "plain"), (2, "5"), (3, '{"a":[1]}'), (4, None), (5, "True"), (6, None)]


def test_the_columns_of_a_batch_are_its_fields_in_order_of_appearance() -> None:
    columns = TableWriter._columns_of
    assert columns([]) == []
    assert columns([{"a": 1, "b": 2}, {"b": 3}, {}]) == ["a", "b"]
    assert columns([{"a": 1}, {"b": 2, "a": 1}]) == ["a", "b"]
    assert columns([{"a": 1, "b": 2}, {"a": 1, "c": 2}]) == ["a", "b", "c"]


def test_a_null_merge_key_is_said_null_not_missing() -> None:
    _, errs = prepare([{"a": 3, "b": None, "_meta": {"x": 1}}, {"a": 4, "_meta": {"x": 2}}],
                      "m", ("a", "b"))
    assert [e.message.split(" in record")[0] for e in errs] == [
        "step 'm': a merge key cannot be null (b is null)",
        "step 'm': a merge key cannot be null (b is missing)"]


def test_a_blob_column_takes_hex_text_as_bytes_and_refuses_bad_hex_alone(tmp_path: Path) -> None:
    # Database sources give bytea and binary values as PostgreSQL's hex text ('\x...').
    (tmp_path / "dw").mkdir()
    with duckdb.connect(str(tmp_path / "dw" / "warehouse.duckdb")) as conn:
        conn.execute("CREATE TABLE events (id BIGINT, raw BLOB)")
    errors = run(ctx_for(tmp_path, on_error="skip"), [[
        {"id": 1, "raw": "\\xdeadbeef"}, {"id": 2, "raw": "\\x"}, {"id": 3, "raw": "plain"},
        {"id": 4, "raw": "\\xzz"}, {"id": 5, "raw": None}]])
    assert [(e.record["id"], "not hex text of bytes" in e.message) for e in errors] == [
        (4, True)]
    assert query(tmp_path, "SELECT id, raw FROM events ORDER BY id") == [
        (1, b"\xde\xad\xbe\xef"), (2, b""), (3, b"plain"), (5, None)]


def test_a_bc_date_or_time_is_written_before_year_1(tmp_path: Path) -> None:
    # A PostgreSQL source gives dates before year 1 as its text ('0044-03-15 BC'): DuckDB
    # refused it as a date and read it, as a timestamp, as the year 44 AD.
    (tmp_path / "dw").mkdir()
    with duckdb.connect(str(tmp_path / "dw" / "warehouse.duckdb")) as conn:
        conn.execute("CREATE TABLE events (id BIGINT, d DATE, ts TIMESTAMP, tz TIMESTAMPTZ, "
                     "note VARCHAR)")
    assert run(ctx_for(tmp_path), [[
        {"id": 1, "d": "0044-03-15 BC", "ts": "0044-03-15 10:00:00 BC",
         "tz": "0001-01-01 00:00:00+00 BC", "note": "0044 BC"},
        {"id": 2, "d": "2024-01-02", "ts": "2024-01-02 03:04:05", "tz": None, "note": None}]]) \
        == []
    assert query(tmp_path, "SELECT id, d::VARCHAR, ts::VARCHAR, (tz AT TIME ZONE 'UTC')"
                           "::VARCHAR, note FROM events ORDER BY id") == [
        (1, "0044-03-15 (BC)", "0044-03-15 (BC) 10:00:00", "0001-01-01 (BC) 00:00:00",
         "0044 BC"),
        (2, "2024-01-02", "2024-01-02 03:04:05", None, None)]
