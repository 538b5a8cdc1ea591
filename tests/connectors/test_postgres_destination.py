"""PostgreSQL destination against the shared PostgreSQL server (a fresh schema per test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from dataflare.connectors import postgres_destination
from dataflare.connectors.batching import _BufferLogic, buffer
from dataflare.connectors.postgres_destination import (
    PostgresDestinationConfig,
    PostgresDialect,
    build_postgres_destination,
)
from dataflare.connectors.sql_writer import TableWriter, prepare
from dataflare.dsl_compiler import models
from dataflare.registry import BuildContext
from tests.fixtures.services import PgSchema

FAST_RETRY = models.Retry(max_attempts=3, backoff=models.Backoff(initial=0.05, max=0.2))


def ctx_for(pg: Any, table: str = "orders", write_mode: dict[str, Any] | None = None,
            batch: dict[str, Any] | None = None, step: str = "warehouse",
            on_error: str = "fail") -> BuildContext:
    config = {"dsn": pg.dsn, "schema": pg.schema, "table": table}
    cfg = PostgresDestinationConfig(**config)
    component = models.Destination(type="postgres", config=config, inputs=["src"],
                                   write_mode=models.WriteMode(**(write_mode or {})),
                                   batch=models.BatchSettings(**(batch or {})),
                                   error_handling=models.ErrorHandling(strategy=on_error))
    workflow = models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY))
    return BuildContext(step, "destination", component, cfg, workflow, Path("."))


def run(ctx: BuildContext, batches: list[list[Any]]) -> list[Any]:
    flow = Dataflow("pg")
    up = op.input("in", flow, TestingSource(batches))
    errors: list[Any] = []
    op.output("failed", build_postgres_destination(ctx, up), TestingSink(errors))
    run_main(flow)
    return [f for batch in errors for f in batch]


def messages(exc: BaseException | None) -> list[str]:
    """The messages of ``exc`` and of its causes (bytewax wraps what a step raised)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__
    return out


def test_config_forms() -> None:
    PostgresDestinationConfig(host="db", port=5433, database="dw", username="etl",
                              password="pw", schema="analytics", table="t")
    cfg = PostgresDestinationConfig(dsn="postgresql://u:secret@h/db", table="t")
    assert "secret" not in repr(cfg)
    with pytest.raises(ValueError):
        PostgresDestinationConfig(table="t", tabel="x")
    with pytest.raises(ValueError, match="not a SQL type"):
        PostgresDestinationConfig(table="t", columns={"a": "int); DROP TABLE t; --"})


def test_append_creates_and_widens_the_table(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema)
    errors = run(ctx, [
        [{"id": 1, "name": "a", "amount": 1.5, "vip": True, "_meta": {"file": "x", "line": 1}}],
        [{"id": 2, "name": "b", "amount": None, "address": {"city": "Oslo"}, "tags": ["x"]}],
    ])
    assert errors == []
    cols = pg_schema.rows(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'orders' ORDER BY ordinal_position",
        pg_schema.schema)
    assert cols == [("id", "bigint"), ("name", "text"), ("amount", "double precision"),
                    ("vip", "boolean"), ("address", "jsonb"), ("tags", "jsonb")]
    rows = pg_schema.rows(f'SELECT id, name, amount, vip, address, tags FROM '
                          f'"{pg_schema.schema}".orders ORDER BY id')
    assert rows == [(1, "a", 1.5, True, None, None), (2, "b", None, None, {"city": "Oslo"}, ["x"])]


def test_integer_columns_widen_and_json_columns_take_any_value(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema)
    run(ctx, [[{"id": 1, "amount": 3, "attrs": {"a": 1}}]])
    run(ctx, [[{"id": 2, "amount": 2.5, "attrs": "plain text"}, {"id": 3, "attrs": [1]}]])
    rows = pg_schema.rows(f'SELECT id, amount, attrs FROM "{pg_schema.schema}".orders '
                          "ORDER BY id")
    assert rows == [(1, 3.0, {"a": 1}), (2, 2.5, "plain text"), (3, None, [1])]


def test_merge_upserts_deletes_and_keeps_the_last_record_per_key(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "merge", "merge_key": "customer.id"})
    run(ctx, [[
        {"customer": {"id": "c1"}, "total": 10},
        {"customer": {"id": "c2"}, "total": 20},
        {"customer": {"id": "c3"}, "total": 30},
        {"customer": {"id": "c1"}, "total": 11},  # last one wins within the batch
    ]])
    run(ctx, [[
        {"customer": {"id": "c2"}, "total": 21, "segment": "gold"},
        {"customer": {"id": "c3"}, "_meta": {"op": "delete", "lsn": 5}},
        {"customer": {"id": "c4"}, "total": 40},
    ]])
    rows = pg_schema.rows(f'SELECT "customer.id", total, segment FROM '
                          f'"{pg_schema.schema}".orders ORDER BY 1')
    assert rows == [("c1", 11, None), ("c2", 21, "gold"), ("c4", 40, None)]


def test_cdc_truncate_empties_a_merged_mirror_but_not_an_append_log(pg_schema: Any) -> None:
    truncate = {"_meta": {"op": "truncate", "table": "public.items", "lsn": "0/1"}}
    merged = ctx_for(pg_schema, "mirror", {"type": "merge", "merge_key": "id"})
    log = ctx_for(pg_schema, "log", step="log")
    for ctx in (merged, log):
        errors = run(ctx, [
            [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}],
            [{"id": 3, "v": "c"}, truncate, {"id": 4, "v": "d"}],
        ])
        assert errors == []
    mirror = pg_schema.rows(f'SELECT id, v FROM "{pg_schema.schema}".mirror ORDER BY id')
    assert mirror == [(4, "d")]
    kept = pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".log ORDER BY id')
    assert kept == [(1,), (2,), (3,), (4,)]


