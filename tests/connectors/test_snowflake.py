"""Snowflake destination through the real connector, against a fakesnow server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflare.connectors.snowflake import (
    SnowflakeConfig,
    SnowflakeDialect,
    build_snowflake_destination,
)
from dataflare.connectors.sql_writer import TableWriter, prepare
from dataflare.dsl_compiler import models
from dataflare.registry import BuildContext
from tests.fixtures.snowflake import FakeSnowflake

FAST_RETRY = models.Retry(max_attempts=3, backoff=models.Backoff(initial=0.01, max=0.05))


def ctx_for(sf: FakeSnowflake, write_mode: dict[str, Any] | None = None,
            batch: dict[str, Any] | None = None, on_error: str = "fail",
            table: str = "EVENTS") -> BuildContext[SnowflakeConfig]:
    config = sf.config(schema="PUBLIC", table=table, warehouse="COMPUTE_WH", role="ETL_ROLE")
    component = models.Destination(type="snowflake", config=config,
                                   write_mode=models.WriteMode(**(write_mode or {})),
                                   batch=models.BatchSettings(**(batch or {})),
                                   error_handling=models.ErrorHandling(strategy=on_error))
    workflow = models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY))
    return BuildContext("dw", "destination", component, SnowflakeConfig(**config), workflow,
                        Path("."))


def run(ctx: BuildContext[SnowflakeConfig], batches: list[list[Any]]) -> list[Any]:
    flow = Dataflow("sf")
    up = op.input("in", flow, TestingSource(batches))
    errors: list[Any] = []
    op.output("failed", build_snowflake_destination(ctx, up), TestingSink(errors))
    run_main(flow)
    return [f for batch in errors for f in batch]


def q(sf: FakeSnowflake, sql: str) -> list[tuple[Any, ...]]:
    return sf.rows(sql, schema="PUBLIC")


def test_append_creates_the_table_from_the_records_and_widens_it(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, batch={"size": 2})
    run(ctx, [[{"id": 1, "user": {"id": "u1"}, "amount": 2.5, "name": "o'neil \\ x"},
               {"id": 2, "amount": 3}],
              [{"id": 3, "ok": True, "name": {"nested": 1}, "_meta": {"file": "a", "line": 1}}]])
    assert q(sf, "SELECT column_name, data_type FROM information_schema.columns "
             "WHERE table_name = 'EVENTS' ORDER BY ordinal_position") == [
        ("id", "NUMBER"), ("user", "VARIANT"), ("amount", "FLOAT"), ("name", "TEXT"),
        ("ok", "BOOLEAN")]
    assert q(sf, 'SELECT "id", "user":id::VARCHAR, "amount", "name", "ok" FROM "EVENTS" '
             'ORDER BY "id"') == [
        (1, "u1", 2.5, "o'neil \\ x", None), (2, None, 3.0, None, None),
        (3, None, None, '{"nested":1}', True)]


def test_an_integer_column_that_receives_a_fraction_becomes_a_float(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf)
    run(ctx, [[{"id": 1, "amount": 3}]])
    run(ctx, [[{"id": 2, "amount": 2.5}]])
    assert q(sf, 'SELECT "id", "amount" FROM "EVENTS" ORDER BY "id"') == [(1, 3.0), (2, 2.5)]
    assert q(sf, "SELECT data_type FROM information_schema.columns WHERE table_name = 'EVENTS' "
             "AND column_name = 'amount'") == [("FLOAT",)]


def test_merge_upserts_sets_only_present_fields_and_applies_cdc_deletes(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, write_mode={"type": "merge", "merge_key": "customer.email"})
    run(ctx, [[{"customer": {"email": "a@x"}, "n": 1, "tier": "gold"},
               {"customer": {"email": "b@x"}, "n": 2, "tier": "silver"},
               {"customer": {"email": "a@x"}, "n": 3}]])
    run(ctx, [[{"customer": {"email": "b@x"}, "_meta": {"op": "delete"}},
               {"customer": {"email": "c@x"}, "n": 7},
               {"customer": {"email": "a@x"}, "tier": "platinum"}]])
    assert q(sf, 'SELECT "customer.email", "n", "tier" FROM "EVENTS" ORDER BY 1') == [
        ("a@x", 3, "platinum"), ("c@x", 7, None)]


def test_merge_deletes_and_reinserts_a_key_within_one_batch(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, write_mode={"type": "merge", "merge_key": ["id", "day"]})
    run(ctx, [[{"id": 1, "day": "d1", "v": 1, "w": 1}, {"id": 2, "day": "d1", "v": 2}]])
    run(ctx, [[{"id": 1, "day": "d1", "_meta": {"op": "delete"}},
               {"id": 1, "day": "d1", "v": 9},
               {"id": 3, "day": "d2", "v": 4, "_meta": {"op": "update", "old": {"id": 2,
                                                                               "day": "d1"}}}]])
    assert q(sf, 'SELECT "id", "day", "v", "w" FROM "EVENTS" ORDER BY 1') == [
        (1, "d1", 9, None), (3, "d2", 4, None)]


def test_overwrite_empties_the_table_once_per_run(fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, write_mode={"type": "overwrite"}, batch={"size": 2})
    run(ctx, [[{"id": 0}]])
    run(ctx, [[{"id": i} for i in range(1, 6)]])
    assert q(sf, 'SELECT "id" FROM "EVENTS" ORDER BY 1') == [(i,) for i in range(1, 6)]


def test_append_dedupes_per_key_within_a_batch(fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, write_mode={"type": "append", "merge_key": "id", "deduplicate": True})
    run(ctx, [[{"id": 1, "v": "a"}, {"id": 1, "v": "b"}, {"id": 2, "v": "c"}]])
    assert q(sf, 'SELECT "id", "v" FROM "EVENTS" ORDER BY 1') == [(1, "b"), (2, "c")]


@pytest.mark.parametrize("mode", [{"type": "append"}, {"type": "merge", "merge_key": "id"}])
def test_a_value_that_does_not_fit_its_column_fails_alone(
        fake_snowflake: FakeSnowflake, mode: dict[str, Any]) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, write_mode=mode, on_error="skip")
    run(ctx, [[{"id": 1, "qty": 1}]])
    errors = run(ctx, [[{"id": 2, "qty": 2},
                        {"id": 4, "qty": "many", "_meta": {"file": "in.jsonl", "line": 7}},
                        {"id": 3, "qty": 3}]])
    assert [(e.step, e.type, e.record, e.position()) for e in errors] == [
        ("dw", "SnowflakeDataError", {"id": 4, "qty": "many"}, "in.jsonl:7")]
    assert "many" in errors[0].message
    assert q(sf, 'SELECT "id", "qty" FROM "EVENTS" ORDER BY 1') == [(1, 1), (2, 2), (3, 3)]
    # true was cast to 1 in a NUMBER column (PostgreSQL and DuckDB refuse it)
    errors = run(ctx, [[{"id": 5, "qty": True}]])
    assert [(e.type, e.message) for e in errors] == [
        ("SnowflakeDataError", "column 'qty' is NUMBER(38,0): True is no number")]


def test_a_refused_value_stops_the_run_under_fail(fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf)
    run(ctx, [[{"id": 1}]])
    with pytest.raises(Exception) as raised:  # noqa: PT011 - bytewax wraps the error
        run(ctx, [[{"id": "x"}]])
    chain: list[BaseException] = []
    exc: BaseException | None = raised.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(str(e).startswith(f"step 'dw': writing 1 record(s) to snowflake table "
                                 f"{sf.database}.PUBLIC.EVENTS failed: SnowflakeDataError")
               for e in chain), chain
    assert q(sf, 'SELECT "id" FROM "EVENTS"') == [(1,)]


def test_a_resumed_run_skips_replayed_appends(fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    cfg = SnowflakeConfig(**sf.config(schema="PUBLIC", table="EVENTS"))
    recs = [{"id": i, "_meta": {"file": "in.jsonl", "line": i}} for i in range(1, 7)]
    writer = TableWriter("dw", SnowflakeDialect(cfg, "dw"), "append", (), False, FAST_RETRY)
    writer.write(prepare(recs[:4], "dw", ())[0], True, "run-1")
    writer.close()
    resumed = TableWriter("dw", SnowflakeDialect(cfg, "dw"), "append", (), False, FAST_RETRY)
    assert resumed.write(prepare(recs[2:], "dw", ())[0], False, "run-1") == (2, [])
    resumed.close()
    assert q(sf, 'SELECT "id" FROM "EVENTS" ORDER BY 1') == [(i,) for i in range(1, 7)]
    assert q(sf, "SELECT destination, target, stream, run, position FROM "
             '"_dataflare_positions"') == [("dw", "EVENTS", "file:in.jsonl", "run-1", 6)]


def test_a_closed_session_is_reopened_without_losing_the_batch(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    cfg = SnowflakeConfig(**sf.config(schema="PUBLIC", table="EVENTS"))
    writer = TableWriter("dw", SnowflakeDialect(cfg, "dw"), "append", (), False, FAST_RETRY)
    writer.write(prepare([{"id": 1}], "dw", ())[0], True, "r")
    writer.db.conn.close()
    writer.write(prepare([{"id": 2}], "dw", ())[0], False, "r")
    writer.close()
    assert q(sf, 'SELECT "id" FROM "EVENTS" ORDER BY 1') == [(1,), (2,)]


def test_missing_connection_settings_are_named(fake_snowflake: FakeSnowflake) -> None:
    cfg = SnowflakeConfig(table="T", password="hunter2")
    with pytest.raises(ValueError, match="needs 'account', 'database', 'username'") as exc:
        SnowflakeDialect(cfg, "dw").connect()
    assert "hunter2" not in str(exc.value)


def test_column_types_come_from_the_source_schema_before_the_values(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    schema = {"type": "object", "properties": {
        "amount": {"type": "number"}, "code": {"type": ["string", "null"]},
        "tags": {"type": "array"}, "n": {"type": "integer"}}}
    workflow = models.Workflow(
        config=models.WorkflowConfig(retry=FAST_RETRY),
        sources={"orders": models.Source(type="file", config={"path": "x"},
                                         output_schema=models.OutputSchema(definition=schema))},
        transformations={"big": models.Transformation(type="filter", inputs=["orders"],
                                                      config={"condition": "amount > 1"})},
    )
    config = sf.config(schema="PUBLIC", table="EVENTS")
    component = models.Destination(type="snowflake", inputs=["big"], config=config)
    ctx = BuildContext("dw", "destination", component, SnowflakeConfig(**config), workflow,
                       Path("."))
    run(ctx, [[{"amount": 5, "code": 7, "tags": None, "n": 1, "extra": 2}]])
    assert q(sf, "SELECT column_name, data_type FROM information_schema.columns "
             "WHERE table_name = 'EVENTS' ORDER BY ordinal_position") == [
        ("amount", "FLOAT"), ("code", "TEXT"), ("tags", "VARIANT"), ("n", "NUMBER"),
        ("extra", "NUMBER")]
    run(ctx, [[{"amount": 2.5, "code": "A1", "tags": ["x"], "n": 2}]])
    assert q(sf, 'SELECT "amount", "code", "tags"[0]::VARCHAR FROM "EVENTS" ORDER BY 1') == [
        (2.5, "A1", "x"), (5.0, "7", None)]


def test_a_workflow_without_connection_settings_stops_before_running(tmp_path: Path) -> None:
    from tests.fixtures.workflows import run_cli

    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    s: {type: generator, config: {preset: orders, count: 3}}
  destinations:
    w: {type: snowflake, inputs: [s], config: {table: customer_segments, password: s3cr3t!}}
""")
    result = run_cli("run", str(flow))
    assert result.code == 1
    assert "step 'w': a snowflake destination needs 'account', 'database', 'username'" in (
        result.stderr)
    assert "s3cr3t!" not in result.stderr


