"""data_protection.encryption: TLS required in transit, external key services refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.pg_private import PgServer
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
