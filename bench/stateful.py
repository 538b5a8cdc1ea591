"""Benchmarks W2, W3 and W4 (stateful) of BENCHMARKS.md.

    .venv/bin/python bench/stateful.py                          # 1,000,000 events over Kafka
    .venv/bin/python bench/stateful.py --events 100000 --runs 1 --only w2
    .venv/bin/python bench/stateful.py --source memory          # no broker: JSON in memory

W2  drop ``view``; 60 s tumbling window per ``user_id``: count and sum of ``amount``
W3  5 min / 1 min sliding count per user, and 30 s gap sessions per user (one flow)
W4  events joined to orders (200,000, keyed by user) per user in 5 min tumbling windows
W7  W2 by DataFlare on one process and on two (one worker each; Kafka only)
WM  memory: one event for each of ``--events`` users in the same hour, so that many
    tumbling windows are open at once (events made as they are read, no broker)

Systems, each in its own process on the same data:

- raw: a hand-written single-threaded loop (``Consumer.consume(10000)`` + orjson + a dict
  of windows), the floor for Python;
- bytewax: the pipeline by hand with bytewax's own operators (``fold_window`` /
  ``join_window`` with ``EventClock`` and the tumbling, sliding and session windowers),
  one message per item as bytewax's Kafka connector delivers them;
- quix: Quix Streams (W2 only; Kafka source only). Quix closes a window when a later
  message of its partition arrives and never at the end of the input, so only the
  windows it closed are compared;
- dataflare: DataFlare's Kafka source and ``window`` / ``join`` operators.

Each system reports wall and CPU seconds of its pipeline (imports, set-up and the output
check excluded) and peak RSS; medians of ``--runs`` runs are printed with the ratios to
the raw loop, and every system's output is checked against the raw loop's.
Events are keyed by user, so each user's events are in time order within a partition
and no system sees late events.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Last, so that a ``--baseline`` child's PYTHONPATH (another tree's package) comes first.
sys.path.append(str(ROOT))

EVENTS = ("view", "click", "add_to_cart", "purchase")
T0 = 1_704_067_200_000
MIN = 60_000
HOUR = 60 * MIN
WM_BYTEWAX_MAX = 2_000
TIMED: dict[str, float] = {}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# bytewax's EventClock also advances its watermark with system time: with no wait, a
# user's event that reaches the window a little later than its predecessor (Kafka
# partitions are read side by side) can be dropped as late. The by-hand pipelines wait a
# few seconds so that, like the other systems, they drop nothing; a long wait would keep
# every window open and slow bytewax down (its windows cost more the more are open).
BYTEWAX_WAIT = timedelta(seconds=5)

# ------------------------------------------------------------------------------- data


def events(n: int, seed: int = 42) -> Iterator[dict[str, Any]]:
    """The benchmark events: fixed seed, ~100 bytes each, +10 ms per event."""
    rng = random.Random(seed)
    for i in range(n):
        yield {
            "id": i,
            "user_id": f"u{rng.randrange(10_000)}",
            "event": EVENTS[rng.randrange(4)],
            "amount": round(rng.random() * 100, 2),
            "ts": T0 + 10 * i,
        }


def orders(n_events: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Orders over the same time span: one per five events (200,000 for 1M events)."""
    rng = random.Random(seed)
    n = n_events // 5
    for j in range(n):
        yield {
            "order_id": j,
            "user_id": f"u{rng.randrange(10_000)}",
            "total": round(rng.random() * 500, 2),
            "ts": T0 + 50 * j,
        }


def user_key(i: int, rec: dict[str, Any]) -> bytes:
    return rec["user_id"].encode()


# --------------------------------------------------------------------------- inputs
# Every system reads JSON bytes: from Kafka, or (``--source memory``) from a list made
# before the clock starts.


PRELOADED: dict[str, list[bytes]] = {}
PARTS: dict[str, list[list[bytes]]] = {}


def preload(n: int, partitions: int = 3) -> None:
    """Make the in-memory messages before the clock starts, also split by user into
    ``partitions`` like the keyed Kafka topics (each user's events in order)."""
    import zlib

    import orjson

    for topic, gen in (("events", events(n)), ("orders", orders(n))):
        msgs = PRELOADED[topic] = []
        parts: list[list[bytes]] = [[] for _ in range(partitions)]
        for rec in gen:
            # bytes() copies: orjson leaves each result in an oversized allocation.
            msg = bytes(bytearray(orjson.dumps(rec)))
            msgs.append(msg)
            parts[zlib.crc32(rec["user_id"].encode()) % partitions].append(msg)
        PARTS[topic] = parts


