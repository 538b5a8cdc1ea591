"""Nexmark q0, q1, q2, q3, q4, q5, q7 and q8: DataFlare against a raw loop and DuckDB.

    .venv/bin/python bench/nexmark/run.py                       # 1,000,000 events, 3 runs
    .venv/bin/python bench/nexmark/run.py --events 100000 --runs 1 --only q5
    .venv/bin/python bench/nexmark/run.py --only q4 --baseline /tmp/old   # before/after

The seeded generator (``generator.py``) writes persons, auctions and bids (1:3:46) as
JSON lines once; then for each query every system runs in its own process on those
files, ``--runs`` times:

- ``raw``: a hand-written loop (orjson, plain dicts), writing its result as JSON lines;
- ``bytewax``: the query by hand with bytewax's operators, one item per record (q0, q1,
  q2 only: the stateful queries by hand are not written);
- ``dataflare``: ``dataflare.run`` of ``q*.yaml`` (file source to file destination);
- ``baseline`` (with ``--baseline DIR``): the same, with the ``dataflare`` package of
  another tree (``DIR``, e.g. ``git archive OLD dataflare | tar -x -C DIR``).

Printed per system: medians of wall and CPU seconds (imports excluded: the workflow is
compiled once before the clock starts; ``dataflare.run`` compiles it again, timed), peak
RSS, input records per second (the records of the files the query reads), the ratio to
the raw loop, and whether the output equals DuckDB's result of the same query in SQL
over the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]

import generator  # noqa: E402
import queries  # noqa: E402
from stateful import measure  # noqa: E402

if os.environ.get("DATAFLARE_BASELINE"):  # ``--baseline``: that tree's dataflare, not ours
    sys.path.insert(0, os.environ["DATAFLARE_BASELINE"])

INPUTS = {
    "q0": ("bids",), "q1": ("bids",), "q2": ("bids",), "q3": ("persons", "auctions"),
    "q4": ("auctions", "bids"), "q5": ("bids",), "q7": ("bids",), "q8": ("persons", "auctions"),
}


# ------------------------------------------------------------------------- systems


def run_dataflare(query: str, data: Path, out: Path) -> list[tuple]:
    import dataflare

    os.environ["NEXMARK_DATA"], os.environ["NEXMARK_OUT"] = str(data), str(out)
    result = dataflare.run(queries.workflow(query), quiet=True)
    if not result.ok:
        msg = f"{query}: dataflare run {result.status}: {result.error}"
        raise RuntimeError(msg)
    return queries.dataflare_rows(query, out)


def run_bytewax(query: str, data: Path, out: Path) -> list[tuple]:
    """q0, q1, q2 by hand: bytewax's file input, one record per item, orjson."""
    import bytewax.operators as op
    import orjson
    from bytewax.connectors.files import FileSink, FileSource
    from bytewax.dataflow import Dataflow
    from bytewax.testing import run_main

    flow = Dataflow(f"nexmark_{query}")
    bids = op.map("parse", op.input("bids", flow, FileSource(data / "bids.jsonl")), orjson.loads)
    if query == "q1":
        bids = op.map("euros", bids, lambda b: {
            "auction": b["auction"], "bidder": b["bidder"], "price": b["price"] * 0.908,
            "dateTime": b["dateTime"], "extra": b["extra"]})
    elif query == "q2":
        bids = op.filter_map("select", bids, lambda b: {"auction": b["auction"], "price": b[
            "price"]} if b["auction"] % 123 == 0 else None)
    target = out / f"{query}.bytewax.jsonl"
    # bytewax's FileSink is partitioned: every line goes under one key.
    lines = op.map("dump", bids, lambda r: ("all", orjson.dumps(r).decode()))
    op.output("out", lines, FileSink(target))
    run_main(flow)
    with target.open("rb") as f:
        recs = [orjson.loads(line) for line in f]
    fields = {"q0": ("auction", "bidder", "price", "channel", "url", "dateTime", "extra"),
              "q1": ("auction", "bidder", "price", "dateTime", "extra"),
              "q2": ("auction", "price")}[query]
    return [tuple(r[k] for k in fields) for r in recs]


BYTEWAX = ("q0", "q1", "q2")


