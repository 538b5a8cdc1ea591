"""No secret in any output: every connector path run with distinctive secrets, all bytes grepped."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from dataflare import secrets
from dataflare.dsl_compiler import validate_text

PG_PASSWORD = "Fl7-Pa55 w0rd#Secret"
REDIS_PASSWORD = "Rd5-Pa55 w0rd#Hidden"
TOKEN = "tok-9Zq7Xw3Vv1Lp"
API_KEY = "key-4Hh8Jj2Kk6Mm"
FILE_SECRET = "Fs9-Gq2 fr0m#File"
PLAIN_NAMED = "Xy9 Kq7mZpLw42"  # in $PGPASS: a name that does not say "secret"
SECRETS = [PG_PASSWORD, REDIS_PASSWORD, TOKEN, API_KEY, FILE_SECRET, PLAIN_NAMED]


def _fragments(value: str) -> list[str]:
    """The value and the pieces a driver may quote: words split at spaces and '#'."""
    parts = {value, *value.replace("#", " ").split(), *value.split("#"), *value.split(" ")}
    return sorted(p for p in parts if len(p) >= 6)


@pytest.fixture
def api() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(200, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(400, {"error": "refused"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _flow(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.yaml"
    # quick retries: the failing cases fail in seconds, not after the default minute
    retry = "  config: {retry: {max_attempts: 3, backoff: {initial: 50ms, max: 200ms}}}\n"
    path.write_text(f"workflow:\n  id: {name}\n{retry}{body}")
    return path


def _cases(tmp: Path, api: str) -> dict[str, str]:
    records = tmp / "in.jsonl"
    records.write_text('{"id": 1}\n{"id": 2}\n')
    pg_table = "sources:\n    db:\n      type: postgres\n      config:\n"
    sink = (f"  destinations:\n    out:\n      type: file\n      inputs: [db]\n"
            f"      config: {{path: {tmp}/out.jsonl, format: jsonl}}\n")
    return {
        "pg_kv_dsn": "  " + pg_table
        + "        dsn: \"host=127.0.0.1 port=5432 dbname=test user=postgres"
          " password=${PG_PASSWORD}\"\n        table: nowhere\n" + sink,
        "pg_kv_dsn_plain_name": "  " + pg_table
        + "        dsn: \"host=127.0.0.1 port=5432 dbname=test user=postgres"
          " password=${PGPASS}\"\n        table: nowhere\n" + sink,
        "pg_url_dsn_plain_name": "  " + pg_table
        + "        dsn: \"postgresql://postgres:${PGPASS}@127.0.0.1:9/test\"\n"
          "        table: nowhere\n" + sink,
        "pg_url_dsn": "  " + pg_table
        + "        dsn: \"postgresql://postgres:${PG_PASSWORD}@127.0.0.1:5432/test\"\n"
          "        table: nowhere\n" + sink,
        "pg_unreachable": "  " + pg_table
        + "        host: 127.0.0.1\n        port: 9\n        database: test\n"
          "        username: postgres\n        password: ${PG_PASSWORD}\n"
          "        connect_timeout: 5s\n        table: nowhere\n" + sink,
        "pg_file_secret": "  " + pg_table
        + f"        dsn: \"host=127.0.0.1 port=9 dbname=test user=postgres"
          f" password=${{file:{tmp}/pg_secret}} connect_timeout=5\"\n"
          "        table: nowhere\n" + sink,
        "mysql_wrong_password": "  sources:\n    db:\n      type: mysql\n      config:\n"
        "        host: 127.0.0.1\n        port: 3306\n        database: test\n"
        "        username: root\n        password: ${PG_PASSWORD}\n        table: nowhere\n"
        + sink,
        "redis_url": f"  sources:\n    in:\n      type: file\n"
        f"      config: {{path: {records}, format: jsonl}}\n"
        "  destinations:\n    cache:\n      type: redis\n      inputs: [in]\n"
        "      config:\n        url: \"redis://:${REDIS_PASSWORD}@127.0.0.1:6379/0\"\n"
        "        key_template: \"secrets-test:{{id}}\"\n",
        "http_refused": f"  sources:\n    in:\n      type: file\n"
        f"      config: {{path: {records}, format: jsonl}}\n"
        "  destinations:\n    hook:\n      type: http\n      inputs: [in]\n"
        f"      config:\n        url: \"{api}/hook?token=${{TOKEN}}\"\n"
        "        headers: {Authorization: \"Bearer ${TOKEN}\"}\n"
        "      error_handling: {strategy: redirect, redirect_to: dead}\n"
        f"    dead:\n      type: file\n      inputs: []\n"
        f"      config: {{path: {tmp}/dead.jsonl, format: jsonl}}\n",
        "http_failed": f"  sources:\n    in:\n      type: file\n"
        f"      config: {{path: {records}, format: jsonl}}\n"
        "  destinations:\n    hook:\n      type: http\n      inputs: [in]\n"
        f"      config:\n        url: \"{api}/hook?token=${{TOKEN}}\"\n",
        "rest_api_key": "  sources:\n    api:\n      type: rest_api\n      config:\n"
        f"        url: \"{api}/items\"\n"
        "        auth: {type: api_key, key: \"${API_KEY}\", query_param: api_key}\n"
        "  destinations:\n    out:\n      type: file\n      inputs: [api]\n"
        f"      config: {{path: {tmp}/items.jsonl, format: jsonl}}\n",
    }


def test_no_secret_in_any_output(tmp_path: Path, api: str) -> None:
    (tmp_path / "pg_secret").write_text(FILE_SECRET + "\n")
    env = {**os.environ, "PG_PASSWORD": PG_PASSWORD, "REDIS_PASSWORD": REDIS_PASSWORD,
           "TOKEN": TOKEN, "API_KEY": API_KEY, "PGPASS": PLAIN_NAMED, "PYTHONUNBUFFERED": "1"}
    outputs: dict[str, bytes] = {}
    codes: dict[str, int] = {}
    for name, body in _cases(tmp_path, api).items():
        path = _flow(tmp_path, name, body)
        summary = ["--summary-json", str(tmp_path / f"{name}.summary.json")]
        for command in (["validate"], ["run"], ["-v", "run"], ["graph"], ["discover"]):
            proc = subprocess.run(
                [sys.executable, "-m", "dataflare", *command, str(path),
                 *(summary if command == ["run"] else [])],
                capture_output=True, env=env, timeout=180, cwd=tmp_path, check=False,
            )
            key = f"{name} {' '.join(command)}"
            outputs[key] = proc.stdout + proc.stderr
            codes[key] = proc.returncode
    for written in [*tmp_path.glob("*.jsonl"), *tmp_path.glob("*.summary.json")]:
        outputs[written.name] = written.read_bytes()
    assert b"error" in outputs["pg_unreachable.summary.json"]

    # The paths really ran: failures failed, successes succeeded, dead letters were written.
    assert codes["pg_kv_dsn run"] == 1 and codes["pg_url_dsn run"] == 1
    assert codes["pg_kv_dsn_plain_name run"] == 1 and codes["pg_url_dsn_plain_name run"] == 1
    # refused where it is written, at validate: libpq cannot read it (an unquoted space)
    assert b'.yaml:8:14: sources.db.config.dsn: libpq cannot read this connection string: ' \
        b'missing "=" after "***"' in outputs["pg_kv_dsn_plain_name validate"]
    assert codes["pg_unreachable run"] == 1 and codes["mysql_wrong_password run"] == 1
    assert codes["redis_url run"] == 1 and codes["http_failed run"] == 1
    assert codes["rest_api_key run"] == 0 and codes["http_refused run"] == 0
    assert b"HTTP Request" in outputs["rest_api_key -v run"]  # httpx's request log, with -v
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert len(dead) == 2 and all(d["error"]["step"] == "hook" for d in dead)
    assert (tmp_path / "items.jsonl").read_text().count("\n") == 2

    leaks = [
        (key, fragment)
        for key, data in outputs.items()
        for secret in SECRETS
        for fragment in _fragments(secret)
        if fragment.encode() in data
    ]
    assert not leaks, leaks[:5]


def test_scrub_replaces_values_fragments_and_url_forms() -> None:
    secrets.register(PG_PASSWORD)
    secrets.register_credentials("https://u:p%40ssw0rd-long@h.example/x?access_token=abcdef123")
    text = ("missing \"=\" after \"w0rd#Secret\"; port 'Fl7-Pa55 w0rd'; "
            "Fl7-Pa55%20w0rd%23Secret; p@ssw0rd-long; access_token=abcdef123 stays readable")
    clean = secrets.scrub(text)
    assert "w0rd" not in clean and "Fl7-Pa55" not in clean
    assert "ssw0rd-long" not in clean and "abcdef123" not in clean
    assert "stays readable" in clean and "missing" in clean and "port" in clean


def test_a_word_of_a_message_that_is_part_of_a_secret_stays() -> None:
    # "inline" (of inlinepw99) and "secret" (of hunter2-topsecret) were masked in the
    # file names and words of DataFlare's own warnings: "k8s/***.yaml: a *** written".
    secrets.register("hunter2-topsecret")
    secrets.register("inlinepw99")
    assert secrets.scrub("k8s/inline.yaml:4: a secret written in the workflow") == \
        "k8s/inline.yaml:4: a secret written in the workflow"
    assert secrets.scrub("bad 'topsecret', 'hunter2', 'linepw9'") == "bad '***', '***', '***'"


def test_hyphenated_header_names_hold_secrets() -> None:
    # X-API-Key (the header of auth: api_key) was no secret's name: an API echoing it in
    # an error body put the key in errors, warnings and dead letters.
    secrets.collect({"headers": {"X-API-Key": "zzqqHdrKey777", "Api-Key": "aaHdrKey888",
                                 "X-Trace": "not-secret-1"}})
    clean = secrets.scrub('401: {"got": "zzqqHdrKey777", "also": "aaHdrKey888", "t": '
                          '"not-secret-1"}')
    assert "HdrKey" not in clean and "not-secret-1" in clean


def test_the_basic_auth_credential_is_a_secret() -> None:
    # An API echoing the Authorization header showed base64(user:password), which decodes.
    from dataflare.config import Auth

    secrets.collect(Auth(type="basic", username="svcuser", password="basicPASSvalue777"))
    echoed = "Basic " + base64.b64encode(b"svcuser:basicPASSvalue777").decode()
    assert secrets.scrub(f'401: {{"auth": "{echoed}"}}') == '401: {"auth": "Basic ***"}'


def test_log_records_are_scrubbed_in_process(caplog: pytest.LogCaptureFixture) -> None:
    secrets.install_logging()
    secrets.register_field("password", "In-Pr0cess-S3cret")
    logging.getLogger("dataflare.test").warning("failed with %s", "In-Pr0cess-S3cret")
    assert "In-Pr0cess" not in caplog.text and "failed with ***" in caplog.text


def test_file_secrets_are_read_and_a_missing_file_stops_a_run(tmp_path: Path) -> None:
    from dataflare.dsl_compiler import validate_text

    (tmp_path / "token").write_text("f1le-T0ken-value\n")
    text = f"""\