def memory_partitions(topic: str) -> Any:
    """A bytewax source of the preloaded messages of ``topic``: its partitions spread over
    the workers of every process, 10,000 messages per batch."""
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

    class Part(StatefulSourcePartition[list[bytes], None]):
        def __init__(self, msgs: list[bytes]) -> None:
            self.chunks = iter([msgs[i : i + 10_000] for i in range(0, len(msgs), 10_000)])

        def next_batch(self) -> list[list[bytes]]:
            return [next(self.chunks)]  # one item, a chunk; StopIteration: the end

        def snapshot(self) -> None:
            return None

    class Parts(FixedPartitionedSource[list[bytes], None]):
        def list_parts(self) -> list[str]:
            return [str(i) for i in range(len(PARTS[topic]))]

        def build_part(self, step_id: str, for_part: str, resume_state: None) -> Part:
            return Part(PARTS[topic][int(for_part)])

    return Parts()


def memory_messages(topic: str, n: int) -> list[bytes]:
    return PRELOADED[topic]


def raw_consume(args: argparse.Namespace, topic: str) -> Iterator[list[bytes]]:
    """Chunks of message values, as ``Consumer.consume(10000)`` returns them."""
    if args.source == "memory":
        data = memory_messages(topic, args.events)
        for i in range(0, len(data), 10_000):
            yield data[i : i + 10_000]
        return
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": args.servers,
            "group.id": f"raw-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    done: set[int] = set()
    while len(done) < len(parts):
        chunk = []
        for msg in consumer.consume(10_000, 0.5):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
                continue
            chunk.append(msg.value())
        if chunk:
            yield chunk
    consumer.close()


def bytewax_input(args: argparse.Namespace, flow: Any, topic: str) -> Any:
    """A stream of single parsed events, as bytewax users write it."""
    import bytewax.operators as op
    import orjson

    if args.source == "memory":
        from bytewax.testing import TestingSource

        data = memory_messages(topic, args.events)
        raw = op.input(f"in_{topic}", flow, TestingSource(data, batch_size=10_000))
        return op.map(f"parse_{topic}", raw, orjson.loads)
    from bytewax.connectors.kafka import operators as kop

    kin = kop.input(f"in_{topic}", flow, brokers=[args.servers], topics=[topic], tail=False)
    return op.map(f"parse_{topic}", kin.oks, lambda m: orjson.loads(m.value))


def dataflare_input(args: argparse.Namespace, flow: Any, topic: str) -> Any:
    """A stream of record batches: DataFlare's Kafka source (or batches from memory)."""
    import bytewax.operators as op
    import orjson

    if args.source == "memory":
        raw = op.input(f"in_{topic}", flow, memory_partitions(topic))
        loads = orjson.loads
        return op.map(f"parse_{topic}", raw, lambda chunk: [loads(b) for b in chunk])
    from dataflare.connectors.kafka import KafkaSource, KafkaSourceConfig

    cfg = KafkaSourceConfig(bootstrap_servers=args.servers, topic=topic, stop_at_end=True)
    return op.input(topic, flow, KafkaSource(cfg, stop_at_end=True, step=topic))


def run_flow(flow: Any, epoch_interval: timedelta | None = None) -> None:
    from bytewax.testing import run_main

    run_main(flow, epoch_interval=epoch_interval)


def run_dataflare_flow(flow: Any, epoch_interval: timedelta | None = None) -> None:
    """Run a DataFlare pipeline as ``dataflare run`` without recovery runs it: with the GC
    settings of ``compile_file`` (without them the collector took up to half of W4's CPU)
    and no snapshot pickled at the epochs' ends (a baseline tree without
    ``run_recovery`` pickles them)."""
    from dataflare.dsl_compiler.compiler import tune_gc

    tune_gc()
    with _unrecovered():
        run_flow(flow, epoch_interval)


def _unrecovered() -> Any:
    import contextlib

    try:
        from dataflare.operators.keyed import run_recovery
    except ImportError:  # a tree from before run_recovery (``--baseline``)
        return contextlib.nullcontext()
    return run_recovery(False)


def iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# ------------------------------------------------------------------------------- W2


