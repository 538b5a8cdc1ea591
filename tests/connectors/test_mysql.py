"""MySQL source against a private MariaDB 10.11 with a row-based binlog."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, run_main
from pydantic import ValidationError

from dataflare.connectors.mysql import MySqlSourceConfig, build_mysql_source
from dataflare.connectors.schema import discover
from dataflare.dsl_compiler.models import Source, Workflow
from dataflare.records import META
from dataflare.registry import BuildContext, lookup

RETRY = {"max_attempts": 2, "backoff": {"initial": "10ms", "max": "50ms"}}


def make_ctx(step: str, config: dict[str, Any], **component: Any) -> BuildContext:
    cfg = MySqlSourceConfig.model_validate(config)
    comp = Source.model_validate({"type": "mysql", "config": cfg, **component})
    wf = Workflow.model_validate({"config": {"retry": RETRY}})
    return BuildContext(step, "source", comp, cfg, wf, Path("."))


def conn_cfg(db: Any, **extra: Any) -> dict[str, Any]:
    return {"host": db.host, "port": db.port, "username": db.user, "database": db.database, **extra}


def run(ctx: BuildContext, recovery: Path | None = None) -> list[Any]:
    out: list[Any] = []
    flow = Dataflow("mysql")
    op.output("out", op.input(ctx.step_id, flow, build_mysql_source(ctx)), TestingSink(out))
    rc = RecoveryConfig(str(recovery)) if recovery else None
    run_main(flow, epoch_interval=timedelta(0), recovery_config=rc)
    assert all(isinstance(b, list) for b in out)
    return [r for b in out for r in b]


def plain(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != META}


def chain(exc: BaseException | None) -> str:
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


SEEDS = [
    {
        "type": "mysql",
        "mode": "incremental",
        "config": {"table": "orders"},
        "incremental": {
            "column": "created_at",
            "cursor_field": "created_at",
            "cursor_type": "timestamp",
            "start_value": "2023-01-01T00:00:00Z",
        },
    },
    {
        "type": "mysql",
        "mode": "cdc",
        "config": {"table": "orders"},
        "cdc": {"binlog_position": "latest"},
    },
    {"type": "mysql", "config": {"table": "orders"}},
]


@pytest.mark.parametrize("snippet", SEEDS)
def test_seed_snippets_validate(snippet: dict[str, Any]) -> None:
    spec = lookup("source", "mysql")
    assert spec is not None and spec.config is MySqlSourceConfig
    cfg = MySqlSourceConfig.model_validate(snippet["config"])
    Source.model_validate({**snippet, "config": cfg})


def test_config_settings_and_secrets() -> None:
    cfg = MySqlSourceConfig.model_validate(
        {"dsn": "mysql://ann:p%40ss@db.example:3307/shop", "table": "orders"}
    )
    s = cfg.settings()
    assert (s["host"], s["port"], s["user"], s["password"], s["database"]) == (
        "db.example",
        3307,
        "ann",
        "p@ss",
        "shop",
    )
    assert cfg.qualified() == ("shop", "orders") and "p@ss" not in repr(cfg)
    with pytest.raises(ValidationError, match="tabel"):
        MySqlSourceConfig.model_validate({"tabel": "x"})


@pytest.fixture(scope="module")
def orders(mariadb_private: Any) -> str:
    rows = ", ".join(
        f"({i}, 'c{i % 7}', {i * 1.5}, '2024-01-01 00:00:00' + INTERVAL {i // 3} HOUR)"
        for i in range(1, 251)
    )
    mariadb_private.execute(
        "DROP TABLE IF EXISTS orders",
        "CREATE TABLE orders (id INT PRIMARY KEY, customer VARCHAR(20), "
        "amount DECIMAL(10,2), created_at DATETIME, note JSON)",
        f"INSERT INTO orders (id, customer, amount, created_at) VALUES {rows}",
    )
    return "orders"


def test_full_read_in_batches_and_resume(mariadb_private: Any, orders: str) -> None:
    ctx = make_ctx(
        "orders_full", conn_cfg(mariadb_private, table=orders, batch_size=60), mode="full"
    )
    records = run(ctx)
    assert [r["id"] for r in records] == list(range(1, 251))
    assert plain(records[1]) == {
        "id": 2,
        "customer": "c2",
        "amount": 3,
        "created_at": "2024-01-01T00:00:00",
        "note": None,
    }
    assert records[0][META] == {"table": "dataflare.orders"}
    src = build_mysql_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("orders_full", name, None)
    part.next_batch()
    state = part.snapshot()
    part.close()
    assert state == {"after": [60], "done": False}
    resumed = src.build_part("orders_full", name, state)
    assert [r["id"] for r in resumed.next_batch()[0]][:2] == [61, 62]
    resumed.close()


def test_key_columns_that_repeat_resume_after_the_primary_key_too(
        mariadb_private: Any, caplog: pytest.LogCaptureFixture) -> None:
    # A resume after (g) alone skipped the rest of the rows of the last g read.
    mariadb_private.execute(
        "DROP TABLE IF EXISTS grp", "DROP TABLE IF EXISTS nopk",
        "CREATE TABLE grp (id INT PRIMARY KEY, g INT NOT NULL)",
        "INSERT INTO grp VALUES " + ", ".join(f"({i}, {i % 3})" for i in range(1, 31)),
        "CREATE TABLE nopk (a INT)", "INSERT INTO nopk VALUES (1), (2)")
    cfg = conn_cfg(mariadb_private, table="grp", batch_size=4)
    # "G" for g: MySQL compares column names without case ('G' is not in list, before)
    src = build_mysql_source(make_ctx("grp", {**cfg, "key_columns": ["G"]}, mode="full"))
    (name,) = src.list_parts()
    part = src.build_part("grp", name, None)
    seen = [r["id"] for r in part.next_batch()[0]]
    state = part.snapshot()
    part.close()
    resumed = src.build_part("grp", name, state)
    while not seen or len(seen) < 30:
        batch = resumed.next_batch()
        if not batch:
            break
        seen += [r["id"] for r in batch[0]]
    resumed.close()
    assert sorted(seen) == list(range(1, 31))
    nopk = build_mysql_source(make_ctx("nopk", conn_cfg(mariadb_private, table="nopk"),
                                       mode="full"))
    (name,) = nopk.list_parts()
    nopk.build_part("nopk", name, None).next_batch()
    assert "nopk has no primary key and no key_columns are set: a resumed read starts " \
        "the table again" in caplog.text
    mariadb_private.execute("DROP TABLE grp", "DROP TABLE nopk")


def test_incremental_ties_and_start_value(mariadb_private: Any, orders: str) -> None:
    ctx = make_ctx(
        "orders_inc",
        conn_cfg(mariadb_private, table=orders, batch_size=4),
        mode="incremental",
        incremental={
            "column": "created_at",
            "cursor_type": "timestamp",
            "start_value": "2024-01-04T10:00:00Z",
            "interval": "1h",
        },
    )
    src = build_mysql_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("orders_inc", name, None)
    got = [r["id"] for r in part.next_batch()[0]]
    # created_at is hour id // 3: hour 82 (the start) holds 246..248, hour 83 249 and 250;
    # the batch of 4 ends inside hour 83.
    assert got == [246, 247, 248, 249]
    state = part.snapshot()
    part.close()
    mariadb_private.execute(
        "INSERT INTO orders (id, customer, amount, created_at) VALUES "
        "(251, 'late', 1, '2024-01-04 11:00:00'), (252, 'new', 1, '2024-02-01 00:00:00')"
    )
    resumed = src.build_part("orders_inc", name, state)
    later = [r["id"] for r in resumed.next_batch()[0]]
    resumed.close()
    assert later == [250, 251, 252]  # (11:00, 251) sorts after (11:00, 249): kept
    mariadb_private.execute("DELETE FROM orders WHERE id > 250")


def test_a_start_value_with_a_utc_offset_is_a_time_without_cursor_type(
        mariadb_private: Any, orders: str, caplog: pytest.LogCaptureFixture) -> None:
    # Without cursor_type it went to the server as text, which dropped the offset: the
    # start was read 2 hours late, and those rows were never read.
    ctx = make_ctx("orders_inc", conn_cfg(mariadb_private, table=orders, batch_size=4),
                   mode="incremental",
                   incremental={"column": "created_at", "start_value": "2024-01-04T12:00:00+02:00"})
    src = build_mysql_source(ctx)
    (name,) = src.list_parts()
    part = src.build_part("orders_inc", name, None)
    assert [r["id"] for r in part.next_batch()[0]] == [246, 247, 248, 249]  # from 10:00 UTC
    part.close()
    # rows whose cursor is NULL are never read: said, as the PostgreSQL source says it
    assert "the incremental column created_at of dataflare.orders may be NULL" in caplog.text


def test_binlog_cdc_changes_truncate_and_resume(mariadb_private: Any, tmp_path: Path) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS cdc_items",
        "DROP TABLE IF EXISTS cdc_other",
        "CREATE TABLE cdc_items (id INT PRIMARY KEY, name VARCHAR(40), price DECIMAL(8,2), "
        "at DATETIME(3), doc JSON)",
        "CREATE TABLE cdc_other (id INT PRIMARY KEY)",
        "INSERT INTO cdc_items VALUES (1, 'before', 1.00, NULL, NULL)",
    )
    ctx = make_ctx(
        "items_cdc",
        conn_cfg(mariadb_private, table="cdc_items", batch_size=100, stop_at_end=True),
        mode="cdc",
        cdc={"binlog_position": "latest", "snapshot_mode": "initial", "poll_interval": "10ms"},
    )
    init_db_dir(tmp_path, 1)
    snap = run(ctx, tmp_path)
    assert [(r[META]["op"], r["id"]) for r in snap] == [("read", 1)]
    conn = mariadb_private.connect()
    conn.autocommit(False)
    with conn.cursor() as cur:  # one multi-statement transaction
        cur.execute(
            "INSERT INTO cdc_items VALUES (2, 'two', 2.50, '2024-05-01 10:00:00.250', "
            "'{\"k\": [1, 2]}')"
        )
        cur.execute("INSERT INTO cdc_other VALUES (9)")
        cur.execute("UPDATE cdc_items SET name = 'one' WHERE id = 1")
    conn.commit()
    conn.autocommit(True)
    with conn.cursor() as cur:
        cur.execute("DELETE FROM cdc_items WHERE id = 2")
        cur.execute("TRUNCATE TABLE cdc_items")
    conn.close()
    changes = run(ctx, tmp_path)
    got = [(r[META]["op"], plain(r)) for r in changes]
    assert got == [
        (
            "insert",
            {
                "id": 2,
                "name": "two",
                "price": 2.5,
                "at": "2024-05-01T10:00:00.250000",
                "doc": {"k": [1, 2]},
            },
        ),
        ("update", {"id": 1, "name": "one", "price": 1, "at": None, "doc": None}),
        (
            "delete",
            {
                "id": 2,
                "name": "two",
                "price": 2.5,
                "at": "2024-05-01T10:00:00.250000",
                "doc": {"k": [1, 2]},
            },
        ),  # MariaDB's JSON is text with a json_valid check: parsed all the same
        ("truncate", {}),
    ]
    assert changes[1][META]["old"]["name"] == "before"
    assert all(r[META]["table"] == "dataflare.cdc_items" for r in changes)
    assert changes[0][META]["position"] == changes[1][META]["position"]  # one transaction
    file, _, pos = changes[-1][META]["position"].rpartition(":")
    assert file.startswith("binlog.") and int(pos) > 4
    assert all(r[META]["commit_ts"].endswith("+00:00") for r in changes)
    # Resumed from the recovery state: nothing again; then only what is new.
    assert run(ctx, tmp_path) == []
    mariadb_private.execute("INSERT INTO cdc_items VALUES (3, 'three', 3, NULL, NULL)")
    assert [(r[META]["op"], r["id"]) for r in run(ctx, tmp_path)] == [("insert", 3)]


def test_binlog_state_is_a_transaction_boundary(mariadb_private: Any) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS cdc_many",
        "CREATE TABLE cdc_many (id INT PRIMARY KEY)",
    )
    ctx = make_ctx(
        "many_cdc",
        conn_cfg(mariadb_private, table="cdc_many", batch_size=5),
        mode="cdc",
        cdc={"snapshot_mode": "never", "poll_interval": "10ms"},
    )
    src = build_mysql_source(ctx)
    part = src.build_part("many_cdc", "binlog", None)
    assert part.next_batch() == []
    for i in range(1, 13):
        mariadb_private.execute(f"INSERT INTO cdc_many VALUES ({i})")
    first = [r["id"] for b in part.next_batch() for r in b]
    assert first == [1, 2, 3, 4, 5]  # stops at a commit once a batch is full
    state = part.snapshot()
    part.close()
    resumed = src.build_part("many_cdc", "binlog", state)
    rest: list[int] = []
    for _ in range(3):
        rest.extend(r["id"] for b in resumed.next_batch() for r in b)
    resumed.close()
    assert rest == list(range(6, 13))


def test_missing_table_and_bad_position_are_clear_errors(mariadb_private: Any) -> None:
    ctx = make_ctx("nope", conn_cfg(mariadb_private, table="no_such"), mode="full")
    with pytest.raises(Exception) as info:
        run(ctx)
    assert "step 'nope': table dataflare.no_such does not exist" in chain(info.value)
    bad = make_ctx(
        "badpos",
        conn_cfg(mariadb_private, table="orders"),
        mode="cdc",
        cdc={"binlog_position": "somewhere"},
    )
    with pytest.raises(Exception) as info:
        run(bad)
    assert "cdc.binlog_position 'somewhere' is not 'latest', 'earliest'" in chain(info.value)


def test_discover(mariadb_private: Any, orders: str) -> None:
    ctx = make_ctx("orders_disc", conn_cfg(mariadb_private, table=orders), mode="full")
    (table,) = discover(ctx)["tables"]
    assert table["primary_key"] == ["id"]
    assert [c["type"] for c in table["columns"]][:3] == ["int(11)", "varchar(20)", "decimal(10,2)"]
    assert table["json_schema"]["properties"]["amount"] == {"type": ["number", "null"]}


def test_reconnects_after_the_server_kills_its_connections(mariadb_private: Any) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS rc_items",
        "CREATE TABLE rc_items (id INT PRIMARY KEY)",
        "INSERT INTO rc_items VALUES " + ", ".join(f"({i})" for i in range(1, 101)),
    )

    def kill_others() -> int:
        conn = mariadb_private.connect()
        killed = 0
        with conn.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST "
                "WHERE USER = 'dataflare' AND ID <> CONNECTION_ID()"
            )
            for (pid,) in cur.fetchall():
                cur.execute(f"KILL CONNECTION {int(pid)}")
                killed += 1
        conn.close()
        return killed

    full = make_ctx(
        "rc_full", conn_cfg(mariadb_private, table="rc_items", batch_size=30), mode="full"
    )
    src = build_mysql_source(full)
    part = src.build_part("rc_full", src.list_parts()[0], None)
    ids = [r["id"] for b in part.next_batch() for r in b]
    assert kill_others() >= 1
    with pytest.raises(StopIteration):
        while True:
            ids.extend(r["id"] for b in part.next_batch() for r in b)
    part.close()
    assert ids == list(range(1, 101))

    inc = make_ctx(
        "rc_inc",
        conn_cfg(mariadb_private, table="rc_items", batch_size=60),
        mode="incremental",
        incremental={"column": "id", "interval": "1h"},
    )
    src = build_mysql_source(inc)
    part = src.build_part("rc_inc", src.list_parts()[0], None)
    got = [r["id"] for b in part.next_batch() for r in b]
    assert kill_others() >= 1
    got.extend(r["id"] for b in part.next_batch() for r in b)
    part.close()
    assert got == list(range(1, 101))


CRASH_SCRIPT = """
import json, os, signal, sys
from datetime import timedelta
sys.path.insert(0, {repo!r})
import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, run_main
from tests.connectors.test_mysql import make_ctx
from dataflare.connectors.mysql import build_mysql_source