workflow:
  sources: {{s: {{type: file, config: {{path: in.jsonl}}}}}}
  destinations:
    h:
      type: http
      inputs: [s]
      config:
        url: "https://127.0.0.1:9/x"
        headers: {{Authorization: "Bearer ${{file:{tmp_path}/token}}"}}
    g:
      type: http
      inputs: [s]
      config: {{url: "https://127.0.0.1:9/y?token=${{file:{tmp_path}/absent}}"}}
"""
    v = validate_text(text)
    assert v.document.data["workflow"]["destinations"]["h"]["config"]["headers"] == {
        "Authorization": "Bearer f1le-T0ken-value"
    }
    assert "f1le-T0ken-value" in secrets.values()
    (missing,) = [p for p in v.problems if "cannot read secret file" in p.message]
    assert missing.is_error(for_run=True) and not missing.is_error(for_run=False)
    assert "f1le-T0ken" not in secrets.scrub("header Bearer f1le-T0ken-value sent")


def test_a_dsn_without_password_blots_out_nothing() -> None:
    secrets.register_field("dsn", SecretStr("host=127.0.0.1 port=5432 user=postgres dbname=x"))
    secrets.register_field("dsn", SecretStr("postgresql://postgres@127.0.0.1:5432/x"))
    text = "written to postgres table x on 127.0.0.1"
    assert secrets.scrub(text) == text


def test_an_unset_variable_in_a_secret_field_is_named_not_masked():
    v = validate_text("""\
