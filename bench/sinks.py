"""Benchmarks W1 (stateless Kafka -> Kafka) and W5 (warehouse merge) of BENCHMARKS.md.

    .venv/bin/python bench/sinks.py                 # 1,000,000 events, 3 runs each
    .venv/bin/python bench/sinks.py --events 100000 --runs 1 --only w1

W1  parse JSON, drop ``view``, map to a nested record, serialize, write to Kafka:
    - raw: one thread, ``Consumer.consume(10000)`` + orjson + ``Producer.produce``
    - dataflare: the same pipeline as a workflow (kafka -> filter -> mapping -> kafka)
    - bytewax: by hand with bytewax's own Kafka connector, one map per message
W5  W2's output (count and sum per user and 60 s window, computed here from the same
    events) written to PostgreSQL:
    - copy: a bare ``COPY`` of the rows into an empty table without index (the reference)
    - copy-pk: the same into a table whose primary key is the merge key
    - merge (insert): the DataFlare postgres destination, merge on (user_id, window_start),
      into an empty table
    - merge (update): the same rows merged again, every row a conflict (a replay: no
      value changes)
    - merge (change): rows of the same keys with other values merged, every row a
      conflict and every row changed
    - duckdb-arrow: by hand, one Arrow table of all rows inserted into a DuckDB table
    - duckdb-append: the DataFlare duckdb destination appending the same rows
    ``--baseline DIR`` runs the merges of another tree's ``dataflare`` (in DIR) beside
    this one's, as ``w5-merge-*-baseline``.

W6  the cost of exactly-once: W2 + W5 as one workflow (kafka -> filter -> 60 s tumbling
    window per user -> postgres merge), run by ``python -m bytewax.run`` without and
    with recovery (``-r DIR -s 1``); the ratio of throughputs is the cost.

Every system runs in its own process on the same data; each reports the wall and CPU
seconds of its pipeline (imports and set-up excluded) and its peak RSS. Medians of
``--runs`` runs are printed, then the ratios to the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVENTS = ("view", "click", "add_to_cart", "purchase")
PG_DSN = os.environ.get("BENCH_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")


# ------------------------------------------------------------------------------- data


def events(n: int, seed: int = 42) -> Iterator[dict[str, Any]]:
    """The benchmark events: fixed seed, ~100 bytes each, +10 ms per event."""
    rng = random.Random(seed)
    t0 = 1_704_067_200_000
    for i in range(n):
        yield {
            "id": i,
            "user_id": f"u{rng.randrange(10_000)}",
            "event": EVENTS[rng.randrange(4)],
            "amount": round(rng.random() * 100, 2),
            "ts": t0 + 10 * i,
        }


def w2_rows(n: int) -> list[dict[str, Any]]:
    """W2's output for the first ``n`` events: per user and 60 s window, count and sum."""
    from dataflare.records import iso_utc

    acc: dict[tuple[str, int], list[float]] = {}
    for e in events(n):
        if e["event"] == "view":
            continue
        w = e["ts"] // 60_000
        slot = acc.get((e["user_id"], w))
        if slot is None:
            acc[(e["user_id"], w)] = [1, e["amount"]]
        else:
            slot[0] += 1
            slot[1] += e["amount"]
    return [
        {
            "user_id": user,
            "window_start": iso_utc(w * 60),
            "window_end": iso_utc(w * 60 + 60),
            "events": int(c),
            "amount_sum": round(s, 2),
        }
        for (user, w), (c, s) in acc.items()
    ]