cfg, component, out_path, recovery, kill_after = json.loads(sys.argv[1])
ctx = make_ctx("crash_binlog", cfg, **component)
seen = 0

def write(batch):
    global seen
    with open(out_path, "a") as f:
        for r in batch:
            f.write(json.dumps({{"id": r["id"], "position": r["_meta"]["position"]}}) + "\\n")
    seen += len(batch)
    if kill_after and seen >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch

flow = Dataflow("crash")
s = op.map("write", op.input("crash_binlog", flow, build_mysql_source(ctx)), write)
op.output("out", s, TestingSink([]))
run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(recovery))
"""


def test_binlog_resumes_after_sigkill_without_loss(mariadb_private: Any, tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    mariadb_private.execute(
        "DROP TABLE IF EXISTS crash_rows", "CREATE TABLE crash_rows (id INT PRIMARY KEY)"
    )
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(repo=str(repo)))
    out = tmp_path / "out.jsonl"
    rec = tmp_path / "recovery"
    rec.mkdir()
    init_db_dir(rec, 1)
    cfg = conn_cfg(mariadb_private, table="crash_rows", batch_size=7, stop_at_end=True)
    component = {"mode": "cdc", "cdc": {"snapshot_mode": "never", "poll_interval": "10ms"}}

    def run_script(kill_after: int) -> int:
        args = json.dumps([cfg, component, str(out), str(rec), kill_after])
        proc = subprocess.run(
            [sys.executable, str(script), args],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(proc.stderr[-3000:])
        return proc.returncode

    assert run_script(0) == 0  # takes the current binlog position
    for i in range(1, 61):
        mariadb_private.execute(f"INSERT INTO crash_rows VALUES ({i})")
    assert run_script(25) == -signal.SIGKILL
    crashed = len(out.read_text().splitlines())
    assert 25 <= crashed < 60
    assert run_script(0) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert set(ids) == set(range(1, 61))  # nothing lost
    assert len(ids) - 60 <= 14  # at most the batches of the epochs in flight again
    lines = len(ids)
    assert run_script(0) == 0  # resumed at the end: nothing again
    assert len(out.read_text().splitlines()) == lines


SHAPES = (
    "CREATE TABLE {t} (id INT PRIMARY KEY, flag TINYINT(1), small TINYINT, bit1 BIT(1), "
    "tm TIME, tm6 TIME(6), doc JSON, big DECIMAL(30,0), changed DATETIME)",
    "SET SESSION check_constraint_checks = 0",  # lets row 4 hold a document that is no JSON
    "INSERT INTO {t} VALUES "
    "(1, 1, 5, b'1', '-838:59:59', '12:34:56.789', '{{\"a\": [1, 2]}}', "
    "123456789012345678901234567890, '2024-01-01 00:00:00'), "
    "(2, 0, -1, b'0', '01:02:03', '00:00:00', '[1]', 7, '2024-01-02 00:00:00'), "
    "(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '2024-01-03 00:00:00'), "
    "(4, 1, 1, b'1', '00:00:01', '00:00:01', '{{oops', 1, '2024-01-04 00:00:00')",
)
SHAPED = [
    {"id": 1, "flag": True, "small": 5, "bit1": True, "tm": "-838:59:59",
     "tm6": "12:34:56.789000", "doc": {"a": [1, 2]}, "big": "123456789012345678901234567890",
     "changed": "2024-01-01T00:00:00"},
    {"id": 2, "flag": False, "small": -1, "bit1": False, "tm": "01:02:03", "tm6": "00:00:00",
     "doc": [1], "big": 7, "changed": "2024-01-02T00:00:00"},
    {"id": 3, "flag": None, "small": None, "bit1": None, "tm": None, "tm6": None, "doc": None,
     "big": None, "changed": "2024-01-03T00:00:00"},
]


def check_shapes(items: list[Any], schema: dict[str, Any], where: str) -> None:
    """Rows 1-3 as discovery describes them; row 4 (no JSON in a json column) fails alone."""
    import jsonschema

    from dataflare.records import Failed

    *records, failed = items
    assert [plain(r) for r in records] == SHAPED
    for r in records:
        jsonschema.validate(plain(r), schema)
    assert isinstance(failed, Failed) and failed.type == "JSONDecodeError"
    assert failed.message.startswith(
        f"source 'shapes': cannot convert column 'doc' of dataflare.shapes ({where}): "
    )
    assert failed.record["doc"] == "{oops" and failed.record["flag"] is True


def test_records_match_what_discover_reports(mariadb_private: Any) -> None:
    mariadb_private.execute("DROP TABLE IF EXISTS shapes")
    cdc = make_ctx(
        "shapes",
        conn_cfg(mariadb_private, table="shapes"),
        mode="cdc",
        cdc={"snapshot_mode": "never", "poll_interval": "10ms"},
    )
    src = build_mysql_source(cdc)
    stream = src.build_part("shapes", "binlog", None)
    mariadb_private.execute(*(q.format(t="shapes") for q in SHAPES))
    ctx = make_ctx("shapes", conn_cfg(mariadb_private, table="shapes"), mode="full")
    (table,) = discover(ctx)["tables"]
    assert {c["name"]: c["type"] for c in table["columns"]}["doc"] == "json"
    schema = table["json_schema"]
    assert schema["properties"]["doc"] == {}
    assert "format" not in schema["properties"]["tm"]  # a duration: -838:59:59 is no time
    assert "pattern" in schema["properties"]["tm6"]  # which check_shapes checks

    check_shapes(run(ctx), schema, "row 4")
    inc = make_ctx("shapes", conn_cfg(mariadb_private, table="shapes"),
                   mode="incremental", incremental={"column": "changed", "interval": "1h"})
    inc_src = build_mysql_source(inc)
    part = inc_src.build_part("shapes", inc_src.list_parts()[0], None)
    check_shapes([r for b in part.next_batch() for r in b], schema, "row 4")
    part.close()
    changes = [r for _ in range(2) for b in stream.next_batch() for r in b]
    stream.close()
    check_shapes(changes, schema, "insert")
    assert changes[-1].meta["position"] == changes[0][META]["position"]  # the same commit


def test_incremental_reads_a_tie_below_the_last_key_once_and_a_bounded_sync_ends(
    mariadb_private: Any,
) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS ties",
        "CREATE TABLE ties (id INT PRIMARY KEY, updated_at DATETIME NOT NULL, v VARCHAR(8))",
        "INSERT INTO ties VALUES " + ", ".join(
            f"({i}, '2024-01-01 00:00:{min(i, 5):02d}', 'a')" for i in range(1, 12)),
    )
    ctx = make_ctx("ties", conn_cfg(mariadb_private, table="ties", batch_size=4),
                   mode="incremental", incremental={"column": "updated_at", "interval": "1h"})
    src = build_mysql_source(ctx)
    (name,) = src.list_parts()

    def drain(part: Any) -> list[tuple[int, str]]:
        got: list[tuple[int, str]] = []
        while True:
            got.extend((r["id"], r["v"]) for b in part.next_batch() for r in b)
            if part.next_awake() is not None:
                return got

    part = src.build_part("ties", name, None)
    assert sorted(i for i, _ in drain(part)) == list(range(1, 12))
    # The cursor is at (00:00:05, 11); id 4 moves to the same second: a lower key.
    mariadb_private.execute("UPDATE ties SET updated_at = '2024-01-01 00:00:05', v = 'b' "
                            "WHERE id = 4")
    assert drain(part) == [(4, "b")]
    state = part.snapshot()
    part.close()
    resumed = src.build_part("ties", name, state)
    assert drain(resumed) == []  # read once, also after a resume
    resumed.close()
    # A bounded sync: up to the end seen at start, then the input ends.
    bounded = make_ctx("ties", conn_cfg(mariadb_private, table="ties", batch_size=4,
                                        stop_at_end=True),
                       mode="incremental", incremental={"column": "updated_at"})
    src = build_mysql_source(bounded)
    part = src.build_part("ties", name, None)
    got: list[int] = []
    with pytest.raises(StopIteration):
        for _ in range(20):
            got.extend(r["id"] for b in part.next_batch() for r in b)
    assert sorted(got) == list(range(1, 12))
    part.close()


def test_dotted_table_names_split_only_without_schema(mariadb_private: Any) -> None:
    mariadb_private.execute(
        "CREATE DATABASE IF NOT EXISTS dotted_other",
        "DROP TABLE IF EXISTS `orders.v2`",
        "CREATE TABLE `orders.v2` (id INT PRIMARY KEY, what VARCHAR(20))",
        "INSERT INTO `orders.v2` VALUES (1, 'literal name')",
        "DROP TABLE IF EXISTS dotted_other.v2",
        "CREATE TABLE dotted_other.v2 (id INT PRIMARY KEY, what VARCHAR(20))",
        "INSERT INTO dotted_other.v2 VALUES (1, 'database.table')",
    )
    # with 'schema' given the dot is part of the table's name
    given = conn_cfg(mariadb_private, schema=mariadb_private.database, table="orders.v2")
    records = run(make_ctx("literal", given, mode="full"))
    assert [plain(r) for r in records] == [{"id": 1, "what": "literal name"}]
    # without it, 'database.table'
    split = conn_cfg(mariadb_private, table="dotted_other.v2")
    records = run(make_ctx("split", split, mode="full"))
    assert [plain(r) for r in records] == [{"id": 1, "what": "database.table"}]


@contextmanager
def server_settings(db: Any, **settings: str) -> Iterator[None]:
    """The private server with other global binlog settings for a while."""
    conn = db.connect()
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES LIKE 'binlog_row_%'")
        before = dict(cur.fetchall())
    conn.close()
    db.execute(*(f"SET GLOBAL {k} = {v}" for k, v in settings.items()))
    try:
        yield
    finally:
        db.execute(*(f"SET GLOBAL {k} = {before[k]}" for k in settings))


def binlog_position(db: Any) -> str:
    conn = db.connect()
    with conn.cursor() as cur:
        cur.execute("SHOW MASTER STATUS")
        file, pos = cur.fetchone()[:2]
    conn.close()
    return f"{file}:{pos}"


@pytest.mark.parametrize("metadata", ["NO_LOG", "MINIMAL"])
def test_binlog_cdc_refuses_a_server_without_full_row_metadata(
    mariadb_private: Any, metadata: str
) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS meta_rows",
        "CREATE TABLE meta_rows (id INT PRIMARY KEY, b VARBINARY(8))",
    )
    ctx = make_ctx("meta_cdc", conn_cfg(mariadb_private, table="meta_rows"), mode="cdc",
                   cdc={"snapshot_mode": "never", "poll_interval": "10ms"})
    src = build_mysql_source(ctx)
    with server_settings(mariadb_private, binlog_row_metadata=metadata,
                         binlog_row_image="MINIMAL"):
        with pytest.raises(ValueError) as info:
            src.build_part("meta_cdc", "binlog", None)
    msg = str(info.value)
    assert msg.startswith("step 'meta_cdc': binlog CDC needs binlog_format=ROW, "
                          "binlog_row_image=FULL, binlog_row_metadata=FULL; the server "
                          f"has binlog_row_image=MINIMAL, binlog_row_metadata={metadata}")
    assert "SET GLOBAL binlog_row_image = FULL; SET GLOBAL binlog_row_metadata = FULL" in msg
    assert "my.cnf" in msg and "Events written before the change still lack" in msg


def test_binlog_event_without_row_metadata_is_a_clear_error(mariadb_private: Any) -> None:
    """An event written before binlog_row_metadata=FULL names step, table and position."""
    mariadb_private.execute(
        "DROP TABLE IF EXISTS old_events",
        "CREATE TABLE old_events (id INT PRIMARY KEY, b VARBINARY(8))",
    )
    start = binlog_position(mariadb_private)
    with server_settings(mariadb_private, binlog_row_metadata="NO_LOG"):
        mariadb_private.execute("INSERT INTO old_events VALUES (1, x'00ff')")
    ctx = make_ctx("old_cdc", conn_cfg(mariadb_private, table="old_events"), mode="cdc",
                   cdc={"snapshot_mode": "never", "binlog_position": start,
                        "poll_interval": "10ms"})
    src = build_mysql_source(ctx)
    part = src.build_part("old_cdc", "binlog", None)
    for _ in range(2):  # the same clear error on a rerun, never a bare UnicodeDecodeError
        with pytest.raises(RuntimeError) as info:
            part.next_batch()
        assert str(info.value).startswith(
            f"step 'old_cdc': the change of dataflare.old_events in the transaction at "
            f"binlog {start} has no row metadata: it was written while binlog_row_metadata "
            "was not FULL"
        )
    part.close()


def test_binlog_logs_no_row_metadata_warning_per_poll(
    mariadb_private: Any, caplog: pytest.LogCaptureFixture
) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS quiet_rows", "CREATE TABLE quiet_rows (id INT PRIMARY KEY)"
    )
    ctx = make_ctx("quiet_cdc", conn_cfg(mariadb_private, table="quiet_rows"), mode="cdc",
                   cdc={"snapshot_mode": "never", "poll_interval": "10ms"})
    src = build_mysql_source(ctx)
    part = src.build_part("quiet_cdc", "binlog", None)
    caplog.set_level(logging.INFO)
    # mysql-replication warns about the setting once per reader, so once per poll: a
    # server changed after the start (which the source checks) shows it.
    with server_settings(mariadb_private, binlog_row_metadata="NO_LOG"):
        for _ in range(3):
            assert part.next_batch() == []
    part.close()
    assert not [r for r in caplog.records if "BINLOG_ROW_METADATA" in r.getMessage()]


def snapshot_then_update(db: Any, table: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """A CDC read of ``table``: its snapshot rows, then the changes of ``SET n = 1``."""
    ctx = make_ctx(f"{table}_cdc", conn_cfg(db, table=table), mode="cdc",
                   cdc={"snapshot_mode": "initial", "poll_interval": "10ms"})
    part = build_mysql_source(ctx).build_part(f"{table}_cdc", "binlog", None)
    try:
        snap = [plain(r) for b in part.next_batch() for r in b]
        db.execute(f"UPDATE {table} SET n = 1")
        return snap, [r for _ in range(2) for b in part.next_batch() for r in b]
    finally:
        part.close()


def test_binlog_bit_and_set_values_match_the_snapshot(mariadb_private: Any) -> None:
    # A set came as a list and a bit(4) as the text '0101' from the binlog, as 'x,y' and
    # bytes from the snapshot: a mirror's values changed at the row's first update.
    mariadb_private.execute(
        "DROP TABLE IF EXISTS bits_rows",
        "CREATE TABLE bits_rows (id INT PRIMARY KEY, s SET('x', 'y', 'z'), b BIT(4), "
        "w BIT(10), n INT)",
        "INSERT INTO bits_rows VALUES (1, 'z,x', b'0101', b'1000000001', 0), "
        "(2, 'y', b'0', NULL, 0), (3, NULL, NULL, NULL, 0), (4, '', NULL, NULL, 0)")
    snap, changes = snapshot_then_update(mariadb_private, "bits_rows")
    assert snap[0] == {"id": 1, "s": "x,z", "b": "\\x05", "w": "\\x0201", "n": 0}
    assert snap[3]["s"] == "" and snap[2]["s"] is None  # an empty set is no null
    assert [plain(r) for r in changes] == [{**row, "n": 1} for row in snap]


def test_binlog_binary_values_match_the_snapshot(mariadb_private: Any) -> None:
    mariadb_private.execute(
        "DROP TABLE IF EXISTS bin_rows",
        "CREATE TABLE bin_rows (id INT PRIMARY KEY, vb VARBINARY(8), fixed BINARY(4), "
        "bl BLOB, tb TINYBLOB, n INT)",
        "INSERT INTO bin_rows VALUES (1, '', '', '', '', 0), "
        "(2, x'00ff', x'41', x'00', x'4100', 0), (3, NULL, x'00000000', NULL, 'a', 0)",
    )
    snap, changes = snapshot_then_update(mariadb_private, "bin_rows")
    assert snap[0] == {"id": 1, "vb": "\\x", "fixed": "\\x00000000", "bl": "\\x", "tb": "\\x",
                       "n": 0}
    assert snap[1] == {"id": 2, "vb": "\\x00ff", "fixed": "\\x41000000", "bl": "\\x00",
                       "tb": "\\x4100", "n": 0}
    assert [plain(r) for r in changes] == [{**row, "n": 1} for row in snap]
    assert [r[META]["old"] for r in changes] == snap


FILL_FLOW = """
workflow:
  name: binlog-mirror-fill
  sources:
    src:
      type: mysql
      mode: cdc
      config: {{host: 127.0.0.1, port: {port}, username: {user}, database: {db},
               table: fill_rows, stop_at_end: true}}
      cdc: {{snapshot_mode: initial, poll_interval: 10ms}}
  destinations:
    pg:
      type: postgres
      inputs: [src]
      config: {{dsn: "{dsn}", schema: {schema}, table: fill_rows}}
      write_mode: {{type: merge, merge_key: id}}
    duck:
      type: duckdb
      inputs: [src]
      config: {{path: mirror.duckdb, table: fill_rows}}
      write_mode: {{type: merge, merge_key: id}}