def test_a_table_is_created_only_once_values_give_its_column_types(pg_schema: Any) -> None:
    # A CDC mirror's first flush can end with a truncate: nothing to write, no types known.
    truncate = {"_meta": {"op": "truncate", "table": "public.items", "lsn": "0/1"}}
    ctx = ctx_for(pg_schema, "mirror", {"type": "merge", "merge_key": "id"})
    assert run(ctx, [[{"id": 1, "v": "a"}, truncate]]) == []
    assert pg_schema.rows("SELECT 1 FROM information_schema.tables WHERE table_schema = %s",
                          pg_schema.schema) == []
    assert run(ctx, [[{"id": 2, "v": "b"}]]) == []
    cols = pg_schema.rows(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'mirror' ORDER BY ordinal_position",
        pg_schema.schema)
    assert cols == [("id", "bigint"), ("v", "text")]


def test_merge_rejects_records_without_the_key(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "merge", "merge_key": ["id"]})
    errors = run(ctx, [[{"id": 1, "v": "a"}, {"v": "no key", "_meta": {"file": "f", "line": 9}}]])
    assert len(errors) == 1 and "merge key cannot be null (id is missing)" in errors[0].message
    assert errors[0].position() == "f:9"
    assert pg_schema.rows(f'SELECT id, v FROM "{pg_schema.schema}".orders') == [(1, "a")]


def test_overwrite_replaces_the_previous_contents(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "overwrite"}, batch={"size": 2})
    run(ctx, [[{"id": i} for i in range(5)]])
    run(ctx, [[{"id": 10}, {"id": 11}], [{"id": 12}]])  # several flushes, one truncation
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders ORDER BY id') == [
        (10,), (11,), (12,)]


def positioned(lo: int, hi: int, part: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"{part}-{o}", "_meta": {"topic": "t", "partition": part, "offset": o}}
            for o in range(lo, hi)]


def pg_writer(pg: Any) -> TableWriter:
    cfg = PostgresDestinationConfig(dsn=pg.dsn, schema=pg.schema, table="orders")
    return TableWriter("warehouse", PostgresDialect(cfg), "append", (), False, FAST_RETRY)


def test_a_resumed_run_skips_what_it_wrote_before_the_crash(pg_schema: Any) -> None:
    first = pg_writer(pg_schema)
    first.write(prepare(positioned(0, 10) + positioned(0, 4, 1), "w", ())[0], True, "run-1")
    first.close()  # the crash; bytewax resumes run-1 from an older snapshot:
    resumed = pg_writer(pg_schema)
    replay = positioned(5, 14) + positioned(2, 6, 1) + [{"id": "no-position"}]
    assert resumed.write(prepare(replay, "w", ())[0], False, "run-1") == (4 + 2 + 1, [])
    resumed.close()
    ids = [r[0] for r in pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders')]
    assert len(ids) == 14 + 6 + 1 == len(set(ids))
    marks = pg_schema.rows(f'SELECT stream, run, position, ordered FROM "{pg_schema.schema}"'
                           '._dataflare_positions ORDER BY stream')
    assert marks == [("kafka:t/0", "run-1", 13, True), ("kafka:t/1", "run-1", 5, True)]
    # A fresh run (no recovery state, a new run id) writes everything again.
    fresh = pg_writer(pg_schema)
    assert fresh.write(prepare(positioned(0, 3), "w", ())[0], True, "run-2") == (3, [])
    fresh.close()


def test_writers_creating_one_new_schema_and_table_at_once(pg_schema: Any) -> None:
    # Two destinations (or workers) making the same new schema and table: without a lock
    # the second's CREATE ... IF NOT EXISTS fails on the catalog's unique index once the
    # first commits. The second waits for the first, then widens the first's table.
    import threading

    from dataflare.connectors.sql_writer import INT

    schema = f"{pg_schema.schema}_new"
    cfg = PostgresDestinationConfig(dsn=pg_schema.dsn, schema=schema, table="orders")
    first = PostgresDialect(cfg)
    first.connect()
    second = TableWriter("second", PostgresDialect(cfg), "append", (), False, FAST_RETRY)
    failed: list[BaseException] = []

    def write_second() -> None:
        try:
            second.write(prepare([{"id": 2, "v": "b"}], "w", ())[0], True, "")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failed.append(exc)

    thread = threading.Thread(target=write_second)
    try:
        with first.transaction():
            assert first.create_table({"id": INT}, ())
            thread.start()
            for _ in range(600):  # until the second waits on a lock of the first's
                waiting = pg_schema.rows(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                    "(query LIKE '%%pg_advisory_xact_lock%%' OR query LIKE 'CREATE SCHEMA%%')")
                if waiting or not thread.is_alive():
                    break
                threading.Event().wait(0.05)
            first.conn.execute(f'INSERT INTO "{schema}".orders (id) VALUES (1)')
        thread.join(60)
        assert not failed, failed
        rows = pg_schema.rows(f'SELECT id, v FROM "{schema}".orders ORDER BY id')
        assert rows == [(1, None), (2, "b")]
    finally:
        if thread.is_alive():
            thread.join(60)
        second.close()
        first.conn.close()
        with pg_schema.connect() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_out_of_order_positions_fall_back_to_at_least_once(pg_schema: Any) -> None:
    writer = pg_writer(pg_schema)
    evens = [r for r in positioned(0, 10) if int(r["id"][2:]) % 2 == 0]
    odds = [r for r in positioned(0, 10) if int(r["id"][2:]) % 2 == 1]
    writer.write(prepare(evens, "w", ())[0], True, "run-1")
    # Two routes merged again: the odd offsets arrive after the even ones; none is lost.
    assert writer.write(prepare(odds, "w", ())[0], False, "run-1") == (5, [])
    writer.close()
    resumed = pg_writer(pg_schema)  # after a restart the stream is no longer filtered
    assert resumed.write(prepare(positioned(9, 11), "w", ())[0], False, "run-1") == (2, [])
    resumed.close()
    assert pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".orders') == [(12,)]
    assert pg_schema.rows(f'SELECT ordered FROM "{pg_schema.schema}"._dataflare_positions') \
        == [(False,)]


def test_reconnects_after_the_backend_is_killed(pg_schema: Any) -> None:
    cfg = PostgresDestinationConfig(dsn=pg_schema.dsn, schema=pg_schema.schema, table="orders")
    writer = TableWriter("warehouse", PostgresDialect(cfg), "merge", ("id",), False, FAST_RETRY)
    items, _ = prepare([{"id": i, "v": "a"} for i in range(3)], "warehouse", ("id",))
    writer.write(items, first=True, run="r")
    pid = writer.db.conn.info.backend_pid
    with pg_schema.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    items, _ = prepare([{"id": i, "v": "b"} for i in range(2, 5)], "warehouse", ("id",))
    writer.write(items, first=False, run="r")  # the connection is replaced, the batch kept
    assert writer.db.conn.info.backend_pid != pid
    writer.close()
    rows = pg_schema.rows(f'SELECT id, v FROM "{pg_schema.schema}".orders ORDER BY id')
    assert rows == [(0, "a"), (1, "a"), (2, "b"), (3, "b"), (4, "b")]


def test_records_the_database_refuses_fail_alone_and_the_rest_is_written(
    pg_schema: Any,
) -> None:
    ctx = ctx_for(pg_schema, step="dw", on_error="skip")
    run(ctx, [[{"id": 1, "v": "a"}]])
    bad = [{"id": "not a number", "_meta": {"topic": "t", "partition": 0, "offset": 3}},
           {"id": 5, "v": "nul \x00 byte", "_meta": {"file": "in.jsonl", "line": 9}}]
    good = [{"id": i, "v": "ok"} for i in range(2, 5)]
    errors = run(ctx, [[good[0], bad[0], *good[1:], bad[1]]])
    assert [(e.step, e.type, e.position()) for e in errors] == [
        ("dw", "InvalidTextRepresentation", "t[0]@3"), ("dw", "DataError", "in.jsonl:9")]
    assert "not a number" in errors[0].message and errors[0].record == {"id": "not a number"}
    rows = pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders ORDER BY id')
    assert rows == [(1,), (2,), (3,), (4,)]


def test_an_overwrite_whose_every_record_is_refused_still_empties_the_table(
    pg_schema: Any,
) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "overwrite"}, on_error="skip")
    run(ctx, [[{"id": 100}, {"id": 101}]])
    errors = run(ctx, [[{"id": "x"}, {"id": "y"}]])
    assert len(errors) == 2
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders') == []