def child(args: argparse.Namespace) -> None:
    """Run one system on one query in this process; print measurement and digest."""
    system, query = args.child.split("-", 1)
    if system == "baseline":
        system = "dataflare"
        import dataflare

        assert dataflare.__file__.startswith(os.environ["DATAFLARE_BASELINE"]), dataflare.__file__
    if system == "duckdb":  # the oracle, in its own process: the driver stays small
        lines = queries.canonical(queries.duckdb_result(query, Path(args.data)))
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        print(json.dumps({"count": len(lines), "digest": digest}))
        return
    data, out = Path(args.data), Path(tempfile.mkdtemp(prefix=f"nexmark-{query}-"))
    fn = {"raw": queries.RAW[query],
          "dataflare": lambda d, o: run_dataflare(query, d, o),
          "bytewax": lambda d, o: run_bytewax(query, d, o)}[system]
    os.environ["NEXMARK_DATA"], os.environ["NEXMARK_OUT"] = str(data), str(out)
    if system == "dataflare":  # imports of the components out of the clock
        from dataflare.dsl_compiler import compile_file

        compile_file(str(queries.workflow(query)))
    elif system == "bytewax":
        import bytewax.connectors.files  # noqa: F401
        import bytewax.testing  # noqa: F401
    try:
        result, rows = measure(lambda: fn(data, out))
    finally:
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    lines = queries.canonical(rows)
    result["count"] = len(lines)
    result["digest"] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    print(json.dumps(result))


def spawn(name: str, data: Path, baseline: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(data)]
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    if name.startswith("baseline-"):
        env["DATAFLARE_BASELINE"] = str(Path(baseline or "").resolve())
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        msg = f"{name} failed:\n{done.stderr[-3000:]}"
        raise RuntimeError(msg)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="Nexmark events")
    parser.add_argument("--runs", type=int, default=3, help="runs per system (median)")
    parser.add_argument("--only", choices=queries.QUERIES, action="append", help="query(ies)")
    parser.add_argument("--skip", action="append", default=[], help="system(s) to skip")
    parser.add_argument("--baseline", help="a directory holding another tree's dataflare "
                        "package: run as system 'baseline' beside 'dataflare'")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="nexmark-data-") as tmp:
        data = Path(tmp)
        counts = generator.write(data, args.events)
        print(f"events: {args.events:,} ({counts['person']:,} persons, {counts['auction']:,} "
              f"auctions, {counts['bid']:,} bids), runs: {args.runs}, cpus: {os.cpu_count()}")
        table = []
        for query in args.only or queries.QUERIES:
            # Each process starts with its parent's peak RSS (Linux keeps it across exec):
            # nothing big is held here.
            oracle = spawn(f"duckdb-{query}", data)
            digest = oracle["digest"]
            systems = ["raw", "dataflare"] + (["bytewax"] if query in BYTEWAX else [])
            if args.baseline:
                systems.insert(1, "baseline")
            systems = [s for s in systems if s not in args.skip]
            results: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
            for _ in range(args.runs):
                for s in systems:
                    results[s].append(spawn(f"{s}-{query}", data, args.baseline))
            n_in = sum(counts[t[:-1]] for t in INPUTS[query])
            print(f"\n{query} ({n_in:,} input records; DuckDB: {oracle['count']:,} rows)")
            med = {s: {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_mb")}
                   for s, runs in results.items()}
            for s, runs in results.items():
                m = med[s]
                same = all(r["digest"] == digest for r in runs)
                check = "= DuckDB" if same else f"DIFFERS from DuckDB ({runs[0]['count']:,} rows)"
                ratio = f"{m['wall'] / med['raw']['wall']:.2f}x raw" if "raw" in med else ""
                print(f"  {s:<10} wall {m['wall']:7.2f} s  cpu {m['cpu']:7.2f} s  "
                      f"rss {m['rss_mb']:5.0f} MB  {n_in / m['wall']:>10,.0f} records/s  "
                      f"{ratio:>10}  {check}")
                table.append((query, s, m, n_in / m["wall"], ratio, check))
            if "dataflare" in med and "baseline" in med:
                d, b = med["dataflare"], med["baseline"]
                print(f"  dataflare / baseline: wall {d['wall'] / b['wall']:.2f}x, "
                      f"cpu {d['cpu'] / b['cpu']:.2f}x, rss {d['rss_mb'] / b['rss_mb']:.2f}x")
            if "dataflare" in med and "bytewax" in med:
                print(f"  bytewax / dataflare: wall "
                      f"{med['bytewax']['wall'] / med['dataflare']['wall']:.2f}x")
        print("\n| query | system | wall s | CPU s | peak RSS MB | records/s | vs raw | output |")
        print("|---|---|---|---|---|---|---|---|")
        for query, s, m, rate, ratio, check in table:
            print(f"| {query} | {s} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['rss_mb']:.0f} | "
                  f"{rate:,.0f} | {ratio} | {check} |")


if __name__ == "__main__":
    main()
