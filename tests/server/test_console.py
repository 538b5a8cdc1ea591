"""The web console, driven in headless Chromium (Debian's) by Playwright against a real server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.pg_private import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLOW = """
workflow:
  id: clicks
  name: Click counts
  schedule: {type: interval, interval: 1h}
  sources: {events: {type: generator, config: {preset: clickstream, count: 40}}}
  transformations:
    engaged: {type: filter, inputs: [events], config: {condition: "event != 'view'"}}
  destinations: {out: {type: file, inputs: [engaged], config: {path: out.jsonl}}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A ``dataflare server`` (every role, SQLite store): its URL and admin token."""
    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflare", "server", "--port", str(port), "--data-dir",
         str(data)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    try:
        yield url, (data / "admin-token").read_text().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_console_shows_workflows_dag_schedule_runs_and_audit(
        server: tuple[str, str], tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (make test installs it as root)")
    from playwright.sync_api import expect, sync_playwright

    url, token = server
    api = httpx.Client(base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"})
    assert api.post("/workflows", content=FLOW, headers={"content-type": "text/yaml"}
                    ).status_code == 201
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page()
        page.goto(url + "/")
        expect(page.locator("#password, #token")).to_be_visible()  # asks for a token first
        page.fill("#token", token)
        page.click("#save")
        page.get_by_role("link", name="clicks").click()
        # The DAG: one node per component, with its type.
        nodes = page.locator("#dag svg g.node")
        expect(nodes).to_have_count(3)
        expect(page.locator("#dag")).to_contain_text("filter")
        expect(page.locator("#schedule")).to_contain_text("Next runs")
        page.click("#start")
        expect(page.locator("#run-status")).to_have_text("succeeded", timeout=90_000)
        expect(page.locator("table").first).to_contain_text("engaged")
        expect(page.locator("#logs")).to_contain_text("summary")
        page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
        page.get_by_role("link", name="Audit").click()
        expect(page.locator("table")).to_contain_text("run.start")
        expect(page.locator("table")).to_contain_text("workflow.create")
        browser.close()
    runs: Any = api.get("/runs").json()
    assert [r["status"] for r in runs] == ["succeeded"]
