"""Dead letters: one envelope, with the record's position and raw input, in every destination."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from dataflare.broker import LocalBroker
from tests.connectors.test_kafka import consume_all
from tests.fixtures.workflows import read_jsonl, run_cli

BAD_BYTES = b"\xff\xfe not utf-8"
BAD_JSON = b'{"id": 2, broken'


def bad_input(servers: str, topic: str) -> None:
    """Offsets 0 good, 1 invalid UTF-8, 2 bad JSON, 3 a tombstone keyed k9, 4 good."""
    producer = Producer({"bootstrap.servers": servers})
    producer.produce(topic, b'{"id": 1}', b"k1")
    producer.produce(topic, BAD_BYTES, b"k2")
    producer.produce(topic, BAD_JSON, b"k3")
    producer.produce(topic, None, b"k9")
    producer.produce(topic, b'{"id": 5}', b"k5")
    assert producer.flush(30) == 0


def run_flow(tmp_path: Path, servers: str, topic: str, dead: str) -> None:
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  id: dead_letters
  sources:
    events:
      type: kafka
      config: {{bootstrap_servers: "{servers}", topic: {topic}, stop_at_end: true}}
      error_handling: {{strategy: redirect, redirect_to: dead}}
  destinations:
    out: {{type: file, inputs: [events], config: {{path: out.jsonl}}}}
    dead: {dead}
""")
    result = run_cli("run", "flow.yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": 1}, {"id": 5}]


def check_envelopes(letters: list[dict[str, Any]], topic: str) -> None:
    """The three dead letters, by offset: raw bytes, raw text, a keyed tombstone."""
    letters = sorted(letters, key=lambda d: d["source"]["position"]["offset"])
    assert len(letters) == 3
    assert len({d["error"]["run_id"] for d in letters}) == 1
    for d, offset, key in zip(letters, [1, 2, 3], ["k2", "k3", "k9"], strict=True):
        assert d["error"]["step"] == "events"
        assert datetime.fromisoformat(d["error"]["at"]).tzinfo is not None
        assert d["source"]["component"] == "events"
        position = d["source"]["position"]
        assert (position["topic"], position["partition"], position["offset"], position["key"]) == (
            topic, 0, offset, key)
    undecodable, bad_json, tombstone = letters
    assert undecodable["record_encoding"] == "base64"
    assert base64.b64decode(undecodable["record"]) == BAD_BYTES
    assert bad_json["record"] == BAD_JSON.decode() and "record_encoding" not in bad_json
    assert tombstone["error"]["type"] == "Tombstone" and tombstone["record"] is None


@pytest.fixture
def kafka_input(kafka_broker: LocalBroker, kafka_topic: Any) -> tuple[str, str]:
    topic = kafka_topic()
    bad_input(kafka_broker.bootstrap_servers, topic)
    return kafka_broker.bootstrap_servers, topic


def test_file_dead_letters(tmp_path: Path, kafka_input: tuple[str, str]) -> None:
    servers, topic = kafka_input
    run_flow(tmp_path, servers, topic, "{type: file, config: {path: dead.jsonl}}")
    check_envelopes(read_jsonl(tmp_path / "dead.jsonl"), topic)


def test_postgres_dead_letters(tmp_path: Path, kafka_input: tuple[str, str],
                               pg_schema: Any) -> None:
    servers, topic = kafka_input
    run_flow(tmp_path, servers, topic, f'{{type: postgres, config: {{dsn: "{pg_schema.dsn}", '
             f"schema: {pg_schema.schema}, table: dead}}}}")
    rows = pg_schema.rows(
        f'SELECT error, source, record, record_encoding FROM "{pg_schema.schema}".dead')
    letters = [{"error": e, "source": s, "record": r, **({"record_encoding": enc} if enc else {})}
               for e, s, r, enc in rows]
    check_envelopes(letters, topic)


def test_duckdb_dead_letters(tmp_path: Path, kafka_input: tuple[str, str]) -> None:
    import duckdb

    servers, topic = kafka_input
    run_flow(tmp_path, servers, topic, "{type: duckdb, config: {path: dead.duckdb, table: dead}}")
    with duckdb.connect(str(tmp_path / "dead.duckdb"), read_only=True) as db:
        rows = db.execute("SELECT error, source, record, record_encoding FROM dead").fetchall()
    letters = [{"error": json.loads(e), "source": json.loads(s), "record": r,  # all text
                **({"record_encoding": enc} if enc else {})} for e, s, r, enc in rows]
    check_envelopes(letters, topic)