def w2_raw(args: argparse.Namespace) -> list[tuple]:
    import orjson

    loads = orjson.loads
    acc: dict[tuple[str, int], list[Any]] = {}
    for chunk in raw_consume(args, "events"):
        for value in chunk:
            e = loads(value)
            if e["event"] == "view":
                continue
            k = (e["user_id"], e["ts"] // MIN)
            slot = acc.get(k)
            if slot is None:
                acc[k] = [1, e["amount"]]
            else:
                slot[0] += 1
                slot[1] += e["amount"]
    return [(u, w * MIN, c, s) for (u, w), (c, s) in acc.items()]


def w2_bytewax(args: argparse.Namespace) -> list[tuple]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow

    flow = Dataflow("w2_bytewax")
    evs = op.filter("engaged", bytewax_input(args, flow, "events"), lambda e: e["event"] != "view")
    return bytewax_count_sum(flow, evs, MIN)


def bytewax_count_sum(flow: Any, evs: Any, size_ms: int) -> list[tuple]:
    """Count and sum of ``amount`` per user in tumbling windows of ``size_ms``, by hand."""
    import bytewax.operators as op
    import bytewax.operators.windowing as win
    from bytewax.testing import TestingSink

    keyed = op.key_on("user", evs, lambda e: e["user_id"])
    clock = win.EventClock(
        lambda e: EPOCH + timedelta(milliseconds=e["ts"]), wait_for_system_duration=BYTEWAX_WAIT
    )
    windower = win.TumblingWindower(length=timedelta(milliseconds=size_ms), align_to=EPOCH)
    out = win.fold_window(
        "count_sum",
        keyed,
        clock,
        windower,
        lambda: [0, 0.0],
        lambda a, e: [a[0] + 1, a[1] + e["amount"]],
        lambda a, b: [a[0] + b[0], a[1] + b[1]],
    )
    got: list[Any] = []
    op.output("out", out.down, TestingSink(got))
    run_flow(flow)
    return [(u, wid * size_ms, a[0], a[1]) for u, (wid, a) in got]


def w2_config(size: str = "60s") -> Any:
    """DataFlare's window step of W2: count and sum of ``amount`` per user."""
    from dataflare.operators.window import WindowConfig

    return WindowConfig.model_validate(
        {
            "window": {"type": "tumbling", "size": size},
            "time_field": "ts",
            "time_unit": "ms",
            "group_by": ["user_id"],
            "aggregations": [{"operations": ["count"]}, {"field": "amount", "operations": ["sum"]}],
        }
    )


def w2_dataflare(args: argparse.Namespace) -> list[tuple]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink

    from dataflare.operators.window import window

    cfg = w2_config()
    flow = Dataflow("w2_dataflare")
    batches = dataflare_input(args, flow, "events")
    engaged = op.map("engaged", batches, lambda b: [e for e in b if e["event"] != "view"])
    got: list[Any] = []
    op.output("out", window("w2", engaged, cfg).down, TestingSink(got))
    run_dataflare_flow(flow)
    return got


def w2_dataflare_rows(got: list[Any]) -> list[tuple]:
    return [
        (r["user_id"], iso_ms(r["window_start"]), r["count"], r["amount_sum"])
        for b in got
        for r in b
    ]


def w2_quix(args: argparse.Namespace) -> list[tuple]:
    import logging

    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Sum

    logging.getLogger("quixstreams").setLevel(logging.ERROR)
    app = Application(
        broker_address=args.servers,
        consumer_group=f"quix-{uuid.uuid4()}",
        auto_offset_reset="earliest",
        loglevel="ERROR",
        use_changelog_topics=False,
        state_dir=f"/tmp/quix-state-{uuid.uuid4()}",
    )
    topic = app.topic(
        "events",
        value_deserializer="json",
        timestamp_extractor=lambda value, headers, ts, ttype: value["ts"],
    )
    # Tansu does not report topic configs; Quix needs the retention to size its state.
    topic.broker_config.extra_config.setdefault("retention.ms", "-1")
    sdf = app.dataframe(topic)
    sdf = sdf.filter(lambda e: e["event"] != "view")
    sdf = sdf.tumbling_window(timedelta(seconds=60)).agg(count=Count(), amount_sum=Sum("amount"))
    sdf = sdf.final()
    rows = app.run(sdf, timeout=3.0, metadata=True)
    return [
        (
            r["_key"].decode() if isinstance(r["_key"], bytes) else r["_key"],
            r["start"],
            r["count"],
            r["amount_sum"],
        )
        for r in rows
    ]


# ------------------------------------------------------------------------------- W3


def w3_raw(args: argparse.Namespace) -> list[tuple]:
    import orjson

    loads = orjson.loads
    sliding: dict[tuple[str, int], int] = {}
    sessions: dict[str, list[list[int]]] = {}
    gap = 30_000
    for chunk in raw_consume(args, "events"):
        for value in chunk:
            e = loads(value)
            u, t = e["user_id"], e["ts"]
            k = t // MIN
            for start in range(k - 4, k + 1):
                sk = (u, start)
                sliding[sk] = sliding.get(sk, 0) + 1
            ss = sessions.get(u)
            if ss is None:
                sessions[u] = [[t, t, 1]]
            else:
                last = ss[-1]
                if t - last[1] < gap:
                    last[1] = t
                    last[2] += 1
                else:
                    ss.append([t, t, 1])
    out = [("slide", u, s * MIN, c) for (u, s), c in sliding.items()]
    out += [("session", u, a, b, c) for u, ss in sessions.items() for a, b, c in ss]
    return out


def w3_bytewax(args: argparse.Namespace) -> list[tuple]:
    import bytewax.operators as op
    import bytewax.operators.windowing as win
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink

    flow = Dataflow("w3_bytewax")
    keyed = op.key_on("user", bytewax_input(args, flow, "events"), lambda e: e["user_id"])
    clock = win.EventClock(
        lambda e: EPOCH + timedelta(milliseconds=e["ts"]), wait_for_system_duration=BYTEWAX_WAIT
    )
    sliding = win.SlidingWindower(
        length=timedelta(minutes=5), offset=timedelta(minutes=1), align_to=EPOCH
    )
    # bytewax joins items at most `gap` apart; the benchmark's sessions need less than
    # 30 s (times are whole milliseconds).
    session = win.SessionWindower(gap=timedelta(seconds=30) - timedelta(milliseconds=1))

    def counter(step: str, windower: Any) -> Any:
        return win.fold_window(
            step, keyed, clock, windower, lambda: 0, lambda a, e: a + 1, lambda a, b: a + b
        )

    s_out, x_out = counter("sliding", sliding), counter("sessions", session)
    got_s: list[Any] = []
    got_x: list[Any] = []
    got_meta: list[Any] = []
    op.output("out_s", s_out.down, TestingSink(got_s))
    op.output("out_x", x_out.down, TestingSink(got_x))
    op.output("meta_x", x_out.meta, TestingSink(got_meta))
    run_flow(flow)
    out = [("slide", u, wid * MIN, c) for u, (wid, c) in got_s]
    meta = {(u, wid): m for u, (wid, m) in got_meta}
    for u, (wid, c) in got_x:
        m = meta[(u, wid)]
        out.append(
            (
                "session",
                u,
                (m.open_time - EPOCH) // timedelta(milliseconds=1),
                (m.close_time - EPOCH) // timedelta(milliseconds=1),
                c,
            )
        )
    return out


def w3_dataflare(args: argparse.Namespace) -> list[Any]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink

    from dataflare.operators.window import WindowConfig, window

    def cfg(spec: dict[str, Any]) -> WindowConfig:
        return WindowConfig.model_validate(
            {"window": spec, "time_field": "ts", "time_unit": "ms", "group_by": ["user_id"]}
        )

    flow = Dataflow("w3_dataflare")
    batches = dataflare_input(args, flow, "events")
    got_s: list[Any] = []
    got_x: list[Any] = []
    sliding = window("sliding", batches, cfg({"type": "sliding", "size": "5m", "slide": "1m"}))
    sessions = window("sessions", batches, cfg({"type": "session", "gap": "30s"}))
    op.output("out_s", sliding.down, TestingSink(got_s))
    op.output("out_x", sessions.down, TestingSink(got_x))
    run_dataflare_flow(flow)
    return [got_s, got_x]


def w3_dataflare_rows(got: list[Any]) -> list[tuple]:
    got_s, got_x = got
    out = [("slide", r["user_id"], iso_ms(r["window_start"]), r["count"]) for b in got_s for r in b]
    out += [
        ("session", r["user_id"], iso_ms(r["window_start"]), iso_ms(r["window_end"]), r["count"])
        for b in got_x
        for r in b
    ]
    return out


# ------------------------------------------------------------------------------- W4

WIN4 = 5 * MIN
# The two topics are read side by side at their own pace: a user's orders can trail its
# events by any amount, so both systems wait for the whole input (no side is late).
W4_LATENESS = timedelta(days=1)


def w4_raw(args: argparse.Namespace) -> list[tuple]:
    import orjson

    loads = orjson.loads
    sides: dict[tuple[str, int], list[list[int]]] = {}
    for topic, i in (("events", 0), ("orders", 1)):
        ident = "id" if topic == "events" else "order_id"
        for chunk in raw_consume(args, topic):
            for value in chunk:
                r = loads(value)
                k = (r["user_id"], r["ts"] // WIN4)
                slot = sides.get(k)
                if slot is None:
                    slot = sides[k] = [[], []]
                slot[i].append(r[ident])
    return [(e, o) for lefts, rights in sides.values() for e in lefts for o in rights]


def w4_bytewax(args: argparse.Namespace) -> list[tuple]:
    import bytewax.operators as op
    import bytewax.operators.windowing as win
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink

    flow = Dataflow("w4_bytewax")
    evs = op.key_on("ev_user", bytewax_input(args, flow, "events"), lambda e: e["user_id"])
    ords = op.key_on("or_user", bytewax_input(args, flow, "orders"), lambda o: o["user_id"])
    clock = win.EventClock(
        lambda r: EPOCH + timedelta(milliseconds=r["ts"]), wait_for_system_duration=W4_LATENESS
    )
    windower = win.TumblingWindower(length=timedelta(minutes=5), align_to=EPOCH)
    joined = win.join_window("w4", clock, windower, evs, ords, insert_mode="product")
    got: list[Any] = []
    op.output("out", joined.down, TestingSink(got))
    run_flow(flow)
    return [(e["id"], o["order_id"]) for _u, (_wid, (e, o)) in got if e and o]


def w4_dataflare(args: argparse.Namespace) -> list[Any]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink

    from dataflare.operators.join import JoinConfig, join

    cfg = JoinConfig.model_validate(
        {
            "join_key": "user_id",
            "join_type": "inner",
            "window": {"type": "tumbling", "size": "5m"},
            "time_field": "ts",
            "time_unit": "ms",
            "allowed_lateness": "1d",
        }
    )
    flow = Dataflow("w4_dataflare")
    # The workflow ``join -> mapping {id, order_id}``: the compiler has the join hold only
    # the two fields the mapping reads (tests/dsl_compiler/test_projection.py); a
    # ``--baseline`` tree from before that holds whole records.
    evs, ords = dataflare_input(args, flow, "events"), dataflare_input(args, flow, "orders")
    try:
        joined = join("w4", evs, ords, cfg, fields=frozenset({"id", "order_id"}))
    except TypeError:
        joined = join("w4", evs, ords, cfg)
    pairs = op.map("pairs", joined.down, lambda b: [(r["id"], r["order_id"]) for r in b])
    got: list[Any] = []
    op.output("out", pairs, TestingSink(got))
    run_dataflare_flow(flow)
    return got


def w4_dataflare_rows(got: list[Any]) -> list[tuple]:
    return [pair for b in got for pair in b]


# ------------------------------------------------------------------------------- W7
# W2 on one process and on two (bytewax's -i/-a: one worker per process, Kafka only).


def w7_worker(args: argparse.Namespace) -> None:
    """One process of the two-process W2 run: write its window rows to ``--dump``."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, cluster_main

    from dataflare.operators.window import window

    if args.source == "memory":  # every process holds the data, reads its partitions
        preload(args.events, args.partitions)
    flow = Dataflow("w7_dataflare")
    batches = dataflare_input(args, flow, "events")
    engaged = op.map("engaged", batches, lambda b: [e for e in b if e["event"] != "view"])
    got: list[Any] = []
    op.output("out", window("w2", engaged, w2_config()).down, TestingSink(got))
    # Like the one-process run, only the pipeline is timed (not start-up and imports), and
    # every process starts it when all are ready (the in-memory input takes seconds to make).
    from dataflare.dsl_compiler.compiler import tune_gc

    tune_gc()
    Path(f"{args.dump}.ready").touch()
    go = Path(args.dump).with_name("go")
    while not go.exists():
        time.sleep(0.005)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    with _unrecovered():
        cluster_main(flow, args.addresses.split(";"), args.proc)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    Path(args.dump).write_text(
        json.dumps({"rows": w2_dataflare_rows(got), "t0": t0, "t1": t1, "cpu": cpu})
    )


def w7_one_process(args: argparse.Namespace) -> list[tuple]:
    """W2 by the W7 worker alone: timed as each of the two processes times itself."""
    from dataflare.broker import free_port

    return w7_processes(args, [f"127.0.0.1:{free_port()}"])


def w7_two_processes(args: argparse.Namespace) -> list[tuple]:
    from dataflare.broker import free_port

    return w7_processes(args, [f"127.0.0.1:{free_port()}" for _ in range(2)])


def w7_processes(args: argparse.Namespace, addresses: list[str],
                 host: Callable[[int], list[str]] = lambda i: []) -> list[tuple]:
    """W2 on one process per address; ``host(i)`` prefixes process i's command."""
    procs = []
    for i in range(len(addresses)):
        cmd = [*host(i), sys.executable, __file__, "--child", "w7-worker", "--source", args.source,
               "--partitions", str(args.partitions)]
        cmd += ["--addresses", ";".join(addresses), "--proc", str(i)]
        cmd += ["--servers", args.servers] if args.servers else []
        cmd += ["--events", str(args.events), "--dump", f"{args.dump}.{i}"]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "RUST_BACKTRACE": "0"}))
    go = Path(args.dump).with_name("go")  # every process starts its pipeline at once
    while not all(Path(f"{args.dump}.{i}.ready").exists() for i in range(len(procs))):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.005)
    go.touch()
    for p in procs:
        if p.wait() != 0:
            msg = "a W7 worker process failed"
            raise RuntimeError(msg)
    rows: list[tuple] = []
    parts = []
    for i in range(len(addresses)):
        path = Path(f"{args.dump}.{i}")
        parts.append(json.loads(path.read_text()))
        path.unlink()
        Path(f"{path}.ready").unlink()
        rows += [tuple(r) for r in parts[-1]["rows"]]
    go.unlink()
    TIMED["wall"] = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    TIMED["cpu"] = sum(p["cpu"] for p in parts)
    TIMED["cpu_max"] = max(p["cpu"] for p in parts)  # the busier process's
    # The window work each process did: its share of the output rows (of the shards it ran).
    TIMED["busiest"] = max(len(p["rows"]) for p in parts) / max(1, len(rows))
    return rows


