"""data_protection.encryption: TLS required in transit, external key services refused."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dataflare.encryption import ENCRYPTED_PREFIX, FieldCipher
from tests.fixtures.pg_private import PgServer, free_port
from tests.fixtures.workflows import read_jsonl, run_cli


def test_in_transit_reads_and_writes_postgres_over_tls(
    pg_tls: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg_tls.execute(
        "DROP TABLE IF EXISTS tls_in", "DROP TABLE IF EXISTS tls_out",
        "CREATE TABLE tls_in (id int PRIMARY KEY, name text)",
        "INSERT INTO tls_in VALUES (1, 'a'), (2, 'b')",
    )
    monkeypatch.setenv("PGSSLMODE", "disable")  # overridden: in_transit makes it require
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"""\
workflow:
  id: tls
  data_protection:
    encryption: {{in_transit: true}}
  sources:
    db:
      type: postgres
      config: {{host: 127.0.0.1, port: {pg_tls.port}, database: dataflare,
                username: postgres, table: tls_in}}
  destinations:
    copy:
      type: postgres
      inputs: [db]
      config:
        dsn: "host=127.0.0.1 port={pg_tls.port} dbname=dataflare user=postgres"
        table: tls_out
      write_mode: {{type: merge, merge_key: id}}
    file: {{type: file, inputs: [db], config: {{path: out.jsonl}}}}
""")
    checked = run_cli("validate", str(flow), cwd=tmp_path)
    assert checked.code == 0 and "warning" not in checked.stderr, checked.stderr
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out.jsonl")) == [1, 2]
    import psycopg

    with psycopg.connect(pg_tls.dsn + " sslmode=require") as conn:
        rows = conn.execute("SELECT id, name FROM tls_out ORDER BY id").fetchall()
    assert rows == [(1, "a"), (2, "b")]


def test_the_tls_server_refuses_clear_connections(pg_tls: PgServer, tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"""\
workflow:
  sources:
    db:
      type: postgres
      config:
        dsn: "host=127.0.0.1 port={pg_tls.port} dbname=dataflare user=postgres sslmode=disable"
        table: tls_in
  destinations:
    file: {{type: file, inputs: [db], config: {{path: out.jsonl}}}}
""")
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 1 and "no encryption" in result.stderr, result.stderr


CLEAR = """\
workflow:
  data_protection:
    encryption: {in_transit: true}
  sources:
    pg: {type: postgres, config: {dsn: "postgresql://u@127.0.0.1/db?sslmode=prefer", table: t}}
    api: {type: rest_api, config: {url: "http://127.0.0.1:9/items"}}
    events: {type: kafka, config: {bootstrap_servers: "127.0.0.1:9092", topic: t}}
    ok: {type: file, config: {path: in.jsonl}}
  destinations:
    cache:
      type: redis
      inputs: [pg, api, events, ok]
      config: {url: "redis://127.0.0.1:6379/0", key_template: "k:{{id}}"}
    hook: {type: http, inputs: [ok], config: {url: "https://127.0.0.1:9/hook"}}
"""


def test_in_transit_refuses_clear_connections(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(CLEAR)
    checked = run_cli("validate", str(flow), cwd=tmp_path)
    assert checked.code == 0, checked.stderr
    for cid in ("pg", "api", "events", "cache"):
        assert f"'{cid}': data_protection.encryption.in_transit requires TLS" in checked.stderr
    assert "'ok'" not in checked.stderr and "'hook'" not in checked.stderr
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 1
    assert result.stderr.count("in_transit requires TLS") == 4, result.stderr


def test_external_key_services_are_refused(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n')
    flow.write_text("""\
workflow:
  data_protection:
    encryption: {key_management: aws_kms}
  sources: {s: {type: file, config: {path: in.jsonl}}}
  destinations: {o: {type: file, inputs: [s], config: {path: o.jsonl}}}
""")
    checked = run_cli("validate", str(flow), cwd=tmp_path)
    assert checked.code == 0 and "key service 'aws_kms' is not available" in checked.stderr
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 1 and "'aws_kms' is not available" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()
SSN, EMAIL = "078-05-1120", "carol@example.com"


def test_at_rest_fields_are_encrypted_in_postgres_and_files(
    pg_tls: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"id": 1, "ssn": SSN, "contact": {"email": EMAIL}, "n": 7}) + "\n"
        '{"id": 2, "ssn": "999-99-9999", oops\n'
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"""\
workflow:
  id: at_rest
  data_protection:
    encryption:
      in_transit: true
      at_rest: true
      fields: [ssn, contact.email, n]
      key: "${{file:{tmp_path}/key}}"
  sources:
    s:
      type: file
      config: {{path: in.jsonl}}
      error_handling: {{strategy: redirect, redirect_to: dead}}
  destinations:
    db:
      type: postgres
      inputs: [s]
      config:
        dsn: "host=127.0.0.1 port={pg_tls.port} dbname=dataflare user=postgres"
        table: enc_out
    file: {{type: file, inputs: [s], config: {{path: out.jsonl}}}}
    dead: {{type: file, config: {{path: dead.jsonl}}}}
