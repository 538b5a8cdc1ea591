"""Post-actions after a run: webhook, Slack, e-mail (a local SMTP server), triggers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dataflare.server import auth
from dataflare.server.api import create_app
from dataflare.server.store import Store
from dataflare.server.worker import Worker
from tests.fixtures.pg_private import free_port
from tests.server.conftest import Receiver
from tests.server.test_cluster import wait_for


@pytest.fixture
def smtp() -> Iterator[Any]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    class Inbox(Message):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[Any] = []

        def handle_message(self, message: Any) -> None:
            self.messages.append(message)

    inbox = Inbox()
    inbox.port = free_port()  # type: ignore[attr-defined]
    controller = Controller(inbox, hostname="127.0.0.1", port=inbox.port)  # type: ignore[attr-defined]
    controller.start()
    yield inbox
    controller.stop()


def admin(store: Store) -> tuple[TestClient, dict[str, str]]:
    """A client of the server's API, and the headers of an admin's YAML requests."""
    token = "t" * 32
    access = auth.Access({token: auth.User("admin", tuple(auth.DEFAULT_ROLES["admin"]))})
    return TestClient(create_app(store, access)), {"Authorization": f"Bearer {token}",
                                                   "content-type": "text/yaml"}


def flow(tmp_path: Path, actions: str, condition: str = "n >= 0") -> Path:
    (tmp_path / "in.jsonl").write_text("".join(f'{{"n": {i}}}\n' for i in range(4)))
    path = tmp_path / "wf.yaml"
    path.write_text(f"""
workflow:
  id: nightly
  name: Nightly load
  sources: {{numbers: {{type: file, config: {{path: in.jsonl}}}}}}
  transformations:
    keep: {{type: filter, inputs: [numbers], config: {{condition: "{condition}"}}}}
  destinations: {{out: {{type: file, inputs: [keep], config: {{path: out.jsonl}}}}}}
  post_actions:
{actions}""")
    return path


def run(path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    summary = path.parent / "summary.json"
    out = subprocess.run([sys.executable, "-m", "dataflare", "run", str(path),
                          "--summary-json", str(summary), *extra],
                         capture_output=True, text=True, timeout=120)
    return out, json.loads(summary.read_text())


def test_notifications_reach_a_webhook_slack_and_smtp_after_a_run(
        tmp_path: Path, webhook: Receiver, smtp: Any) -> None:
    actions = f"""
    - type: notification
      condition: "workflow.status == 'success'"
      config: {{channel: webhook, url: "{webhook.url}",
               message: "{{{{workflow.name}}}} loaded {{{{run.summary.succeeded}}}} rows"}}
    - type: notification
      condition: "workflow.status == 'success'"
      config: {{channel: slack, webhook_url: "{webhook.url}", recipient: "#data",
               message: "{{{{workflow.id}}}} ok"}}
    - type: notification
      config: {{channel: email, smtp_host: 127.0.0.1, smtp_port: {smtp.port},
               from: df@example.org, recipient: [ops@example.org],
               subject: "{{{{workflow.name}}}}: {{{{workflow.status}}}}",
               message: "total {{{{run.summary.total}}}}"}}
    - type: notification
      condition: "workflow.status == 'failed'"
      config: {{channel: webhook, url: "{webhook.url}", message: never}}
"""
    out, summary = run(flow(tmp_path, actions))
    assert out.returncode == 0, out.stderr
    assert webhook.bodies[0]["message"] == "Nightly load loaded 4 rows"
    assert webhook.bodies[0]["context"]["workflow"]["status"] == "success"
    assert webhook.bodies[1] == {"text": "nightly ok", "channel": "#data"}
    assert len(webhook.bodies) == 2  # the failure notification's condition is false
    mail = smtp.messages[0]
    assert mail["Subject"] == "Nightly load: success" and mail["To"] == "ops@example.org"
    assert mail.get_payload().strip() == "total 4"
    done = [a["done"] for a in summary["post_actions"]]
    assert done == [True, True, True, False]
    assert summary["post_actions"][3]["reason"] == "condition is false"


def test_a_failed_delivery_is_retried_and_reported_not_dropped(
        tmp_path: Path, webhook: Receiver) -> None:
    webhook.status = 500
    actions = f"""
    - type: notification
      config: {{channel: webhook, url: "{webhook.url}", message: "x"}}
"""
    out, summary = run(flow(tmp_path, actions))
    assert out.returncode == 0
    assert len(webhook.bodies) == 3  # three attempts
    assert summary["post_actions"][0]["done"] is False
    assert "HTTP 500" in summary["post_actions"][0]["error"]
    assert "post-action 0 (notification): failed" in out.stderr


def test_the_server_runs_post_actions_and_a_trigger_that_waits(
        tmp_path: Path, sqlite_store: Store, webhook: Receiver) -> None:
    client, headers = admin(sqlite_store)
    down = flow(tmp_path, f"""
    - type: notification
      config: {{channel: webhook, url: "{webhook.url}",
               message: "{{{{workflow.id}}}} {{{{workflow.status}}}}"}}
