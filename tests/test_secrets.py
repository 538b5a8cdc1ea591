"""No secret value reaches any output: stderr, -v logs, dead letters, the summary.

Each run uses distinctive secret values in every place a workflow can hold one, fails or
succeeds through a real service (PostgreSQL, Redis, HTTP servers on loopback), and every
byte it wrote is searched for the values and for the pieces a driver may quote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dataflare import secrets

PASSWORD = "Fl7-Pa55 w0rd#Secret"
TOKEN = "tok-3e8c1f9a77b2"
API_KEY = "key-51ab9cc0de"
FILE_SECRET = "fromfile-9d8e7f6a"
FORBIDDEN = [PASSWORD, "Fl7-Pa55", "w0rd#Secret", "w0rd", "Secret", "Fl7-Pa55%20w0rd",
             TOKEN, API_KEY, FILE_SECRET]


class Refusing:
    """A local HTTP server answering every request with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length", 0) or 0)
                self.rfile.read(length)
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": "no"}')

            do_GET = do_POST = _answer  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def refusing() -> Iterator[tuple[Refusing, Refusing]]:
    bad_request, server_error = Refusing(400), Refusing(500)
    yield bad_request, server_error
    bad_request.server.shutdown()
    server_error.server.shutdown()


def run(tmp_path: Path, flow: str, name: str) -> str:
    """Run ``flow`` with -v; everything it wrote (output, logs, files) as one text."""
    (tmp_path / "secret.txt").write_text(FILE_SECRET + "\n")
    (tmp_path / "in.jsonl").write_text('{"id": 1, "email": "a@b.c"}\n{"id": 2}\n')
    path = tmp_path / f"{name}.yaml"
    path.write_text(flow)
    env = {**os.environ, "PG_PASSWORD": PASSWORD, "API_TOKEN": TOKEN, "API_KEY": API_KEY}
    out = subprocess.run([sys.executable, "-m", "dataflare", "-v", "run", str(path),
                          "--summary-json", str(tmp_path / f"{name}.summary.json")],
                         capture_output=True, text=True, timeout=180, env=env)
    written = [out.stdout, out.stderr]
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.suffix in (".jsonl", ".json") and f.name != "in.jsonl":
            written.append(f.read_text(errors="replace"))
    return "\n".join(written)


def assert_clean(text: str) -> None:
    for value in FORBIDDEN:
        assert value not in text, f"{value!r} was printed:\n{text[:3000]}"


SOURCE = "  sources: {orders: {type: file, config: {path: in.jsonl}}}\n"


@pytest.mark.parametrize(("name", "destination", "expect"), [
    ("kv_dsn", 'type: postgres, config: {dsn: "host=127.0.0.1 port=5432 user=postgres '
     'password=${PG_PASSWORD} dbname=test", table: t}', "connection info string"),
    ("url_dsn", 'type: postgres, config: {dsn: "postgresql://postgres:${PG_PASSWORD}'
     '@127.0.0.1:5432/test", table: t}', "error"),
    ("unreachable", 'type: postgres, config: {host: 127.0.0.1, port: 1, username: postgres, '
     'password: "${PG_PASSWORD}", database: test, table: t}', "error"),
    ("redis_url", 'type: redis, config: {url: "redis://:${PG_PASSWORD}@127.0.0.1:1/0", '
     'key_template: "k:{{id}}"}', "error"),
    ("file_secret", 'type: postgres, config: {host: 127.0.0.1, port: 1, username: postgres, '
     'password: "${file:secret.txt}", database: test, table: t}', "error"),
])
def test_connection_failures_never_print_a_password(tmp_path: Path, name: str,
                                                    destination: str, expect: str) -> None:
    flow = f"workflow:\n{SOURCE}  destinations: {{out: {{inputs: [orders], {destination}}}}}\n"
    text = run(tmp_path, flow.replace("${file:secret.txt}",
                                      f"${{file:{tmp_path / 'secret.txt'}}}"), name)
    assert expect in text
    assert_clean(text)


def test_http_credentials_stay_out_of_warnings_errors_dead_letters_and_debug_logs(
        tmp_path: Path, refusing: tuple[Refusing, Refusing]) -> None:
    bad_request, server_error = refusing
    source = f"""
workflow:
  sources:
    api:
      type: rest_api
      config:
        url: "{server_error.url}/items"
        auth: {{type: api_key, key: "${{API_KEY}}", query_param: api_key}}
  destinations: {{out: {{type: file, inputs: [api], config: {{path: out.jsonl}}}}}}
  config: {{retry: {{max_attempts: 2, backoff: {{initial: 0s}}}}}}
"""
    text = run(tmp_path, source, "rest")
    assert "returned 500" in text
    assert_clean(text)
    destination = f"""
workflow:
  sources: {{orders: {{type: file, config: {{path: in.jsonl}}}}}}
  destinations:
    hook:
      inputs: [orders]
      type: http
      config:
        url: "{bad_request.url}/hook?token=${{API_TOKEN}}&id={{{{id}}}}"
        headers: {{Authorization: "Bearer ${{API_TOKEN}}"}}
      error_handling: {{strategy: redirect, redirect_to: dead}}
    dead: {{type: file, config: {{path: dead.jsonl}}}}
"""
    text = run(tmp_path, destination, "http")
    dead = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [d["error"]["step"] for d in dead] == ["hook", "hook"]
    assert "${API_TOKEN}" in text  # shown by name
    assert_clean(text)


def test_scrub_covers_encoded_forms_and_pieces() -> None:
    secrets.register("p@ss w0rd#x1", "${DB_PASSWORD}")
    assert secrets.scrub("x p@ss w0rd#x1 y") == "x ${DB_PASSWORD} y"
    assert secrets.scrub("after 'w0rd#x1'") == "after '***'"
    assert secrets.scrub("p%40ss%20w0rd%23x1") == "***"
    assert secrets.scrub_bytes(b"p@ss w0rd#x1") == b"${DB_PASSWORD}"
    assert secrets.url_credentials("postgresql://u:s3cr%20t@h/db?sslmode=require&api_key=zz") == [
        "s3cr t", "zz"]
    assert secrets.url_credentials("host=h password='a b' user=u") == ["a b"]
