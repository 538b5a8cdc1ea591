"""PostgreSQL source against a private PostgreSQL 15 server (wal_level=logical).

Every test drives the bytewax Source directly (input -> TestingSink) with a BuildContext
made from the DSL models, as the compiler would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, run_main
from pydantic import ValidationError

from dataflare.connectors.pgoutput import lsn_to_int
from dataflare.connectors.postgres import PostgresSourceConfig, build_postgres_source
from dataflare.connectors.schema import discover
from dataflare.dsl_compiler.models import Source, Workflow
from dataflare.records import META
from dataflare.registry import BuildContext, lookup
from tests.fixtures.workflows import run_cli

REPO = Path(__file__).resolve().parents[2]
RETRY = {"max_attempts": 2, "backoff": {"initial": "10ms", "max": "50ms"}}


def make_ctx(step_id: str, config: dict[str, Any], **component: Any) -> BuildContext:
    cfg = PostgresSourceConfig.model_validate(config)
    comp = Source.model_validate({"type": "postgres", "config": cfg, **component})
    wf = Workflow.model_validate({"config": {"retry": RETRY}})
    return BuildContext(step_id, "source", comp, cfg, wf, Path("."))


def run_source(ctx: BuildContext, recovery: Path | None = None) -> list[Any]:
    out: list[Any] = []
    flow = Dataflow("pg_test")
    batches = op.input(ctx.step_id, flow, build_postgres_source(ctx))
    op.output("out", batches, TestingSink(out))
    rc = RecoveryConfig(str(recovery)) if recovery is not None else None
    run_main(flow, epoch_interval=timedelta(0), recovery_config=rc)
    for batch in out:
        assert isinstance(batch, list)
    return [item for batch in out for item in batch]


def chain(exc: BaseException | None) -> str:
    """Every message of an exception chain (bytewax wraps builder errors)."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def plain(records: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != META} for r in records]


def conn_cfg(pg: Any, **extra: Any) -> dict[str, Any]:
    return {"host": pg.host, "port": pg.port, "database": pg.database, "username": pg.user, **extra}


# -- config ----------------------------------------------------------------------------------

SEED_SNIPPETS = [
    {
        "type": "postgres",
        "mode": "incremental",
        "config": {
            "host": "db",
            "port": 5432,
            "database": "production",
            "username": "u",
            "password": "p",
            "schema": "public",
            "table": "customers",
        },
        "incremental": {"column": "updated_at", "cursor_field": "updated_at"},
        "cdc": {
            "slot_name": "etl_replication_slot",
            "publication_name": "etl_publication",
            "plugin": "pgoutput",
        },
    },
    {"type": "postgres", "mode": "full", "config": {"table": "customers"}},
    {
        "type": "postgres",
        "mode": "cdc",
        "config": {"table": "products"},
        "cdc": {
            "slot_name": "replication_slot",
            "publication_name": "etl_publication",
            "plugin": "pgoutput",
            "include_tables": ["public.products", "public.inventory"],
            "exclude_tables": ["public.product_archive"],
            "snapshot_mode": "initial",
        },
    },
    {
        "type": "postgres",
        "mode": "hybrid",
        "config": {"table": "transactions"},
        "hybrid": {"initial_mode": "full", "ongoing_mode": "cdc", "transition_after": "completion"},
    },
    {
        "type": "postgres",
        "mode": "incremental",
        "config": {"table": "users"},
        "incremental": {"column": "updated_at"},
    },
    {"type": "postgres", "config": {"table": "customers", "incremental_column": "updated_at"}},
]


@pytest.mark.parametrize("snippet", SEED_SNIPPETS)
def test_seed_snippets_validate(snippet: dict[str, Any]) -> None:
    spec = lookup("source", "postgres")
    assert spec is not None and spec.config is PostgresSourceConfig
    cfg = PostgresSourceConfig.model_validate(snippet["config"])
    Source.model_validate({**snippet, "config": cfg})


def test_config_rejects_unknown_keys_and_masks_password() -> None:
    with pytest.raises(ValidationError, match="tabel"):
        PostgresSourceConfig.model_validate({"tabel": "x"})
    cfg = PostgresSourceConfig.model_validate({"table": "t", "password": "hunter2"})
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.model_dump())
    assert "password=hunter2" in cfg.conninfo()
    dsn = PostgresSourceConfig.model_validate({"dsn": "postgresql://a@h:7/db", "port": 9})
    assert "port=9" in dsn.conninfo() and "host=h" in dsn.conninfo()


# -- full ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people(pg_private: Any) -> str:
    pg_private.execute(
        "DROP TABLE IF EXISTS people",
        "CREATE TABLE people (id int PRIMARY KEY, name text, score numeric(6,2), "
        "born date, tags text[], extra jsonb, seen timestamptz)",
        "INSERT INTO people SELECT g, 'p' || g, g / 4.0, date '2000-01-01' + g, "
        "ARRAY['a', 'b'], jsonb_build_object('n', g), "
        "timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute' "
        "FROM generate_series(1, 2500) g",
    )
    return "people"


def test_full_reads_every_row_in_batches(pg_private: Any, people: str) -> None:
    ctx = make_ctx("people_full", conn_cfg(pg_private, table=people, batch_size=300), mode="full")
    records = run_source(ctx)
    assert sorted(r["id"] for r in records) == list(range(1, 2501))
    first = next(r for r in records if r["id"] == 2)
    assert plain([first]) == [
        {
            "id": 2,
            "name": "p2",
            "score": 0.5,
            "born": "2000-01-03",
            "tags": ["a", "b"],
            "extra": {"n": 2},
            "seen": "2024-01-01T00:02:00+00:00",
        }
    ]
    assert first[META] == {"table": "public.people"}


