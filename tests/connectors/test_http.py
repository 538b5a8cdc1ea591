"""HTTP destination against a local HTTP server that records requests and injects faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflare.connectors.http import (
    HttpDestinationConfig,
    build_http_destination,
)
from dataflare.dsl_compiler import models
from dataflare.registry import BuildContext
from dataflare.retry import retry_after_seconds

FAST_RETRY = models.Retry(max_attempts=4, backoff=models.Backoff(initial=0.01, max=0.5))


@dataclass
class Receiver:
    url: str = ""
    received: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    faults: deque[tuple[int, str | None]] = field(default_factory=deque)
    down: int | None = None  # a status answered to every request while set
    answered: int = 0  # requests answered with ``down``
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            with state.lock:
                fault = state.faults.popleft() if state.faults else None
                if state.down is not None:
                    fault = (state.down, None)
                    state.answered += 1
                if fault is None:
                    state.received.append((self.command, self.path, dict(self.headers), body))
            status, retry_after = fault or (200, None)
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            payload = b'{"ok": true}' if status < 300 else b'{"error": "nope"}'
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_PUT = do_GET = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def run(batches: list[Any], step: str = "notify", batch: dict[str, Any] | None = None,
        recovery: Path | None = None, **config: Any) -> list[Any]:
    component = models.Destination(type="http", config=config, batch=batch or {})
    workflow = models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY))
    ctx = BuildContext(step, "destination", component, HttpDestinationConfig(**config),
                       workflow, Path("."))
    flow = Dataflow("http")
    up = op.input("in", flow, TestingSource(batches))
    errors: list[Any] = []
    op.output("failed", build_http_destination(ctx, up), TestingSink(errors))
    if recovery is None:
        run_main(flow)
    else:
        run_main(flow, epoch_interval=timedelta(0),
                 recovery_config=RecoveryConfig(str(recovery)))
    return [f for b in errors for f in b]


SEED_BODY = '{\n "customer_id": "{{customer.id}}",\n "note": "{{customer.note}}"\n}'


def test_seed_snippet_validates() -> None:
    cfg = HttpDestinationConfig(url="https://notification.example.com/api/alerts", method="POST",
                          headers={"Content-Type": "application/json",
                                   "Authorization": "Bearer token"},
                          body_template=SEED_BODY)
    assert "Bearer" not in repr(cfg)  # headers often hold credentials


def test_templated_bodies_are_valid_json_for_any_value(receiver: Receiver) -> None:
    recs = [{"customer": {"id": 1, "note": 'says "hi"\nand \\ leaves'}, "_meta": {"line": 1}},
            {"customer": {"id": 2}}]
    errors = run([recs], url=receiver.url + "/alerts/{{customer.id}}", body_template=SEED_BODY,
                 headers={"Content-Type": "application/json", "Authorization": "Bearer t",
                          "Idempotency-Key": "alert-{{customer.id}}"})
    assert errors == []
    got = sorted(receiver.received, key=lambda r: r[1])
    assert [(m, p) for m, p, _, _ in got] == [("POST", "/alerts/1"), ("POST", "/alerts/2")]
    assert json.loads(got[0][3]) == {"customer_id": "1", "note": 'says "hi"\nand \\ leaves'}
    assert json.loads(got[1][3]) == {"customer_id": "2", "note": ""}
    assert got[0][2]["Authorization"] == "Bearer t"
    assert got[0][2]["Idempotency-Key"] == "alert-1"


def test_record_as_json_without_template(receiver: Receiver) -> None:
    run([[{"id": 1, "nested": {"a": [1, 2]}, "_meta": {"offset": 3}}]], url=receiver.url,
        method="PUT")
    ((method, _, headers, body),) = receiver.received
    assert method == "PUT" and json.loads(body) == {"id": 1, "nested": {"a": [1, 2]}}
    assert headers["Content-Type"] == "application/json"


def test_bytes_and_big_integers_go_as_files_have_them(receiver: Receiver) -> None:
    # Bytes (a Kafka `format: bytes` value) went as their Python repr, "b'\\x00\\xff'".
    run([[{"raw": b"\x00\xff", "n": 10**30}]], url=receiver.url)
    ((_, _, _, body),) = receiver.received
    assert json.loads(body) == {"raw": "\\x00ff", "n": str(10**30)}


def test_retries_429_and_5xx_honouring_retry_after(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.faults.extend([(503, None), (429, "0.3"), (500, None)])
    with caplog.at_level("WARNING", logger="dataflare.retry"):
        errors = run([[{"id": 1}, {"id": 2}]], url=receiver.url)
    assert errors == []
    assert sorted(json.loads(b)["id"] for *_, b in receiver.received) == [1, 2]
    assert not receiver.faults
    waits = [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records]
    assert waits == ["0.0s", "0.3s", "0.0s"]  # backoff 0.01s, then the Retry-After of 429


def test_gives_up_after_the_retry_policy(receiver: Receiver) -> None:
    receiver.faults.extend([(503, None)] * 4)
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run([[{"id": 1, "_meta": {"file": "in.jsonl", "line": 7}}]], url=receiver.url)
    text = str(info.value.__cause__)
    assert "step 'notify'" in text and "4 attempt(s)" in text and "in.jsonl:7" in text


def test_a_refused_request_fails_its_record_alone(receiver: Receiver) -> None:
    receiver.faults.append((400, None))
    recs = [{"id": 1, "_meta": {"file": "in.jsonl", "line": 1}}, {"id": 2}]
    errors = run([recs], url=receiver.url)
    assert [(e.step, e.type, e.as_record()["record"], e.position()) for e in errors] == [
        ("notify", "HTTP 400", {"id": 1}, "in.jsonl:1")]
    assert "answered 400" in errors[0].message
    assert [json.loads(r[3]) for r in receiver.received] == [{"id": 2}]


def test_a_refused_request_follows_the_error_policy(receiver: Receiver, tmp_path: Path) -> None:
    from tests.fixtures.workflows import read_jsonl, run_cli

    receiver.faults.append((422, None))
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    flow = """\
workflow:
  id: hooks
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    hook:
      type: http
      inputs: [src]
      config: {{url: "{url}"}}
      error_handling: {{strategy: {strategy}}}
    dead: {{type: file, config: {{path: dead.jsonl}}}}