def measure(fn: Callable[[], int]) -> dict[str, Any]:
    """Wall and CPU seconds of ``fn`` (all threads), its item count, and peak RSS."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    count = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"wall": wall, "cpu": cpu, "count": count, "rss_mb": r1.ru_maxrss / 1024}


# --------------------------------------------------------------------------------- W1


def w1_transform(e: dict[str, Any]) -> dict[str, Any]:
    """The W1 map: a nested record."""
    return {
        "id": e["id"],
        "user": {"id": e["user_id"]},
        "event": {"type": e["event"], "amount": e["amount"]},
        "ts": e["ts"],
    }


def w1_raw(servers: str, src: str, dst: str) -> int:
    """The floor: one consume/parse/filter/map/produce loop."""
    import orjson
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"raw-{uuid.uuid4()}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    parts = consumer.list_topics(src, timeout=10).topics[src].partitions
    consumer.assign([TopicPartition(src, p, 0) for p in parts])
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 5,
                         "enable.idempotence": True})
    loads, dumps, produce = orjson.loads, orjson.dumps, producer.produce
    done: set[int] = set()
    written = 0
    while len(done) < len(parts):
        for msg in consumer.consume(10_000, 0.5):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
                continue
            e = loads(msg.value())
            if e["event"] == "view":
                continue
            while True:
                try:
                    produce(dst, dumps(w1_transform(e)))
                    break
                except BufferError:
                    producer.poll(0.05)
            written += 1
        producer.poll(0)
    producer.flush(60)
    consumer.close()
    return written


W1_FLOW = """
workflow:
  id: w1
  sources:
    events:
      type: kafka
      config: {{bootstrap_servers: "{servers}", topic: "{src}", stop_at_end: true}}
  transformations:
    engaged:
      inputs: [events]
      type: filter
      config: {{condition: "event != 'view'"}}
    shaped:
      inputs: [engaged]
      type: mapping
      config:
        mappings:
          - {{source: id, destination: id}}
          - {{source: user_id, destination: user.id}}
          - {{source: event, destination: event.type}}
          - {{source: amount, destination: event.amount}}
          - {{source: ts, destination: ts}}
  destinations:
    out:
      inputs: [shaped]
      type: kafka
      config: {{bootstrap_servers: "{servers}", topic: "{dst}"}}
"""


def w1_dataflare(servers: str, src: str, dst: str) -> Callable[[], int]:
    """The workflow, compiled here and run in this process (one worker)."""
    from bytewax.testing import run_main

    from dataflare.dsl_compiler import compile_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w1.yaml"
        path.write_text(W1_FLOW.format(servers=servers, src=src, dst=dst))
        flow = compile_file(path)

    def run() -> int:
        run_main(flow)
        return -1

    return run


def w1_bytewax(servers: str, src: str, dst: str) -> Callable[[], int]:
    """By hand with bytewax's Kafka connector: one Python call per message per step."""
    import bytewax.operators as op
    import orjson
    from bytewax.connectors.kafka import KafkaSinkMessage
    from bytewax.connectors.kafka import operators as kop
    from bytewax.dataflow import Dataflow
    from bytewax.testing import run_main

    flow = Dataflow("w1_bytewax")
    kin = kop.input("in", flow, brokers=[servers], topics=[src], tail=False)

    def shape(msg: Any) -> Any:
        e = orjson.loads(msg.value)
        if e["event"] == "view":
            return None
        return KafkaSinkMessage(None, orjson.dumps(w1_transform(e)))

    out = op.filter_map("shape", kin.oks, shape)
    kop.output("out", out, brokers=[servers], topic=dst)

    def run() -> int:
        run_main(flow)
        return -1

    return run


# --------------------------------------------------------------------------------- W5


def w5_copy(schema: str, rows: list[dict[str, Any]], keyed: bool = False) -> int:
    """A bare COPY into an empty table of the right shape (with the merge key as PK)."""
    import psycopg

    cols = ["user_id", "window_start", "window_end", "events", "amount_sum"]
    pk = ", PRIMARY KEY (user_id, window_start)" if keyed else ""
    with psycopg.connect(PG_DSN) as conn:
        conn.execute(f'CREATE TABLE "{schema}".copy_ref (user_id text, window_start text, '
                     f"window_end text, events bigint, amount_sum double precision{pk})")
        conn.commit()

        def run() -> int:
            with conn.cursor() as cur, cur.copy(
                f'COPY "{schema}".copy_ref ({", ".join(cols)}) FROM STDIN'
            ) as cp:
                for r in rows:
                    cp.write_row((r["user_id"], r["window_start"], r["window_end"],
                                  r["events"], r["amount_sum"]))
            conn.commit()
            return len(rows)

        return run()