def test_with_fail_a_refused_record_rolls_its_batch_back_and_stops_the_run(
    pg_schema: Any,
) -> None:
    ctx = ctx_for(pg_schema, step="dw")
    run(ctx, [[{"id": 1}]])
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [[{"id": 2}, {"id": "not a number"}, {"id": 3}]])
    text = str(info.value.__cause__)
    assert "step 'dw'" in text and "not a number" in text
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders') == [(1,)]


def test_a_step_level_write_error_stops_the_run_naming_the_step(pg_schema: Any) -> None:
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE VIEW "{pg_schema.schema}".v AS SELECT 1 AS id')
    ctx = ctx_for(pg_schema, "v", step="dw")  # a view takes no COPY: not the records' fault
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [[{"id": 1}]])
    text = str(info.value.__cause__)
    assert "step 'dw'" in text and ".v failed" in text


def test_two_workers_write_every_record_once(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, batch={"size": 7})
    flow = Dataflow("pg2")
    up = op.input("in", flow, TestingSource([[{"id": i * 10 + j} for j in range(10)]
                                             for i in range(20)]))
    op.output("failed", build_postgres_destination(ctx, up), TestingSink([]))
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    ids = [r[0] for r in pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders')]
    assert sorted(ids) == list(range(200))


def test_buffer_logic_flushes_on_size_interval_and_keeps_its_state() -> None:
    logic = _BufferLogic(3, timedelta(seconds=5), None)
    assert logic.notify_at() is None
    assert logic.on_batch([[1], [2]]) == ([], False)
    due = logic.notify_at()
    assert due is not None
    restored = _BufferLogic(3, timedelta(seconds=5), logic.snapshot())  # after a restart
    assert restored.notify_at() == due
    assert restored.state.run == logic.state.run  # the run id survives a restart
    out, _ = restored.on_notify()  # the interval passed: a flush of what waits
    assert [(f.seq, f.items) for f in out] == [(0, [1, 2])]
    assert restored.notify_at() is None
    out, _ = restored.on_batch([[3, 4, 5, 6]])
    assert [(f.seq, f.items) for f in out] == [(1, [3, 4, 5, 6])]
    assert restored.on_eof() == ([], False)


def test_buffer_groups_batches_by_size_and_flushes_at_the_end() -> None:
    flow = Dataflow("buf")
    up = op.input("in", flow, TestingSource([[1, 2], [3], [4, 5, 6, 7], [], [8]]))
    out: list[Any] = []
    op.output("out", buffer("batch", up, 3, 60.0), TestingSink(out))
    run_main(flow)
    assert [(f.seq, f.items) for f in out] == [(0, [1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8])]
    assert len({f.run for f in out}) == 1 and out[0].run



N = 40_000
CRASH_FLOW = """
workflow:
  id: crash_resume
  config: {retry: {max_attempts: 3, backoff: {initial: 100ms}}}
  sources:
    events:
      type: kafka
      mode: streaming
      config:
        bootstrap_servers: "${SERVERS}"
        topic: "${TOPIC}"
        stop_at_end: ${STOP_AT_END}
        batch_size: 50
  transformations:
    shaped:
      inputs: [events]
      type: mapping
      config:
        mappings:
          - {source: id, destination: id}
          - {source: user, destination: user.name}
  destinations:
    warehouse:
      inputs: [shaped]
      type: postgres
      config: {dsn: "${DSN}", schema: "${SCHEMA}", table: events}
      batch: {size: 40, flush_interval: 20ms}
"""


def test_kafka_to_postgres_appends_exactly_once_across_a_crash(
    pg_schema: Any, kafka_broker: Any, kafka_topic: Any, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from bytewax.recovery import init_db_dir

    from dataflare.connectors.kafka import produce_records

    topic = kafka_topic(partitions=2)

    def produce(start: int, stop: int) -> None:
        produce_records(kafka_broker.bootstrap_servers, topic,
                        ({"id": i, "user": f"u{i % 5}"} for i in range(start, stop)),
                        partitions=2)

    produce(0, N // 2)  # the second half comes while the first run writes
    flow = tmp_path / "flow.yaml"
    flow.write_text(CRASH_FLOW)
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    env = {**os.environ, "SERVERS": kafka_broker.bootstrap_servers, "TOPIC": topic,
           "DSN": pg_schema.dsn, "SCHEMA": pg_schema.schema, "RUST_BACKTRACE": "0"}
    cmd = [sys.executable, "-m", "bytewax.run",
           f"dataflare.dsl_compiler:compile_file({str(flow)!r})",
           "-r", str(recovery), "-s", "1", "-b", "0"]

    def count() -> int:
        try:
            return int(pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".events')[0][0])
        except Exception:  # noqa: BLE001 - the table may not exist yet
            return 0

    def snapshotted() -> bool:
        import sqlite3

        try:
            with sqlite3.connect(recovery / "part-0.sqlite3", timeout=5) as db:
                found = db.execute("SELECT count(*) FROM snaps WHERE step_id LIKE "
                                   "'%warehouse.write.batch.buffer'").fetchone()
            return bool(found and found[0])
        except sqlite3.Error:
            return False

    # First run tails the topic; right after its destination's first snapshot it is
    # killed (no clean shutdown) while still writing.
    proc = subprocess.Popen(cmd, env={**env, "STOP_AT_END": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            if (snapshotted() and count() > 0) or proc.poll() is not None:
                break
            time.sleep(0.05)
        after_snapshot = count()
        produce(N // 2, N)  # the run cannot have written these yet: it is killed mid-way
        for _ in range(1200):  # rows committed after that snapshot will be replayed
            if count() >= after_snapshot + 1500 or proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written_before_crash = count()
    assert 0 < written_before_crash < N

    # The rerun resumes from the last snapshot, replays what followed it, and stops at
    # the end of the topic; replayed rows that were already committed are skipped.
    done = subprocess.run(cmd, env={**env, "STOP_AT_END": "true"}, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"already written to postgres table" in done.stderr  # the replay happened
    rows = pg_schema.rows(f'SELECT id, "user" FROM "{pg_schema.schema}".events')
    ids = [r[0] for r in rows]
    assert len(ids) == N and set(ids) == set(range(N))
    assert {r[1]["name"] for r in rows} == {f"u{i}" for i in range(5)}


def test_merge_sets_the_fields_a_record_has_whatever_else_is_in_the_batch(
    pg_schema: Any,
) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "merge", "merge_key": "id"})
    run(ctx, [[{"id": 1, "a": 1, "b": 1}, {"id": 2, "a": 1, "b": 1}]])
    run(ctx, [[{"id": 1, "a": 2}]])
    # A CDC update leaves out unchanged TOASTed columns; a record in the same batch has them.
    update = {"id": 2, "a": 2, "_meta": {"op": "update", "unchanged": ["b"]}}
    run(ctx, [[update, {"id": 3, "b": 5}]])
    # Within a batch a key's records fold in order; a delete forgets what came before.
    run(ctx, [[{"id": 4, "a": 7, "b": 7}, {"id": 4, "a": 8},
               {"id": 5, "a": 1, "b": 1}, {"id": 5, "_meta": {"op": "delete"}}, {"id": 5, "a": 2}]])
    rows = pg_schema.rows(f'SELECT id, a, b FROM "{pg_schema.schema}".orders ORDER BY id')
    assert rows == [(1, 2, 1), (2, 2, 1), (3, None, 5), (4, 8, 7), (5, 2, None)]


def test_a_cdc_update_that_changes_the_key_deletes_the_old_row(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, "mirror", {"type": "merge", "merge_key": "id"})
    run(ctx, [[{"id": 3, "v": "x"}, {"id": 9, "v": "y"}]])
    moved = {"id": 4, "v": "x", "_meta": {"op": "update", "old": {"id": 3}}}
    same = {"id": 9, "v": "z", "_meta": {"op": "update", "old": {"id": 9, "v": "y"}}}
    assert run(ctx, [[moved, same]]) == []
    assert pg_schema.rows(f'SELECT id, v FROM "{pg_schema.schema}".mirror ORDER BY id') == [
        (4, "x"), (9, "z")]


def test_merge_deletes_from_a_table_with_not_null_columns(pg_schema: Any) -> None:
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".nn '
                     "(id bigint PRIMARY KEY, name text NOT NULL)")
        conn.execute(f"INSERT INTO \"{pg_schema.schema}\".nn VALUES (1, 'a'), (2, 'b')")
    ctx = ctx_for(pg_schema, "nn", {"type": "merge", "merge_key": "id"})
    assert run(ctx, [[{"id": 1, "_meta": {"op": "delete"}}, {"id": 3, "name": "c"}]]) == []
    assert pg_schema.rows(f'SELECT id, name FROM "{pg_schema.schema}".nn ORDER BY id') == [
        (2, "b"), (3, "c")]


def test_new_columns_take_the_type_all_their_values_fit(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema)
    run(ctx, [[{"id": 1, "price": 10, "tag": 1}, {"id": 2, "price": 10.5, "tag": "x"}]])
    cols = pg_schema.rows(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'orders' ORDER BY ordinal_position",
        pg_schema.schema)
    assert cols == [("id", "bigint"), ("price", "double precision"), ("tag", "jsonb")]
    assert pg_schema.rows(f'SELECT price, tag FROM "{pg_schema.schema}".orders ORDER BY id') == [
        (10.0, 1), (10.5, "x")]


def test_an_overwrite_run_that_writes_nothing_empties_the_table(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "overwrite"})
    run(ctx, [[{"id": 1}, {"id": 2}]])
    assert run(ctx, [[]]) == []
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders') == []
    # append keeps the rows of earlier runs
    append = ctx_for(pg_schema, "log", step="log")
    run(append, [[{"id": 1}]])
    run(append, [[]])
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".log') == [(1,)]


def test_merge_into_a_table_without_the_key_index_says_so(pg_schema: Any) -> None:
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".nokey (id bigint, v text)')
    ctx = ctx_for(pg_schema, "nokey", {"type": "merge", "merge_key": "id"})
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [[{"id": 1, "v": "a"}]])
    causes = messages(info.value)
    assert any("has no primary key or unique index on (id)" in c for c in causes), causes


def test_merge_on_a_deferrable_key_constraint_says_so_at_once(pg_schema: Any) -> None:
    """ON CONFLICT refuses a deferrable arbiter (SQLSTATE 55000): not retried as transient."""
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".deferred (id bigint, v text, '
                     "CONSTRAINT deferred_id UNIQUE (id) DEFERRABLE INITIALLY IMMEDIATE)")
    ctx = ctx_for(pg_schema, "deferred", {"type": "merge", "merge_key": "id"})
    retries: list[int] = []
    with patch("dataflare.connectors.sql_writer.TableWriter._reconnect",
               lambda self, exc=None: retries.append(1)), \
            pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [[{"id": 1, "v": "a"}]])
    causes = messages(info.value)
    assert any("step 'warehouse'" in c and "unique constraint on (id) is DEFERRABLE" in c
               for c in causes), causes
    assert retries == []


def test_a_write_that_fails_after_every_retry_names_the_step_and_table() -> None:
    config = {"dsn": "postgresql://postgres@127.0.0.1:1/test", "table": "t"}  # nothing listens
    ctx = BuildContext("warehouse", "destination", models.Destination(type="postgres",
                                                                      config=config),
                       PostgresDestinationConfig(**config),
                       models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY)), Path("."))
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [[{"id": 1}]])
    causes = messages(info.value)
    assert any(c.startswith("step 'warehouse': write to postgres table public.t failed: "
                            "OperationalError: ") for c in causes), causes