"""
    (tmp_path / "f.yaml").write_text(flow.format(url=receiver.url,
                                                 strategy="redirect, redirect_to: dead"))
    result = run_cli("run", "f.yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    [dead] = read_jsonl(tmp_path / "dead.jsonl")
    assert dead["record"] == {"id": 1} and "answered 422" in dead["error"]["message"]
    receiver.faults.append((400, None))
    failing = flow.replace("    dead: {{type: file, config: {{path: dead.jsonl}}}}\n", "")
    (tmp_path / "f.yaml").write_text(failing.format(url=receiver.url, strategy="fail"))
    result = run_cli("run", "f.yaml", cwd=tmp_path)
    assert result.code == 1
    assert "step 'hook' failed on the record at in.jsonl:1: HTTP 400" in result.stderr


def test_recovery_state_holds_no_credential_and_a_resume_sends_the_current_ones(
    receiver: Receiver, tmp_path: Path
) -> None:
    init_db_dir(tmp_path, 1)
    recs = [{"id": i, "note": f"pending_{i}"} for i in (1, 2, 3)]
    batches = [[recs[0]], [recs[1]], TestingSource.ABORT(), [recs[2]]]
    pending = {"size": 100, "flush_interval": 3600}  # buffered until the input ends

    def config(token: str) -> dict[str, Any]:
        return {"url": receiver.url + f"/hook?api_key=key_{token}",
                "headers": {"Authorization": f"Bearer {token}", "X-Id": "{{id}}"}}

    # A crash with records 1 and 2 buffered (and in the snapshot), none sent.
    run(batches, batch=pending, recovery=tmp_path, **config("OLD_token_111111"))
    assert receiver.received == []
    state = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"pending_2" in state
    assert b"OLD_token_111111" not in state

    run(batches, batch=pending, recovery=tmp_path, **config("NEW_token_222222"))
    got = {int(h["X-Id"]): (path, h["Authorization"]) for _, path, h, _ in receiver.received}
    assert got == {i: ("/hook?api_key=key_NEW_token_222222", "Bearer NEW_token_222222")
                   for i in (1, 2, 3)}


def test_a_graceful_stop_during_retries_keeps_the_records_for_the_resume(
    receiver: Receiver, tmp_path: Path
) -> None:
    from tests.fixtures.workflows import ROOT, run_cli

    (tmp_path / "f.yaml").write_text(f"""\
workflow:
  id: hooks
  config: {{retry: {{max_attempts: 10, backoff: {{initial: 0.5, multiplier: 20, max: 30}}}}}}
  sources:
    g: {{type: generator, config: {{count: 40, rate: 10, fields: {{n: {{type: sequence}}}}}}}}
  destinations:
    api: {{type: http, inputs: [g], config: {{url: "{receiver.url}/x"}}}}
