"""CDC end to end: two tables replicated into PostgreSQL merge mirrors while a writer runs.

The writer inserts, updates and deletes (also in multi-statement transactions) and
truncates; the replicating `dataflare run` is killed with SIGKILL several times and
restarted. In the end each mirror equals its source table and the slot has advanced.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time

from tests.fixtures.workflows import ROOT

FLOW = """\
workflow:
  id: cdc_mirror
  sources:
    shop:
      type: postgres
      mode: cdc
      config: {{host: 127.0.0.1, port: {port}, database: {database}, username: {user},
               stop_at_end: "${{STOP:-false}}", batch_size: 50}}
      cdc:
        slot_name: mirror_slot
        publication_name: mirror_pub
        include_tables: [public.accounts, public.items]
        snapshot_mode: initial
        poll_interval: 50ms
  transformations:
    by_table:
      inputs: [shop]
      type: route
      config:
        routes:
          - {{name: accounts, condition: "_meta.table == 'public.accounts'"}}
          - {{name: items, condition: "_meta.table == 'public.items'"}}
  destinations:
    accounts_mirror:
      inputs: [by_table.accounts]
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: accounts}}
      write_mode: {{type: merge, merge_key: id}}
      batch: {{size: 500, flush_interval: 100ms}}
    items_mirror:
      inputs: [by_table.items]
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: items}}
      write_mode: {{type: merge, merge_key: id}}
      batch: {{size: 500, flush_interval: 100ms}}
"""


class Writer(threading.Thread):
    """Random inserts, updates, deletes, multi-statement transactions and truncates."""

    def __init__(self, server, seed: int) -> None:
        super().__init__(daemon=True)
        self.server, self.rng = server, random.Random(seed)
        self.stop = threading.Event()
        self.ops = 0
        self.truncates = 0
        self.next_id = {"accounts": 1000, "items": 1000}

    def statement(self) -> str:
        rng = self.rng
        table = rng.choice(["accounts", "items"])
        roll = rng.random()
        value = rng.randint(0, 10_000)
        if roll < 0.45:
            self.next_id[table] += 1
            text = f"'{table[0]}{self.next_id[table]}'"
            return f"INSERT INTO {table} VALUES ({self.next_id[table]}, {text}, {value})"
        if roll < 0.75:
            return (f"UPDATE {table} SET amount = {value} WHERE id = "
                    f"(SELECT id FROM {table} ORDER BY random() LIMIT 1)")
        return f"DELETE FROM {table} WHERE id = (SELECT id FROM {table} ORDER BY random() LIMIT 1)"

    def run(self) -> None:
        with self.server.connect(autocommit=False) as conn:
            while not self.stop.is_set():
                roll = self.rng.random()
                if roll < 0.01:
                    self.truncates += 1
                    conn.execute(self.rng.choice(["TRUNCATE accounts", "TRUNCATE items",
                                                  "TRUNCATE accounts, items"]))
                else:
                    for _ in range(1 if roll < 0.7 else self.rng.randint(2, 6)):
                        conn.execute(self.statement())
                conn.commit()
                self.ops += 1
                time.sleep(0.002)


def slot_lsn(server) -> int | None:
    """The slot's confirmed LSN; None before the run created it.

    While ``pg_create_logical_replication_slot`` runs, the slot is listed with a null
    ``confirmed_flush_lsn``: that is not created yet either.
    """
    with server.connect() as conn:
        row = conn.execute("SELECT confirmed_flush_lsn FROM pg_replication_slots "
                           "WHERE slot_name = 'mirror_slot'").fetchone()
    if row is None or row[0] is None:
        return None
    hi, lo = str(row[0]).split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def wait_for_progress(server, proc, since: int | None, timeout: float = 120) -> int:
    """Wait until the slot exists and moved past ``since`` (a snapshot committed changes).

    Under load a run can take long to start; a fixed sleep then killed it before it had
    created the slot (or before any snapshot), and the test failed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        lsn = slot_lsn(server)
        if lsn is not None and (since is None or lsn > since):
            return lsn
        time.sleep(0.1)
    raise AssertionError(f"the slot did not move past {since} within {timeout:g}s")


def test_mirrors_equal_their_sources_after_sigkills(pg_private, pg_schema, tmp_path):
    pg_private.execute(
        "DROP TABLE IF EXISTS accounts, items",
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = 'mirror_slot'",
        "DROP PUBLICATION IF EXISTS mirror_pub",
        "CREATE TABLE accounts (id int PRIMARY KEY, name text, amount int)",
        "CREATE TABLE items (id int PRIMARY KEY, label text, amount int)",
        "INSERT INTO accounts SELECT g, 'a' || g, g FROM generate_series(1, 300) g",
        "INSERT INTO items SELECT g, 'i' || g, g * 2 FROM generate_series(1, 300) g",
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW.format(port=pg_private.port, database=pg_private.database,
                                user=pg_private.user, dsn=pg_schema.dsn, schema=pg_schema.schema))
    cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "-q",
           "--recovery-dir", str(tmp_path / "recovery"), "-s", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
    rng = random.Random(7)

    writer = Writer(pg_private, seed=11)
    writer.start()
    first_lsn = None
    try:
        for _ in range(4):
            proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE,
                                    text=True)
            # the run is replicating (its slot moved), then it dies at a random moment
            moved = wait_for_progress(pg_private, proc, slot_lsn(pg_private))
            time.sleep(rng.uniform(0.2, 1.5))
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if first_lsn is None:
                first_lsn = moved
    finally:
        writer.stop.set()
        writer.join()
    print(f"writer: {writer.ops} transactions, {writer.truncates} truncates")
    assert writer.ops > 200 and writer.truncates > 0
    done = subprocess.run(cmd, env={**env, "STOP": "true"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    for table in ("accounts", "items"):
        with pg_private.connect() as conn:
            source = sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
        mirror = sorted(pg_schema.rows(f'SELECT id, {"name" if table == "accounts" else "label"}, '
                                       f'amount FROM "{pg_schema.schema}".{table}'))
        print(f"{table}: {len(source)} rows mirrored")
        assert mirror == source, table
    assert first_lsn is not None and slot_lsn(pg_private) > first_lsn  # WAL is released