def test_a_missing_database_is_said_at_once_not_retried() -> None:
    # A wrong password or database was retried for a minute as if the server were down.
    config = {"dsn": "postgresql://postgres@127.0.0.1:5432/no_such_db_dest", "table": "t"}
    ctx = BuildContext("warehouse", "destination", models.Destination(type="postgres",
                                                                      config=config),
                       PostgresDestinationConfig(**config),
                       models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY)), Path("."))
    retries: list[int] = []
    with patch("dataflare.connectors.sql_writer.TableWriter._reconnect",
               lambda self, exc=None: retries.append(1)), \
            pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [[{"id": 1}]])
    causes = messages(info.value)
    assert any('database "no_such_db_dest" does not exist' in c and "step 'warehouse'" in c
               for c in causes), causes
    assert retries == []


def test_a_missing_schema_is_created(pg_schema: Any) -> None:
    schema = f"{pg_schema.schema}_new"
    config = {"dsn": pg_schema.dsn, "schema": schema, "table": "t"}
    ctx = BuildContext("w", "destination", models.Destination(type="postgres", config=config),
                       PostgresDestinationConfig(**config),
                       models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY)), Path("."))
    try:
        assert run(ctx, [[{"id": 1}]]) == []
        assert pg_schema.rows(f'SELECT id FROM "{schema}".t') == [(1,)]
    finally:
        with pg_schema.connect() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_refused_records_follow_the_destination_error_policy(pg_schema: Any,
                                                             tmp_path: Path) -> None:
    from tests.fixtures.workflows import read_jsonl, run_cli

    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".t (id bigint)')
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n{"id": "two"}\n{"id": 3}\n{"id": 4}\n')
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  id: refusals
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    pg:
      type: postgres
      inputs: [src]
      config: {{dsn: "{pg_schema.dsn}", schema: {pg_schema.schema}, table: t}}
      error_handling: {{strategy: redirect, redirect_to: rejects}}
    rejects: {{type: file, config: {{path: rejects.jsonl}}}}