""")
    receiver.down = 503
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", "f.yaml", "-r", "rec"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while receiver.answered < 2:  # the first record is being retried
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped cleanly on SIGTERM (state kept in the final snapshot)" in err
    assert "not retried after 2 attempt(s), the run is stopping" in err
    assert "giving up" not in err and "run failed" not in err
    assert receiver.received == []

    receiver.down = None
    result = run_cli("run", "f.yaml", "-r", "rec", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert sorted(json.loads(body)["n"] for *_, body in receiver.received) == list(range(40))


def test_unreachable_endpoint_is_retried_then_fails() -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - wrapped by bytewax
        run([[{"id": 1}]], url="http://127.0.0.1:9/nothing", timeout=1)
    assert "ConnectError" in str(info.value.__cause__)


def test_invalid_rendered_json_is_rejected_not_sent(receiver: Receiver) -> None:
    errors = run([[{"n": 1}]], url=receiver.url, body_template='{"n": {{n}}, }')
    assert len(errors) == 1 and "cannot render" in errors[0].message
    assert receiver.received == []


def test_a_header_value_is_sent_as_utf8_or_fails_its_record_alone(receiver: Receiver) -> None:
    # A value beyond ASCII stopped the run with a bare "'ascii' codec can't encode";
    # one with a line break was retried as a network failure, then stopped every resume.
    recs = [{"id": 1, "n": "José"}, {"id": 2, "n": "bad\r\nX-Evil: 1", "_meta": {"line": 2}},
            {"id": 3, "n": "plain"}, {"id": 4, "n": "nul\x00", "_meta": {"line": 4}}]
    errors = run([recs], url=receiver.url, headers={"X-Name": "{{n}}"})
    assert sorted((e.type, e.position(), e.message.split(": ", 1)[-1]) for e in errors) == [
        ("LocalProtocolError", "line=4", "Illegal header value b'nul\\x00'"),
        ("ValueError", "line=2", "cannot render the request: header 'X-Name' would hold a "
         "line break (a header cannot carry one)")]
    sent = {json.loads(b)["id"]: h["X-Name"] for _, _, h, b in receiver.received}
    assert sent[3] == "plain" and sent[1].encode("latin-1").decode() == "José"
    assert 2 not in sent and 4 not in sent


def test_a_dot_segment_value_fails_its_record_instead_of_naming_another_path(
        receiver: Receiver) -> None:
    # `/users/{{id}}/delete` with id ".." was sent to /delete: httpx resolves dot segments.
    recs = [{"id": ".."}, {"id": "."}, {"id": "a.b"}]
    errors = run([recs], url=f"{receiver.url}/users/{{{{id}}}}/delete")
    assert sorted(e.record["id"] for e in errors) == [".", ".."]
    assert "cannot render the request URL: the value '..' cannot be put in a URL" in \
        max(e.message for e in errors)
    assert [path for _, path, *_ in receiver.received] == ["/users/a.b/delete"]


@pytest.mark.parametrize("config", [
    "{type: http, inputs: [src], config: {url: 'http://h/', headers: {'Bad Header': x}}}",
    "{type: rest_api, config: {url: 'http://h/', headers: {'X:Y': x}}}",
])
def test_a_header_name_http_cannot_send_is_refused_by_validate(config: str) -> None:
    # Every record failed with LocalProtocolError("Illegal header name"), or went to
    # dead letters one by one, for a mistake in the workflow.
    from dataflare.dsl_compiler import validate_text

    section = "sources" if "rest_api" in config else "destinations"
    other = ("destinations: {o: {type: stdout, inputs: [src]}}" if section == "sources"
             else "sources: {s0: {type: file, config: {path: in.jsonl}}}")
    text = f"workflow:\n  {section}: {{src: {config}}}\n  {other}\n".replace(
        "inputs: [src]", "inputs: [s0]")
    v = validate_text(text, "w.yaml")
    assert any("is not a valid HTTP header name" in p.message for p in v.errors()), \
        [p.render() for p in v.problems]


def test_concurrent_requests(receiver: Receiver) -> None:
    run([[{"id": i} for i in range(40)]], url=receiver.url, concurrency=8)
    assert sorted(json.loads(b)["id"] for *_, b in receiver.received) == list(range(40))


def test_retry_after_forms() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
