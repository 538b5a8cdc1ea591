"""``make demo-seed``: the seed's DSL reference workflow (flows/seed/) on embedded stand-ins.

- Kafka (``events``): the local Tansu broker, with login events produced here;
- Snowflake (``analytics_db``): a fakesnow server on loopback (the real connector, DuckDB
  behind it);
- the remote ML service (``ml_processor``), the alert API (``notification_service``) and
  the Slack webhook: :mod:`dataflare.demo_services`;
- the custom transformer: ``flows/plugins/template.wat`` in the WASM sandbox;
- PostgreSQL (``main_db``): no database server is embedded, so that source reads
  generated customer rows instead (everything downstream of it runs as written).

Prints the merged ``CUSTOMER_360`` table and the alerts the notification stand-in got.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from dataflare.broker import LocalBroker
from dataflare.demo_services import seed_services

FLOW = Path(__file__).resolve().parent.parent / "flows" / "seed" / "dsl_reference.yaml"
TOPIC = "user_events"


def customers(n: int) -> list[dict[str, Any]]:
    """Rows of the ``customers`` table (as the postgres source would read them)."""
    return [{"id": i, "name": f"  Customer {i} ", "email": f"Customer{i}@Example.com",
             "updated_at": f"2026-11-{10 + i % 7:02d}T{i % 24:02d}:00:00Z"}
            for i in range(1, n + 1)]


def events(n: int) -> list[dict[str, Any]]:
    """Login events of every other customer, an hour after its row changed."""
    return [{"user_email": f"customer{i}@example.com", "event": "login",
             "timestamp": f"2026-11-{10 + i % 7:02d}T{i % 24:02d}:30:00Z"}
            for i in range(2, n + 1, 2)]


def run(n: int = 20) -> int:
    """Run the demo; returns the exit code."""
    import fakesnow
    import orjson
    import snowflake.connector
    from bytewax.testing import run_main
    from confluent_kafka import Producer

    from dataflare.dsl_compiler import compile_validated, validate_file
    from dataflare.runner import error_text

    warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
    out = FLOW.parent.parent / "out"
    out.mkdir(exist_ok=True)
    with LocalBroker() as broker, fakesnow.server() as sf, seed_services() as svc:
        broker.create_topic(TOPIC)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
        for e in events(n):
            producer.produce(TOPIC, orjson.dumps(e))
        producer.flush(30)
        del producer  # closed before the broker stops
        os.environ.update({
            "DB_HOST": "embedded", "DB_USER": "demo", "DB_PASSWORD": "demo",
            "KAFKA_SERVERS": broker.bootstrap_servers, "EVENTS_TOPIC": TOPIC,
            "SF_ACCOUNT": "fakesnow", "SF_HOST": sf["host"], "SF_PORT": str(sf["port"]),
            "SF_PROTOCOL": "http", "SF_USER": sf["user"], "SF_PASSWORD": sf["password"],
            "ML_URL": f"{svc.url}/predict", "ML_API_TOKEN": "demo-token",
            "NOTIFY_URL": f"{svc.url}/alerts", "NOTIFICATION_TOKEN": "demo-token",
            "SLACK_WEBHOOK_URL": f"{svc.url}/slack", "SECRET_VAR": "demo",
            "ERROR_RECORDS_PATH": str(out / "seed_error_records.jsonl"),
        })
        validated = validate_file(FLOW)
        print(f"{FLOW.name}: broker at {broker.bootstrap_servers}, fakesnow at "
              f"{sf['host']}:{sf['port']}, services at {svc.url}; main_db reads {n} "
              "generated customers (no PostgreSQL is embedded)", flush=True)
        try:
            run_main(compile_validated(validated, source_records={"main_db": customers(n)}))
        except Exception as exc:  # noqa: BLE001 - reported as the run's error
            print(f"error: {error_text(exc)}")
            return 1
        with snowflake.connector.connect(
            account="fakesnow", user=sf["user"], password=sf["password"], host=sf["host"],
            port=sf["port"], protocol="http", database="ANALYTICS", schema="CUSTOMERS",
            session_parameters={"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
        ) as conn:
            cur = conn.cursor()
            cur.execute(
                'SELECT "customer":id::NUMBER, "customer.email", '
                '"customer":churn_probability::FLOAT, "event" FROM "CUSTOMER_360" ORDER BY 1'
            )
            rows = cur.fetchall()
        print(f"\nANALYTICS.CUSTOMERS.CUSTOMER_360 ({len(rows)} rows, merged on customer.email)")
        print(f"{'id':>4}  {'email':<26} {'churn':>6}  event")
        for cid, email, churn, event in rows:
            print(f"{cid:>4}  {email:<26} {churn:>6.3f}  {event or '-'}")
        print(f"\n{len(svc.alerts)} high churn alerts sent (churn probability > 0.7)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