""")
    result = run_cli("run", "flow.yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".t ORDER BY id') == [
        (1,), (3,), (4,)]
    [dead] = read_jsonl(tmp_path / "rejects.jsonl")
    assert dead["record"] == {"id": "two"} and dead["error"]["step"] == "pg"
    assert "invalid input syntax for type bigint" in dead["error"]["message"]


def test_a_dead_letter_holding_a_nul_character_is_kept_in_postgresql(pg_schema: Any,
                                                                    tmp_path: Path) -> None:
    # PostgreSQL holds no NUL: the dead-letter table refused the letter and every resume
    # stopped on it.
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n{"id": "x\\u0000y"}\n')
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  transformations:
    typed:
      type: mapping
      inputs: [src]
      config: {{mappings: [{{source: id, destination: id, transform: to_int}}]}}
      error_handling: {{strategy: redirect, redirect_to: dead}}
  destinations:
    out: {{type: postgres, inputs: [typed], config: {{dsn: "{pg_schema.dsn}",
          schema: {pg_schema.schema}, table: t}}}}
    dead: {{type: postgres, config: {{dsn: "{pg_schema.dsn}", schema: {pg_schema.schema},
           table: dead}}}}
""")
    from tests.fixtures.workflows import run_cli

    result = run_cli("run", "flow.yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert pg_schema.rows(f'SELECT record, error->>\'step\' FROM "{pg_schema.schema}".dead'
                          ) == [({"id": "x\ufffdy"}, "typed")]


def test_a_key_given_as_a_number_and_as_text_is_one_key(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, "m", {"type": "merge", "merge_key": "id"})
    run(ctx, [[{"id": 5, "name": "a"}]])
    batch = [{"id": 5, "name": "b"}, {"id": "5", "name": "c"}, {"id": 6, "name": "d"}]
    assert run(ctx, [batch]) == []
    assert pg_schema.rows(f'SELECT id, name FROM "{pg_schema.schema}".m ORDER BY id') == [
        (5, "c"), (6, "d")]


def test_a_refused_record_folded_with_good_ones_fails_alone(pg_schema: Any) -> None:
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".m '
                     "(id bigint PRIMARY KEY, name text, qty int CHECK (qty >= 0))")
        conn.execute(f"INSERT INTO \"{pg_schema.schema}\".m VALUES (1, 'one', 1)")
    ctx = ctx_for(pg_schema, "m", {"type": "merge", "merge_key": "id"}, on_error="skip")
    errors = run(ctx, [[{"id": 1, "name": "ONE"}, {"id": 1, "qty": -5}, {"id": 2, "qty": 2}]])
    assert [e.record for e in errors] == [{"id": 1, "qty": -5}]
    assert pg_schema.rows(f'SELECT id, name, qty FROM "{pg_schema.schema}".m ORDER BY id') == [
        (1, "ONE", 1), (2, None, 2)]


