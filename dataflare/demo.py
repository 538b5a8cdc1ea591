"""``make demo``: a Kafka-to-warehouse job on embedded defaults.

Starts a local Kafka-compatible broker, produces a sample clickstream and orders, runs
``flows/kafka_to_warehouse.yaml`` into a DuckDB file and prints the resulting table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import orjson

from dataflare.broker import LocalBroker
from dataflare.cli import main
from dataflare.connectors.generator import GeneratorConfig, make_records, record_maker

FLOWS = Path(__file__).resolve().parent.parent / "flows"
FLOW = FLOWS / "kafka_to_warehouse.yaml"


def produce(servers: str, topic: str, preset: str, count: int, users: int) -> None:
    """Produce ``count`` generated records of ``preset``, keyed by user, to ``topic``."""
    from confluent_kafka import Producer

    config = GeneratorConfig.model_validate(
        {"preset": preset, "count": count, "seed": 11,
         "fields": {"user_id": {"type": "text", "template": "u{n}", "min": 0, "max": users - 1}}}
    )
    make = record_maker(config)
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 20,
                         "enable.idempotence": True})
    for start in range(0, count, 5000):
        for rec in make_records(make, config.seed, start, min(5000, count - start)):
            producer.produce(topic, orjson.dumps(rec), key=rec["user_id"].encode())
        producer.flush()


def show(path: Path, limit: int = 12) -> None:
    """Print the busiest rows of the demo's warehouse table."""
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        total = con.execute("SELECT count(*) FROM user_activity").fetchall()[0][0]
        cur = con.execute(
            "SELECT user_id, window_start, events, spend, orders, revenue FROM user_activity "
            f"ORDER BY spend DESC, user_id LIMIT {int(limit)}"
        )
        header = [d[0] for d in cur.description]
        rows = [[str(v) for v in row] for row in cur.fetchall()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\nuser_activity in {path}: {total} rows; top {limit} by spend")
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def run(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m dataflare.demo", description=__doc__)
    parser.add_argument("--clicks", type=int, default=60_000, help="Clickstream events.")
    parser.add_argument("--orders", type=int, default=12_000, help="Orders.")
    parser.add_argument("--users", type=int, default=200, help="Distinct users.")
    parser.add_argument("--warehouse", type=Path, default=FLOWS / "out" / "warehouse.duckdb")
    args = parser.parse_args(argv)
    args.warehouse.parent.mkdir(parents=True, exist_ok=True)
    args.warehouse.unlink(missing_ok=True)
    with LocalBroker() as broker:
        broker.create_topic("clicks", partitions=3)
        broker.create_topic("orders", partitions=1)
        print(f"broker at {broker.bootstrap_servers}: producing {args.clicks} clicks and "
              f"{args.orders} orders", flush=True)
        produce(broker.bootstrap_servers, "clicks", "clickstream", args.clicks, args.users)
        produce(broker.bootstrap_servers, "orders", "orders", args.orders, args.users)
        os.environ["KAFKA_SERVERS"] = broker.bootstrap_servers
        os.environ["WAREHOUSE"] = str(args.warehouse.resolve())
        code = main(["run", str(FLOW)])
    if code == 0:
        show(args.warehouse)
    return code


if __name__ == "__main__":
    sys.exit(run())
