"""The Nexmark queries three ways: DuckDB SQL (the oracle), a raw Python loop (the
floor), and how to read DataFlare's output (``q*.yaml`` beside this file).

Every query's result is a list of row tuples; :func:`canonical` makes two results
comparable (sorted, floats rounded, window starts as epoch milliseconds).

- q0 pass-through: every bid.
- q1 currency conversion: each bid with its price times 0.908.
- q2 selection: ``auction, price`` of the bids on auctions whose id is a multiple of 123.
- q3 local item suggestion: ``name, city, state, auction id`` of category-10 auctions
  whose seller lives in OR, ID or CA (person-auction join).
- q4 average price per category: each auction's highest bid among those placed between
  its ``dateTime`` and ``expires`` (inclusive), averaged per category.
- q5 hot items: per 10 s window sliding by 2 s (aligned to the epoch), the auction(s)
  with the most bids: ``auction, num, window_start``.
- q7 highest bid: per 10 s tumbling window, the bid(s) with the highest price:
  ``auction, price, bidder, dateTime``.
- q8 monitor new users: ``id, name, window start`` of the people who opened an auction
  in the 10 s tumbling window in which they registered.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

QUERIES = ("q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8")
HERE = Path(__file__).resolve().parent
WIN = 10_000  # q7, q8: tumbling window (ms)
HOP_SIZE, HOP_SLIDE = 10_000, 2_000  # q5: sliding window (ms)


def workflow(query: str) -> Path:
    """The DataFlare workflow file of ``query``."""
    return HERE / f"{query}.yaml"


def canonical(rows: list[tuple]) -> list[str]:
    """Sorted JSON lines of ``rows``, floats rounded to 6 digits (sums in another order)."""

    def fix(v: Any) -> Any:
        return round(v, 6) if isinstance(v, float) else v

    return sorted(json.dumps([fix(v) for v in row]) for row in rows)


def iso_ms(text: str) -> int:
    """Epoch milliseconds of an ISO-8601 UTC timestamp."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# ------------------------------------------------------------------------- DuckDB SQL

SQL = {
    "q0": """SELECT auction, bidder, price, channel, url, dateTime, extra FROM bids""",
    "q1": """SELECT auction, bidder, price * 0.908::DOUBLE, dateTime, extra FROM bids""",
    "q2": """SELECT auction, price FROM bids WHERE auction % 123 = 0""",
    "q3": """
        SELECT p.name, p.city, p.state, a.id
        FROM auctions a JOIN persons p ON a.seller = p.id
        WHERE a.category = 10 AND p.state IN ('OR', 'ID', 'CA')""",
    "q4": """
        SELECT category, AVG(final) FROM (
            SELECT a.id, a.category, MAX(b.price) AS final
            FROM auctions a JOIN bids b ON a.id = b.auction
            WHERE b.dateTime BETWEEN a.dateTime AND a.expires
            GROUP BY a.id, a.category)
        GROUP BY category""",
    "q5": f"""
        WITH hops AS (
            SELECT auction, unnest(range(
                (dateTime // {HOP_SLIDE}) * {HOP_SLIDE} - {HOP_SIZE - HOP_SLIDE},
                (dateTime // {HOP_SLIDE}) * {HOP_SLIDE} + 1, {HOP_SLIDE})) AS ws
            FROM bids),
        counts AS (SELECT ws, auction, count(*) AS num FROM hops GROUP BY ws, auction),
        tops AS (SELECT ws, max(num) AS max_num FROM counts GROUP BY ws)
        SELECT c.auction, c.num, c.ws FROM counts c
        JOIN tops t ON c.ws = t.ws AND c.num = t.max_num""",
    "q7": f"""
        WITH w AS (
            SELECT dateTime // {WIN} AS k, max(price) AS max_price FROM bids GROUP BY k)
        SELECT b.auction, b.price, b.bidder, b.dateTime FROM bids b
        JOIN w ON b.dateTime // {WIN} = w.k AND b.price = w.max_price""",
    "q8": f"""
        SELECT DISTINCT p.id, p.name, (p.dateTime // {WIN}) * {WIN}
        FROM persons p JOIN auctions a
          ON p.id = a.seller AND p.dateTime // {WIN} = a.dateTime // {WIN}""",
}


def duckdb_result(query: str, data: Path) -> list[tuple]:
    """``query`` run by DuckDB over the generated files under ``data``."""
    import duckdb

    con = duckdb.connect()
    try:
        for table in ("persons", "auctions", "bids"):
            path = str(data / f"{table}.jsonl").replace("'", "''")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM "
                        f"read_json('{path}', format='newline_delimited')")
        return [tuple(r) for r in con.execute(SQL[query]).fetchall()]
    finally:
        con.close()


# ----------------------------------------------------------------------- DataFlare output


def dataflare_rows(query: str, out: Path) -> list[tuple]:
    """The rows of DataFlare's output file of ``query`` under ``out``."""
    import orjson

    with (out / f"{query}.jsonl").open("rb") as f:
        recs = [orjson.loads(line) for line in f]
    fields = {
        "q0": ("auction", "bidder", "price", "channel", "url", "dateTime", "extra"),
        "q1": ("auction", "bidder", "price", "dateTime", "extra"),
        "q2": ("auction", "price"),
        "q3": ("name", "city", "state", "id"),
        "q4": ("category", "average"),
        "q7": ("auction", "price", "bidder", "dateTime"),
    }
    if query == "q5":
        return [(r["auction"], r["num"], iso_ms(r["window_start"])) for r in recs]
    if query == "q8":
        return [(r["id"], r["name"], iso_ms(r["starttime"])) for r in recs]
    return [tuple(r[k] for k in fields[query]) for r in recs]