""").read_text().replace("id: nightly", "id: downstream").replace("in.jsonl", "/nope.jsonl")
    assert client.post("/api/v1/workflows", content=down, headers=headers).status_code == 201
    up = flow(tmp_path, """
    - type: trigger
      condition: "workflow.status == 'success'"
      config: {workflow: downstream, wait: true}
""").read_text().replace("in.jsonl", str(tmp_path / "in.jsonl"))
    assert client.post("/api/v1/workflows", content=up, headers=headers).status_code == 201
    run_id = client.post("/api/v1/workflows/nightly/runs", headers=headers).json()["id"]
    assert Worker(sqlite_store, tmp_path / "data").run_one()
    got = client.get(f"/api/v1/runs/{run_id}", headers=headers).json()
    assert got["status"] == "succeeded"
    action = got["actions"][0]
    assert action["type"] == "trigger" and action["done"] is False  # downstream failed
    assert "failed" in action["result"]
    child = sqlite_store.runs("downstream")[0]
    assert child.trigger == "trigger" and child.parent_run == run_id
    assert child.status == "failed"
    assert webhook.bodies[-1]["message"] == "downstream failed"
    assert sqlite_store.run(child.id).actions[0]["done"] is True


def test_run_without_a_server_reports_a_trigger_it_cannot_start(tmp_path: Path) -> None:
    out, summary = run(flow(tmp_path, """
    - type: trigger
      config: {workflow: downstream}
"""))
    assert out.returncode == 0
    assert "needs the server" in summary["post_actions"][0]["error"]


def test_a_run_stopped_while_queued_gets_its_post_actions_once(
        tmp_path: Path, sqlite_store: Store, webhook: Receiver) -> None:
    client, headers = admin(sqlite_store)
    text = flow(tmp_path, f"""
    - type: notification
      condition: "workflow.status == 'stopped'"
      config: {{channel: webhook, url: "{webhook.url}",
               message: "{{{{workflow.id}}}} {{{{run.id}}}} {{{{workflow.status}}}}"}}
""").read_text()
    assert client.post("/api/v1/workflows", content=text, headers=headers).status_code == 201
    run_id = client.post("/api/v1/workflows/nightly/runs", headers=headers).json()["id"]
    assert client.post(f"/api/v1/runs/{run_id}/stop", headers=headers).status_code == 200
    worker = Worker(sqlite_store, tmp_path / "data")
    assert worker.run_one()
    got = client.get(f"/api/v1/runs/{run_id}", headers=headers).json()
    assert got["status"] == "stopped" and got["started_at"] is None  # it never ran
    assert got["actions"][0]["done"] is True, got["actions"]
    assert webhook.bodies[-1]["message"] == f"nightly {run_id} stopped"
    assert not worker.run_one()  # carried out once
    assert len(webhook.bodies) == 1


def test_a_hanging_webhook_does_not_hold_up_the_next_run(
        tmp_path: Path, sqlite_store: Store, webhook: Receiver) -> None:
    # The post-actions ran on the worker's thread: a webhook that hangs (or fails and is
    # retried) delayed every run queued behind it.
    import threading

    client, headers = admin(sqlite_store)
    text = flow(tmp_path, f"""
    - type: notification
      config: {{channel: webhook, url: "{webhook.url}", message: "{{{{run.id}}}}"}}
""").read_text().replace("in.jsonl", str(tmp_path / "in.jsonl"))
    assert client.post("/api/v1/workflows", content=text, headers=headers).status_code == 201
    webhook.answer.clear()
    first = client.post("/api/v1/workflows/nightly/runs", headers=headers).json()["id"]
    stop = threading.Event()
    worker = threading.Thread(target=Worker(sqlite_store, tmp_path / "data").run_forever,
                              args=(stop,))
    worker.start()
    try:
        wait_for(lambda: sqlite_store.run(first).status == "succeeded" and webhook.bodies,
                 60, "the first run and its webhook call")
        second = client.post("/api/v1/workflows/nightly/runs", headers=headers).json()["id"]
        wait_for(lambda: sqlite_store.run(second).status == "succeeded", 60,
                 "the second run, while the first's webhook hangs")
        assert not sqlite_store.run(first).actions  # still waiting for its answer
        webhook.answer.set()
        wait_for(lambda: sqlite_store.run(second).actions, 60, "the second's post-actions")
        assert sqlite_store.run(first).actions[0]["done"] is True
        assert sorted(b["message"] for b in webhook.bodies) == sorted([first, second])
    finally:
        webhook.answer.set()
        stop.set()
        worker.join(60)
    assert not worker.is_alive()