def test_redis_dead_letters(tmp_path: Path, kafka_input: tuple[str, str], redis_url: str) -> None:
    import redis

    servers, topic = kafka_input
    run_flow(tmp_path, servers, topic, f'{{type: redis, config: {{url: "{redis_url}", '
             f'data_structure: string, key_template: "dead:{{{{source.position.offset}}}}"}}}}')
    client = redis.Redis.from_url(redis_url)
    check_envelopes([json.loads(client.get(f"dead:{i}")) for i in (1, 2, 3)], topic)


def test_kafka_dead_letters_keep_the_raw_value_key_and_envelope(
    tmp_path: Path, kafka_input: tuple[str, str], kafka_topic: Any
) -> None:
    servers, topic = kafka_input
    dead_topic = kafka_topic()
    run_flow(tmp_path, servers, topic,
             f'{{type: kafka, config: {{bootstrap_servers: "{servers}", topic: {dead_topic}}}}}')
    msgs = sorted(consume_all(servers, dead_topic, 3), key=lambda m: m.offset())
    assert [(m.key(), m.value()) for m in msgs] == [
        (b"k2", BAD_BYTES), (b"k3", BAD_JSON), (b"k9", None)]  # the tombstone stays one
    headers = [dict(m.headers()) for m in msgs]
    assert [h["dataflare.source.offset"] for h in headers] == [b"1", b"2", b"3"]
    assert {h["dataflare.source.component"] for h in headers} == {b"events"}
    assert len({h["dataflare.error.run_id"] for h in headers}) == 1
    assert all(datetime.fromisoformat(h["dataflare.error.at"].decode()) for h in headers)
    assert json.loads(headers[2]["dataflare.source.meta"])["key"] == "k9"


def test_bytes_nested_in_a_record_or_its_position_become_base64_text() -> None:
    from dataflare.records import Failed

    failed = Failed("pg", "DataError", "refused", {"id": 1, "blob": [b"\xff\x00"]},
                    {"topic": "t", "partition": 0, "offset": 4, "key": b"\xfe"})
    letter = failed.as_record(component="events", run_id="r1")
    json.dumps(letter)  # JSON as it is: every destination can write it
    assert letter["record"] == {"id": 1, "blob": ["/wA="]} and "record_encoding" not in letter
    assert letter["source"] == {"component": "events", "position": {
        "topic": "t", "partition": 0, "offset": 4, "key": "/g=="}}
    assert failed.record == {"id": 1, "blob": [b"\xff\x00"]}  # the original is left as it was


def test_a_replay_after_a_crash_refuses_again_what_was_refused_before(pg_schema: Any) -> None:
    from dataflare.connectors.postgres_destination import (
        PostgresDestinationConfig,
        PostgresDialect,
    )
    from dataflare.connectors.sql_writer import TableWriter, prepare
    from tests.connectors.test_postgres_destination import FAST_RETRY

    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".orders (id bigint)')
    cfg = PostgresDestinationConfig(dsn=pg_schema.dsn, schema=pg_schema.schema, table="orders")
    batch = [{"id": "four" if o == 4 else o, "_meta": {"topic": "t", "partition": 0, "offset": o}}
             for o in range(10)]

    def write() -> tuple[int, list[Any]]:
        writer = TableWriter("warehouse", PostgresDialect(cfg), "append", (), False, FAST_RETRY)
        try:
            return writer.write(prepare(batch, "warehouse", ())[0], False, "run-1")
        finally:
            writer.close()

    written, refused = write()
    assert written == 9 and [f.meta["offset"] for f in refused] == [4]
    # The crash came before the snapshot: the replay skips the rows written, not the refusal.
    written, refused = write()
    assert written == 0 and [(f.meta["offset"], f.record) for f in refused] == [(4, {"id": "four"})]
    assert "invalid input syntax for type bigint" in refused[0].message
    ids = pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".orders ORDER BY id')
    assert ids == [(o,) for o in range(10) if o != 4]