def test_full_split_into_key_ranges_across_two_workers(pg_private: Any, people: str) -> None:
    from bytewax.testing import cluster_main

    ctx = make_ctx(
        "people_ranges",
        conn_cfg(pg_private, table=people, batch_size=200, partitions=4),
        mode="full",
    )
    src = build_postgres_source(ctx)
    parts = src.list_parts()
    assert len(parts) == 4 and parts[0].endswith("[:626)") and parts[-1].endswith("[1876:)")
    out: list[Any] = []
    flow = Dataflow("ranges")
    op.output("out", op.input("people_ranges", flow, src), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    ids = [r["id"] for b in out for r in b]
    assert sorted(ids) == list(range(1, 2501))


def test_full_resumes_after_the_last_key(pg_private: Any, people: str, tmp_path: Path) -> None:
    ctx = make_ctx(
        "people_resume", conn_cfg(pg_private, table=people, batch_size=1000), mode="full"
    )
    src = build_postgres_source(ctx)
    (part_name,) = src.list_parts()
    part = src.build_part("people_resume", part_name, None)
    first = part.next_batch()[0]
    state = part.snapshot()
    part.close()
    assert state == {"after": [1000], "done": False}
    resumed = src.build_part("people_resume", part_name, state)
    rest: list[Any] = []
    while True:
        try:
            rest.extend(r for b in resumed.next_batch() for r in b)
        except StopIteration:
            break
    assert [r["id"] for r in first + rest] == list(range(1, 2501))
    done = src.build_part("people_resume", part_name, resumed.snapshot())
    with pytest.raises(StopIteration):
        done.next_batch()


def test_key_columns_that_repeat_resume_after_the_primary_key_too(
        pg_private: Any, caplog: pytest.LogCaptureFixture) -> None:
    # A resume after (g) alone skipped the rest of the rows of the last g read.
    pg_private.execute(
        "DROP TABLE IF EXISTS grp", "DROP TABLE IF EXISTS nopk",
        "CREATE TABLE grp (id int PRIMARY KEY, g int NOT NULL)",
        "INSERT INTO grp SELECT i, i % 3 FROM generate_series(1, 30) i",
        "CREATE TABLE nopk (a int)", "INSERT INTO nopk VALUES (1), (2)")
    cfg = {**conn_cfg(pg_private, table="grp", batch_size=4), "key_columns": ["g"]}
    src = build_postgres_source(make_ctx("grp", cfg, mode="full"))
    (name,) = src.list_parts()
    part = src.build_part("grp", name, None)
    seen = [r["id"] for b in part.next_batch() for r in b]
    state = part.snapshot()
    part.close()
    resumed = src.build_part("grp", name, state)
    while True:
        try:
            seen.extend(r["id"] for b in resumed.next_batch() for r in b)
        except StopIteration:
            break
    assert sorted(seen) == list(range(1, 31))
    nopk = build_postgres_source(make_ctx("nopk", conn_cfg(pg_private, table="nopk"),
                                          mode="full"))
    (name,) = nopk.list_parts()
    nopk.build_part("nopk", name, None).next_batch()
    assert "public.nopk has no primary key and no key_columns are set: a resumed read " \
        "starts the table again" in caplog.text


def test_missing_table_is_a_clear_error(pg_private: Any) -> None:
    ctx = make_ctx("nope", conn_cfg(pg_private, table="no_such_table"), mode="full")
    with pytest.raises(Exception) as info:
        run_source(ctx)
    assert "step 'nope': table public.no_such_table does not exist" in chain(info.value)


def test_unreachable_server_is_retried_then_fails(pg_private: Any) -> None:
    from tests.fixtures.pg_private import free_port

    cfg = conn_cfg(pg_private, table="people", connect_timeout="1s")
    cfg["port"] = free_port()
    ctx = make_ctx("down", cfg, mode="full")
    with pytest.raises(Exception) as info:
        run_source(ctx)
    assert "step 'down': looking up the key of public.people failed: OperationalError" in chain(
        info.value
    )


def test_a_missing_database_is_terminal_not_retried(
    pg_private: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = make_ctx(
        "nodb", {**conn_cfg(pg_private, table="people"), "database": "nope_db"}, mode="full"
    )
    with caplog.at_level("WARNING"), pytest.raises(Exception) as info:
        run_source(ctx)
    assert 'database "nope_db" does not exist' in chain(info.value)
    assert "retry" not in caplog.text


# -- incremental -----------------------------------------------------------------------------


def test_incremental_keeps_ties_and_resumes_from_its_cursor(
    pg_private: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pg_private.execute(
        "DROP TABLE IF EXISTS events_inc",
        "CREATE TABLE events_inc (id int PRIMARY KEY, updated_at timestamptz, v text)",
        # 7 rows share one cursor value: a batch of 3 ends in the middle of them.
        "INSERT INTO events_inc SELECT g, timestamptz '2024-01-01 00:00:00+00' "
        "+ (CASE WHEN g BETWEEN 2 AND 8 THEN 1 ELSE g END) * interval '1 hour', 'v' "
        "FROM generate_series(1, 10) g",
        "INSERT INTO events_inc VALUES (0, '2023-06-01 00:00:00+00', 'old')",
    )
    ctx = make_ctx(
        "events_inc",
        conn_cfg(pg_private, table="events_inc", batch_size=3),
        mode="incremental",
        incremental={
            "column": "updated_at",
            "cursor_field": "updated_at",
            "cursor_type": "timestamp",
            "start_value": "2024-01-01T00:00:00Z",
            "interval": "1h",
        },
    )
    src = build_postgres_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("events_inc", name, None)
    # updated_at may be NULL: such rows are never read, and a fresh start says so
    assert "the incremental column updated_at of public.events_inc may be NULL" in caplog.text
    first = [r["id"] for b in part.next_batch() for r in b]
    assert first == [1, 2, 3]  # ids 1..8 share one cursor value; the batch ends inside it
    state = part.snapshot()
    part.close()
    pg_private.execute("INSERT INTO events_inc VALUES (11, '2024-01-01 01:00:00+00', 'tie')")
    resumed = src.build_part("events_inc", name, state)
    seen: list[int] = []
    for _ in range(4):
        for batch in resumed.next_batch():
            seen.extend(r["id"] for r in batch)
    # The tie inserted after the snapshot sorts after (01:00, 3): read, as are 4..8.
    assert seen == [4, 5, 6, 7, 8, 11, 9, 10]  # row 0 is before start_value
    assert resumed.next_awake() is not None  # caught up: waits `interval`
    state = resumed.snapshot()
    resumed.close()
    pg_private.execute(
        "INSERT INTO events_inc VALUES (12, '2025-01-01 00:00:00+00', 'new')",
        "UPDATE events_inc SET updated_at = '2025-01-02 00:00:00+00', v = 'changed' WHERE id = 1",
    )
    again = src.build_part("events_inc", name, state)
    later = [r for b in again.next_batch() for r in b]
    again.close()
    assert [(r["id"], r["v"]) for r in later] == [(12, "new"), (1, "changed")]


@pytest.mark.parametrize("column", ["timestamp", "timestamptz"])
def test_a_start_value_with_a_utc_offset_holds_for_a_naive_time_column(
        pg_private: Any, column: str) -> None:
    # PostgreSQL casts such a text to `timestamp` with the offset dropped: a start of
    # 12:00+02:00 read from 12:00 UTC, and the rows of 10:00-12:00 were never read.
    pg_private.execute(
        "DROP TABLE IF EXISTS events_off",
        f"CREATE TABLE events_off (id int PRIMARY KEY, at {column})",
        "INSERT INTO events_off SELECT g, timestamp '2024-01-01 09:00' + g * interval '1 hour' "
        "FROM generate_series(0, 4) g",
    )
    ctx = make_ctx("events_off", conn_cfg(pg_private, table="events_off"), mode="incremental",
                   incremental={"column": "at", "start_value": "2024-01-01T12:00:00+02:00"})
    src = build_postgres_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("events_off", name, None)
    assert [r["id"] for b in part.next_batch() for r in b] == [1, 2, 3, 4]  # from 10:00 UTC
    part.close()


def test_incremental_runs_with_recovery_and_resumes(pg_private: Any, tmp_path: Path) -> None:
    pg_private.execute(
        "DROP TABLE IF EXISTS orders_inc",
        "CREATE TABLE orders_inc (id serial PRIMARY KEY, seq bigint NOT NULL)",
        "INSERT INTO orders_inc (seq) SELECT g FROM generate_series(1, 50) g",
    )
    init_db_dir(tmp_path, 1)
    ctx = make_ctx(
        "orders_inc",
        conn_cfg(pg_private, table="orders_inc", batch_size=20),
        incremental={"column": "seq", "cursor_type": "integer", "interval": "1h"},
    )
    src = build_postgres_source(ctx)
    assert src.mode == "incremental"

    class Stop(Exception):
        pass

    def run_until(n: int) -> list[int]:
        got: list[int] = []

        def take(batch: list[Any]) -> list[Any]:
            got.extend(r["seq"] for r in batch)
            if len(got) >= n:
                raise Stop
            return batch

        flow = Dataflow("inc")
        s = op.map("take", op.input("orders_inc", flow, build_postgres_source(ctx)), take)
        op.output("out", s, TestingSink([]))
        with pytest.raises(Exception) as info:
            run_main(
                flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(tmp_path))
            )
        assert "Stop" in chain(info.value)
        return got

    first = run_until(50)
    assert first == list(range(1, 51))
    pg_private.execute("INSERT INTO orders_inc (seq) SELECT g FROM generate_series(51, 60) g")
    second = run_until(10)
    # The last committed snapshot is at most one batch behind: nothing lost, at most the
    # uncommitted batch again.
    assert second[-10:] == list(range(51, 61))
    assert set(second) <= set(range(31, 61))


# -- cdc -------------------------------------------------------------------------------------


def slot_confirmed(pg: Any, slot: str) -> int | None:
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    return None if row is None else lsn_to_int(row[0])


def drop_slot(pg: Any, slot: str, publication: str) -> None:
    with pg.connect() as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )
        conn.execute(f"DROP PUBLICATION IF EXISTS {publication}")


def cdc_ctx(pg: Any, step: str, slot: str, tables: list[str], **cdc: Any) -> BuildContext:
    return make_ctx(
        step,
        conn_cfg(pg, table=tables[0].split(".")[1], batch_size=50, stop_at_end=True),
        mode="cdc",
        cdc={
            "slot_name": slot,
            "publication_name": f"{slot}_pub",
            "include_tables": tables,
            "snapshot_mode": "never",
            "poll_interval": "10ms",
            **cdc,
        },
    )


def test_cdc_inserts_updates_deletes_and_truncate(pg_private: Any, tmp_path: Path) -> None:
    slot = "cdc_basic"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS products, inventory, product_archive",
        "CREATE TABLE products (id int PRIMARY KEY, name text, price numeric(8,2), "
        "updated timestamptz)",
        "CREATE TABLE inventory (sku text, wh int, qty int, PRIMARY KEY (sku, wh))",
        "CREATE TABLE product_archive (id int PRIMARY KEY)",
    )
    ctx = cdc_ctx(
        pg_private,
        "products_cdc",
        slot,
        ["public.products", "public.inventory", "public.product_archive"],
        exclude_tables=["public.product_archive"],
    )
    init_db_dir(tmp_path, 1)
    assert run_source(ctx, tmp_path) == []  # creates slot and publication
    with pg_private.connect(autocommit=False) as conn:  # one multi-statement transaction
        conn.execute(
            "INSERT INTO products VALUES (1, 'apple', 1.25, '2024-05-01 10:00+00'), "
            "(2, 'pear', 2.00, NULL)"
        )
        conn.execute("INSERT INTO inventory VALUES ('a-1', 1, 10), ('a-1', 2, 5)")
        conn.execute("INSERT INTO product_archive VALUES (99)")
        conn.commit()
    pg_private.execute(
        "UPDATE products SET price = 1.50 WHERE id = 1",
        "DELETE FROM inventory WHERE sku = 'a-1' AND wh = 2",
        "DELETE FROM products WHERE id = 2",
        "TRUNCATE products, inventory",
    )
    before = slot_confirmed(pg_private, slot)
    records = run_source(ctx, tmp_path)
    got = [(r[META]["op"], r[META]["table"], plain([r])[0]) for r in records]
    assert got == [
        (
            "insert",
            "public.products",
            {"id": 1, "name": "apple", "price": 1.25, "updated": "2024-05-01T10:00:00+00:00"},
        ),
        ("insert", "public.products", {"id": 2, "name": "pear", "price": 2, "updated": None}),
        ("insert", "public.inventory", {"sku": "a-1", "wh": 1, "qty": 10}),
        ("insert", "public.inventory", {"sku": "a-1", "wh": 2, "qty": 5}),
        (
            "update",
            "public.products",
            {"id": 1, "name": "apple", "price": 1.5, "updated": "2024-05-01T10:00:00+00:00"},
        ),
        ("delete", "public.inventory", {"sku": "a-1", "wh": 2}),  # the key only
        ("delete", "public.products", {"id": 2}),
        ("truncate", "public.products", {}),
        ("truncate", "public.inventory", {}),
    ]
    first_tx = {r[META]["xid"] for r in records[:4]}
    assert len(first_tx) == 1  # the multi-statement transaction keeps its xid
    lsns = [lsn_to_int(r[META]["lsn"]) for r in records]
    assert lsns == sorted(lsns)
    assert all(r[META]["commit_ts"].endswith("+00:00") for r in records)
    # A clean rerun resumes after everything: no duplicates; the slot moved past them.
    assert run_source(ctx, tmp_path) == []
    after = slot_confirmed(pg_private, slot)
    assert before is not None and after is not None and after > before
    assert after >= max(lsns)


