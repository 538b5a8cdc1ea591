"""Benchmark: the ``sql`` step per window against the ``window`` operator.

    .venv/bin/python bench/sql.py                       # 100,000 events, 20 users, 1 run
    .venv/bin/python bench/sql.py --events 50000 --users 100 --runs 1

Both compute, per user and 60 s tumbling window, the count, sum and max of ``amount``
over the same in-memory batches (1,000 records each, one worker): the ``window`` operator
with its generated aggregate loop, the ``sql`` step with DuckDB over each closed window's
records. The outputs are checked equal; the medians of wall seconds and the ratio
sql / window are printed.

Measured here (2 shared cores, one worker): 100,000 events in 1,680 windows (20 users):
window 0.12 s, sql 6.7 s (ratio 56); in 168 windows (2 users): window 0.28 s, sql 1.5 s
(ratio 5.5). The sql step pays about 4 ms per window (registering the Arrow table and
running one DuckDB query), so it suits few, large windows; the `window` operator is the
choice for many small ones.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bytewax.operators as op  # noqa: E402
from bytewax.dataflow import Dataflow  # noqa: E402
from bytewax.testing import TestingSink, TestingSource, run_main  # noqa: E402

from dataflare.operators.sql import SqlConfig, build_sql  # noqa: E402
from dataflare.operators.window import WindowConfig, window  # noqa: E402
from dataflare.registry import BuildContext  # noqa: E402

WINDOW = {"type": "tumbling", "size": "60s"}


def events(n: int, users: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    rnd = random.Random(seed)
    recs = [
        {"user_id": rnd.randrange(users), "ts": 1_704_067_200 + i * 0.05,
         "amount": rnd.randrange(1, 10_000) / 100}
        for i in range(n)
    ]
    return [recs[i : i + 1000] for i in range(0, n, 1000)]


def run_window(batches: list[Any]) -> list[Any]:
    cfg = WindowConfig.model_validate({
        "window": WINDOW, "time_field": "ts", "group_by": ["user_id"],
        "aggregations": [{"operations": ["count"], "as": "n"},
                         {"field": "amount", "operations": ["sum"], "as": "total"},
                         {"field": "amount", "operations": ["max"], "as": "top"}],
    })
    flow = Dataflow("bench_window")
    out: list[Any] = []
    w = window("w", op.input("in", flow, TestingSource(batches)), cfg)
    op.output("out", w.down, TestingSink(out))
    run_main(flow)
    return [r for b in out for r in b]


def run_sql(batches: list[Any]) -> list[Any]:
    cfg = SqlConfig.model_validate({
        "query": "select count(*) as n, sum(amount) as total, max(amount) as top from input",
        "window": WINDOW, "time_field": "ts", "group_by": ["user_id"],
    })
    ctx = BuildContext("q", "transformation", SimpleNamespace(inputs=["in"]), cfg, None, ROOT)
    flow = Dataflow("bench_sql")
    out: list[Any] = []
    built = build_sql(ctx, [op.input("in", flow, TestingSource(batches))])
    assert built.down is not None  # noqa: S101
    op.output("out", built.down, TestingSink(out))
    run_main(flow)
    return [r for b in out for r in b]


def canon(rows: list[Any]) -> list[str]:
    return sorted(
        json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()},
                   sort_keys=True)
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    batches = events(args.events, args.users)
    times: dict[str, list[float]] = {"window": [], "sql": []}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.runs):
        for name, fn in (("window", run_window), ("sql", run_sql)):
            t0 = time.perf_counter()
            rows = fn(batches)
            times[name].append(time.perf_counter() - t0)
            outputs[name] = canon(rows)
    if outputs["window"] != outputs["sql"]:
        sys.exit("outputs differ between window and sql")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.events} events, {args.users} users, {len(outputs['sql'])} windows")
    for name, s in med.items():
        print(f"{name:7s} {s:7.3f} s  {args.events / s:12,.0f} events/s")
    print(f"ratio sql/window: {med['sql'] / med['window']:.2f}")


if __name__ == "__main__":
    main()