# ------------------------------------------------------------------ WM: open windows


def wm_events(n: int) -> Iterator[dict[str, Any]]:
    """``n`` users with one event each, all in the same hour: ``n`` windows stay open."""
    for i in range(n):
        yield {"user_id": f"u{i}", "amount": float(i % 1000) / 10, "ts": T0 + i // 1000}


def wm_raw(args: argparse.Namespace) -> list[tuple]:
    acc: dict[tuple[str, int], list[Any]] = {}
    for e in wm_events(args.events):
        k = (e["user_id"], e["ts"] // HOUR)
        slot = acc.get(k)
        if slot is None:
            acc[k] = [1, e["amount"]]
        else:
            slot[0] += 1
            slot[1] += e["amount"]
    return [(u, w * HOUR, c, s) for (u, w), (c, s) in acc.items()]


def wm_bytewax(args: argparse.Namespace) -> list[tuple]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSource

    flow = Dataflow("wm_bytewax")
    return bytewax_count_sum(flow, op.input("in", flow, TestingSource(wm_events(args.events))),
                             HOUR)


def wm_dataflare(args: argparse.Namespace) -> list[Any]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource

    from dataflare.operators.window import window

    cfg = w2_config("1h")

    def batches() -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for e in wm_events(args.events):
            batch.append(e)
            if len(batch) == 10_000:
                yield batch
                batch = []
        if batch:
            yield batch

    flow = Dataflow("wm_dataflare")
    got: list[Any] = []
    up = op.input("in", flow, TestingSource(batches()))
    op.output("out", window("wm", up, cfg).down, TestingSink(got))
    if not args.recovered:
        run_dataflare_flow(flow, timedelta(seconds=args.snapshot_interval))
        return got
    import tempfile

    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.testing import run_main

    from dataflare.dsl_compiler.compiler import tune_gc
    from dataflare.operators.keyed import run_recovery

    # As ``dataflare run -r DIR -s 1`` runs it: a recovery partition, a snapshot at the
    # end of every epoch (1 s by default, ``--snapshot-interval``), no backup delay.
    tune_gc()
    with tempfile.TemporaryDirectory(prefix="wm-recovery-") as tmp:
        init_db_dir(Path(tmp), 1)
        with run_recovery(True):
            run_main(flow, epoch_interval=timedelta(seconds=args.snapshot_interval),
                     recovery_config=RecoveryConfig(tmp, timedelta(0)))
        TIMED["snapshot_mb"] = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    return got


def wm_recovered(args: argparse.Namespace) -> list[Any]:
    """WM by DataFlare with recovery on (``-s 1``): the W6 cost with that many windows."""
    args.recovered = True
    return wm_dataflare(args)


# ------------------------------------------------------------------------------ driver

SYSTEMS: dict[str, dict[str, Callable[[argparse.Namespace], Any]]] = {
    "w2": {"raw": w2_raw, "bytewax": w2_bytewax, "quix": w2_quix, "dataflare": w2_dataflare},
    "w3": {"raw": w3_raw, "bytewax": w3_bytewax, "dataflare": w3_dataflare},
    "w4": {"raw": w4_raw, "bytewax": w4_bytewax, "dataflare": w4_dataflare},
    "w7": {"raw": w2_raw, "1proc": w7_one_process, "2proc": w7_two_processes},
    "wm": {"raw": wm_raw, "bytewax": wm_bytewax, "dataflare": wm_dataflare,
           "recovered": wm_recovered},
}
ROWS: dict[str, Callable[[Any], list[tuple]]] = {
    "w2-dataflare": w2_dataflare_rows,
    "w3-dataflare": w3_dataflare_rows,
    "w4-dataflare": w4_dataflare_rows,
    "wm-dataflare": w2_dataflare_rows,
    "wm-recovered": w2_dataflare_rows,
}
# ``--baseline``: the other tree's systems, and the system of this tree each one runs.
BASELINES = {"baseline": "dataflare", "baseline_recovered": "recovered",
             "baseline_1proc": "1proc", "baseline_2proc": "2proc"}


def measure(fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Wall and CPU seconds of ``fn`` (all threads) and peak RSS; and its result."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    cpu += (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    rss = max(r1.ru_maxrss, c1.ru_maxrss) / 1024
    return {"wall": wall, "cpu": cpu, "rss_mb": rss}, result


def canonical(rows: list[tuple]) -> list[str]:
    def fix(v: Any) -> Any:
        return round(v, 2) if isinstance(v, float) else v

    return sorted(json.dumps([fix(v) for v in row]) for row in rows)


# What each system imports, imported before its clock starts: a run measures the
# pipeline, not the start of the process (importing DataFlare's operators took 0.3 s).
IMPORTS = {
    "raw": ["orjson", "confluent_kafka"],
    "bytewax": ["orjson", "bytewax.operators", "bytewax.operators.windowing",
                "bytewax.testing", "bytewax.connectors.kafka"],
    "quix": ["quixstreams", "quixstreams.dataframe.windows"],
    "dataflare": ["orjson", "bytewax.operators", "bytewax.testing", "bytewax.recovery",
                  "zstandard", "dataflare.connectors.kafka", "dataflare.operators.window",
                  "dataflare.operators.join", "dataflare.operators.keyed",
                  "dataflare.dsl_compiler.compiler"],
}


def import_modules(system: str) -> None:
    """Import what ``system`` uses (a ``--baseline`` tree may lack some: skipped)."""
    import importlib

    kind = system if system in IMPORTS else "dataflare"  # recovered, 1proc, baselines
    for name in IMPORTS[kind]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def child(args: argparse.Namespace) -> None:
    """Run one system in this process; print its measurement and output digest as JSON."""
    if args.child == "w7-worker":
        w7_worker(args)
        return
    workload, system = args.child.split("-", 1)
    if args.source == "memory" and workload != "wm":  # WM makes its events as it goes
        preload(args.events, args.partitions)
    import_modules(system)
    result, got = measure(lambda: SYSTEMS[workload][system](args))
    result.update(TIMED)  # a system that times itself (W7's two processes)
    rows = ROWS.get(args.child, lambda g: g)(got)
    lines = canonical(rows)
    result["count"] = len(lines)
    result["digest"] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    if args.dump:
        Path(args.dump).write_text("\n".join(lines))
    print(json.dumps(result))


def spawn(name: str, args: argparse.Namespace, dump: str) -> dict[str, Any]:
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    workload, system = name.split("-", 1)
    if system in BASELINES:  # DataFlare as of another tree (``--baseline``)
        name = f"{workload}-{BASELINES[system]}"
        env["PYTHONPATH"] = args.baseline
    cmd = [sys.executable, __file__, "--child", name, "--events", str(args.events)]
    cmd += ["--source", args.source, "--partitions", str(args.partitions), "--dump", dump]
    cmd += ["--snapshot-interval", str(args.snapshot_interval)]
    if args.servers:
        cmd += ["--servers", args.servers]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        msg = f"{name} failed:\n{out.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(title: str, results: dict[str, list[dict[str, Any]]], n_events: int,
           interval: float = 1.0) -> None:
    print(f"\n{title}")
    med: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        med[name] = {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_mb")}
        m = med[name]
        print(
            f"  {name:<10} wall {m['wall']:7.2f} s   cpu {m['cpu']:7.2f} s   "
            f"rss {m['rss_mb']:6.0f} MB   {n_events / m['wall']:>10,.0f} events/s   "
            f"{runs[0]['count']:>9,} output rows   {runs[0]['check']}"
        )
    base = med["raw"]
    for name, m in med.items():
        if name != "raw":
            print(
                f"  {name} / raw: wall {m['wall'] / base['wall']:.2f}x, "
                f"cpu {m['cpu'] / base['cpu']:.2f}x"
            )
    for prefix in ("", "baseline_"):
        if f"{prefix}2proc" in med:
            one, two = med[f"{prefix}1proc"], med[f"{prefix}2proc"]
            busiest = results[f"{prefix}2proc"][0]["busiest"]
            # With a core per process, the wall time is the busier process's CPU time:
            # on a shared machine this ratio holds where the wall ratio does not.
            cpu_max = statistics.median(r["cpu_max"] for r in results[f"{prefix}2proc"])
            print(f"  {prefix}2proc: {one['wall'] / two['wall']:.2f}x the throughput of "
                  f"{prefix}1proc (wall), {two['cpu'] / one['cpu']:.2f}x its CPU, "
                  f"{one['cpu'] / cpu_max:.2f}x its CPU over the busier process's; the busier "
                  f"process made {busiest:.1%} of the window rows")
    if title.startswith("WM") and "dataflare" in med:
        windows = results["dataflare"][0]["count"]
        print(
            f"  dataflare: peak RSS {med['dataflare']['rss_mb']:.0f} MB with {windows:,} open "
            f"windows, raw {base['rss_mb']:.0f} MB (target: under 600 MB for 1,000,000)"
        )
    for base, system in BASELINES.items():
        if system in med and base in med:
            d, b = med[system], med[base]
            print(
                f"  {system} / {base}: wall {d['wall'] / b['wall']:.2f}x, "
                f"cpu {d['cpu'] / b['cpu']:.2f}x, peak RSS {d['rss_mb'] / b['rss_mb']:.2f}x"
            )
    for off, on in (("dataflare", "recovered"), ("baseline", "baseline_recovered")):
        if off in med and on in med:  # W6 with as many open windows as WM has
            mb = statistics.median(r["snapshot_mb"] for r in results[on])
            cost = 1 - med[off]["wall"] / med[on]["wall"]
            print(
                f"  {on}: recovery on (-s {interval:g}) costs {cost:.0%} of {off}'s "
                f"throughput (wall), "
                f"{med[on]['cpu'] / med[off]['cpu'] - 1:.0%} more CPU; recovery store "
                f"{mb:.0f} MB at the end (target: cost <= 10%)"
            )
    if "dataflare" in med:
        d = med["dataflare"]
        for ref in ("bytewax", "quix"):
            if ref in med:
                r = med[ref]
                print(
                    f"  dataflare is {r['wall'] / d['wall']:.1f}x faster than {ref} (wall), "
                    f"{r['cpu'] / d['cpu']:.1f}x (cpu)"
                )


def check(name: str, res: dict[str, Any], raw: dict[str, Any], raw_dump: Path, dump: Path) -> str:
    if res["digest"] == raw["digest"]:
        return "same output as raw"
    if name.endswith("quix") and dump.exists():
        # Quix never closes the windows still open at the end of its partitions.
        want = set(raw_dump.read_text().splitlines())
        got = dump.read_text().splitlines()
        extra = [g for g in got if g not in want]
        if not extra:
            return f"its {len(got):,} closed windows match raw ({len(want) - len(got):,} open)"
        return f"DIFFERS from raw ({len(extra):,} rows not in raw)"
    return "DIFFERS from raw"


def produce(servers: str, n: int) -> None:
    t0 = time.perf_counter()
    for topic, gen in (("events", events(n)), ("orders", orders(n))):
        produce_keyed(servers, topic, gen)
    print(f"produced {n:,} events and {n // 5:,} orders in {time.perf_counter() - t0:.1f} s")


def produce_keyed(servers: str, topic: str, gen: Iterator[dict[str, Any]]) -> None:
    """Write ``gen`` keyed by user (the default partitioner keeps a user's events in order)."""
    import orjson
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": servers, "linger.ms": 20})
    for rec in gen:
        while True:
            try:
                producer.produce(topic, orjson.dumps(rec), rec["user_id"].encode())
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(60):
        msg = f"messages to {topic!r} not acknowledged"
        raise RuntimeError(msg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to generate")
    parser.add_argument("--runs", type=int, default=3, help="runs per system (median)")
    parser.add_argument("--only", choices=sorted(SYSTEMS), action="append", help="workload(s)")
    parser.add_argument("--source", choices=["kafka", "memory"], default="kafka")
    parser.add_argument("--partitions", type=int, default=3,
                        help="partitions of each topic (Kafka) or of the in-memory input")
    parser.add_argument(
        "--skip", action="append", default=[], help="system(s) to skip: bytewax, quix"
    )
    parser.add_argument(
        "--snapshot-interval", type=float, default=1.0,
        help="WM: seconds per epoch (dataflare run's -s), with recovery on and off",
    )
    parser.add_argument("--keep", action="store_true", help="keep the output dumps in /tmp")
    parser.add_argument(
        "--baseline",
        help="a directory holding another tree's dataflare package (e.g. `git archive` of an "
        "earlier commit): run as system 'baseline' beside 'dataflare', for before/after",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--recovered", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--servers", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--proc", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(
        f"events: {args.events:,}, runs: {args.runs}, source: {args.source}, cpus: {os.cpu_count()}"
    )
    broker = None
    if args.source == "kafka":
        from dataflare.broker import LocalBroker

        broker = LocalBroker().start()
        args.servers = broker.bootstrap_servers
        broker.create_topic("events", partitions=args.partitions)
        broker.create_topic("orders", partitions=args.partitions)
        produce(args.servers, args.events)
    tmp = Path(f"/tmp/dataflare-bench-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for workload in args.only or sorted(SYSTEMS):
            names = [
                s
                for s in SYSTEMS[workload]
                if s not in args.skip and not (s == "quix" and args.source != "kafka")
            ]
            if args.baseline:
                for base, system in BASELINES.items():
                    if system in names:
                        names.insert(names.index(system), base)
            if workload == "wm" and args.events > WM_BYTEWAX_MAX and "bytewax" in names:
                # Every item makes bytewax visit each open window: 1,000 take 3.5 s.
                print(f"\nWM: bytewax skipped above {WM_BYTEWAX_MAX:,} open windows "
                      "(its time grows with the square of their number)")
                names.remove("bytewax")
            results: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
            for _ in range(args.runs):
                for system in names:
                    dump = tmp / f"{workload}-{system}.txt"
                    r = spawn(f"{workload}-{system}", args, str(dump))
                    busier = f", busier process {r['cpu_max']:.2f} s" if "cpu_max" in r else ""
                    print(f"  {system}: wall {r['wall']:.2f} s, cpu {r['cpu']:.2f} s{busier}",
                          flush=True)
                    results[system].append(r)
            raw = results["raw"][0]
            for system, runs in results.items():
                for r in runs:
                    r["check"] = check(
                        system,
                        r,
                        raw,
                        tmp / f"{workload}-raw.txt",
                        tmp / f"{workload}-{system}.txt",
                    )
            report(f"{workload.upper()} ({args.events:,} events)", results, args.events,
                   args.snapshot_interval)
    finally:
        if broker is not None:
            broker.stop()
        if not args.keep:
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()


if __name__ == "__main__":
    main()