def test_a_cdc_truncate_empties_a_merged_table_before_what_follows(
        fake_snowflake: FakeSnowflake) -> None:
    sf = fake_snowflake
    ctx = ctx_for(sf, write_mode={"type": "merge", "merge_key": "id"})
    run(ctx, [[{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]])
    run(ctx, [[{"id": 3, "v": "c"}, {"_meta": {"op": "truncate"}}, {"id": 4, "v": "d"}]])
    assert q(sf, 'SELECT "id", "v" FROM "EVENTS" ORDER BY 1') == [(4, "d")]


def test_a_statement_waits_on_the_network_no_longer_than_the_retry_policy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # With the service gone mid-write, the connector retried its query for 13+ minutes,
    # past config.retry.max_elapsed (10 s in the trial), and a graceful stop waited on it.
    import snowflake.connector

    from dataflare.connectors.snowflake import SnowflakeConfig, SnowflakeDialect

    seen: dict[str, Any] = {}

    def connect(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise snowflake.connector.errors.OperationalError("stop here")

    monkeypatch.setattr(snowflake.connector, "connect", connect)
    cfg = SnowflakeConfig.model_validate({"account": "a", "username": "u", "database": "d",
                                          "table": "t"})
    with pytest.raises(snowflake.connector.errors.OperationalError):
        SnowflakeDialect(cfg, "sf", 10.0).connect()
    assert seen["network_timeout"] == 10.0