def test_two_thousand_refused_rows_are_found_in_one_pass(pg_schema: Any) -> None:
    from dataflare.connectors.postgres_destination import (
        PostgresDestinationConfig,
        PostgresDialect,
    )
    from dataflare.connectors.sql_writer import TableWriter, prepare
    from tests.connectors.test_postgres_destination import FAST_RETRY

    class Counted(PostgresDialect):
        copies = 0

        def _copy(self, table: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
            Counted.copies += 1
            super()._copy(table, columns, rows)

    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".orders (id bigint CHECK (id % 5 <> 1), '
                     "note text, tags jsonb, ok boolean)")
    cfg = PostgresDestinationConfig(dsn=pg_schema.dsn, schema=pg_schema.schema, table="orders")
    batch = [{"id": "x" if o % 5 == 3 else o, "note": f"n{o}", "tags": {"o": [o]}, "ok": o % 2 == 0,
              "_meta": {"topic": "t", "partition": 0, "offset": o}} for o in range(5_000)]
    writer = TableWriter("warehouse", Counted(cfg), "append", (), False, FAST_RETRY)
    written, refused = writer.write(prepare(batch, "warehouse", ())[0], True, "run-1")
    writer.close()
    assert Counted.copies == 2  # the batch, refused; then its rows staged once (no halving)
    assert written == 3_000 and len(refused) == 2_000
    assert {f.meta["offset"] for f in refused} == {o for o in range(5_000) if o % 5 in (1, 3)}
    kinds = {f.meta["offset"] % 5: (f.type, f.message.split(":")[0]) for f in refused}
    assert kinds == {1: ("CheckViolation", 'new row for relation "orders" violates check '
                                           'constraint "orders_id_check"'),
                     3: ("InvalidTextRepresentation", 'invalid input syntax for type bigint')}
    rows = pg_schema.rows(f'SELECT id, note, tags, ok FROM "{pg_schema.schema}".orders ORDER BY id')
    assert rows == [(o, f"n{o}", {"o": [o]}, o % 2 == 0)
                    for o in range(5_000) if o % 5 in (0, 2, 4)]
    # the refusals were noted with the marks, in the same transaction
    noted = pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}"._dataflare_positions '
                           "WHERE stream LIKE '%#refused@%'")
    assert noted == [(2_000,)]


def test_config_timeout_stops_a_long_search_for_refused_rows(tmp_path: Path,
                                                             pg_schema: Any) -> None:
    # NUL bytes cannot be staged: these refusals are found by halving the batch, which for
    # 8,000 of 20,000 rows takes minutes; the 3 s timeout must stop it within the minute.
    rows = [{"id": o, "note": "bad \u0000" if o % 5 < 2 else "ok"} for o in range(20_000)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  id: slow_refusals
  config: {{timeout: 3s}}
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    pg:
      type: postgres
      inputs: [src]
      config: {{dsn: "{pg_schema.dsn}", schema: {pg_schema.schema}, table: t}}
      batch: {{size: 20000, flush_interval: 10s}}
      error_handling: {{strategy: redirect, redirect_to: rejects}}
    rejects: {{type: file, config: {{path: rejects.jsonl}}}}
""")
    result = run_cli("run", "flow.yaml", cwd=tmp_path, timeout=60)
    assert result.code == 124, result.stderr
    assert "ran longer than its config.timeout (3s)" in result.stderr


def test_quarantined_records_name_their_source_like_other_dead_letters(tmp_path: Path) -> None:
    # A data_quality quarantine's dead letters had source.component null, by either route.
    (tmp_path / "a.jsonl").write_text('{"email": "a@x.com"}\n{"email": "nope"}\n')
    (tmp_path / "b.jsonl").write_text('{"email": "bad"}\n')
    rules = "validations: [{field: email, rules: [is_email]}]"
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  sources:
    a: {{type: file, config: {{path: a.jsonl}}}}
    b: {{type: file, config: {{path: b.jsonl}}}}
  transformations:
    to_dest: {{type: data_quality, inputs: [a], config: {{{rules}, quarantine_to: q1}}}}
    by_policy:
      type: data_quality
      inputs: [a]
      config: {{{rules}}}
      error_handling: {{strategy: redirect, redirect_to: q2}}
    both: {{type: data_quality, inputs: [a, b], config: {{{rules}, quarantine_to: q3}}}}
  destinations:
    out: {{type: file, inputs: [to_dest, by_policy, both], config: {{path: out.jsonl}}}}
    q1: {{type: file, config: {{path: q1.jsonl}}}}
    q2: {{type: file, config: {{path: q2.jsonl}}}}
    q3: {{type: file, config: {{path: q3.jsonl}}}}
""")
    result = run_cli("run", "flow.yaml", cwd=tmp_path)
    assert result.code == 0, result.stderr
    for name in ("q1", "q2"):
        [letter] = read_jsonl(tmp_path / f"{name}.jsonl")
        assert letter["error"]["type"] == "quality"
        assert letter["source"] == {"component": "a",
                                    "position": {"file": "a.jsonl", "line": 2}}, name
    # Fed by two sources: the component is not known (the position still says where).
    letters = sorted(read_jsonl(tmp_path / "q3.jsonl"), key=lambda d: d["record"]["email"])
    assert [d["source"] for d in letters] == [
        {"component": None, "position": {"file": "b.jsonl", "line": 1}},
        {"component": None, "position": {"file": "a.jsonl", "line": 2}}]
