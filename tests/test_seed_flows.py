"""The seed's example workflows (flows/seed/) end to end against real services.

PostgreSQL (a schema of the test's own) and MariaDB (a database of its own), the Tansu
broker, fakesnow, a private Redis server, the HTTP stand-ins of
``dataflare.demo_services`` and the churn model's ONNX file. Each destination's output is
checked against values computed here from the inputs.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dataflare.broker import LocalBroker
from dataflare.demo_services import SeedServices, churn_probability, credit_score, seed_services
from tests.fixtures.mariadb_private import MariaDbServer
from tests.fixtures.services import PgSchema
from tests.fixtures.snowflake import FakeSnowflake
from tests.fixtures.workflows import ROOT, run_cli

SEED = ROOT / "flows" / "seed"
FLOWS = sorted(SEED.glob("*.yaml"))


@pytest.fixture
def services() -> Iterator[SeedServices]:
    with seed_services() as svc:
        yield svc


def produce(broker: LocalBroker, topic: str, records: list[dict[str, Any]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for rec in records:
        producer.produce(topic, json.dumps(rec).encode())
    producer.flush(30)


def snowflake_env(monkeypatch: pytest.MonkeyPatch, sf: FakeSnowflake, schema: str) -> None:
    for name, value in {"SF_ACCOUNT": "fakesnow", "SF_HOST": sf.host, "SF_PORT": str(sf.port),
                        "SF_PROTOCOL": "http", "SF_DATABASE": sf.database, "SF_SCHEMA": schema,
                        "SF_USER": "fake", "SF_PASSWORD": "snow"}.items():
        monkeypatch.setenv(name, value)


def mysql_database(server: MariaDbServer, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    server.execute(f"CREATE DATABASE {name}")
    return name


def run_tests_block(flow: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``dataflare test FLOW`` (in this process: the environment is the test's)."""
    from dataflare.testing import run_workflow_tests

    assert run_workflow_tests([str(flow)]) == 0, capsys.readouterr()
    assert "1 passed, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize("flow", FLOWS, ids=[f.stem for f in FLOWS])
def test_seed_flow_validates(flow: Path) -> None:
    from dataflare.dsl_compiler import validate_file

    v = validate_file(flow)
    assert not v.errors(), [p.render() for p in v.errors()]