""")
    pg_tls.execute("DROP TABLE IF EXISTS enc_out")
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    written = (tmp_path / "out.jsonl").read_text() + (tmp_path / "dead.jsonl").read_text()
    assert SSN not in written and EMAIL not in written and KEY not in result.stderr

    import psycopg

    with psycopg.connect(pg_tls.dsn + " sslmode=require") as conn:
        (row,) = conn.execute("SELECT id, ssn, contact, n FROM enc_out").fetchall()
    assert SSN not in str(row) and EMAIL not in str(row)
    stored = {"ssn": row[1], "contact": row[2], "n": row[3]}
    if isinstance(stored["contact"], str):
        stored["contact"] = json.loads(stored["contact"])

    cipher = FieldCipher(KEY, ["ssn", "contact.email", "n"])
    assert cipher.decrypt_record(stored) == {"ssn": SSN, "contact": {"email": EMAIL}, "n": 7}
    with pytest.raises(ValueError, match="does not decrypt"):
        FieldCipher(OTHER_KEY, ["ssn"]).decrypt_record(stored)

    (file_record,) = read_jsonl(tmp_path / "out.jsonl")
    back = run_cli("decrypt", str(flow), str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert back.code == 0, back.stderr
    assert json.loads(back.stdout) == {"id": 1, "ssn": SSN, "contact": {"email": EMAIL}, "n": 7}
    (dead,) = read_jsonl(tmp_path / "dead.jsonl")  # undecodable input: its fields encrypted
    assert "999-99-9999" not in dead["record"] and ENCRYPTED_PREFIX in dead["record"]
    (tmp_path / "key").write_text(OTHER_KEY)
    wrong = run_cli("decrypt", str(flow), str(tmp_path / "out.jsonl"), cwd=tmp_path)
    assert wrong.code == 1 and "does not decrypt with this key" in wrong.stderr
    assert SSN not in wrong.stdout + wrong.stderr and file_record["ssn"] != SSN


@pytest.fixture
def redis_tls(tmp_path: Path) -> Iterator[int]:
    """A private redis-server listening only with TLS (self-signed certificate)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-keyout", str(tmp_path / "r.key"),
         "-out", str(tmp_path / "r.crt")],
        check=True, capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(tmp_path / "r.crt"), "--tls-key-file", str(tmp_path / "r.key"),
         "--tls-ca-cert-file", str(tmp_path / "r.crt"), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="none")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # waiting for the server to listen, not for a result
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_in_transit_writes_redis_over_tls(redis_tls: int, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": 1, "name": "a"}\n{"id": 2, "name": "b"}\n')
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"""\
workflow:
  data_protection:
    encryption: {{in_transit: true}}
  sources: {{s: {{type: file, config: {{path: in.jsonl}}}}}}
  destinations:
    cache:
      type: redis
      inputs: [s]
      config:
        url: "rediss://127.0.0.1:{redis_tls}/0?ssl_cert_reqs=none"
        key_template: "tls:{{{{id}}}}"
""")
    checked = run_cli("validate", str(flow), cwd=tmp_path)
    assert checked.code == 0 and "warning" not in checked.stderr, checked.stderr
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    client = redis.Redis(host="127.0.0.1", port=redis_tls, ssl=True, ssl_cert_reqs="none",
                         decode_responses=True)
    assert client.hgetall("tls:2") == {"id": "2", "name": "b"}
    clear = flow.read_text().replace("rediss://", "redis://").replace("?ssl_cert_reqs=none", "")
    flow.write_text(clear)
    refused = run_cli("run", str(flow), cwd=tmp_path)
    assert refused.code == 1 and "'cache': data_protection.encryption.in_transit" in (
        refused.stderr)


def test_in_transit_covers_remote_plugins_and_enrichments(tmp_path: Path) -> None:
    # Records were POSTed to an http:// plugin and looked up in Redis in clear.
    (tmp_path / "in.jsonl").write_text('{"cid": 1}\n')
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  data_protection:
    encryption: {in_transit: true}
  plugins:
    svc: {type: remote, url: "http://127.0.0.1:9/ok"}
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    e:
      type: enrich
      inputs: [src]
      config:
        enrichments:
          - {type: lookup, connection: {type: redis, url: "redis://127.0.0.1:9/0",
             pattern: "c:*"}, key: cid, lookup_key: id, fields: [name]}
          - {type: http_api, url: "https://127.0.0.1:9/x/{{cid}}", output_field: x}
    p: {type: plugin, plugin: svc, inputs: [e]}
  destinations:
    out: {type: file, inputs: [p], config: {path: out.jsonl}}
""")
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 1
    errors = [line for line in result.stderr.splitlines() if "requires TLS" in line]
    assert [e.split(": ", 1)[1].split(":")[0] for e in errors] == [
        "plugins.svc.url", "transformations.e.config.enrichments[0]"]
    assert not (tmp_path / "out.jsonl").exists()