def changed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same keys with other values: every merged row is an update that changes it."""
    return [{**r, "events": r["events"] + 1, "amount_sum": round(r["amount_sum"] + 1, 2)}
            for r in rows]


def w5_destination(kind: str, target: str, rows: list[dict[str, Any]],
                   merge: bool = True) -> Callable[[], int]:
    """A DataFlare destination (``postgres`` schema or ``duckdb`` file) writing ``rows``.

    Merges on (user_id, window_start), else appends. The modules are imported here, so
    only the run is measured.
    """
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    from dataflare.dsl_compiler import models
    from dataflare.registry import BuildContext

    if kind == "postgres":
        from dataflare.connectors.postgres_destination import (
            PostgresDestinationConfig as Config,
        )
        from dataflare.connectors.postgres_destination import (
            build_postgres_destination as build,
        )

        config: dict[str, Any] = {"dsn": PG_DSN, "schema": target, "table": "merged"}
    else:
        import duckdb  # noqa: F401 - imported before the run, as the reference's
        import pyarrow  # noqa: F401

        from dataflare.connectors.duckdb import DuckDBDestinationConfig as Config  # type: ignore[assignment]
        from dataflare.connectors.duckdb import build_duckdb_destination as build

        config = {"path": target, "table": "appended"}
    write_mode = models.WriteMode(type="merge", merge_key=["user_id", "window_start"]) \
        if merge else models.WriteMode()
    component = models.Destination(type=kind, config=config, write_mode=write_mode)
    ctx = BuildContext("warehouse", "destination", component, Config(**config),
                       models.Workflow(), ROOT)

    def run() -> int:
        from dataflare.dsl_compiler.compiler import tune_gc

        batches = [rows[i:i + 10_000] for i in range(0, len(rows), 10_000)]
        flow = Dataflow("w5")
        up = op.input("windows", flow, TestingSource(batches))
        op.output("failed", build(ctx, up), TestingSink([]))
        tune_gc()  # as ``dataflare run`` collects (compile_file)
        run_main(flow)
        return len(rows)

    return run


def w5_duckdb_arrow(path: str, rows: list[dict[str, Any]]) -> Callable[[], int]:
    """By hand: the rows as one Arrow table, column by column, inserted into DuckDB."""
    import duckdb
    import pyarrow as pa

    conn = duckdb.connect(path)
    conn.execute("CREATE TABLE appended (user_id VARCHAR, window_start VARCHAR, "
                 "window_end VARCHAR, events BIGINT, amount_sum DOUBLE)")
    types = {"user_id": pa.string(), "window_start": pa.string(), "window_end": pa.string(),
             "events": pa.int64(), "amount_sum": pa.float64()}

    def run() -> int:
        for i in range(0, len(rows), 10_000):
            part = rows[i:i + 10_000]
            staged = pa.Table.from_arrays(  # noqa: F841 - read by DuckDB by its name
                [pa.array([r[c] for r in part], t) for c, t in types.items()],
                names=list(types))
            conn.execute("INSERT INTO appended SELECT * FROM staged")
        conn.close()
        return len(rows)

    return run


# --------------------------------------------------------------------------------- W6

W6_FLOW = """
workflow:
  id: w6
  sources:
    events:
      type: kafka
      config: {{bootstrap_servers: "{servers}", topic: "{src}", stop_at_end: true}}
  transformations:
    engaged:
      inputs: [events]
      type: filter
      config: {{condition: "event != 'view'"}}
    per_minute:
      inputs: [engaged]
      type: window
      config:
        window: {{type: tumbling, size: 60s}}
        time_field: ts
        time_unit: ms
        group_by: [user_id]
        aggregations:
          - {{field: event, operations: [count], as: events}}
          - {{field: amount, operations: [sum], as: amount_sum}}
  destinations:
    warehouse:
      inputs: [per_minute]
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: per_minute}}
      write_mode: {{type: merge, merge_key: [user_id, window_start]}}