def test_customer_360_profile_end_to_end(
    pg_schema: PgSchema, mariadb_private: MariaDbServer, kafka_broker: LocalBroker,
    kafka_topic: Callable[..., str], fake_snowflake: FakeSnowflake, redis_url: str,
    services: SeedServices, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import redis

    from flows.seed.churn_model import churn_score

    n = 12
    customers = [(i, f"Customer {i}", f" User{i}@Example.com", f"(202) 555-01{i:02d}",
                  f"2026-11-{i:02d}T08:00:00+00:00") for i in range(1, n + 1)]
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".customers (customer_id int PRIMARY KEY, '
                     "name text, email text, phone text, updated_at timestamptz)")
        with conn.cursor() as cur:
            cur.executemany(f'INSERT INTO "{pg_schema.schema}".customers '
                            "VALUES (%s, %s, %s, %s, %s)", customers)
    # Orders for customers 1..8 only (the others meet the left join with nothing); one
    # order of each customer is older than 90 days before that customer's latest order.
    orders = []
    for cid in range(1, 9):
        for k in range(cid % 3 + 1):
            orders.append((len(orders) + 1, cid, 10.0 * cid + k, f"p{(cid + k) % 4}",
                           f"2026-{6 + k:02d}-{cid:02d} 12:00:00"))
        orders.append((len(orders) + 1, cid, 999.0, "p9", "2025-01-01 00:00:00"))
    db = mysql_database(mariadb_private, "c360")
    mariadb_private.execute(
        f"CREATE TABLE {db}.orders (id INT PRIMARY KEY, customer_id INT, amount DOUBLE, "
        "product_id VARCHAR(10), created_at DATETIME)",
        *[f"INSERT INTO {db}.orders VALUES ({o[0]}, {o[1]}, {o[2]}, '{o[3]}', '{o[4]}')"
          for o in orders],
    )
    topic = kafka_topic(prefix="web")
    funnel = ["view_product", "add_to_cart", "checkout", "purchase"]
    events = []
    for uid in (2, 3, 5):  # user 2 completes the funnel; 3 reaches two steps; 5 one
        for step, name in enumerate(funnel[: {2: 4, 3: 2, 5: 1}[uid]]):
            events.append({"user_id": uid, "event": name,
                           "timestamp": f"2026-11-20T10:{step * 5:02d}:00Z"})
    produce(kafka_broker, topic, events)

    env = {"CUSTOMERS_DSN": pg_schema.dsn, "CUSTOMERS_SCHEMA": pg_schema.schema,
           "ORDERS_DSN": f"mysql://{mariadb_private.user}@127.0.0.1:{mariadb_private.port}/{db}",
           "KAFKA_SERVERS": kafka_broker.bootstrap_servers, "WEB_EVENTS_TOPIC": topic,
           "CREDIT_SCORE_URL": f"{services.url}/credit-score", "REDIS_URL": redis_url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    snowflake_env(monkeypatch, fake_snowflake, "CUSTOMERS")
    result = run_cli("run", str(SEED / "customer_360_profile.yaml"), timeout=240)
    assert result.code == 0, result.stderr[-3000:]

    # What each profile must hold, computed from the inputs.
    def expected(cid: int) -> dict[str, Any]:
        mine = [o for o in orders if o[1] == cid]
        out: dict[str, Any] = {"credit_score": credit_score(cid), "order_count": len(mine)}
        if mine:
            latest = max(datetime.fromisoformat(o[4]) for o in mine)
            recent = [o[2] for o in mine if (latest - datetime.fromisoformat(o[4])).days < 90]
            # Whole days, as the flow's days_between(last_order_date, 'now') counts them.
            days = int((datetime.now(UTC) - latest.replace(tzinfo=UTC)).total_seconds() / 86400)
            out.update(amount_sum=sum(recent), amount_max=max(recent),
                       amount_avg=sum(recent) / len(recent),
                       churn=churn_score(len(mine) / 90, sum(recent) / len(recent), days))
        else:
            out.update(amount_sum=None, churn=churn_score(0, 0, 365))
        return out

    rows = fake_snowflake.rows(
        'SELECT "customer_id", "email", "phone", "credit_score", "order_count", "amount_sum", '
        '"amount_max", "churn_risk_score", "conversion_funnel" FROM "customer_360_profiles" '
        'ORDER BY "customer_id"', schema="CUSTOMERS")
    assert [r[0] for r in rows] == list(range(1, n + 1))
    for cid, email, phone, score, count, total, top, churn, funnel_json in rows:
        want = expected(cid)
        assert email == f" User{cid}@Example.com"
        assert phone == f"+1202555{cid + 100:04d}"
        assert score == want["credit_score"]
        if want["amount_sum"] is None:
            assert (count, total) == (None, None)
        else:
            assert (count, total, top) == (want["order_count"], want["amount_sum"],
                                           want["amount_max"])
        assert math.isclose(churn, want["churn"], abs_tol=2e-3), (cid, churn, want)
        if cid in (2, 3, 5):
            reached = json.loads(funnel_json)["reached"]
            assert reached == funnel[: {2: 4, 3: 2, 5: 1}[cid]]
        else:
            assert funnel_json is None
    assert services.requests.count("POST /credit-score") == n

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(client.scan_iter("customer:*"))
    assert len(keys) == n
    profile = client.hgetall("customer:3")
    assert profile["credit_score"] == str(credit_score(3))
    assert profile["email"] == " User3@Example.com"
    assert float(profile["amount_sum"]) == expected(3)["amount_sum"]
    client.close()

    run_tests_block(SEED / "customer_360_profile.yaml", capsys)


def test_dsl_reference_end_to_end(
    pg_schema: PgSchema, kafka_broker: LocalBroker, kafka_topic: Callable[..., str],
    fake_snowflake: FakeSnowflake, services: SeedServices, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from psycopg.conninfo import conninfo_to_dict

    n = 15
    customers = [(i, f"  Customer {i} ", f"User{i}@Example.COM",
                  f"2026-11-{10 + i % 5:02d}T0{i % 9}:00:00+00:00") for i in range(1, n + 1)]
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".customers (id int PRIMARY KEY, '
                     "name text, email text, updated_at timestamptz)")
        with conn.cursor() as cur:
            cur.executemany(f'INSERT INTO "{pg_schema.schema}".customers '
                            "VALUES (%s, %s, %s, %s)", customers)
    topic = kafka_topic(prefix="user-events")
    # Events of every third customer, an hour after the customer row (the same 7-day window).
    events = [{"user_email": f"user{i}@example.com", "event": "login",
               "timestamp": f"2026-11-{10 + i % 5:02d}T1{i % 9}:00:00Z"}
              for i in range(3, n + 1, 3)]
    produce(kafka_broker, topic, events)

    pg = conninfo_to_dict(pg_schema.dsn)
    errors = tmp_path / "errors.jsonl"
    env = {"DB_HOST": str(pg.get("host", "127.0.0.1")), "DB_USER": str(pg.get("user", "postgres")),
           "DB_PASSWORD": str(pg.get("password", "")), "DB_NAME": str(pg.get("dbname", "postgres")),
           "DB_SCHEMA": pg_schema.schema, "KAFKA_SERVERS": kafka_broker.bootstrap_servers,
           "EVENTS_TOPIC": topic, "ML_URL": f"{services.url}/predict",
           "ML_API_TOKEN": "ml-token", "NOTIFY_URL": f"{services.url}/alerts",
           "NOTIFICATION_TOKEN": "notify-token", "SLACK_WEBHOOK_URL": f"{services.url}/slack",
           "SECRET_VAR": "s", "ERROR_RECORDS_PATH": str(errors)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    snowflake_env(monkeypatch, fake_snowflake, "CUSTOMERS")
    result = run_cli("run", str(SEED / "dsl_reference.yaml"), timeout=240)
    assert result.code == 0, result.stderr[-3000:]

    emails = {i: f"user{i}@example.com" for i in range(1, n + 1)}
    rows = fake_snowflake.rows('SELECT "customer.email", "customer":id::NUMBER, '
                               '"customer":fullName::VARCHAR, '
                               '"customer":churn_probability::FLOAT, "event" '
                               'FROM "CUSTOMER_360" ORDER BY 2', schema="CUSTOMERS")
    assert [r[0] for r in rows] == [emails[i] for i in range(1, n + 1)]
    for email, cid, name, churn, event in rows:
        assert name == f"Customer {cid}"
        assert churn == churn_probability(email)
        assert event == ("login" if cid % 3 == 0 else None)

    risky = sorted(i for i, e in emails.items() if churn_probability(e) > 0.7)
    assert risky and len(risky) < n
    got = [json.loads(a) if isinstance(a, str) else a for a in services.alerts]
    assert sorted(int(a["customer_id"]) for a in got) == risky
    assert all(a["alert_type"] == "high_churn_risk" and float(a["churn_risk"]) > 0.7
               for a in got)
    assert [m["text"] for m in services.slack] == ["Workflow workflow-name completed successfully"]
    assert not errors.exists() or errors.read_text() == ""
    assert "ml-token" not in result.stderr and "notify-token" not in result.stderr

    run_tests_block(SEED / "dsl_reference.yaml", capsys)


def test_multi_source_analytics_end_to_end(
    pg_schema: PgSchema, mariadb_private: MariaDbServer, kafka_broker: LocalBroker,
    kafka_topic: Callable[..., str], fake_snowflake: FakeSnowflake, redis_url: str,
    s3_bucket: Any, services: SeedServices, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    import pyarrow.parquet as pq
    import redis

    from tests.fixtures.s3 import KEY_ID, SECRET

    n = 8
    users = [(u, f"First{u}", f"Last{u}", f"user{u}@example.com",
              f"2026-11-20T{10 + u:02d}:05:00+00:00") for u in range(1, n + 1)]
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".users (id int PRIMARY KEY, '
                     "first_name text, last_name text, email text, updated_at timestamptz)")
        with conn.cursor() as cur:
            cur.executemany(f'INSERT INTO "{pg_schema.schema}".users VALUES (%s, %s, %s, %s, %s)',
                            users)
    totals = {u: 10.0 * u + 0.5 for u in range(1, n + 1)}
    db = mysql_database(mariadb_private, "msa")
    mariadb_private.execute(
        f"CREATE TABLE {db}.orders (id INT PRIMARY KEY, user_id INT, total DOUBLE, "
        "product_id VARCHAR(10), created_at VARCHAR(30))",
        *[f"INSERT INTO {db}.orders VALUES ({100 + u}, {u}, {t}, 'p{u % 7}', "
          "'2026-11-19T09:00:00Z')" for u, t in totals.items()],
    )
    services.products[:] = [{"id": f"p{i}", "name": f"Product {i}", "price": i + 0.99,
                             "category": "home" if i % 2 else "garden"} for i in range(7)]
    topic = kafka_topic(prefix="clicks")
    clicks = {u: u % 3 + 1 for u in range(1, n + 1)}  # all of a user's clicks in one minute
    produce(kafka_broker, topic, [
        {"user_id": u, "event": "click", "timestamp": f"2026-11-20T{10 + u:02d}:00:{10 + j:02d}Z"}
        for u, k in clicks.items() for j in range(k)])

    env = {"USERS_DSN": pg_schema.dsn, "USERS_SCHEMA": pg_schema.schema,
           "ORDERS_DSN": f"mysql://{mariadb_private.user}@127.0.0.1:{mariadb_private.port}/{db}",
           "PRODUCTS_URL": f"{services.url}/products",
           "KAFKA_SERVERS": kafka_broker.bootstrap_servers, "CLICKS_TOPIC": topic,
           "REDIS_URL": redis_url, "LAKE_BUCKET": s3_bucket.name,
           "AWS_ENDPOINT_URL": s3_bucket.endpoint_url, "AWS_ACCESS_KEY_ID": KEY_ID,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    snowflake_env(monkeypatch, fake_snowflake, "PUBLIC")
    result = run_cli("run", str(SEED / "multi_source_analytics.yaml"), timeout=300)
    assert result.code == 0, result.stderr[-3000:]

    def value(u: int) -> float:
        return totals[u] * 0.7 + clicks[u] * 0.3

    rows = fake_snowflake.rows(
        'SELECT "user.email", "user":id::NUMBER, "user":customerValue::FLOAT, '
        '"user":segment::NUMBER, "click_count", "orders":total::FLOAT '
        'FROM "customer_segments" ORDER BY 2', schema="PUBLIC")
    assert [r[1] for r in rows] == list(range(1, n + 1))
    for email, u, customer_value, segment, click_count, total in rows:
        assert email == f"user{u}@example.com"
        assert math.isclose(customer_value, value(u))
        assert (click_count, total) == (clicks[u], totals[u])
        assert segment in range(5)

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert len(list(client.scan_iter("customer:*"))) == n
    for u in (1, n):
        stored = client.hgetall(f"customer:{u}")
        assert stored["email"] == f"user{u}@example.com"
        assert math.isclose(float(stored["value"]), value(u))
        assert int(stored["segment"]) in range(5)
    client.close()

    s3 = s3_bucket.client()
    per_source: dict[str, list[dict[str, Any]]] = {}
    for key in s3_bucket.keys():
        if key.startswith("_dataflare/"):
            continue  # the lake's journal of published objects
        assert key.startswith("year=") and "/month=" in key and "/day=" in key, key
        source = key.rsplit("/", 1)[-1].split("_data")[0]
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=s3_bucket.name,
                                                       Key=key)["Body"].read()))
        per_source.setdefault(source, []).extend(table.to_pylist())
    assert sorted(per_source) == ["order_transform", "product_transform", "user_transform"]
    assert sorted(r["email"] for r in per_source["user_transform"]) == sorted(
        u[3] for u in users)
    assert sorted(r["total"] for r in per_source["order_transform"]) == sorted(totals.values())
    assert len(per_source["product_transform"]) == 7

    run_tests_block(SEED / "multi_source_analytics.yaml", capsys)
