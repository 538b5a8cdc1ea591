"""Property-based API tests (schemathesis, from the served OpenAPI): no 500s, tokens enforced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from dataflare.server import auth
from dataflare.server.api import create_app
from dataflare.server.store import Store, migrate

TOKEN = "p" * 32
FLOW = """
workflow:
  id: orders
  schedule: {type: cron, expression: "*/5 * * * *"}
  sources: {g: {type: generator, config: {preset: orders, count: 3}}}
  destinations: {out: {type: stdout, inputs: [g]}}
"""


def _schema(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    migrate(url)
    store = Store(url)
    store.put_workflow("orders", None, FLOW, "test", create=True)
    access = auth.Access({TOKEN: auth.User("admin", tuple(auth.DEFAULT_ROLES["admin"]))})
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(store, access))


def test_no_request_makes_a_server_error_and_none_passes_without_a_token(
        tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code < 500, (case.path, case.method, response.text)
            for headers in ({}, {"Authorization": "Bearer " + "x" * 32},
                            {"Authorization": f"Basic {TOKEN}"}):
                refused = case.call(headers=headers)
                assert refused.status_code == 401, (case.path, case.method, headers)

        check()