"""


def test_a_column_added_with_a_default_fills_the_mirrors_earlier_rows(
    mariadb_private: Any, pg_schema: Any, tmp_path: Path
) -> None:
    # The binlog carries the ALTER, not the value it gave the rows already there.
    import duckdb

    from tests.fixtures.workflows import run_cli

    mariadb_private.execute(
        "DROP TABLE IF EXISTS fill_rows",
        "CREATE TABLE fill_rows (id INT PRIMARY KEY, v VARCHAR(10))",
        "INSERT INTO fill_rows VALUES (1, 'a'), (2, 'b')",
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(FILL_FLOW.format(
        port=mariadb_private.port, user=mariadb_private.user, db=mariadb_private.database,
        dsn=pg_schema.dsn, schema=pg_schema.schema))

    def run() -> str:
        done = run_cli("run", str(flow), "-r", str(tmp_path / "rec"), "-s", "0")
        assert done.code == 0, done.stderr
        return done.stderr

    run()
    mariadb_private.execute(
        "ALTER TABLE fill_rows ADD COLUMN grade INT DEFAULT 7, "
        "ADD COLUMN note VARCHAR(10) DEFAULT 'it''s\\\\x', ADD COLUMN n INT NOT NULL, "
        "ADD COLUMN flag TINYINT(1) DEFAULT 1, ADD COLUMN amt DECIMAL(8,2) DEFAULT -1.5, "
        "ADD COLUMN kind ENUM('p', 'q') NOT NULL, "
        "ADD COLUMN at TIMESTAMP NULL DEFAULT CURRENT_TIMESTAMP",
        "INSERT INTO fill_rows (id, v, n, kind, at) VALUES (3, 'c', 5, 'q', NULL)",
        "UPDATE fill_rows SET v = 'b2' WHERE id = 2",
    )
    said = run()
    assert "gains column 'at'" in said and "take a new snapshot" in said
    with pg_schema.connect() as conn:
        mirror = conn.execute(
            f'SELECT id, v, grade, note, n, flag, amt::text, kind, "at" IS NULL '
            f'FROM "{pg_schema.schema}".fill_rows ORDER BY id').fetchall()
    assert mirror == [
        (1, "a", 7, "it's\\x", 0, True, "-1.50", "p", True),  # warned: "at" unknown
        (2, "b2", 7, "it's\\x", 0, True, "-1.50", "p", False),
        (3, "c", 7, "it's\\x", 5, True, "-1.50", "q", True)]
    with duckdb.connect(str(tmp_path / "mirror.duckdb"), read_only=True) as duck:
        assert duck.execute("SELECT id, grade, note, n, amt::VARCHAR, kind FROM fill_rows "
                            "ORDER BY id").fetchall() == [
            (i, g, note, n, amt, kind) for i, _, g, note, n, _, amt, kind, _ in mirror]
    mariadb_private.execute("DROP TABLE fill_rows")


def test_zero_dates_come_as_null_from_the_snapshot_and_the_binlog(mariadb_private: Any) -> None:
    # MySQL's zero dates ('0000-00-00', '2024-00-10') have no date value: the snapshot gave
    # their text, which a PostgreSQL mirror refused, and the binlog gave null (a zero
    # TIMESTAMP: 1970-01-01, which a TIMESTAMP cannot hold). Both give null now, as Debezium.
    mariadb_private.execute(
        "DROP TABLE IF EXISTS zero_dates",
        "SET SESSION sql_mode = ''",
        "CREATE TABLE zero_dates (id INT PRIMARY KEY, d DATE, dt DATETIME, dt6 DATETIME(6), "
        "ts TIMESTAMP NULL, dn DATE NOT NULL, n INT)",
        "INSERT INTO zero_dates VALUES "
        "(1, '0000-00-00', '0000-00-00 00:00:00', '0000-00-00', '0000-00-00', '0000-00-00', 0),"
        "(2, '2024-00-10', '2024-01-00 10:00:00', '2024-02-03 04:05:06.5', "
        "'2024-02-03 04:05:06', '2024-01-01', 0)")
    snap, changes = snapshot_then_update(mariadb_private, "zero_dates")
    assert snap[0] == {"id": 1, "d": None, "dt": None, "dt6": None, "ts": None, "dn": None,
                       "n": 0}
    assert snap[1]["d"] is None and snap[1]["dt"] is None and snap[1]["dn"] == "2024-01-01"
    assert snap[1]["dt6"].startswith("2024-02-03T04:05:06.5") and snap[1]["ts"] is not None
    assert [plain(r) for r in changes] == [{**row, "n": 1} for row in snap]


def test_binlog_warns_of_a_dropped_or_renamed_column(
    mariadb_private: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A mirror kept a dropped column's stale values, and a renamed one was NULL in the rows
    # not changed since, without a word (PostgreSQL's CDC warned already).
    mariadb_private.execute(
        "DROP TABLE IF EXISTS shifting",
        "CREATE TABLE shifting (id INT PRIMARY KEY, a INT, b INT, c INT)")
    ctx = make_ctx("shift_cdc", conn_cfg(mariadb_private, table="shifting"), mode="cdc",
                   cdc={"snapshot_mode": "never", "poll_interval": "10ms"})
    part = build_mysql_source(ctx).build_part("shift_cdc", "binlog", None)
    mariadb_private.execute(
        "INSERT INTO shifting VALUES (1, 1, 1, 1)", "UPDATE shifting SET a = 2",
        "ALTER TABLE shifting DROP COLUMN b", "ALTER TABLE shifting RENAME COLUMN c TO d",
        "INSERT INTO shifting VALUES (2, 2, 2)", "ALTER TABLE shifting ADD COLUMN e INT",
        "INSERT INTO shifting VALUES (3, 3, 3, 3)")
    with caplog.at_level(logging.WARNING, logger="dataflare.connectors.sql_source"):
        changes = [plain(r) for _ in range(3) for b in part.next_batch() for r in b]
    part.close()
    assert [r["id"] for r in changes] == [1, 1, 2, 3]
    said = [r.getMessage() for r in caplog.records if "no longer has" in r.getMessage()]
    assert said == [
        f"step 'shift_cdc': table {mariadb_private.database}.shifting no longer has column(s) "
        "b, c (new: d): a mirror keeps the column(s) it made, with the values they had, and a"
        " renamed column is a new one, NULL in the rows not changed since; alter the mirror "
        "table to match, or take a new snapshot"]  # an added column alone is not warned


def test_an_unknown_charset_is_refused_by_validate() -> None:
    # The connection failed with "'NoneType' object has no attribute 'encoding'".
    from dataflare.connectors.mysql import MySqlSourceConfig

    with pytest.raises(ValueError, match="unknown character set 'nosuch'"):
        MySqlSourceConfig.model_validate({"table": "t", "charset": "nosuch"})
