"""`make demo`: Kafka -> filter, windows, join -> DuckDB, checked against a plain computation."""

import subprocess
import sys
from collections import defaultdict

import duckdb

from dataflare.connectors.generator import GeneratorConfig, make_records, record_maker
from tests.fixtures.workflows import ROOT


def generated(preset: str, count: int, users: int) -> list[dict]:
    config = GeneratorConfig.model_validate(
        {"preset": preset, "count": count, "seed": 11,
         "fields": {"user_id": {"type": "text", "template": "u{n}", "min": 0, "max": users - 1}}})
    return make_records(record_maker(config), config.seed, 0, count)


def expected(clicks: int, orders: int, users: int) -> set[tuple]:
    window = 300_000
    activity: dict = defaultdict(lambda: [0, 0.0])
    for r in generated("clickstream", clicks, users):
        if r["event"] != "view":
            a = activity[(r["user_id"], r["ts"] // window)]
            a[0] += 1
            a[1] += r["amount"]
    totals: dict = defaultdict(lambda: [0, 0.0])
    for r in generated("orders", orders, users):
        t = totals[(r["user_id"], r["ts"] // window)]
        t[0] += 1
        t[1] += r["total"]
    out = set()
    for (user, w), (events, spend) in activity.items():
        n, revenue = totals.get((user, w), (0, 0.0))
        start = f"2024-01-01T00:{(w * 5) % 60:02d}:00Z"
        out.add((user, start, events, round(spend, 2), n, round(revenue, 2)))
    return out


def test_demo_fills_the_warehouse_with_the_expected_rows(tmp_path):
    warehouse = tmp_path / "w.duckdb"
    args = ["--clicks", "9000", "--orders", "1500", "--users", "25", "--warehouse", str(warehouse)]
    proc = subprocess.run([sys.executable, "-m", "dataflare.demo", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "top 12 by spend" in proc.stdout
    with duckdb.connect(str(warehouse), read_only=True) as con:
        rows = con.execute("SELECT user_id, window_start, events, spend, orders, revenue "
                           "FROM user_activity").fetchall()
    got = {(u, str(w), e, round(s, 2), o, round(r, 2)) for u, w, e, s, o, r in rows}
    assert got == expected(9000, 1500, 25)


def test_demo_seed_runs_the_dsl_reference_workflow_on_stand_ins():
    from dataflare.demo_seed import customers
    from dataflare.demo_services import churn_probability

    proc = subprocess.run([sys.executable, "-m", "dataflare.demo_seed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    emails = [c["email"].lower() for c in customers(20)]
    assert "CUSTOMER_360 (20 rows, merged on customer.email)" in proc.stdout
    table = [line.split() for line in proc.stdout.splitlines() if "@example.com" in line]
    assert [row[1] for row in table] == emails
    assert [float(row[2]) for row in table] == [round(churn_probability(e), 3) for e in emails]
    risky = sum(churn_probability(e) > 0.7 for e in emails)
    assert f"{risky} high churn alerts sent" in proc.stdout