def test_dotted_table_names_and_a_merge_key_naming_a_dotted_column(pg_schema: Any) -> None:
    # 'schema.table' without 'schema': the table 'orders' in that schema
    config = {"dsn": pg_schema.dsn, "table": f"{pg_schema.schema}.orders"}
    component = models.Destination(type="postgres", config=config)
    workflow = models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY))
    ctx = BuildContext("split", "destination", component, PostgresDestinationConfig(**config),
                       workflow, Path("."))
    assert run(ctx, [[{"id": 1}]]) == []
    assert pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders') == [(1,)]

    # with 'schema' given, the dot belongs to the name; a merge key 'order.id' that is a
    # field of the records (a column named with a dot) is that column, not a path
    ctx = ctx_for(pg_schema, table="orders.v2",
                  write_mode={"type": "merge", "merge_key": "order.id"})
    assert run(ctx, [[{"order.id": 1, "v": "a"}, {"order.id": 2, "v": "b"}],
                     [{"order.id": 1, "v": "c"}]]) == []
    rows = pg_schema.rows(f'SELECT "order.id", v FROM "{pg_schema.schema}"."orders.v2" '
                          'ORDER BY 1')
    assert rows == [(1, "c"), (2, "b")]


COPY_FLOW = """
workflow:
  sources:
    src:
      type: ${KIND}
      mode: full
      config: {dsn: "${SRC_DSN}", host: "${HOST}", port: "${PORT}", username: "${USER}",
               database: "${DB}", table: "${TABLE}"}
  destinations:
    copy:
      inputs: [src]
      type: postgres
      config: {dsn: "${DSN}", schema: "${SCHEMA}", table: copied,
               columns: {note: "varchar(40)", extra: jsonb}}
"""


def copy_table(tmp_path: Path, pg: Any, kind: str, **env: str) -> None:
    from dataflare.dsl_compiler import compile_file

    flow = tmp_path / "flow.yaml"
    text = COPY_FLOW
    if kind == "postgres":  # dsn only
        text = text.replace(', host: "${HOST}", port: "${PORT}", username: "${USER}",\n'
                            '               database: "${DB}"', "")
    else:
        text = text.replace('dsn: "${SRC_DSN}", ', "")
    flow.write_text(text)
    run_main(compile_file(flow, env={"KIND": kind, "DSN": pg.dsn, "SCHEMA": pg.schema, **env}))


def column_types(pg: Any, table: str) -> dict[str, str]:
    return dict(pg.rows(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
        "format('%%I.%%I', %s::text, %s::text)::regclass AND attnum > 0 AND NOT attisdropped",
        pg.schema, table))


def primary_key_of(pg: Any, table: str) -> list[str]:
    return [r[0] for r in pg.rows(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY (i.indkey) WHERE i.indrelid = format('%%I.%%I', %s::text, "
        "%s::text)::regclass AND i.indisprimary", pg.schema, table)]


def test_a_postgres_to_postgres_copy_keeps_types_key_and_arrays(
    pg_schema: Any, tmp_path: Path
) -> None:
    s = pg_schema.schema
    with pg_schema.connect() as conn:
        conn.execute(
            f'CREATE TABLE "{s}".source (id integer PRIMARY KEY, amount numeric(12,2), '
            "big numeric(30,0), seen timestamptz, day date, ref uuid, blob bytea, "
            "tags text[], doc jsonb, flag boolean, note text)")
        conn.execute(
            f'INSERT INTO "{s}".source VALUES '
            "(1, 12.50, 123456789012345678901234567890, '2024-03-01 12:00:00+02', "
            "'2024-03-01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', "
            "'{a,\"b c\"}', '{\"k\": [1, 2]}', true, 'x'), "
            "(2, 0.10, 42, NULL, NULL, NULL, NULL, '{}', NULL, false, NULL)")
    copy_table(tmp_path, pg_schema, "postgres", SRC_DSN=pg_schema.dsn,
               TABLE=f"{s}.source")
    assert column_types(pg_schema, "copied") == {
        "id": "integer", "amount": "numeric(12,2)", "big": "numeric(30,0)",
        "seen": "timestamp with time zone", "day": "date", "ref": "uuid", "blob": "bytea",
        "tags": "text[]", "doc": "jsonb", "flag": "boolean",
        "note": "character varying(40)",  # the destination's columns hint wins
        "extra": "jsonb",  # a hinted column no record has is created too
    }
    assert primary_key_of(pg_schema, "copied") == ["id"]
    cols = "id, amount, big, seen, day, ref, blob, tags, doc, flag, note"
    assert pg_schema.rows(f'SELECT {cols} FROM "{s}".copied ORDER BY id') == pg_schema.rows(
        f'SELECT {cols} FROM "{s}".source ORDER BY id')


def test_a_mysql_to_postgres_copy_maps_the_types(
    pg_schema: Any, mariadb_private: Any, tmp_path: Path
) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS typed_copy",
        "CREATE TABLE typed_copy (id INT UNSIGNED PRIMARY KEY, amount DECIMAL(10,2), "
        "seen DATETIME, doc JSON, bin VARBINARY(8), flag TINYINT(1), name VARCHAR(20), "
        "note TEXT, took TIME(2))",
        "INSERT INTO typed_copy VALUES (1, 12.50, '2024-03-01 12:00:00', '{\"k\": [1, 2]}', "
        "X'00FF10', 1, 'ann', 'x', '-12:34:56.78'), "
        "(2, 0.10, NULL, NULL, NULL, 0, NULL, NULL, '838:59:59')",
    )
    copy_table(tmp_path, pg_schema, "mysql", HOST=mariadb_private.host,
               PORT=str(mariadb_private.port), USER=mariadb_private.user,
               DB=mariadb_private.database, TABLE="typed_copy")
    assert column_types(pg_schema, "copied") == {
        "id": "bigint", "amount": "numeric(10,2)", "seen": "timestamp without time zone",
        "doc": "jsonb", "bin": "bytea", "flag": "boolean", "name": "character varying(20)",
        "note": "character varying(40)", "took": "interval", "extra": "jsonb",
    }  # a MySQL TIME is a duration: PostgreSQL's time refused -12:34:56.78
    assert primary_key_of(pg_schema, "copied") == ["id"]
    from datetime import datetime
    from decimal import Decimal

    assert pg_schema.rows(
        f'SELECT id, amount, seen, doc, bin, flag, name, took::text '
        f'FROM "{pg_schema.schema}".copied ORDER BY id') == [
        (1, Decimal("12.50"), datetime(2024, 3, 1, 12), {"k": [1, 2]}, b"\x00\xff\x10", True,
         "ann", "-12:34:56.78"),
        (2, Decimal("0.10"), None, None, None, False, None, "838:59:59")]