# ------------------------------------------------------------------------- raw loops
# Each reads the JSON lines it needs with orjson, computes in plain dicts and writes its
# result as JSON lines (like the workflows), then returns the rows.


def _read(data: Path, table: str) -> Iterator[dict[str, Any]]:
    import orjson

    loads = orjson.loads
    with (data / f"{table}.jsonl").open("rb") as f:
        for line in f:
            yield loads(line)


def _write(out: Path, query: str, rows: list[tuple], names: tuple[str, ...]) -> list[tuple]:
    import orjson

    with (out / f"{query}.raw.jsonl").open("wb") as f:
        f.writelines(orjson.dumps(dict(zip(names, r, strict=True))) + b"\n" for r in rows)
    return rows


def raw_q0(data: Path, out: Path) -> list[tuple]:
    import orjson

    rows = []
    with (out / "q0.raw.jsonl").open("wb") as f:
        for b in _read(data, "bids"):
            f.write(orjson.dumps(b) + b"\n")
            rows.append((b["auction"], b["bidder"], b["price"], b["channel"], b["url"],
                         b["dateTime"], b["extra"]))
    return rows


def raw_q1(data: Path, out: Path) -> list[tuple]:
    rows = [(b["auction"], b["bidder"], b["price"] * 0.908, b["dateTime"], b["extra"])
            for b in _read(data, "bids")]
    return _write(out, "q1", rows, ("auction", "bidder", "price", "dateTime", "extra"))


def raw_q2(data: Path, out: Path) -> list[tuple]:
    rows = [(b["auction"], b["price"]) for b in _read(data, "bids") if b["auction"] % 123 == 0]
    return _write(out, "q2", rows, ("auction", "price"))


def raw_q3(data: Path, out: Path) -> list[tuple]:
    people = {p["id"]: p for p in _read(data, "persons") if p["state"] in ("OR", "ID", "CA")}
    rows = []
    for a in _read(data, "auctions"):
        if a["category"] == 10:
            p = people.get(a["seller"])
            if p is not None:
                rows.append((p["name"], p["city"], p["state"], a["id"]))
    return _write(out, "q3", rows, ("name", "city", "state", "id"))


def raw_q4(data: Path, out: Path) -> list[tuple]:
    auctions = {a["id"]: (a["category"], a["dateTime"], a["expires"])
                for a in _read(data, "auctions")}
    final: dict[int, int] = {}
    for b in _read(data, "bids"):
        a = auctions.get(b["auction"])
        if a is not None and a[1] <= b["dateTime"] <= a[2]:
            best = final.get(b["auction"])
            if best is None or b["price"] > best:
                final[b["auction"]] = b["price"]
    per_category: dict[int, list[int]] = {}
    for aid, price in final.items():
        per_category.setdefault(auctions[aid][0], []).append(price)
    rows = [(c, sum(p) / len(p)) for c, p in per_category.items()]
    return _write(out, "q4", rows, ("category", "average"))


def raw_q5(data: Path, out: Path) -> list[tuple]:
    counts: dict[int, dict[int, int]] = {}
    for b in _read(data, "bids"):
        last = b["dateTime"] // HOP_SLIDE * HOP_SLIDE
        for ws in range(last - HOP_SIZE + HOP_SLIDE, last + 1, HOP_SLIDE):
            per = counts.get(ws)
            if per is None:
                per = counts[ws] = {}
            per[b["auction"]] = per.get(b["auction"], 0) + 1
    rows = []
    for ws, per in counts.items():
        top = max(per.values())
        rows += [(auction, n, ws) for auction, n in per.items() if n == top]
    return _write(out, "q5", rows, ("auction", "num", "window_start"))


def raw_q7(data: Path, out: Path) -> list[tuple]:
    best: dict[int, tuple[int, list[tuple]]] = {}
    for b in _read(data, "bids"):
        k = b["dateTime"] // WIN
        row = (b["auction"], b["price"], b["bidder"], b["dateTime"])
        cur = best.get(k)
        if cur is None or b["price"] > cur[0]:
            best[k] = (b["price"], [row])
        elif b["price"] == cur[0]:
            cur[1].append(row)
    rows = [r for _, rs in best.values() for r in rs]
    return _write(out, "q7", rows, ("auction", "price", "bidder", "dateTime"))


def raw_q8(data: Path, out: Path) -> list[tuple]:
    sellers = {(a["seller"], a["dateTime"] // WIN) for a in _read(data, "auctions")}
    rows = [(p["id"], p["name"], p["dateTime"] // WIN * WIN) for p in _read(data, "persons")
            if (p["id"], p["dateTime"] // WIN) in sellers]
    return _write(out, "q8", rows, ("id", "name", "starttime"))


RAW: dict[str, Callable[[Path, Path], list[tuple]]] = {
    "q0": raw_q0, "q1": raw_q1, "q2": raw_q2, "q3": raw_q3,
    "q4": raw_q4, "q5": raw_q5, "q7": raw_q7, "q8": raw_q8,
}
