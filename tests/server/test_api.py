"""The REST API: validation on submit, revisions, runs carried out by a worker, RBAC, audit."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dataflare.server import auth
from dataflare.server.api import create_app
from dataflare.server.store import Store, now
from dataflare.server.worker import Worker

TOKENS = {name: f"{name}-token-0123456789abcdefghij" for name in
          ("admin", "operator", "developer", "viewer")}

FLOW = """
workflow:
  id: {wid}
  name: {wid} flow
  environment: {{SIZE: "3"}}
  sources: {{g: {{type: generator, config: {{preset: orders, count: "${{SIZE}}"}}}}}}
  transformations:
    big: {{type: filter, inputs: [g], config: {{condition: "total >= 0"}}}}
  destinations: {{out: {{type: file, inputs: [big], config: {{path: out.jsonl}}}}}}
{extra}"""


def flow(wid: str = "orders", extra: str = "") -> str:
    return FLOW.format(wid=wid, extra=extra)


@pytest.fixture
def access(tmp_path: Path) -> auth.Access:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(json.dumps({"users": {n: {"token": t, "roles": [n]}
                                         for n, t in TOKENS.items()}}))
    return auth.load(cfg)


@pytest.fixture
def client(store: Store, access: auth.Access) -> TestClient:
    return TestClient(create_app(store, access))


def h(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


def post_yaml(client: TestClient, text: str, user: str = "admin", wid: str | None = None
              ) -> Any:
    headers = {**h(user), "content-type": "text/yaml"}
    if wid is None:
        return client.post("/api/v1/workflows", content=text, headers=headers)
    return client.put(f"/api/v1/workflows/{wid}", content=text, headers=headers)


def test_an_invalid_workflow_is_refused_with_located_problems_and_nothing_stored(
        client: TestClient) -> None:
    bad = flow().replace("type: filter", "type: filtr")
    r = post_yaml(client, bad)
    assert r.status_code == 422
    assert set(r.json()) == {"problems"}  # CONTRACT §11's body
    problems = r.json()["problems"]
    assert problems[0]["line"] == 8 and "did you mean 'filter'" in problems[0]["message"]
    assert post_yaml(client, "workflow: [").status_code == 422
    assert client.get("/api/v1/workflows", headers=h("admin")).json() == []
    assert client.get("/api/v1/audit", headers=h("admin")).json() == []


def test_every_change_is_a_revision_and_an_audit_record(client: TestClient) -> None:
    assert post_yaml(client, flow()).json() == {"id": "orders", "revision": 1}
    assert post_yaml(client, flow()).status_code == 409  # exists: update with PUT
    changed = flow().replace("total >= 0", "total >= 10")
    assert post_yaml(client, changed, "developer", wid="orders").json()["revision"] == 2
    # the same text again (a deploy applied twice) is no new revision
    assert post_yaml(client, changed, "developer", wid="orders").json()["revision"] == 2
    revs = client.get("/api/v1/workflows/orders/revisions", headers=h("viewer")).json()
    assert [(r["number"], r["author"]) for r in revs] == [(1, "admin"), (2, "developer")]
    one = client.get("/api/v1/workflows/orders/revisions/1", headers=h("viewer")).json()
    assert "total >= 0" in one["yaml"]
    wf = client.get("/api/v1/workflows/orders", headers=h("viewer")).json()
    assert wf["revision"] == 2 and "${SIZE}" in wf["yaml"]  # stored as written
    assert post_yaml(client, flow("other"), wid="orders").status_code == 422  # id mismatch
    assert post_yaml(client, flow("missing"), wid="missing").status_code == 404
    log = client.get("/api/v1/audit", headers=h("admin")).json()
    assert [(a["action"], a["user"], a["revision"]) for a in reversed(log)] == [
        ("workflow.create", "admin", 1), ("workflow.update", "developer", 2)]
    assert client.delete("/api/v1/workflows/orders", headers=h("admin")).status_code == 204
    assert client.get("/api/v1/workflows/orders", headers=h("admin")).status_code == 404


def test_deleting_a_workflow_stops_its_queued_and_running_runs(
        client: TestClient, store: Store) -> None:
    post_yaml(client, flow())
    started = [client.post("/api/v1/workflows/orders/runs", headers=h("operator")).json()["id"]
               for _ in range(3)]
    claimed = store.claim("w1", timedelta(seconds=30))
    assert claimed is not None and claimed[0].id == started[0]
    assert client.delete("/api/v1/workflows/orders", headers=h("admin")).status_code == 204
    assert [store.run(r).status for r in started[1:]] == ["stopped", "stopped"]
    assert store.claim("w2", timedelta(seconds=30)) is None  # nothing of it runs any more
    assert store.heartbeat(started[0], "w1", timedelta(seconds=30), "") is True  # asked to stop
    # Each stop is an audit record, by who deleted the workflow (there were none).
    stops = [(a["action"], a["user"], a["detail"]) for a in reversed(store.audit())
             if a["action"] == "run.stop"]
    assert stops == [("run.stop", "admin", {"run": r, "reason": "workflow deleted"})
                     for r in started]


def test_a_backfill_range_without_a_zone_is_utc(client: TestClient) -> None:
    post_yaml(client, flow(extra="  schedule: {type: cron, expression: '0 3 * * *'}\n"))
    r = client.post("/api/v1/workflows/orders/backfill", headers=h("operator"),
                    json={"start": "2026-01-01T00:00:00", "end": "2026-01-03T12:00:00"})
    assert r.status_code == 201, r.text
    assert len(r.json()["runs"]) == 3
    runs = client.get("/api/v1/runs?workflow=orders", headers=h("viewer")).json()
    assert sorted(x["scheduled_for"] for x in runs)[0] == "2026-01-01T03:00:00+00:00"


def test_a_discovery_error_names_its_source_once(client: TestClient) -> None:
    text = """