@pytest.mark.parametrize("part", [3, 2_000])
def test_copied_values_keep_their_text_nulls_and_types(pg_schema: Any, monkeypatch: Any,
                                                       part: int) -> None:
    monkeypatch.setattr(postgres_destination, "COPY_PART", part)  # 3: sent in two parts
    awkward = "tab\there\nnew line \\N back\\slash \r\b\f\v é"
    records = [
        {"id": 1, "s": awkward, "n": 7, "x": 1.5, "b": True, "j": {"k": [1, "a\tb"]}},
        {"id": 2, "s": "", "n": None, "x": 1e-05, "b": None, "j": None},
        {"id": 3, "s": None, "n": -12, "x": None, "b": False, "j": ["\\"]},
        {"id": 4, "s": "\\N", "n": 3, "x": 2.0, "b": True, "j": "text"},
    ]
    assert run(ctx_for(pg_schema, write_mode={"type": "merge", "merge_key": "id"}),
               [records]) == []
    rows = pg_schema.rows(f'SELECT id, s, n, x, b, j FROM "{pg_schema.schema}".orders '
                          "ORDER BY id")
    assert rows == [(1, awkward, 7, 1.5, True, {"k": [1, "a\tb"]}),
                    (2, "", None, 1e-05, None, None),
                    (3, None, -12, None, False, ["\\"]),
                    (4, "\\N", 3, 2.0, True, "text")]


def test_a_merge_leaves_rows_it_would_not_change_untouched(pg_schema: Any) -> None:
    ctx = ctx_for(pg_schema, write_mode={"type": "merge", "merge_key": "id"})
    run(ctx, [[{"id": 1, "v": "a", "x": 1.5}, {"id": 2, "v": "b", "x": 2.5}]])
    versions = f'SELECT id, xmin::text FROM "{pg_schema.schema}".orders ORDER BY id'
    before = dict(pg_schema.rows(versions))
    run(ctx, [[{"id": 1, "v": "a", "x": 1.5}, {"id": 2, "v": "b", "x": 3.5}]])
    after = dict(pg_schema.rows(versions))
    assert after[1] == before[1]  # the same values: the row was not rewritten
    assert after[2] != before[2]
    assert pg_schema.rows(f'SELECT id, v, x FROM "{pg_schema.schema}".orders ORDER BY id') \
        == [(1, "a", 1.5), (2, "b", 3.5)]


def test_a_merge_of_new_keys_is_copied_straight_and_staged_after_a_miss(
        pg_schema: Any, monkeypatch: Any) -> None:
    """New keys go straight into the table; a key already there rolls that COPY back and
    stages the batch, and the next 4 batches are staged without trying (then 16, 64)."""
    staged: list[int] = []
    fill = PostgresDialect._fill_stage

    def spy(self: Any, columns: list[str], rows: list[dict[str, Any]]) -> None:
        staged.append(rows[0]["batch"])
        fill(self, columns, rows)

    monkeypatch.setattr(PostgresDialect, "_fill_stage", spy)
    ctx = ctx_for(pg_schema, write_mode={"type": "merge", "merge_key": "id"},
                  batch={"size": 2})
    keys = [(100 + 2 * i, 101 + 2 * i) for i in range(26)]  # new keys...
    keys[2] = (100, 5)  # ...but 100, written by batch 0
    keys[7] = (7, 103)  # ...and 103, written by batch 1
    batches = [[{"id": a, "batch": i}, {"id": b, "batch": i}] for i, (a, b) in enumerate(keys)]
    assert run(ctx, batches) == []
    # Batch 2 missed: it and the next 4 were staged; batch 7, the next try, missed: it and
    # the next 16 were staged; batches 24 and 25 went straight in again.
    assert staged == list(range(2, 7)) + list(range(7, 24))
    last = {k: i for i, pair in enumerate(keys) for k in pair}
    rows = pg_schema.rows(f'SELECT id, batch FROM "{pg_schema.schema}".orders ORDER BY id')
    assert rows == sorted(last.items())


def test_a_merge_straight_into_the_table_refuses_what_the_staged_one_would(
        pg_schema: Any) -> None:
    """Another unique index refuses a record either way: it fails alone, as before."""
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".users (id bigint PRIMARY KEY, '
                     "email text UNIQUE)")
    ctx = ctx_for(pg_schema, "users", {"type": "merge", "merge_key": "id"}, on_error="skip")
    failed = run(ctx, [[{"id": 1, "email": "a@x"}, {"id": 2, "email": "b@x"}],
                       [{"id": 3, "email": "c@x"}, {"id": 4, "email": "a@x"}]])
    assert [(f.record["id"], f.type) for f in failed] == [(4, "UniqueViolation")]
    rows = pg_schema.rows(f'SELECT id, email FROM "{pg_schema.schema}".users ORDER BY id')
    assert rows == [(1, "a@x"), (2, "b@x"), (3, "c@x")]