def test_cdc_initial_snapshot_then_changes(
    pg_private: Any, tmp_path: Path
) -> None:
    slot = "cdc_snap"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS snap_items",
        "CREATE TABLE snap_items (id int PRIMARY KEY, label text)",
        "INSERT INTO snap_items SELECT g, 'l' || g FROM generate_series(1, 120) g",
    )
    ctx = make_ctx(
        "snap_items",
        conn_cfg(pg_private, table="snap_items", batch_size=50, stop_at_end=True),
        mode="hybrid",
        hybrid={"initial_mode": "full", "ongoing_mode": "cdc", "transition_after": "completion"},
        cdc={"slot_name": slot, "publication_name": f"{slot}_pub", "poll_interval": "10ms"},
    )
    init_db_dir(tmp_path, 1)
    first = run_source(ctx, tmp_path)
    assert [r[META]["op"] for r in first] == ["read"] * 120
    assert sorted(r["id"] for r in first) == list(range(1, 121))
    pg_private.execute(
        "INSERT INTO snap_items VALUES (121, 'l121'), (122, 'bad label')",
        "UPDATE snap_items SET label = 'l1b' WHERE id = 1",
    )
    second = run_source(ctx, tmp_path)
    assert [(r[META]["op"], r["id"], r["label"]) for r in second] == [
        ("insert", 121, "l121"), ("insert", 122, "bad label"), ("update", 1, "l1b")]


def test_cdc_snapshot_phase_resumes_after_its_last_key(pg_private: Any) -> None:
    slot = "cdc_snap_resume"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS snap_resume",
        "CREATE TABLE snap_resume (id int PRIMARY KEY)",
        "INSERT INTO snap_resume SELECT g FROM generate_series(1, 120) g",
    )
    ctx = make_ctx(
        "snap_resume",
        conn_cfg(pg_private, table="snap_resume", batch_size=50),
        mode="cdc",
        cdc={
            "slot_name": slot,
            "publication_name": f"{slot}_pub",
            "snapshot_mode": "initial",
            "poll_interval": "10ms",
        },
    )
    src = build_postgres_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("snap_resume", name, None)
    first = [r["id"] for b in part.next_batch() for r in b]
    state = part.snapshot()
    part.close()
    assert first == list(range(1, 51))
    assert state["phase"] == "snapshot" and state["after"] == [50]
    pg_private.execute("INSERT INTO snap_resume VALUES (121)")  # after the slot: a change
    resumed = src.build_part("snap_resume", name, state)
    rest: list[tuple[str, int]] = []
    for _ in range(4):
        rest.extend((r[META]["op"], r["id"]) for b in resumed.next_batch() for r in b)
    resumed.close()
    reads = [i for op_, i in rest if op_ == "read"]
    # the resumed snapshot reads a new view (121 included), then the change comes again
    assert reads == list(range(51, 122))
    assert [i for op_, i in rest if op_ == "insert"] == [121]