workflow:
  sources:
    s: {type: generator, config: {preset: orders, count: 1}}
  destinations:
    out:
      type: http
      inputs: [s]
      config:
        url: "https://example.com/hook"
        headers: {Authorization: "Bearer ${HOOK_TOKEN}"}
""")
    from dataflare import secrets

    rendered = [secrets.scrub(p.render()) for p in v.problems]
    assert any("variable HOOK_TOKEN is not set" in r for r in rendered), rendered


def test_a_password_written_in_a_dsn_is_not_copied_into_the_recovery_directory(
        tmp_path: Path, pg_schema: Any) -> None:
    # The run records its workflow beside its state (for `plan --recovery-dir`); the text
    # held the DSN's password as written.
    password = "TopSecretPw9-x"
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    dsn = f"postgresql://postgres:{password}@127.0.0.1:5432/test"
    (tmp_path / "wf.yaml").write_text(f"""\
workflow:
  sources: {{src: {{type: file, config: {{path: in.jsonl}}}}}}
  destinations:
    pg: {{type: postgres, inputs: [src], config: {{dsn: "{dsn}", schema: {pg_schema.schema},
         table: t}}}}
""")
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    run = subprocess.run([sys.executable, "-m", "dataflare", "run", "wf.yaml", "-r", "st"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for f in (tmp_path / "st").iterdir():
        assert password.encode() not in f.read_bytes(), f
    assert "***@127.0.0.1" in (tmp_path / "st" / "dataflare-workflow.json").read_text()
    plan = subprocess.run([sys.executable, "-m", "dataflare", "plan", "wf.yaml",
                           "--recovery-dir", "st"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert plan.returncode == 0 and "nothing differs" in plan.stdout, plan.stdout + plan.stderr


def test_a_secret_written_in_the_workflow_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    # A literal password was accepted without a word, and shown to every viewer of the
    # workflow on the server. A ${VAR}, an unset one, or a DSN without a password is not
    # warned; a DSN holding one is.
    monkeypatch.setenv("PW_FOR_TEST", "from-env")
    text = """workflow:
  sources:
    a: {type: postgres, config: {host: h, database: d, username: u, password: hunter2,
                                 table: t}}
    b: {type: postgres, config: {host: h, database: d, username: u, password: "${PW_FOR_TEST}",
                                 table: t}}
    c: {type: postgres, config: {host: h, database: d, username: u, password: "${UNSET_PW_X}",
                                 table: t}}
    d: {type: postgres, config: {dsn: "postgresql://u@h/d", table: t}}
    e: {type: postgres, config: {dsn: "postgresql://u:pw@h/d", table: t}}
    f: {type: postgres, config: {dsn: "host=h dbname=d password=pw", table: t}}
    g:
      type: rest_api
      config:
        url: http://127.0.0.1:9/x
        headers: {X-API-Key: literalKey123, Authorization: "Bearer {{tok}}", X-Trace: abc}
        params: {access_token: "${PW_FOR_TEST}", page_size: 10}
    h: {type: rest_api, config: {url: "http://127.0.0.1:9/x?api_key=LiteralKey8&page=1"}}
    i: {type: rest_api, config: {url: "http://127.0.0.1:9/x?api_key=${PW_FOR_TEST}"}}
  destinations:
    out: {type: file, inputs: [a, b, c, d, e, f, g, h, i], config: {path: out.jsonl}}
  environment: {DB_PASSWORD: LiteralPw999, API_TOKEN: "${PW_FOR_TEST}", REGION: eu}
"""
    v = validate_text(text, "f.yaml", dict(os.environ))
    said = [(p.line, p.path) for p in v.problems if "secret written" in p.message]
    assert said == [(3, "sources.a.config.password"), (10, "sources.e.config.dsn"),
                    (11, "sources.f.config.dsn"), (16, "sources.g.config.headers.X-API-Key"),
                    (18, "sources.h.config.url"), (22, "environment.DB_PASSWORD")]
    assert all(p.severity == "warning" for p in v.problems if "secret written" in p.message)
    assert not v.errors()