def test_a_merge_into_a_table_with_row_level_security_is_staged(pg_schema: Any,
                                                                 monkeypatch: Any) -> None:
    """COPY FROM does not support row-level security: such a table is merged by INSERT."""
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".secured (id bigint PRIMARY KEY, v text)')
        conn.execute(f'ALTER TABLE "{pg_schema.schema}".secured ENABLE ROW LEVEL SECURITY')
    staged: list[int] = []
    fill = PostgresDialect._fill_stage

    def spy(self: Any, columns: list[str], rows: list[dict[str, Any]]) -> None:
        staged.append(len(rows))
        fill(self, columns, rows)

    monkeypatch.setattr(PostgresDialect, "_fill_stage", spy)
    ctx = ctx_for(pg_schema, "secured", {"type": "merge", "merge_key": "id"})
    assert run(ctx, [[{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]]) == []
    assert staged == [2]
    assert pg_schema.rows(f'SELECT id, v FROM "{pg_schema.schema}".secured ORDER BY id') \
        == [(1, "a"), (2, "b")]


@contextmanager
def restricted_role(pg: Any, table: str, *setup: str) -> Iterator[tuple[PgSchema, str]]:
    """``pg`` as a new login role, and its name, after ``setup`` statements (``{role}``: the
    name) run as the test's superuser; the role goes afterwards, and ``table`` with it."""
    role = f"df_role_{uuid.uuid4().hex[:8]}"
    with pg.connect() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'GRANT USAGE ON SCHEMA "{pg.schema}" TO {role}')
        for sql in setup:
            conn.execute(sql.format(role=role))
    try:
        yield PgSchema(f"{pg.dsn} user={role}", pg.schema), role
    finally:
        with pg.connect() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_a_table_with_row_level_security_takes_the_rows_its_policy_allows(
        pg_schema: Any, mode: str) -> None:
    """As a role the policy applies to: COPY FROM is refused it, and a row the policy refuses
    fails alone (42501, like a missing privilege, which stops the run)."""
    table = f'"{pg_schema.schema}".secured'
    with restricted_role(
        pg_schema, table,
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, tenant text)",
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_a ON {table} TO {{role}} USING (tenant = 'a') "
        "WITH CHECK (tenant = 'a')",
        f"GRANT SELECT, INSERT, UPDATE ON {table} TO {{role}}",
    ) as (restricted, role):
        write_mode = {"type": "merge", "merge_key": "id"} if mode == "merge" else None
        ctx = ctx_for(restricted, "secured", write_mode, on_error="skip")
        failed = run(ctx, [[{"id": 1, "tenant": "a"}, {"id": 2, "tenant": "b"},
                            {"id": 3, "tenant": "a"}]])
        assert [(f.record["id"], f.type) for f in failed] == [(2, "InsufficientPrivilege")]
        assert "row-level security policy" in failed[0].message
        assert pg_schema.rows(f"SELECT id, tenant FROM {table} ORDER BY id") == [
            (1, "a"), (3, "a")]
        with pg_schema.connect() as conn:  # no privilege at all: the run stops
            conn.execute(f"REVOKE INSERT, UPDATE ON {table} FROM {role}")
        with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
            run(ctx, [[{"id": 4, "tenant": "a"}]])
        causes = messages(info.value)
        said = ("lacks UPDATE on the table, which a merge needs" if mode == "merge"
                else "InsufficientPrivilege: permission denied")
        assert any(said in c for c in causes), causes


@pytest.mark.parametrize("mode", ["append", "merge"])
def test_a_refused_batch_under_fail_names_its_first_refused_record(
        pg_schema: Any, mode: str) -> None:
    """The run stops with nothing of the batch written, saying which record it was (not
    the line of PostgreSQL's COPY, which nobody can look up)."""
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".orders (id bigint primary key, '
                     "amount double precision)")
    ctx = ctx_for(pg_schema, write_mode={"type": mode, "merge_key": ["id"]}
                  if mode == "merge" else None)
    batch = [{"id": i, "amount": "abc" if i in (3, 4) else i,
              "_meta": {"file": "orders.jsonl", "line": i}} for i in range(1, 6)]
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [batch])
    said = messages(info.value)
    assert any(c.startswith("step 'warehouse': writing 5 record(s) to postgres table ")
               and c.endswith(' failed on orders.jsonl:3: InvalidTextRepresentation: invalid '
                              'input syntax for type double precision: "abc" (column amount)')
               for c in said), said
    assert pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".orders') == [(0,)]
    for rec in batch:  # without positions: its place in the batch
        del rec["_meta"]
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run(ctx, [batch])
    assert any(" failed on record 3 of the 5: " in c
               for c in messages(info.value)), messages(info.value)
    assert pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".orders') == [(0,)]
    with pg_schema.connect() as conn:  # the positions of the rolled-back pass went with it
        assert conn.execute("SELECT to_regclass(%s)", (f'"{pg_schema.schema}"."_dataflare_'
                                                       'positions"',)).fetchone() == (None,)


def test_a_merge_without_select_on_the_table_is_refused_before_any_key_repeats(
        pg_schema: Any) -> None:
    """New keys would go in by COPY with INSERT alone; the first update would then fail."""
    table = f'"{pg_schema.schema}".orders'
    with restricted_role(pg_schema, table,
                         f"CREATE TABLE {table} (id bigint PRIMARY KEY, v text)",
                         f"GRANT INSERT, UPDATE ON {table} TO {{role}}") as (restricted, role):
        ctx = ctx_for(restricted, write_mode={"type": "merge", "merge_key": "id"})
        with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
            run(ctx, [[{"id": 1, "v": "a"}]])
        assert any(f"postgres table {pg_schema.schema}.orders: the role lacks SELECT on the "
                   "table, which a merge needs" in c for c in messages(info.value))
        assert pg_schema.rows(f"SELECT count(*) FROM {table}") == [(0,)]
        with pg_schema.connect() as conn:
            conn.execute(f"GRANT SELECT ON {table} TO {role}")
        assert run(ctx, [[{"id": 1, "v": "a"}]]) == []
        assert run(ctx, [[{"id": 1, "v": "b"}]]) == []
        assert pg_schema.rows(f"SELECT id, v FROM {table}") == [(1, "b")]


def test_the_summary_counts_what_a_replay_left_out_apart(
        pg_schema: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The records left out as written before a restart were counted as written.
    from tests.fixtures.workflows import run_cli

    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(5)))
    (tmp_path / "flow.yaml").write_text(f"""
workflow:
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    pg:
      type: postgres
      inputs: [src]
      config: {{dsn: "{pg_schema.dsn}", schema: {pg_schema.schema}, table: t}}
      write_mode: {{type: append}}
""")
    monkeypatch.setenv("DATAFLARE_RUN_ID", uuid.uuid4().hex)  # the same run, restarted
    assert run_cli("run", str(tmp_path / "flow.yaml")).code == 0
    again = run_cli("run", str(tmp_path / "flow.yaml"))
    assert again.code == 0, again.stderr
    assert "  pg: 5 received, 5 of them left out as written before a restart" in again.stderr
    assert pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".t') == [(5,)]