CRASH_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from datetime import timedelta
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig
    from bytewax.testing import TestingSink, run_main
    from tests.connectors.test_postgres_source import make_ctx
    from dataflare.connectors.postgres import build_postgres_source

    cfg, component, out_path, recovery, kill_after = json.loads(sys.argv[1])
    ctx = make_ctx("crash_cdc", cfg, **component)
    seen = 0

    def write(batch):
        global seen
        with open(out_path, "a") as f:
            for r in batch:
                f.write(json.dumps({{"id": r["id"], "lsn": r["_meta"]["lsn"]}}) + "\\n")
        seen += len(batch)
        if kill_after and seen >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return batch

    flow = Dataflow("crash")
    s = op.map("write", op.input("crash_cdc", flow, build_postgres_source(ctx)), write)
    op.output("out", s, TestingSink([]))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(recovery))
    """
)


def test_cdc_resumes_after_sigkill_without_loss(pg_private: Any, tmp_path: Path) -> None:
    slot = "cdc_crash"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS crash_rows",
        "CREATE TABLE crash_rows (id int PRIMARY KEY, v text)",
    )
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(repo=str(REPO)))
    out = tmp_path / "out.jsonl"
    rec = tmp_path / "recovery"
    rec.mkdir()
    init_db_dir(rec, 1)
    cfg = conn_cfg(pg_private, table="crash_rows", batch_size=10, stop_at_end=True)
    component = {
        "mode": "cdc",
        "cdc": {
            "slot_name": slot,
            "publication_name": f"{slot}_pub",
            "snapshot_mode": "never",
            "poll_interval": "10ms",
        },
    }

    def run(kill_after: int) -> int:
        args = json.dumps([cfg, component, str(out), str(rec), kill_after])
        proc = subprocess.run(
            [sys.executable, str(script), args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(proc.stderr[-3000:])
        return proc.returncode

    assert run(0) == 0  # creates the slot
    start = slot_confirmed(pg_private, slot)
    for i in range(1, 101):  # 100 single-row transactions
        pg_private.execute(f"INSERT INTO crash_rows VALUES ({i}, 'v{i}')")
    assert run(45) == -signal.SIGKILL
    crashed = [json.loads(line) for line in out.read_text().splitlines()]
    assert 45 <= len(crashed) < 100
    # The slot moved, but never past what a committed snapshot holds.
    moved = slot_confirmed(pg_private, slot)
    assert moved is not None and start is not None and moved > start
    assert run(0) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert set(ids) == set(range(1, 101))  # nothing lost
    # Precisely: the slot had not passed the first change the crashed run never delivered.
    first_undelivered = max(r["id"] for r in crashed) + 1
    lsn_of = {r["id"]: lsn_to_int(r["lsn"]) for r in rows}
    assert moved <= lsn_of[first_undelivered]
    resumed = ids[len(crashed) :]
    # The rerun starts at the last committed snapshot, not at the beginning: only the
    # batches of the epochs in flight at the kill come again.
    assert len(resumed) < 100 and resumed == sorted(resumed)
    assert len(ids) - 100 <= 20
    # Every change at or below the rerun's state is acknowledged: a third run reads nothing.
    lines = len(rows)
    assert run(0) == 0
    assert len(out.read_text().splitlines()) == lines
    assert slot_confirmed(pg_private, slot) > moved


def test_cdc_reports_slot_lag(pg_private: Any, tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    slot = "cdc_lag"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS lag_rows", "CREATE TABLE lag_rows (id int PRIMARY KEY)"
    )
    ctx = cdc_ctx(pg_private, "lag_rows", slot, ["public.lag_rows"])
    init_db_dir(tmp_path, 1)
    run_source(ctx, tmp_path)
    value = REGISTRY.get_sample_value(
        "dataflare_postgres_slot_lag_bytes", {"step": "lag_rows", "slot": slot}
    )
    assert value is not None and value >= 0


def test_cdc_refuses_a_table_an_existing_publication_misses(pg_private: Any) -> None:
    # It was a warning: the snapshot read the table, then its changes never came.
    drop_slot(pg_private, "warn_slot", "warn_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS warn_rows",
        "CREATE TABLE warn_rows (id int PRIMARY KEY)",
        "CREATE PUBLICATION warn_pub",
    )
    ctx = make_ctx(
        "warn_rows",
        conn_cfg(pg_private, table="warn_rows"),
        mode="cdc",
        cdc={"slot_name": "warn_slot", "publication_name": "warn_pub", "snapshot_mode": "never"},
    )
    src = build_postgres_source(ctx)
    with pytest.raises(LookupError, match="publication 'warn_pub' does not publish "
                       "public.warn_rows, so their changes would never be read: ALTER "
                       "PUBLICATION warn_pub ADD TABLE public.warn_rows"):
        src.build_part("warn_rows", src.list_parts()[0], None)
    drop_slot(pg_private, "warn_slot", "warn_pub")


def test_cdc_resume_is_refused_when_the_slot_lost_changes(pg_private: Any) -> None:
    # A slot dropped (by a DBA, or by the server) and made again at the current WAL, or
    # moved on by another reader, no longer holds the changes since the saved position:
    # resuming would silently skip them.
    slot = "lost_slot"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute("DROP TABLE IF EXISTS lost_rows",
                       "CREATE TABLE lost_rows (id int PRIMARY KEY)")
    ctx = cdc_ctx(pg_private, "lost_rows", slot, ["public.lost_rows"])
    src = build_postgres_source(ctx)
    part = src.list_parts()[0]
    src.build_part("lost_rows", part, None).close()  # creates the slot
    saved = {"phase": "stream", "lsn": slot_confirmed(pg_private, slot)}
    src.build_part("lost_rows", part, saved).close()  # the slot is where the state is: fine
    pg_private.execute("INSERT INTO lost_rows VALUES (1)")
    with pg_private.connect() as conn:  # another reader takes the change
        conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (slot,))
    with pytest.raises(LookupError, match=f"cannot resume: replication slot '{slot}' was "
                       "moved to .* by another reader; the server no longer holds the "
                       "changes since the saved position"):
        src.build_part("lost_rows", part, saved)
    drop_slot(pg_private, slot, f"{slot}_pub")
    with pytest.raises(LookupError, match=f"'{slot}' no longer exists .* fresh recovery"):
        src.build_part("lost_rows", part, saved)
    assert slot_confirmed(pg_private, slot) is None  # not made again behind the user's back
    src.build_part("lost_rows", part, None).close()  # a fresh start makes it
    assert slot_confirmed(pg_private, slot) is not None
    drop_slot(pg_private, slot, f"{slot}_pub")


def test_cdc_refuses_to_publish_a_table_without_replica_identity(pg_private: Any) -> None:
    # Publishing a table without a key makes PostgreSQL fail the applications' UPDATE and
    # DELETE on it: the publication is not created, and the message says what to do.
    slot = "nokey_slot"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute("DROP TABLE IF EXISTS nokey_rows, keyed_rows",
                       "CREATE TABLE nokey_rows (id int, v text)",
                       "CREATE TABLE keyed_rows (id int PRIMARY KEY)")
    ctx = cdc_ctx(pg_private, "nokey", slot, ["public.keyed_rows", "public.nokey_rows"])
    src = build_postgres_source(ctx)
    with pytest.raises(ValueError, match="publication 'nokey_slot_pub' is not created: "
                       "public.nokey_rows has no primary key or replica identity.*ALTER TABLE "
                       "public.nokey_rows REPLICA IDENTITY FULL"):
        src.build_part("nokey", src.list_parts()[0], None)
    pg_private.execute("INSERT INTO nokey_rows VALUES (1, 'a')",
                       "UPDATE nokey_rows SET v = 'b'")  # the application still writes
    pg_private.execute("ALTER TABLE nokey_rows REPLICA IDENTITY FULL")
    src.build_part("nokey", src.list_parts()[0], None).close()
    pg_private.execute("UPDATE nokey_rows SET v = 'c'", "DELETE FROM nokey_rows")
    drop_slot(pg_private, slot, f"{slot}_pub")


def test_discover_lists_columns_keys_and_json_schema(pg_private: Any, people: str) -> None:
    ctx = make_ctx("people_disc", conn_cfg(pg_private, table=people), mode="full")
    found = discover(ctx)
    (table,) = found["tables"]
    assert table["name"] == "people" and table["primary_key"] == ["id"]
    cols = {c["name"]: c["type"] for c in table["columns"]}
    assert cols["score"] == "numeric(6,2)" and cols["tags"] == "text[]"
    props = table["json_schema"]["properties"]
    assert props["id"] == {"type": "integer"} and props["tags"] == {"type": ["array", "null"]}
    assert props["seen"] == {"type": ["string", "null"], "format": "date-time"}
    # `schema:` beside `table:` names the same table (it was looked up as public.public.people)
    ctx = make_ctx("people_disc2", conn_cfg(pg_private, table=people, schema="public"))
    assert discover(ctx)["tables"][0]["columns"] == table["columns"]


def test_snapshot_modes_and_hybrid_variants(pg_private: Any, tmp_path: Path) -> None:
    pg_private.execute(
        "DROP TABLE IF EXISTS modes_a, modes_b",
        "CREATE TABLE modes_a (id int PRIMARY KEY, ts int NOT NULL)",
        "CREATE TABLE modes_b (id int PRIMARY KEY)",
        "INSERT INTO modes_a VALUES (1, 10), (2, 20)",
        "INSERT INTO modes_b VALUES (7)",
    )
    for slot in ("modes_always", "modes_never", "modes_hnever"):
        drop_slot(pg_private, slot, f"{slot}_pub")
    base = conn_cfg(pg_private, batch_size=10, stop_at_end=True)

    # always: every start reads the tables again (here two, no config.table), then changes
    always = make_ctx(
        "modes_always",
        base,
        mode="cdc",
        cdc={
            "slot_name": "modes_always",
            "publication_name": "modes_always_pub",
            "include_tables": ["modes_a", "public.modes_b"],
            "snapshot_mode": "always",
            "poll_interval": "10ms",
        },
    )
    rec_always = tmp_path / "always"
    rec_always.mkdir()
    init_db_dir(rec_always, 1)
    first = run_source(always, rec_always)
    assert sorted((r[META]["table"], r["id"]) for r in first) == [
        ("public.modes_a", 1),
        ("public.modes_a", 2),
        ("public.modes_b", 7),
    ]
    pg_private.execute("INSERT INTO modes_b VALUES (8)")
    second = run_source(always, rec_always)
    assert [r[META]["op"] for r in second] == ["read", "read", "read", "read", "insert"]

    # never: changes only
    never = make_ctx(
        "modes_never",
        {**base, "table": "modes_a"},
        mode="cdc",
        cdc={
            "slot_name": "modes_never",
            "publication_name": "modes_never_pub",
            "snapshot_mode": "never",
            "poll_interval": "10ms",
        },
    )
    assert run_source(never) == []

    # hybrid that never switches: the snapshot alone, a bounded read
    hnever = make_ctx(
        "modes_hnever",
        {**base, "table": "modes_a"},
        mode="hybrid",
        hybrid={"transition_after": "never"},
        cdc={"slot_name": "modes_hnever", "publication_name": "modes_hnever_pub"},
    )
    assert sorted(r["id"] for r in run_source(hnever)) == [1, 2]
    assert slot_confirmed(pg_private, "modes_hnever") is None  # no slot keeps the WAL

    # hybrid full -> incremental: the whole table first, then rows past the cursor
    hinc = make_ctx(
        "modes_hinc",
        {**base, "table": "modes_a", "stop_at_end": False},  # polls on
        mode="hybrid",
        hybrid={"initial_mode": "full", "ongoing_mode": "incremental"},
        incremental={"column": "ts", "interval": "1h"},
    )
    src = build_postgres_source(hinc)
    (name,) = src.list_parts()
    assert name == "incremental:public.modes_a"
    part = src.build_part("modes_hinc", name, None)
    assert [r["id"] for b in part.next_batch() for r in b] == [1, 2]
    pg_private.execute("INSERT INTO modes_a VALUES (3, 30)")
    assert [r["id"] for b in part.next_batch() for r in b] == [3]
    part.close()


def test_streaming_mode_and_missing_settings_are_rejected(pg_private: Any) -> None:
    with pytest.raises(ValueError, match="mode 'streaming' is not supported by type 'postgres'"):
        build_postgres_source(make_ctx("s", {"table": "t"}, mode="streaming"))
    with pytest.raises(ValueError, match="mode incremental needs incremental.column"):
        build_postgres_source(make_ctx("s", {"table": "t"}, mode="incremental"))
    with pytest.raises(ValueError, match="config.table is required for mode 'full'"):
        build_postgres_source(make_ctx("s", {}, mode="full"))
    shorthand = build_postgres_source(make_ctx("s", {"table": "t", "incremental_column": "u"}))
    assert shorthand.mode == "incremental" and shorthand.incremental_settings()[0] == "u"


def _terminate(pg: Any, application_name_like: str = "%") -> int:
    with pg.connect() as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            (pg.database,),
        ).fetchall()
    return len(rows)


def test_full_read_reconnects_and_continues_after_its_key(pg_private: Any, people: str) -> None:
    ctx = make_ctx(
        "people_reconnect", conn_cfg(pg_private, table=people, batch_size=500), mode="full"
    )
    src = build_postgres_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("people_reconnect", name, None)
    ids = [r["id"] for b in part.next_batch() for r in b]
    assert _terminate(pg_private) >= 1  # the server drops the reading connection
    with pytest.raises(StopIteration):
        while True:
            ids.extend(r["id"] for b in part.next_batch() for r in b)
    part.close()
    assert ids == list(range(1, 2501))  # retried on a new connection from the last key


def test_cdc_reconnects_between_polls_and_runs_on_two_workers(
    pg_private: Any, tmp_path: Path
) -> None:
    from bytewax.testing import cluster_main

    slot = "cdc_reconnect"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute("DROP TABLE IF EXISTS rc_rows", "CREATE TABLE rc_rows (id int PRIMARY KEY)")
    ctx = cdc_ctx(pg_private, "rc_rows", slot, ["public.rc_rows"])
    polling = make_ctx(
        "rc_rows",
        conn_cfg(pg_private, table="rc_rows"),
        mode="cdc",
        cdc={
            "slot_name": slot,
            "publication_name": f"{slot}_pub",
            "snapshot_mode": "never",
            "poll_interval": "10ms",
        },
    )
    src = build_postgres_source(polling)
    (name,) = src.list_parts()
    part = src.build_part("rc_rows", name, None)
    assert part.next_batch() == []
    pg_private.execute("INSERT INTO rc_rows VALUES (1)")
    assert _terminate(pg_private) >= 1
    pg_private.execute("INSERT INTO rc_rows VALUES (2)")
    got = [r["id"] for b in part.next_batch() for r in b]
    state = part.snapshot()
    part.close()
    assert got == [1, 2]
    # the same stream on two workers: one of them owns the slot's partition
    pg_private.execute("INSERT INTO rc_rows VALUES (3)")
    init_db_dir(tmp_path, 2)
    out: list[Any] = []
    flow = Dataflow("two")
    op.output("out", op.input("rc_rows", flow, build_postgres_source(ctx)), TestingSink(out))
    cluster_main(
        flow,
        [],
        0,
        worker_count_per_proc=2,
        epoch_interval=timedelta(0),
        recovery_config=RecoveryConfig(str(tmp_path)),
    )
    assert [r["id"] for b in out for r in b] == [1, 2, 3]  # no state given: from the slot
    assert state["lsn"] > 0


# -- end to end through YAML -----------------------------------------------------------------

E2E_FLOW = """
workflow:
  name: cdc-to-postgres
  config:
    retry: {{max_attempts: 1}}
  sources:
    src:
      type: postgres
      mode: cdc
      config:
        host: 127.0.0.1
        port: {port}
        database: {db}
        username: postgres
        table: e2e_src
        batch_size: 5
        stop_at_end: true
        cdc:
          slot_name: e2e_slot
          publication_name: e2e_pub
          snapshot_mode: initial
          poll_interval: 10ms
  destinations:
    dst:
      type: postgres
      inputs: [src]
      config:
        host: 127.0.0.1
        port: {port}
        database: {db}
        username: postgres
        table: e2e_dst
      write_mode: {{type: merge, merge_key: id}}