workflow:
  id: pg
  sources:
    db: {type: postgres, config: {dsn: "postgresql://postgres@127.0.0.1:5432/no_such_db_x",
                                  table: t}}
  destinations: {out: {type: file, inputs: [db], config: {path: out.jsonl}}}
"""
    assert post_yaml(client, text).status_code == 201
    r = client.get("/api/v1/workflows/pg/discover/db", headers=h("operator"))
    assert r.status_code == 502
    detail = r.json()["detail"]
    assert detail.startswith("step 'db': ") and "'db'" not in detail[len("step 'db'"):], detail


def test_an_unknown_status_filter_is_refused(client: TestClient) -> None:
    r = client.get("/api/v1/runs?status=finished", headers=h("viewer"))
    assert r.status_code == 422 and "'finished' is none of queued" in r.json()["detail"]
    assert client.get("/api/v1/runs?status=failed", headers=h("viewer")).json() == []


def test_a_schedule_that_never_fires_is_refused(client: TestClient) -> None:
    never = flow(extra="  schedule: {type: cron, expression: '0 0 30 2 *'}\n")
    r = post_yaml(client, never)
    assert r.status_code == 422
    assert "never fires" in r.json()["problems"][0]["message"]
    ended = flow(extra="  schedule: {type: interval, interval: 1h, "
                 "end_date: '2020-01-01T00:00:00Z'}\n")
    assert "before its end_date" in str(post_yaml(client, ended).json())
    past = flow(extra="  schedule: {type: once, start_date: '2020-01-01T00:00:00Z'}\n")
    r = post_yaml(client, past)
    assert r.status_code == 422 and "its start_date is past" in str(r.json())
    never_said = flow(extra="  schedule: {type: once}\n")
    assert "a once schedule needs 'start_date'" in str(post_yaml(client, never_said).json())
    ahead = (now() + timedelta(days=30)).isoformat()
    soon = flow(extra=f"  schedule: {{type: once, start_date: '{ahead}'}}\n")
    assert post_yaml(client, soon).status_code == 201



def test_a_start_date_without_a_zone_is_utc(client: TestClient) -> None:
    # A cron or interval schedule with a naive start_date failed the API with a 500
    # (a naive and an aware time compared).
    for schedule, first in (
            ("{type: cron, expression: '0 9 * * *', timezone: Asia/Shanghai, "
             "start_date: '2030-12-10T00:00:00'}", "2030-12-10T01:00:00+00:00"),
            ("{type: interval, interval: 1h, start_date: '2030-12-10T00:00:00'}",
             "2030-12-10T00:00:00+00:00")):
        r = post_yaml(client, flow(extra=f"  schedule: {schedule}\n"))
        assert r.status_code == 201, r.text
        got = client.get("/api/v1/workflows/orders", headers=h("viewer")).json()
        assert got["next_runs"][0] == first
        assert client.delete("/api/v1/workflows/orders", headers=h("admin")).status_code == 204


def test_a_stored_schedule_that_no_longer_validates_is_said_not_scheduled(
        client: TestClient, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # Stored by an earlier version (a 6-field cron): it stopped being scheduled, and the
    # API showed only `schedule: null`.
    from dataflare.server.scheduler import Scheduler

    store.put_workflow("orders", None, flow(
        extra="  schedule: {type: cron, expression: '0 0 1 * * *'}\n"), "test", create=True)
    got = client.get("/api/v1/workflows/orders", headers=h("viewer")).json()
    assert got["schedule"] is None and got["schedule_error"] == (
        "its schedule does not validate (cron expression '0 0 1 * * *' has 6 fields: it "
        "needs 5 (minute hour day-of-month month day-of-week; no seconds)); store it again "
        "with a valid one")
    Scheduler(store).tick()
    assert "workflow 'orders' is not scheduled: its schedule does not validate" in caplog.text


def test_a_name_keeps_its_references_and_an_id_has_none(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The stored name was the server's interpolation: a viewer saw the value of
    # ${API_KEY}, or the content of any file the server could read (${file:...}).
    monkeypatch.setenv("API_KEY", "sk-live-VERYSECRET-123456")
    secret = tmp_path / "token.txt"
    secret.write_text("file-secret-0123456789\n")
    text = flow().replace("name: orders flow",
                          f'name: "key ${{API_KEY}} ${{file:{secret}}}"')
    assert post_yaml(client, text).status_code == 201
    shown = client.get("/api/v1/workflows/orders", headers=h("viewer")).text
    assert "VERYSECRET" not in shown and "file-secret" not in shown
    assert client.get("/api/v1/workflows/orders", headers=h("viewer")).json()["name"] == (
        f"key ${{API_KEY}} ${{file:{secret}}}")
    secret.write_text("orders2\n")
    r = post_yaml(client, flow("x").replace("id: x", f"id: ${{file:{secret}}}"))
    assert r.status_code == 422 and "id is written out" in r.text


def test_a_workflow_whose_once_has_fired_is_still_edited(client: TestClient, store: Store
                                                          ) -> None:
    fired = flow(wid="fired", extra="  schedule: {type: once, start_date: "
                 "'2020-01-01T00:00:00Z'}\n")
    store.put_workflow("fired", None, fired, "admin", create=True)  # stored when it was ahead
    edited = fired.replace("total >= 0", "total >= 1")
    assert post_yaml(client, edited, wid="fired").status_code == 200
    moved = fired.replace("2020-01-01", "2021-01-01")
    assert post_yaml(client, moved, wid="fired").status_code == 422


def test_ids_and_periods_no_store_can_hold_are_refused(client: TestClient) -> None:
    # An id with '/' could never be read, run or deleted through its URL (and names a
    # directory); a zero period divided by zero in the scheduler: 422s, not stored.
    for wid in ("a/b", "has space", "../up", "x" * 129):
        r = post_yaml(client, flow(wid=wid.replace('"', '')))
        assert r.status_code == 422, (wid, r.text)
        assert "invalid workflow id" in r.json()["problems"][0]["message"]
    r = client.put("/api/v1/workflows/has%20space", content=flow().replace("  id: orders\n", ""),
                   headers={**h("admin"), "content-type": "text/yaml"})
    assert r.status_code == 422 and "invalid workflow id" in r.text
    long_name = flow().replace("name: orders flow", "name: " + "n" * 401)
    assert post_yaml(client, long_name).status_code == 422
    for body in ({"yaml": flow().replace("id: orders", "id: \"nu\u0000l\"")}, {"yaml": 5}):
        r = client.post("/api/v1/workflows", json=body, headers=h("admin"))
        assert r.status_code == 422, r.text
    zero = flow(extra="  schedule: {type: interval, expression: 0s}\n")
    r = post_yaml(client, zero)
    assert r.status_code == 422
    assert "period must be positive" in r.json()["problems"][0]["message"]
    assert client.get("/api/v1/workflows", headers=h("admin")).json() == []


def test_a_trigger_cycle_is_refused(client: TestClient) -> None:
    trig = "  post_actions:\n    - {{type: trigger, config: {{workflow: {0}}}}}\n"
    assert post_yaml(client, flow("a", trig.format("b"))).status_code == 201
    assert post_yaml(client, flow("b", trig.format("c"))).status_code == 201
    r = post_yaml(client, flow("c", trig.format("a")))
    assert r.status_code == 422
    assert "a cycle: c -> a -> b -> c" in r.json()["problems"][0]["message"]


def test_a_run_is_carried_out_by_a_worker_with_its_summary_and_logs(
        client: TestClient, store: Store, tmp_path: Path) -> None:
    post_yaml(client, flow())
    run = client.post("/api/v1/workflows/orders/runs", headers=h("operator")).json()
    assert run["status"] == "queued" and run["trigger"] == "manual"
    assert Worker(store, tmp_path / "data").run_one()
    got = client.get(f"/api/v1/runs/{run['id']}", headers=h("viewer")).json()
    assert got["status"] == "succeeded", got
    assert got["summary"]["total"] == 3 and got["summary"]["succeeded"] == 3
    assert got["summary"]["steps"]["big"] == {"records": 3, "failed": 0}
    out = tmp_path / "data/work/orders/out.jsonl"
    assert len(out.read_text().splitlines()) == 3
    logs = client.get(f"/api/v1/runs/{run['id']}/logs", headers=h("viewer")).text
    assert "summary" in logs
    listed = client.get("/api/v1/runs?workflow=orders&status=succeeded",
                        headers=h("viewer")).json()
    assert [r["id"] for r in listed] == [run["id"]]
    assert client.get("/api/v1/runs?status=failed", headers=h("viewer")).json() == []
    # A queued run stops at once; a finished one cannot be stopped.
    queued = client.post("/api/v1/workflows/orders/runs", headers=h("operator")).json()
    stopped = client.post(f"/api/v1/runs/{queued['id']}/stop", headers=h("operator")).json()
    assert stopped["status"] == "stopped"
    assert client.post(f"/api/v1/runs/{run['id']}/stop",
                       headers=h("operator")).status_code == 409


def test_a_failing_run_is_retried_then_failed_with_its_error(
        client: TestClient, store: Store, tmp_path: Path) -> None:
    # A valid text that fails at run: its output cannot be opened.
    text = flow().replace("path: out.jsonl", "path: /proc/forbidden/out.jsonl").replace(
        "environment:", "config: {retry: {max_attempts: 2, backoff: {initial: 0s}}}\n"
        "  environment:")
    assert post_yaml(client, text).status_code == 201
    run = client.post("/api/v1/workflows/orders/runs", headers=h("admin")).json()
    worker = Worker(store, tmp_path / "data")
    assert worker.run_one() and worker.run_one()
    got = client.get(f"/api/v1/runs/{run['id']}", headers=h("admin")).json()
    assert got["status"] == "failed" and got["attempt"] == 2
    assert "out" in got["error"] and "/proc/forbidden" in got["error"]
    assert not worker.run_one()


ENDPOINTS = [  # method, path, permission needed
    ("GET", "/api/v1/workflows", "workflow:read"),
    ("POST", "/api/v1/workflows", "workflow:create"),
    ("GET", "/api/v1/workflows/orders", "workflow:read"),
    ("PUT", "/api/v1/workflows/orders", "workflow:update"),
    ("GET", "/api/v1/workflows/orders/revisions", "workflow:read"),
    ("GET", "/api/v1/workflows/orders/graph", "workflow:read"),
    ("POST", "/api/v1/workflows/orders/runs", "workflow:execute"),
    ("GET", "/api/v1/runs", "workflow:read"),
    ("GET", "/api/v1/connectors", "connector:read"),
    # Discovery reads the source with the server's credentials and files, as a run does.
    ("GET", "/api/v1/workflows/orders/discover/g", "workflow:execute"),
    ("GET", "/api/v1/audit", "system:audit"),
    ("DELETE", "/api/v1/workflows/orders", "workflow:delete"),
]


def test_rbac_matrix(client: TestClient) -> None:
    roles = {n: auth.User(n, tuple(auth.DEFAULT_ROLES[n])) for n in TOKENS}
    for method, path, permission in ENDPOINTS:
        for token in (None, "wrong-token-0123456789abcdefghij", "Basic x"):
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            r = client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, token)
        for name, user in roles.items():
            post_yaml(client, flow())  # exists (again) for the calls that need it
            body = flow() if method in ("POST", "PUT") and "runs" not in path else None
            r = client.request(method, path, headers={**h(name), "content-type": "text/yaml"},
                               content=body)
            if user.may(permission):
                assert r.status_code not in (401, 403), (method, path, name, r.text)
            else:
                assert r.status_code == 403, (method, path, name)
                assert permission in r.json()["detail"]


def test_probes_metrics_openapi_and_console_need_no_token(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    assert "dataflare_api_requests" in client.get("/metrics").text
    spec = client.get("/openapi.json").json()
    assert "/api/v1/workflows/{wid}/runs" in spec["paths"]
    assert "<title>DataFlare</title>" in client.get("/").text


def test_weak_or_unknown_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(json.dumps({"users": {"bob": {"token": "short", "roles": ["admin"]}}}))
    with pytest.raises(ValueError, match="at least 24"):
        auth.load(cfg)
    cfg.write_text(json.dumps({"users": {"bob": {"token": "x" * 30, "roles": ["root"]}}}))
    with pytest.raises(ValueError, match="unknown role 'root'"):
        auth.load(cfg)
    secret = tmp_path / "token"
    secret.write_text("y" * 32 + "\n")
    cfg.write_text(json.dumps({"users": {"ci": {"token_file": str(secret),
                                                "roles": ["operator"]}}}))
    user = auth.load(cfg).authenticate("y" * 32)
    assert user is not None and user.may("workflow:execute") and not user.may("workflow:create")
    # Two users of one token: the second acted as the first, and was audited as such.
    cfg.write_text(json.dumps({"users": {"alice": {"token": "z" * 30, "roles": ["admin"]},
                                         "bob": {"token": "z" * 30, "roles": ["viewer"]}}}))
    with pytest.raises(ValueError, match="users 'alice' and 'bob' have the same token"):
        auth.load(cfg)


@pytest.mark.parametrize(("config", "said"), [
    ("users:\n  - {name: bob, token: x}\n", "users: should be a mapping of names, not a list"),
    ("- a\n", "the file: should be a mapping of 'users' and 'roles', not a list"),
    ("user: {bob: {}}\n", "user: unknown setting (known: users, roles)"),
    ("users: {bob: {tokn: x, roles: [admin]}}\n",
     "users.bob.tokn: unknown setting (known: token, token_file, roles)"),
    ("users: {bob: {roles: [admin]}}\n", "users.bob: give either 'token' or 'token_file'"),
    ("users: {bob: {token: 123456789012345678901234567, roles: [admin]}}\n",
     "users.bob.token: should be text, not a number"),
    ("roles: {ops: {permissions: [workflow]}}\n",
     "roles.ops.permissions: a permission is 'resource:action' ('workflow:*'), not 'workflow'"),
])
def test_a_malformed_config_is_refused_in_its_own_terms(tmp_path: Path, config: str, said: str
                                                         ) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(config)
    with pytest.raises(ValueError) as caught:
        auth.load(cfg)
    assert str(caught.value) == said
    assert "123456789" not in str(caught.value)


def test_a_config_token_may_have_a_default_which_no_error_shows(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    default = "d" * 30
    cfg.write_text(json.dumps({"users": {"bob": {"token": f"${{BOB_TOKEN:-{default}}}",
                                                 "roles": ["viewer"]}}}))
    assert auth.load(cfg, env={}).authenticate(default) is not None
    assert auth.load(cfg, env={"BOB_TOKEN": "e" * 30}).authenticate("e" * 30) is not None
    cfg.write_text(json.dumps({"users": {"bob": {"token": "${BOB_TOKEN}", "roles": []}}}))
    with pytest.raises(ValueError, match="variable BOB_TOKEN is not set"):
        auth.load(cfg, env={})


def test_a_bad_config_stops_the_server_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataflare.server import serve

    cfg = tmp_path / "server.yaml"
    cfg.write_text(json.dumps({"users": {"bob": {"token": "${NO_SUCH_TOKEN_VAR}",
                                                 "roles": ["admin"]}}}))
    assert serve(None, "all", "127.0.0.1", 0, str(cfg), tmp_path) == 1
    assert capsys.readouterr().err == (
        f"error: --config {cfg}: variable NO_SUCH_TOKEN_VAR is not set\n")
    assert not (tmp_path / "server.sqlite3").exists()  # stopped before any role started
    # A store out of reach: a traceback of some 130 lines.
    store = "postgresql://postgres:pw-0123456789@127.0.0.1:5432/no_such_db_for_serve"
    assert serve(store, "all", "127.0.0.1", 0, None, tmp_path) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: --store: cannot open postgresql://postgres:***@127.0.0.1"
                              ":5432/no_such_db_for_serve: ") and "pw-0123" not in err[-1]
    assert 'database "no_such_db_for_serve" does not exist' in err[-1]
