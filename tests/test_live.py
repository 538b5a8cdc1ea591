"""A run's live endpoints: /health, /ready (a stopped database), /status, /metrics, tap, top."""

from __future__ import annotations

import json
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

FLOW = """
workflow:
  id: live
  sources:
    clicks: {{type: generator, config: {{preset: clickstream, count: null, rate: 200,
              fields: {{email: {{type: text, template: "user{{n}}@example.org", max: 50}}}}}}}}
    idle: {{type: generator, config: {{preset: orders, count: 1, start_delay: 1h}}}}
  transformations:
    engaged: {{type: filter, inputs: [clicks], config: {{condition: "event != 'view'"}}}}
  destinations:
    out: {{type: file, inputs: [engaged], config: {{path: out.jsonl}}}}
    cache: {{type: redis, inputs: [idle], config: {{url: "redis://127.0.0.1:{redis_port}/0",
            key_template: "o:{{{{order_id}}}}"}}}}
  data_protection:
    masking_rules: [{{field: email, method: partial, show_chars: 2}}]
"""


def start_redis(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    wait(lambda: _connects(port), "redis to start")
    return proc


def _connects(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait(cond: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """A running workflow with --http-port: (its URL, its Redis port, tmp dir)."""
    redis_port = free_port()
    redis = start_redis(redis_port, tmp_path)
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(redis_port=redis_port))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", str(flow),
                             "--http-port", str(port)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait(up, "the run's http port")
    try:
        yield url, redis_port, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        redis.terminate()
        redis.wait()


def test_ready_names_a_stopped_database_and_recovers(running: tuple[str, int, Path]) -> None:
    url, redis_port, tmp = running
    assert httpx.get(url + "/health").json() == {"status": "alive"}
    assert httpx.get(url + "/ready").status_code == 200
    subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"],
                   capture_output=True)
    r = wait(lambda: (x := httpx.get(url + "/ready")).status_code == 503 and x, "503")
    assert r.json()["not_ready"] == [
        {"component": "cache", "endpoint": f"127.0.0.1:{redis_port}",
         "error": "Connection refused"}]
    restarted = start_redis(redis_port, tmp)
    try:
        wait(lambda: httpx.get(url + "/ready").status_code == 200, "ready again")
    finally:
        restarted.terminate()


def test_status_metrics_top_and_a_masked_tap(running: tuple[str, int, Path]) -> None:
    url, _, _ = running
    status = wait(lambda: (s := httpx.get(url + "/status").json())["steps"]["engaged"]["records"]
                  and s, "records through the filter")
    assert status["workflow"] == "live"
    assert status["steps"]["clicks"]["kind"] == "source"
    assert status["steps"]["out"]["kind"] == "destination"
    assert 'dataflare_records_out_total{step="clicks"}' in httpx.get(url + "/metrics").text
    top = subprocess.run([sys.executable, "-m", "dataflare", "top", url, "--once"],
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "engaged" in top.stdout and "rate/s" in top.stdout
    tap = subprocess.run([sys.executable, "-m", "dataflare", "tap", url, "engaged",
                          "--limit", "5"], capture_output=True, text=True, timeout=60)
    assert tap.returncode == 0, tap.stderr
    records = [json.loads(line) for line in tap.stdout.splitlines()]
    assert len(records) == 5
    assert all(r["event"] != "view" for r in records)
    assert all(r["email"].startswith("us") and r["email"].endswith("****") for r in records)
    missing = subprocess.run([sys.executable, "-m", "dataflare", "tap", url, "nope"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no step 'nope'" in missing.stderr


def test_records_are_served_off_loopback_only_with_a_token(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A pod served /tap and /views on 0.0.0.0 to anyone: every other pod could read the
    # records of a run.
    import httpx

    from dataflare.dsl_compiler import validate_text
    from dataflare.live import TOKEN_ENV, Live

    wf = validate_text("workflow:\n  sources: {s: {type: file, config: {path: x.jsonl}}}\n"
                       "  destinations: {o: {type: stdout, inputs: [s]}}\n").workflow
    for token, headers, status in ((None, {}, 403), ("t0k-Xy12", {}, 401),
                                   ("t0k-Xy12", {"Authorization": "Bearer t0k-Xy12"}, 404)):
        if token:
            monkeypatch.setenv(TOKEN_ENV, token)
        live = Live(wf, None)
        port = live.start("0.0.0.0", 0)  # noqa: S104 - what a pod binds
        try:
            url = f"http://127.0.0.1:{port}"
            assert httpx.get(f"{url}/views/nope", headers=headers).status_code == status
            assert httpx.get(f"{url}/health").status_code == 200  # probes need no token
        finally:
            live.stop()
    monkeypatch.delenv(TOKEN_ENV)
    local = Live(wf, None)
    port = local.start("127.0.0.1", 0)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/views/nope").status_code == 404
    finally:
        local.stop()