"""


def test_yaml_cdc_into_postgres_resumes_after_a_failed_run(pg_private: Any, tmp_path: Path) -> None:
    drop_slot(pg_private, "e2e_slot", "e2e_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS e2e_src, e2e_dst",
        "CREATE TABLE e2e_src (id int PRIMARY KEY, v text)",
        "CREATE TABLE e2e_dst (id int PRIMARY KEY, v text CHECK (v <> 'poison'))",
        "INSERT INTO e2e_src SELECT g, 'snap' || g FROM generate_series(1, 12) g",
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(E2E_FLOW.format(port=pg_private.port, db=pg_private.database))
    rec = tmp_path / "recovery"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(rec), "-s", "0", "-q"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = run()  # the snapshot, and the slot created before it
    assert first.returncode == 0, first.stderr
    slot_at_start = slot_confirmed(pg_private, "e2e_slot")
    statements = []
    for i in range(13, 60):
        statements.append(f"INSERT INTO e2e_src VALUES ({i}, 'v{i}')")
        if i % 4 == 0:
            statements.append(f"UPDATE e2e_src SET v = 'u{i}' WHERE id = {i - 10}")
        if i % 9 == 0:
            statements.append(f"DELETE FROM e2e_src WHERE id = {i - 5}")
        if i == 35:
            statements.append("UPDATE e2e_src SET v = 'poison' WHERE id = 20")
    pg_private.execute(*statements)
    failed = run()
    assert failed.returncode == 1
    assert "dst" in failed.stderr and "poison" in failed.stderr
    with pg_private.connect() as conn:
        partial = conn.execute("SELECT count(*) FROM e2e_dst").fetchone()[0]
        conn.execute("ALTER TABLE e2e_dst DROP CONSTRAINT e2e_dst_v_check")
        conn.execute("UPDATE e2e_src SET v = 'cured' WHERE id = 20")
    assert partial >= 12  # the snapshot went through before the failure
    # Epochs before the failing batch were committed and acknowledged: the rerun resumes
    # from there (and the merge makes the replayed epoch harmless).
    slot_after_failure = slot_confirmed(pg_private, "e2e_slot")
    assert slot_at_start is not None and slot_after_failure is not None
    assert slot_after_failure > slot_at_start
    again = run()
    assert again.returncode == 0, again.stderr
    with pg_private.connect() as conn:
        src = conn.execute("SELECT id, v FROM e2e_src ORDER BY id").fetchall()
        dst = conn.execute("SELECT id, v FROM e2e_dst ORDER BY id").fetchall()
    assert dst == src


MIRROR_TYPES_FLOW = """
workflow:
  name: cdc-mirror-types
  sources:
    src:
      type: postgres
      mode: cdc
      config: {{host: 127.0.0.1, port: {port}, database: {db}, username: postgres,
               stop_at_end: true}}
      cdc: {{slot_name: types_slot, publication_name: types_pub, snapshot_mode: initial,
            include_tables: [public.types_a, public.types_b], poll_interval: 10ms}}
  transformations:
    by_table:
      inputs: [src]
      type: route
      config:
        routes:
          - {{name: a, condition: "_meta.table == 'public.types_a'"}}
          - {{name: b, condition: "_meta.table == 'public.types_b'"}}
  destinations:
    a:
      type: postgres
      inputs: [by_table.a]
      config: {{host: 127.0.0.1, port: {port}, database: {db}, username: postgres,
               schema: types_mirror, table: a}}
      write_mode: {{type: merge, merge_key: id}}
    b:
      type: postgres
      inputs: [by_table.b]
      config: {{host: 127.0.0.1, port: {port}, database: {db}, username: postgres,
               schema: types_mirror, table: b}}
      write_mode: {{type: merge, merge_key: id}}
    a_duck:
      type: duckdb
      inputs: [by_table.a]
      config: {{path: mirror.duckdb, table: a}}
      write_mode: {{type: merge, merge_key: id}}
    b_duck:
      type: duckdb
      inputs: [by_table.b]
      config: {{path: mirror.duckdb, table: b}}
      write_mode: {{type: merge, merge_key: id}}
"""


def test_cdc_mirror_tables_take_each_source_tables_column_types(
    pg_private: Any, tmp_path: Path
) -> None:
    # A change stream of several tables: each mirror table is created with the types of
    # the table its records come from (``_meta.table``), so a numeric(30,6) is not made a
    # double by its first value (1.5) and a later exact value is not rounded.
    drop_slot(pg_private, "types_slot", "types_pub")
    pg_private.execute(
        "DROP SCHEMA IF EXISTS types_mirror CASCADE",
        "DROP TABLE IF EXISTS types_a, types_b",
        "CREATE TABLE types_a (id int PRIMARY KEY, amt numeric(30,6), at timestamptz, u uuid, "
        "raw bytea)",
        "CREATE TABLE types_b (id bigint PRIMARY KEY, n numeric, note varchar(20))",
        "INSERT INTO types_a VALUES (1, 1.5, '2024-05-01 10:00+02', "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\xdeadbeef')",
        "INSERT INTO types_b VALUES (1, 2.25, 'x')",
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(MIRROR_TYPES_FLOW.format(port=pg_private.port, db=pg_private.database))

    def run() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(tmp_path / "rec"),
             "-s", "0", "-q"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    run()
    pg_private.execute(
        "INSERT INTO types_a VALUES (2, 12345678901234567.123456, NULL, NULL, '')",
        "INSERT INTO types_b VALUES (2, 123456789012345678901234567890.5, 'y')",
    )
    run()
    with pg_private.connect() as conn:
        types = conn.execute(
            "SELECT table_name, column_name, format_type(atttypid, atttypmod) "
            "FROM information_schema.columns c JOIN pg_attribute a ON a.attrelid = "
            "format('%I.%I', table_schema, table_name)::regclass AND a.attname = column_name "
            "WHERE table_schema = 'types_mirror' ORDER BY 1, ordinal_position").fetchall()
        mirrored = conn.execute(
            "SELECT a.id, a.amt::text, a.at, a.u::text, a.raw FROM types_mirror.a ORDER BY 1"
        ).fetchall()
        source = conn.execute(
            "SELECT id, amt::text, at, u::text, raw FROM types_a ORDER BY 1").fetchall()
        b = conn.execute("SELECT n::text FROM types_mirror.b ORDER BY id").fetchall()
    assert types == [
        ("a", "id", "integer"), ("a", "amt", "numeric(30,6)"),
        ("a", "at", "timestamp with time zone"), ("a", "u", "uuid"), ("a", "raw", "bytea"),
        ("b", "id", "bigint"), ("b", "n", "numeric"), ("b", "note", "character varying(20)"),
    ]
    assert mirrored == source
    assert b == [("2.25",), ("123456789012345678901234567890.5",)]
    import duckdb  # DuckDB's mirror: the same types where DuckDB has them

    with duckdb.connect(str(tmp_path / "mirror.duckdb"), read_only=True) as duck:
        assert duck.execute("SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_name = 'a' ORDER BY ordinal_position").fetchall() == [
            ("id", "INTEGER"), ("amt", "DECIMAL(30,6)"), ("at", "TIMESTAMP WITH TIME ZONE"),
            ("u", "UUID"), ("raw", "BLOB")]
        assert duck.execute("SELECT id, amt::VARCHAR, epoch_us(a.at), u::VARCHAR, raw FROM a "
                            "ORDER BY id").fetchall() == [
            (1, "1.500000", 1714550400000000, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
             b"\xde\xad\xbe\xef"),
            (2, "12345678901234567.123456", None, None, b"")]
        # a bare numeric: its exact text (was JSON holding a quoted string, or a double)
        assert duck.execute("SELECT data_type FROM information_schema.columns WHERE "
                            "table_name = 'b' AND column_name = 'n'").fetchone() == ("VARCHAR",)
        assert duck.execute("SELECT n FROM b ORDER BY id").fetchall() == [
            ("2.25",), ("123456789012345678901234567890.5",)]
    drop_slot(pg_private, "types_slot", "types_pub")
    pg_private.execute("DROP SCHEMA types_mirror CASCADE")


FILL_FLOW = """
workflow:
  name: cdc-mirror-fill
  sources:
    src:
      type: postgres
      mode: cdc
      config: {{host: 127.0.0.1, port: {port}, database: {db}, username: postgres,
               stop_at_end: true}}
      cdc: {{slot_name: fill_slot, publication_name: fill_pub, snapshot_mode: initial,
            include_tables: [public.fill_src], poll_interval: 10ms}}
  destinations:
    pg:
      type: postgres
      inputs: [src]
      config: {{host: 127.0.0.1, port: {port}, database: {db}, username: postgres,
               schema: fill_mirror, table: t}}
      write_mode: {{type: merge, merge_key: id}}
    duck:
      type: duckdb
      inputs: [src]
      config: {{path: mirror.duckdb, table: t}}
      write_mode: {{type: merge, merge_key: id}}