"""


def w6_run(servers: str, src: str, recovery: bool, gc_threshold: int) -> dict[str, Any]:
    """One run of the W6 workflow in a child process; wall, CPU, RSS and rows written."""
    import psycopg
    from bytewax.recovery import init_db_dir

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            flow = Path(tmp) / "w6.yaml"
            flow.write_text(W6_FLOW.format(servers=servers, src=src, dsn=PG_DSN, schema=schema))
            prelude = f"import gc; gc.set_threshold({gc_threshold}, 50, 100); " \
                if gc_threshold else ""
            cmd = [sys.executable, "-c",
                   f"{prelude}import runpy, sys; sys.argv = ['bytewax.run'] + sys.argv[1:]; "
                   "runpy.run_module('bytewax.run', run_name='__main__')",
                   f"dataflare.dsl_compiler:compile_file({str(flow)!r})"]
            if recovery:
                rec = Path(tmp) / "recovery"
                rec.mkdir()
                init_db_dir(rec, 1)
                cmd += ["-r", str(rec), "-s", "1", "-b", "0"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env={**os.environ, "RUST_BACKTRACE": "0",
                                         "PYTHONPATH": str(ROOT)})
            assert proc.stderr is not None
            err = proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            if status != 0:
                raise RuntimeError(f"w6 run failed:\n{err.decode()[-3000:]}")
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            row = conn.execute(f'SELECT count(*) FROM "{schema}".per_minute').fetchone()
            rows = int(row[0]) if row else 0
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, "count": rows}


# ------------------------------------------------------------------------------ driver


def child(args: argparse.Namespace) -> None:
    """Run one system in this process and print its measurement as JSON."""
    name = args.child
    if args.baseline:  # before any dataflare import
        sys.path.insert(0, args.baseline)
    if args.gc_threshold:
        import gc

        gc.set_threshold(args.gc_threshold, 50, 100)
    if name.startswith("w1-"):
        if name == "w1-raw":
            result = measure(lambda: w1_raw(args.servers, args.src, args.dst))
        else:  # build the dataflow first: set-up is not measured
            build = w1_dataflare if name == "w1-dataflare" else w1_bytewax
            result = measure(build(args.servers, args.src, args.dst))
    else:
        rows = w2_rows(args.events)
        if name == "w5-copy":
            result = measure(lambda: w5_copy(args.schema, rows))
        elif name == "w5-copy-pk":
            result = measure(lambda: w5_copy(args.schema, rows, keyed=True))
        elif name == "w5-duckdb-arrow":
            result = measure(w5_duckdb_arrow(str(Path(args.schema) / "arrow.duckdb"), rows))
        elif name == "w5-duckdb-append":
            path = str(Path(args.schema) / "append.duckdb")
            result = measure(w5_destination("duckdb", path, rows, merge=False))
        else:  # w5-merge-insert, -update (a replay: the table holds the rows), -change
            if not name.startswith("w5-merge-insert"):
                w5_destination("postgres", args.schema, rows)()
            if name.startswith("w5-merge-change"):
                rows = changed(rows)
            result = measure(w5_destination("postgres", args.schema, rows))
    print(json.dumps(result))


GC_THRESHOLD = 0


def spawn(name: str, baseline: str | None = None, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--gc-threshold", str(GC_THRESHOLD)]
    if name.endswith("-baseline"):  # DataFlare as of another tree (``--baseline``)
        cmd += ["--baseline", str(baseline)]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                    "RUST_BACKTRACE": "0"})
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_topic(servers: str, topic: str) -> int:
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"count-{uuid.uuid4()}",
                         "enable.partition.eof": True})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    done: set[int] = set()
    n = 0
    while len(done) < len(parts):
        for msg in consumer.consume(10_000, 0.5):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
            else:
                n += 1
    consumer.close()
    return n


def report(title: str, results: dict[str, list[dict[str, Any]]], ref: str, items: str) -> None:
    print(f"\n{title}")
    med: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        med[name] = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_mb")}
        m = med[name]
        n = runs[0]["count"]
        rate = f"{n / m['wall']:>11,.0f} {items}/s" if n > 0 else ""
        print(f"  {name:<22} wall {m['wall']:7.2f} s   cpu {m['cpu']:7.2f} s   "
              f"rss {m['rss_mb']:7.0f} MB   {rate}")
    base = med[ref]
    for name, m in med.items():
        if name != ref:
            print(f"  {name} / {ref}: wall {m['wall'] / base['wall']:.2f}x, "
                  f"cpu {m['cpu'] / base['cpu']:.2f}x")


def run_w1(args: argparse.Namespace, broker: Any) -> None:
    """W1: every system on the events topic, output counts compared."""
    servers = broker.bootstrap_servers
    systems = ["w1-raw", "w1-dataflare"] + ([] if args.no_bytewax else ["w1-bytewax"])
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for run in range(args.runs):
        for name in systems:
            dst = f"out-{name}-{run}"
            broker.create_topic(dst, partitions=3)
            res = spawn(name, servers=servers, src="events", dst=dst)
            res["count"] = count_topic(servers, dst)
            results[name].append(res)
    counts = {name: {r["count"] for r in runs} for name, runs in results.items()}
    if len({c for cs in counts.values() for c in cs}) != 1:
        raise SystemExit(f"W1 output counts differ: {counts}")
    report("W1 stateless Kafka -> Kafka (items: messages written)", results,
           "w1-raw", "msg")


def run_w6(args: argparse.Namespace, servers: str) -> None:
    """W6: the same workflow without and with recovery."""
    results: dict[str, list[dict[str, Any]]] = {"w6-recovery-off": [], "w6-recovery-on": []}
    for _run in range(args.runs):
        for name in results:
            results[name].append(w6_run(servers, "events", name.endswith("-on"),
                                        args.gc_threshold))
    counts = {r["count"] for runs in results.values() for r in runs}
    if len(counts) != 1:
        raise SystemExit(f"W6 row counts differ: {counts}")
    report("W6 exactly-once cost: W2 + W5 workflow, whole process (items: rows)", results,
           "w6-recovery-off", "row")
    off = statistics.median(r["wall"] for r in results["w6-recovery-off"])
    on = statistics.median(r["wall"] for r in results["w6-recovery-on"])
    print(f"  recovery on costs {1 - off / on:.0%} of throughput (target <= 10%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to generate")
    parser.add_argument("--runs", type=int, default=3, help="runs per system (median)")
    parser.add_argument("--only", choices=["w1", "w5", "w6"], help="one workload")
    parser.add_argument("--no-bytewax", action="store_true", help="skip the bytewax reference")
    parser.add_argument(
        "--gc-threshold", type=int, default=0,
        help="set gc.set_threshold(N, 50, 100) in every system's process (0: Python's default)",
    )
    parser.add_argument(
        "--baseline",
        help="a directory holding another tree's dataflare package (e.g. `git archive` of an "
        "earlier commit): its W5 merges run beside this tree's, for before/after",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("servers", "src", "dst", "schema"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    global GC_THRESHOLD
    GC_THRESHOLD = args.gc_threshold
    gc_text = f"gc threshold {args.gc_threshold}" if args.gc_threshold else "default gc"
    gc_text += " (W5's DataFlare runs: tune_gc, as dataflare run)"
    print(f"events: {args.events:,}, runs: {args.runs}, cpus: {os.cpu_count()}, {gc_text}")
    if args.only in (None, "w1", "w6"):
        from dataflare.broker import LocalBroker
        from dataflare.connectors.kafka import produce_records

        with LocalBroker() as broker:
            servers = broker.bootstrap_servers
            broker.create_topic("events", partitions=3)
            t0 = time.perf_counter()
            # Keyed by user: each user's events stay in time order in one partition, so
            # W6's window sees no late event and every run writes the same rows.
            evs = list(events(args.events))
            produce_records(servers, "events", evs, key=lambda i: evs[i]["user_id"].encode())
            print(f"produced {args.events:,} events in {time.perf_counter() - t0:.1f} s")
            if args.only in (None, "w1"):
                run_w1(args, broker)
            if args.only in (None, "w6"):
                run_w6(args, servers)

    if args.only in (None, "w5"):
        run_w5(args)


def run_w5(args: argparse.Namespace) -> None:
    """W5: references and merges, one of each per run, each into a fresh schema."""
    import psycopg

    merges = ["w5-merge-insert", "w5-merge-update", "w5-merge-change"]
    systems = ["w5-copy", "w5-copy-pk"]
    for m in merges:
        systems += [f"{m}-baseline", m] if args.baseline else [m]
    systems += ["w5-duckdb-arrow", "w5-duckdb-append"]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for _run in range(args.runs):
        for name in systems:
            if name.startswith("w5-duckdb"):
                with tempfile.TemporaryDirectory() as tmp:
                    results[name].append(spawn(name, events=args.events, schema=tmp))
                continue
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            try:
                results[name].append(spawn(name, args.baseline, events=args.events,
                                           schema=schema))
            finally:
                with psycopg.connect(PG_DSN, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    report("W5 warehouse sink: W2 output into PostgreSQL and DuckDB (items: rows)", results,
           "w5-copy", "row")

    def rate(name: str) -> float:
        return statistics.median(r["count"] / r["wall"] for r in results[name])

    for name in systems[2:-2]:
        print(f"  {name} rate = {rate(name) / rate('w5-copy'):.0%} of w5-copy, "
              f"{rate(name) / rate('w5-copy-pk'):.0%} of w5-copy-pk (target >= 50%)")
    if args.baseline:
        for m in merges:
            print(f"  {m} / baseline: rate {rate(m) / rate(m + '-baseline'):.2f}x")
    print(f"  w5-duckdb-append rate = {rate('w5-duckdb-append') / rate('w5-duckdb-arrow'):.0%}"
          " of w5-duckdb-arrow")


if __name__ == "__main__":
    main()