"""


def test_a_column_added_with_a_default_fills_the_mirrors_earlier_rows(
    pg_private: Any, tmp_path: Path
) -> None:
    # Rows that predate a column added with a default hold that default in the source, but
    # the change stream never carries them: the mirror gives them the same value.
    drop_slot(pg_private, "fill_slot", "fill_pub")
    pg_private.execute(
        "DROP SCHEMA IF EXISTS fill_mirror CASCADE",
        "DROP TABLE IF EXISTS fill_src",
        "CREATE TABLE fill_src (id int PRIMARY KEY, v text)",
        "INSERT INTO fill_src VALUES (1, 'a'), (2, 'b')",
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(FILL_FLOW.format(port=pg_private.port, db=pg_private.database))

    def run() -> str:
        done = run_cli("run", str(flow), "-r", str(tmp_path / "rec"), "-s", "0")
        assert done.code == 0, done.stderr
        return done.stderr

    run()
    pg_private.execute(
        # a volatile default rewrites the table: each row has its own value
        "ALTER TABLE fill_src ADD COLUMN stamp timestamptz DEFAULT clock_timestamp()",
        # constant defaults: the earlier rows share PostgreSQL's "missing value"
        "ALTER TABLE fill_src ADD COLUMN grade int DEFAULT 7, ADD COLUMN note text "
        "DEFAULT 'it''s', ADD COLUMN amt numeric(8,2) DEFAULT 1.5, ADD COLUMN tags text[] "
        "DEFAULT '{x,\"y z\"}', ADD COLUMN at timestamptz DEFAULT now()",
        "ALTER TABLE fill_src ALTER grade SET DEFAULT 9",  # later rows: not the earlier ones
        "INSERT INTO fill_src (id, v) VALUES (3, 'c')",
        "UPDATE fill_src SET v = 'b2' WHERE id = 2",
    )
    said = run()
    assert "gains column 'stamp'" in said and "take a new snapshot" in said
    columns = "id, v, grade, note, amt::text, tags, at"
    with pg_private.connect() as conn:
        source = conn.execute(f"SELECT {columns} FROM fill_src ORDER BY id").fetchall()
        mirror = conn.execute(f"SELECT {columns} FROM fill_mirror.t ORDER BY id").fetchall()
        stamps = conn.execute("SELECT id FROM fill_mirror.t WHERE stamp IS NULL").fetchall()
        defaults = conn.execute(
            "SELECT count(*) FROM pg_attrdef WHERE adrelid = 'fill_mirror.t'::regclass"
        ).fetchone()[0]
    assert source[0][2:5] == (7, "it's", "1.50")
    assert mirror == source
    assert stamps == [(1,)]  # warned: only a new snapshot has the source's values
    assert defaults == 0  # the mirror's later rows come with their own values
    import duckdb

    with duckdb.connect(str(tmp_path / "mirror.duckdb"), read_only=True) as duck:
        assert duck.execute("SELECT id, v, grade, note, amt::VARCHAR, \"at\" FROM t "
                            "ORDER BY id").fetchall() == [
            (i, v, g, n, a, at) for i, v, g, n, a, _, at in source]
    drop_slot(pg_private, "fill_slot", "fill_pub")
    pg_private.execute("DROP SCHEMA fill_mirror CASCADE", "DROP TABLE fill_src")


def test_an_update_of_the_key_keeps_the_unchanged_toasted_columns_in_the_mirror(
    pg_private: Any, tmp_path: Path
) -> None:
    # pgoutput leaves an unchanged TOASTed value out of an update: the mirror deleted the
    # old key's row and inserted the new key without it (NULL), the source had 96 kB.
    flow = tmp_path / "flow.yaml"
    flow.write_text(FILL_FLOW.replace("fill_", "toast_").format(
        port=pg_private.port, db=pg_private.database))
    drop_slot(pg_private, "toast_slot", "toast_pub")
    big = "string_agg(md5(g::text), '') FROM generate_series(1, 3000) g"
    pg_private.execute(
        "DROP SCHEMA IF EXISTS toast_mirror CASCADE", "DROP TABLE IF EXISTS toast_src",
        "CREATE TABLE toast_src (id int PRIMARY KEY, v text, bio text)",
        f"INSERT INTO toast_src SELECT 1, 'a', {big}")

    def run() -> None:
        done = run_cli("run", str(flow), "-r", str(tmp_path / "rec"), "-s", "0")
        assert done.code == 0, done.stderr

    run()
    pg_private.execute("UPDATE toast_src SET id = 2 WHERE id = 1",
                       f"INSERT INTO toast_src SELECT 5, 'e', {big}",  # in one batch:
                       "UPDATE toast_src SET id = 6, v = 'f' WHERE id = 5")  # made and moved
    run()
    query = "SELECT id, v, length(bio) FROM {} ORDER BY id"
    with pg_private.connect() as conn:
        source = conn.execute(query.format("toast_src")).fetchall()
        mirror = conn.execute(query.format("toast_mirror.t")).fetchall()
    assert source == [(2, "a", 96000), (6, "f", 96000)]
    assert mirror == source
    import duckdb

    with duckdb.connect(str(tmp_path / "mirror.duckdb"), read_only=True) as duck:
        assert duck.execute(query.format("t")).fetchall() == source
    drop_slot(pg_private, "toast_slot", "toast_pub")
    pg_private.execute("DROP SCHEMA toast_mirror CASCADE", "DROP TABLE toast_src")


# -- values Python cannot hold ---------------------------------------------------------------

ODD_TIMES = (
    "CREATE TABLE {t} (id int PRIMARY KEY, tz timestamptz, ts timestamp, d date, ds date[], "
    "t time, iv interval)",
    "INSERT INTO {t} VALUES "
    "(1, 'infinity', '-infinity', 'infinity', '{{-infinity,2024-01-01}}', '24:00:00', NULL), "
    "(2, '2024-01-01 00:00+00', '2024-01-01', '0100-01-01 BC', '{{0044-03-15 BC}}', '12:00', "
    "NULL), "  # before year 1
    "(3, '-infinity', '10000-01-01', '2024-01-02', NULL, NULL, NULL), "  # after year 9999
    "(4, NULL, NULL, NULL, NULL, NULL, NULL), "
    "(5, NULL, NULL, NULL, NULL, NULL, '100000000 years')",  # a timedelta holds 2.7M years
)
ODD_RECORDS = [
    {"id": 1, "tz": "infinity", "ts": "-infinity", "d": "infinity",
     "ds": ["-infinity", "2024-01-01"], "t": "24:00:00", "iv": None},  # a time Python lacks
    {"id": 2, "tz": "2024-01-01T00:00:00+00:00", "ts": "2024-01-01T00:00:00",
     "d": "0100-01-01 BC", "ds": ["0044-03-15 BC"], "t": "12:00:00", "iv": None},
    {"id": 3, "tz": "-infinity", "ts": "10000-01-01 00:00:00", "d": "2024-01-02", "ds": None,
     "t": None, "iv": None},
    {"id": 4, "tz": None, "ts": None, "d": None, "ds": None, "t": None, "iv": None},
]


def check_odd_failures(items: list[Any], step: str, table: str, where: str) -> None:
    """Rows 1-4 as records (the dates Python lacks as PostgreSQL's text); row 5, whose
    interval no timedelta holds, a failure naming step, table, column and row."""
    from dataflare.records import Failed

    assert plain([r for r in items if not isinstance(r, Failed)]) == ODD_RECORDS
    (failed,) = (f for f in items if isinstance(f, Failed))
    assert (failed.step, failed.type) == (step, "DataError")
    assert f"source '{step}': cannot convert column 'iv' of {table} ({where}" in failed.message
    assert "can't parse interval '100000000 years'" in failed.message
    assert failed.record == {**ODD_RECORDS[3], "id": 5, "iv": "100000000 years"}


def test_dates_python_lacks_come_as_text_and_a_bad_value_fails_its_row_alone(
    pg_private: Any, tmp_path: Path
) -> None:
    pg_private.execute(
        "DROP TABLE IF EXISTS odd_times", *(q.format(t="odd_times") for q in ODD_TIMES)
    )
    full = make_ctx("odd", conn_cfg(pg_private, table="odd_times", batch_size=2), mode="full")
    items = run_source(full)
    check_odd_failures(items, "odd", "public.odd_times", "row 5")
    assert [f.meta for f in items if not isinstance(f, dict)] == [
        {"table": "public.odd_times", "row": 5}]

    inc = make_ctx("odd_inc", conn_cfg(pg_private, table="odd_times", batch_size=3),
                   mode="incremental", incremental={"column": "tz", "interval": "1h"})
    src = build_postgres_source(inc)
    part = src.build_part("odd_inc", src.list_parts()[0], None)
    polled = [r for _ in range(3) for b in part.next_batch() for r in b]
    part.close()
    # Ordered by tz: -infinity (3), 2024-01-01 (2), infinity (1); null cursors are not read.
    assert [r["id"] if isinstance(r, dict) else r.record["id"] for r in polled] == [3, 2, 1]
    assert part.snapshot().cursor == "infinity"  # the text resumes the cursor

    # The error policy applies per row: skip keeps the others, fail names the row.
    flow = tmp_path / "flow.yaml"
    for strategy in ("skip", "fail"):
        flow.write_text(textwrap.dedent(f"""\
            workflow:
              sources:
                pg:
                  type: postgres
                  error_handling: {{strategy: {strategy}}}
                  config: {{host: {pg_private.host}, port: {pg_private.port},
                            database: {pg_private.database}, username: postgres,
                            table: odd_times}}
              destinations:
                out: {{type: file, inputs: [pg], config: {{path: out.jsonl}}}}
            """))
        result = subprocess.run(
            [sys.executable, "-m", "dataflare", "run", str(flow), "-q"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if strategy == "skip":
            assert result.returncode == 0, result.stderr
            lines = (tmp_path / "out.jsonl").read_text().splitlines()
            assert [json.loads(line) for line in lines] == ODD_RECORDS
        else:
            assert result.returncode == 1
            assert (
                "step 'pg' failed on the record at table=public.odd_times, row=5: DataError: "
                "source 'pg': cannot convert column 'iv' of public.odd_times (row 5)"
            ) in result.stderr


def test_cdc_snapshot_and_changes_carry_dates_python_lacks_and_fail_bad_rows_alone(
    pg_private: Any,
) -> None:
    slot = "cdc_odd"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute(
        "DROP TABLE IF EXISTS odd_snap, odd_changes",
        *(q.format(t="odd_snap") for q in ODD_TIMES),
        ODD_TIMES[0].format(t="odd_changes"),
    )
    ctx = cdc_ctx(pg_private, "odd_cdc", slot, ["public.odd_snap", "public.odd_changes"],
                  snapshot_mode="initial")
    snapshot = run_source(ctx)  # creates the slot, then reads odd_snap
    check_odd_failures(snapshot, "odd_cdc", "public.odd_snap", "row 5")
    pg_private.execute(ODD_TIMES[1].format(t="odd_changes"))
    changes = run_source(cdc_ctx(pg_private, "odd_cdc", slot, ["public.odd_changes"]))
    check_odd_failures(changes, "odd_cdc", "public.odd_changes", "insert at lsn")


def test_numeric_values_stay_exact_and_encodable(pg_private: Any) -> None:
    import orjson

    pg_private.execute(
        "DROP TABLE IF EXISTS nums",
        "CREATE TABLE nums (id int PRIMARY KEY, big numeric(30,0), free numeric, "
        "price numeric(6,2), whole numeric(10,0))",
        "INSERT INTO nums VALUES "
        "(1, 123456789012345678901234567890, 1234567890123.000001, 10.00, 7), "
        "(2, -9223372036854775808, 0.1, 2.50, NULL), "
        "(3, 9223372036854775808, 'NaN', NULL, NULL), (4, 5, '-Infinity', NULL, NULL)",
    )

    def read(handling: str) -> list[dict[str, Any]]:
        cfg = conn_cfg(pg_private, table="nums", decimal_handling=handling)
        records = plain(run_source(make_ctx("nums", cfg, mode="full")))
        orjson.dumps(records)  # every value is one the JSON encoders take
        return records

    assert read("number") == [
        {"id": 1, "big": "123456789012345678901234567890", "free": "1234567890123.000001",
         "price": 10.0, "whole": 7},
        {"id": 2, "big": -9223372036854775808, "free": 0.1, "price": 2.5, "whole": None},
        {"id": 3, "big": "9223372036854775808", "free": "NaN", "price": None, "whole": None},
        {"id": 4, "big": 5, "free": "-Infinity", "price": None, "whole": None},
    ]
    strings = read("string")
    assert [r["price"] for r in strings] == ["10.00", "2.50", None, None]
    assert strings[0]["free"] == "1234567890123.000001" and strings[3]["big"] == "5"
    floats = read("float")
    assert floats[0]["big"] == 1.2345678901234568e29 and floats[0]["free"] == 1234567890123.0
    assert floats[3]["big"] == 5.0

    ctx = make_ctx("nums", conn_cfg(pg_private, table="nums"), mode="full")
    props = discover(ctx)["tables"][0]["json_schema"]["properties"]
    assert props["big"] == {"type": ["number", "string", "null"]}
    assert props["free"] == {"type": ["number", "string", "null"]}
    assert props["price"] == {"type": ["number", "null"]}
    assert props["whole"] == {"type": ["integer", "null"]}
    ctx = make_ctx("nums", conn_cfg(pg_private, table="nums", decimal_handling="string"))
    assert discover(ctx)["tables"][0]["json_schema"]["properties"]["price"] == {
        "type": ["string", "null"]}


def test_incremental_reads_a_tie_below_the_last_key_once_even_after_a_resume(
    pg_private: Any,
) -> None:
    pg_private.execute(
        "DROP TABLE IF EXISTS ties",
        "CREATE TABLE ties (id int PRIMARY KEY, updated_at timestamptz NOT NULL, v text)",
        "INSERT INTO ties SELECT g, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 s'"
        " / 2, 'a' FROM generate_series(1, 11) g",  # id 11 at 00:00:05.5, id 10 at 00:00:05
        "UPDATE ties SET updated_at = '2024-01-01 00:00:05+00' WHERE id = 11",
    )
    ctx = make_ctx("ties", conn_cfg(pg_private, table="ties", batch_size=4),
                   incremental={"column": "updated_at", "interval": "1h"})
    src = build_postgres_source(ctx)
    (name,) = src.list_parts()

    def drain(part: Any) -> list[tuple[int, str]]:
        got: list[tuple[int, str]] = []
        while True:
            got.extend((r["id"], r["v"]) for b in part.next_batch() for r in b)
            if part.next_awake() is not None:  # the pass ended: caught up
                return got

    part = src.build_part("ties", name, None)
    assert sorted(i for i, _ in drain(part)) == list(range(1, 12))
    # The cursor is at (00:00:05, 11): a row updated to the same second, with a lower key.
    pg_private.execute("UPDATE ties SET updated_at = '2024-01-01 00:00:05+00', v = 'b' "
                       "WHERE id = 4")
    assert drain(part) == [(4, "b")]
    assert drain(part) == []  # read once
    state = part.snapshot()
    part.close()
    pg_private.execute("UPDATE ties SET v = 'c' WHERE id = 4")  # same second, new content
    resumed = src.build_part("ties", name, state)
    assert drain(resumed) == [(4, "c")]
    assert drain(resumed) == []
    resumed.close()


def test_incremental_lookback_reads_a_late_commit(pg_private: Any) -> None:
    pg_private.execute(
        "DROP TABLE IF EXISTS late",
        "CREATE TABLE late (id int PRIMARY KEY, ts bigint NOT NULL)",
        "INSERT INTO late VALUES (1, 100), (2, 200)",
    )
    cfg = conn_cfg(pg_private, table="late")
    src = build_postgres_source(make_ctx("late", cfg, incremental={
        "column": "ts", "interval": "1h", "lookback": "60s"}))
    (name,) = src.list_parts()
    part = src.build_part("late", name, None)
    assert [r["id"] for b in part.next_batch() for r in b] == [1, 2]
    # A transaction that took its cursor value earlier commits now: 150 < 200.
    pg_private.execute("INSERT INTO late VALUES (3, 150), (4, 120)")
    assert [r["id"] for b in part.next_batch() for r in b] == [3]  # 120 is beyond 60 back
    assert [r["id"] for b in part.next_batch() for r in b] == []
    part.close()


def test_a_bounded_incremental_sync_ends_and_the_next_run_goes_on(
    pg_private: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    pg_private.execute(
        "DROP TABLE IF EXISTS sync_src",
        "CREATE TABLE sync_src (id int PRIMARY KEY, seq int NOT NULL)",
        "INSERT INTO sync_src SELECT g, g FROM generate_series(1, 25) g",
    )
    flow = tmp_path / "sync.yaml"
    flow.write_text(f"""
workflow:
  sources:
    rows:
      type: postgres
      mode: incremental
      incremental: {{column: seq, interval: 1h}}
      config: {{dsn: "{pg_private.dsn}", table: sync_src, batch_size: 10, stop_at_end: true}}
  destinations: {{out: {{type: file, inputs: [rows], config: {{path: out.jsonl}}}}}}
""")
    cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(tmp_path / "rec")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr  # ended by itself: no timeout
    pg_private.execute("INSERT INTO sync_src SELECT g, g FROM generate_series(26, 30) g")
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    ids = [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == list(range(1, 31))  # the file resumed too: every row once
    assert "rows: 5" in second.stderr  # the second run read only what came since


def test_dotted_table_names_split_only_without_schema(pg_schema: Any) -> None:
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}"."people.v2" (id int PRIMARY KEY, '
                     "what text)")
        conn.execute(f'INSERT INTO "{pg_schema.schema}"."people.v2" VALUES (1, %s)',
                     ["literal name"])
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".v2 (id int PRIMARY KEY, what text)')
        conn.execute(f'INSERT INTO "{pg_schema.schema}".v2 VALUES (1, %s)', ["schema.table"])
    given = {"dsn": pg_schema.dsn, "schema": pg_schema.schema, "table": "people.v2"}
    assert plain(run_source(make_ctx("literal", given, mode="full"))) == [
        {"id": 1, "what": "literal name"}]
    split = {"dsn": pg_schema.dsn, "table": f"{pg_schema.schema}.v2"}
    assert plain(run_source(make_ctx("split", split, mode="full"))) == [
        {"id": 1, "what": "schema.table"}]


IDLE_FLOW = """\
workflow:
  sources:
    quiet:
      type: postgres
      mode: cdc
      config: {{host: {host}, port: {port}, database: {database}, username: {user},
               table: idle_rows}}
      cdc: {{slot_name: cdc_idle, publication_name: cdc_idle_pub, snapshot_mode: never,
            include_tables: [public.idle_rows], poll_interval: 50ms,
            heartbeat_interval: 100ms}}
  destinations:
    out: {{type: file, inputs: [quiet], config: {{path: {out}}}}}
"""


def slot_lag(pg: Any, slot: str) -> int | None:
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    # listed with a null position while it is being created
    return None if row is None or row[0] is None else int(row[0])


def wait_for(what: str, check: Any, timeout: float = 90) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_an_idle_slot_follows_the_wal_others_write(pg_private: Any, tmp_path: Path) -> None:
    slot = "cdc_idle"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute("DROP TABLE IF EXISTS idle_rows",
                       "CREATE TABLE idle_rows (id int PRIMARY KEY)",
                       "INSERT INTO idle_rows VALUES (1)")
    with pg_private.connect() as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'idle_other'")
        if exists.fetchone() is None:
            conn.execute("CREATE DATABASE idle_other")
    other = pg_private.dsn.replace(f"dbname={pg_private.database}", "dbname=idle_other")
    out = tmp_path / "out.jsonl"
    flow = tmp_path / "flow.yaml"
    flow.write_text(IDLE_FLOW.format(host=pg_private.host, port=pg_private.port, out=out,
                                     database=pg_private.database, user=pg_private.user))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RUST_BACKTRACE": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflare", "run", str(flow), "-q",
         "--recovery-dir", str(tmp_path / "recovery"), "-s", "0.2"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the slot", lambda: slot_lag(pg_private, slot) is not None or proc.poll())
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        import psycopg

        for round_ in range(2):  # another database is written; the published table is idle
            with psycopg.connect(other, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS filler")
                conn.execute("CREATE TABLE filler AS SELECT g, repeat('x', 500) AS pad "
                             "FROM generate_series(1, 50000) g")
            lag = slot_lag(pg_private, slot)
            assert lag is not None and lag > 20_000_000, (round_, lag)  # WAL was written
            # the slot follows: under 4 MB behind soon after (it held it all before)
            wait_for(f"the slot to advance (round {round_})",
                     lambda: (slot_lag(pg_private, slot) or 0) < 4_000_000)
        # moving the idle position loses no change that comes after it
        pg_private.execute("INSERT INTO idle_rows VALUES (2)")
        wait_for("the change", lambda: out.exists() and '"id":2' in out.read_text().replace(
            " ", ""))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        drop_slot(pg_private, slot, f"{slot}_pub")


@pytest.mark.parametrize("tables", [{"exclude_tables": ["public.skipped"]}, {}])
def test_cdc_snapshot_without_a_table_list_reads_the_published_tables(
        pg_private: Any, tables: dict[str, Any], tmp_path: Path) -> None:
    # Without include_tables the initial snapshot read no table: the mirror of an existing
    # database started empty, without a word.
    import dataclasses

    db = f"snapall_{os.getpid()}_{len(tables)}"
    pg_private.execute(f"DROP DATABASE IF EXISTS {db}", f"CREATE DATABASE {db}")
    pg = dataclasses.replace(pg_private, database=db)
    pg.execute("CREATE TABLE kept (id int PRIMARY KEY, v text)",
               "CREATE TABLE skipped (id int PRIMARY KEY, v text)",
               "INSERT INTO kept VALUES (1, 'a'), (2, 'b')", "INSERT INTO skipped VALUES (1, 'x')")
    slot = f"snapall_{len(tables)}"
    ctx = make_ctx("all", conn_cfg(pg, batch_size=1, stop_at_end=True), mode="cdc", cdc={
        "slot_name": slot, "publication_name": f"{slot}_pub", "snapshot_mode": "initial",
        "poll_interval": "10ms", **tables})
    init_db_dir(tmp_path, 1)
    try:
        got = run_source(ctx, tmp_path)
        read = sorted((r["_meta"]["table"], r["id"]) for r in got)
        expected = [("public.kept", 1), ("public.kept", 2)]
        assert read == (expected if tables else [*expected, ("public.skipped", 1)])
        pg.execute("INSERT INTO kept VALUES (3, 'c')")
        assert [(r["_meta"]["op"], r["id"]) for r in run_source(ctx, tmp_path)] == [
            ("insert", 3)]  # resumed: the snapshot is not read again
    finally:
        drop_slot(pg, slot, f"{slot}_pub")
        pg_private.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_a_publication_dropped_under_its_slot_is_said_with_the_way_out(
        pg_private: Any, tmp_path: Path) -> None:
    # Every resume failed with the server's "publication ... does not exist" and no hint.
    pg_private.execute("DROP TABLE IF EXISTS pubgone", "CREATE TABLE pubgone (id int PRIMARY KEY)")
    ctx = make_ctx("gone", conn_cfg(pg_private, table="pubgone", stop_at_end=True), mode="cdc",
                   cdc={"slot_name": "pubgone_slot", "publication_name": "pubgone_pub",
                        "snapshot_mode": "never", "poll_interval": "10ms"})
    init_db_dir(tmp_path, 1)
    try:
        assert run_source(ctx, tmp_path) == []
        pg_private.execute("DROP PUBLICATION pubgone_pub", "INSERT INTO pubgone VALUES (1)")
        with pytest.raises(Exception) as info:
            run_source(ctx, tmp_path)
        said = chain(info.value)
        assert "publication 'pubgone_pub' was dropped while the slot held changes" in said
        assert "pg_drop_replication_slot('pubgone_slot')" in said and "empty the mirror" in said
    finally:
        drop_slot(pg_private, "pubgone_slot", "pubgone_pub")
        pg_private.execute("DROP TABLE pubgone")


def test_cdc_exclude_tables_are_neither_published_nor_read(pg_private: Any) -> None:
    # They were both: the publication was FOR ALL TABLES, so their changes came through,
    # and a table without a key there (excluded or created later) refused the
    # applications' UPDATE and DELETE.
    import dataclasses

    db = f"excl_{os.getpid()}"
    pg_private.execute(f"DROP DATABASE IF EXISTS {db}", f"CREATE DATABASE {db}")
    pg = dataclasses.replace(pg_private, database=db)
    pg.execute("CREATE TABLE kept (id int PRIMARY KEY, v text)",
               "CREATE TABLE skipped (id int PRIMARY KEY, v text)",
               "CREATE TABLE app_log (a int, b text)")
    ctx = make_ctx("all_but", conn_cfg(pg, batch_size=50, stop_at_end=True), mode="cdc", cdc={
        "slot_name": "excl_slot", "publication_name": "excl_pub", "snapshot_mode": "never",
        "poll_interval": "10ms", "exclude_tables": ["public.skipped", "app_log"]})
    try:
        src = build_postgres_source(ctx)
        src.build_part("all_but", src.list_parts()[0], None).close()
        with pg.connect() as conn:
            published = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = 'excl_pub'")]
        assert published == ["kept"]
        pg.execute("INSERT INTO kept VALUES (1, 'a')", "INSERT INTO skipped VALUES (1, 'b')",
                   "INSERT INTO app_log VALUES (1, 'x')",
                   "UPDATE app_log SET b = 'y'")  # the application still writes
        got = run_source(ctx)
        assert [(r["_meta"]["table"], r["id"]) for r in got] == [("public.kept", 1)]
    finally:
        drop_slot(pg, "excl_slot", "excl_pub")
        pg_private.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_cdc_refuses_a_slot_another_reader_holds(pg_private: Any) -> None:
    # A second run on the same slot took a snapshot and then ran beside the first, each
    # missing the changes the other read, until one died of ObjectInUse.
    from tests.fixtures.pg_private import PG_BIN

    slot = "held_slot"
    drop_slot(pg_private, slot, f"{slot}_pub")
    pg_private.execute("DROP TABLE IF EXISTS held_rows",
                       "CREATE TABLE held_rows (id int PRIMARY KEY)")
    ctx = cdc_ctx(pg_private, "held_rows", slot, ["public.held_rows"])
    src = build_postgres_source(ctx)
    src.build_part("held_rows", src.list_parts()[0], None).close()  # creates the slot
    reader = subprocess.Popen(
        [str(PG_BIN / "pg_recvlogical"), "-d", pg_private.dsn, "--slot", slot, "--start",
         "-o", "proto_version=1", "-o", f"publication_names={slot}_pub", "-f", os.devnull])
    try:
        deadline = time.monotonic() + 30
        while slot_active(pg_private, slot) is None:
            assert time.monotonic() < deadline and reader.poll() is None
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=f"replication slot '{slot}' is in use by "
                           "another reader .*give this one its own cdc.slot_name"):
            src.build_part("held_rows", src.list_parts()[0], None)
    finally:
        reader.terminate()
        reader.wait(timeout=30)
    deadline = time.monotonic() + 30
    while slot_active(pg_private, slot) is not None:  # the reader is gone: the run goes on
        assert time.monotonic() < deadline
        time.sleep(0.05)
    src.build_part("held_rows", src.list_parts()[0], None).close()
    drop_slot(pg_private, slot, f"{slot}_pub")


def slot_active(pg: Any, slot: str) -> int | None:
    with pg.connect() as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s "
                           "AND active", (slot,)).fetchone()
    return None if row is None else row[0]


@pytest.mark.parametrize("dsn", [
    "host=127.0.0.1 port=54x99 dbname=test user=postgres",
    "host=127.0.0.1 port=5432 dbname=test user=postgres sslmode=bogus",
    "postgresql://postgres:pa@ss@127.0.0.1:5432/test",  # the "@" of a password unescaped
    # Startup options the server refuses with a FATAL.
    "host=127.0.0.1 port=5432 dbname=test user=postgres options='-c statement_timeout=abc'",
    "host=127.0.0.1 port=5432 dbname=test user=postgres options='-c no_such_setting_x=1'",
])
def test_a_connection_string_libpq_cannot_read_is_not_retried(dsn: str) -> None:
    # Each was retried for a minute as if the server were down.
    import psycopg

    from dataflare.connectors.postgres import is_transient

    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=2)
    assert not is_transient(info.value)
