"""Crash test: Kafka -> mapping -> window -> PostgreSQL merge + append + Redis hash.

The run is killed with SIGKILL at random moments and restarted with the same recovery
directory; in the end every table and hash equals what one clean pass computes: nothing
lost, nothing doubled. With refusals, the append tables refuse some records (a CHECK
constraint) and redirect them to a file and a PostgreSQL dead-letter destination: every
dead letter arrives at least once.
"""

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict

import orjson
import pytest
import redis

from dataflare.connectors.generator import GeneratorConfig, make_records, record_maker
from tests.fixtures.workflows import ROOT

EVENTS = 100_000
USERS = 500

FLOW = """\
workflow:
  id: crash_test
  sources:
    events:
      type: kafka
      config:
        bootstrap_servers: "{servers}"
        topic: "{topic}"
        consumer_group: crash-test
        auto_offset_reset: earliest
        stop_at_end: true
        batch_size: 2000
  transformations:
    shaped:
      inputs: [events]
      type: mapping
      config:
        mappings:
          - {{source: id, destination: event_id}}
          - {{source: user_id, destination: user_id}}
          - {{source: event, destination: kind}}
          - {{source: amount, destination: amount, transform: to_float}}
          - {{source: ts, destination: ts}}
    per_minute:
      inputs: [shaped]
      type: window
      config:
        window: {{type: tumbling, size: 1m}}
        time_field: ts
        time_unit: ms
        group_by: [user_id]
        aggregations:
          - {{field: amount, operations: [count, sum]}}
  destinations:
    minutes:
      inputs: [per_minute]
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: user_minutes}}
      write_mode: {{type: merge, merge_key: [user_id, window_start]}}
      batch: {{size: 2000, flush_interval: 200ms}}
    raw:
      inputs: [shaped]
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: raw_events}}
      write_mode: {{type: append}}
      batch: {{size: 5000, flush_interval: 200ms}}
    serving:
      inputs: [per_minute]
      type: redis
      config:
        url: "{redis_url}"
        data_structure: hash
        key_template: "minute:{{{{user_id}}}}:{{{{window_start}}}}"
        fields:
          - {{source: amount_count, destination: count}}
          - {{source: amount_sum, destination: sum}}
"""


REFUSALS = """\
    raw_copy:
      inputs: [shaped]
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: raw_copy}}
      write_mode: {{type: append}}
      batch: {{size: 5000, flush_interval: 200ms}}
      error_handling: {{strategy: redirect, redirect_to: refused_pg}}
    refused_file: {{type: file, config: {{path: refused.jsonl}}}}
    refused_pg:
      type: postgres
      config: {{dsn: "{dsn}", schema: "{schema}", table: refused}}
"""

REFUSED = 7  # the append tables refuse the events whose id % 500 is this


def events() -> list[dict]:
    config = GeneratorConfig.model_validate(
        {"preset": "clickstream", "count": EVENTS, "seed": 3,
         "fields": {"user_id": {"type": "text", "template": "u{n}", "min": 0, "max": USERS - 1}}})
    return make_records(record_maker(config), config.seed, 0, EVENTS)


def expected_minutes(records: list[dict]) -> dict[tuple[str, int], tuple[int, float]]:
    out: dict = defaultdict(lambda: [0, 0.0])
    for r in records:
        agg = out[(r["user_id"], r["ts"] // 60_000)]
        agg[0] += 1
        agg[1] += r["amount"]
    return {k: (n, round(s, 6)) for k, (n, s) in out.items()}


def produce(servers: str, topic: str, records: list[dict]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True,
                         "linger.ms": 20})
    for r in records:
        producer.produce(topic, orjson.dumps(r), key=r["user_id"].encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def _count(pg_schema, table: str) -> int:
    try:
        return pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".{table}')[0][0]
    except Exception:  # noqa: BLE001 - the table does not exist before the first write
        return 0


class Crashable:
    """The crash-test workflow over 100,000 events, run as ``dataflare run`` subprocesses."""

    def __init__(self, tmp_path, kafka_broker, kafka_topic, pg_schema, redis_url,
                 snapshot_seconds: float, refusals: bool = False) -> None:
        topic = kafka_topic(partitions=3)
        self.records = events()
        produce(kafka_broker.bootstrap_servers, topic, self.records)
        flow = tmp_path / "flow.yaml"
        text = FLOW
        if refusals:  # raw redirects to a file, raw_copy to a table
            raw = "table: raw_events}}\n"
            text = FLOW.replace(raw, raw + "      error_handling: {{strategy: redirect, "
                                "redirect_to: refused_file}}\n") + REFUSALS
        if refusals:
            with pg_schema.connect() as conn:
                for table in ("raw_events", "raw_copy"):
                    conn.execute(
                        f'CREATE TABLE "{pg_schema.schema}".{table} (event_id bigint CHECK '
                        f"(event_id % 500 <> {REFUSED}), user_id text, kind text, "
                        "amount double precision, ts bigint)")
        flow.write_text(text.format(servers=kafka_broker.bootstrap_servers, topic=topic,
                                    dsn=pg_schema.dsn, schema=pg_schema.schema,
                                    redis_url=redis_url))
        self.cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "--quiet",
                    "--recovery-dir", str(tmp_path / "recovery"), "-s", str(snapshot_seconds)]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
        self.cwd, self.pg = tmp_path, pg_schema

    def kill_after(self, rows: int, extra_seconds: float = 0.0) -> int:
        """Start a run, SIGKILL it once ``raw_events`` holds ``rows``; the rows then."""
        proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while _count(self.pg, "raw_events") < rows and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        time.sleep(extra_seconds)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return _count(self.pg, "raw_events")

    def finish(self) -> None:
        """Run to the end (resuming)."""
        done = subprocess.run(self.cmd, env=self.env, cwd=self.cwd, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_sigkill_and_restart_lose_and_double_nothing(tmp_path, kafka_broker, kafka_topic,
                                                      pg_schema, redis_url):
    run = Crashable(tmp_path, kafka_broker, kafka_topic, pg_schema, redis_url, 0.3)
    records = run.records
    rng = random.Random(20261122)
    progress: list[int] = []
    for _ in range(5):
        # kill at a random moment once the run is writing: after a random number of new rows.
        # A restarted run writes 10,000-25,000 rows before the kill lands: no kill is aimed
        # at the last quarter, where the run could end first.
        target = _count(pg_schema, "raw_events") + rng.randint(1_000, 8_000)
        if target >= EVENTS * 0.75:
            break
        progress.append(run.kill_after(target, rng.uniform(0, 0.2)))
    run.finish()
    # the kills interrupted real work: rows had been written, and not yet all of them
    print("raw_events rows when killed:", progress)
    assert len(progress) >= 3 and all(0 < n < EVENTS for n in progress), progress

    want = expected_minutes(records)
    rows = pg_schema.rows(
        f'SELECT user_id, window_start, amount_count, amount_sum FROM "{pg_schema.schema}".'
        "user_minutes")
    got = {}
    for user, start, count, total in rows:
        minute = int(time.mktime(time.strptime(str(start)[:19], "%Y-%m-%dT%H:%M:%S"))
                     - time.timezone) // 60
        assert (user, minute) not in got
        got[(user, minute)] = (count, round(total, 6))
    assert got == want

    raw = pg_schema.rows(f'SELECT event_id, user_id, kind, amount, ts FROM "{pg_schema.schema}".'
                         "raw_events")
    assert len(raw) == EVENTS
    assert sorted(raw) == sorted(
        (r["id"], r["user_id"], r["event"], float(r["amount"]), r["ts"]) for r in records)

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = client.keys("minute:*")
    assert len(keys) == len(want)
    for key in rng.sample(keys, 200):
        _, user, start = key.split(":", 2)
        minute = int(time.mktime(time.strptime(start[:19], "%Y-%m-%dT%H:%M:%S"))
                     - time.timezone) // 60
        value = client.hgetall(key)
        assert (int(value["count"]), round(float(value["sum"]), 6)) == want[(user, minute)]


def test_a_crash_before_the_first_snapshot_doubles_nothing(tmp_path, kafka_broker, kafka_topic,
                                                            pg_schema, redis_url):
    # No snapshot is taken before the kill (-s 60): the restart reads from the start again,
    # and the append destination must still recognise what the first execution wrote.
    run = Crashable(tmp_path, kafka_broker, kafka_topic, pg_schema, redis_url, 60)
    assert 0 < run.kill_after(10_000) < EVENTS
    run.finish()
    ids = pg_schema.rows(f'SELECT event_id FROM "{pg_schema.schema}".raw_events')
    assert sorted(i for (i,) in ids) == sorted(r["id"] for r in run.records)


@pytest.mark.slow
def test_dead_letters_of_refused_records_survive_sigkills(tmp_path, kafka_broker, kafka_topic,
                                                          pg_schema, redis_url):
    run = Crashable(tmp_path, kafka_broker, kafka_topic, pg_schema, redis_url, 0.3,
                    refusals=True)
    rng = random.Random(20261204)
    progress: list[int] = []
    for _ in range(10):
        # Kills early in the input (a resumed run reads the rest in about a second on a fast
        # machine): ten of them, each after a few hundred to a few thousand new rows.
        target = _count(pg_schema, "raw_events") + rng.randint(500, 3_000)
        if target >= EVENTS * 0.6:
            break
        progress.append(run.kill_after(target, rng.uniform(0, 0.1)))
    run.finish()
    print("raw_events rows when killed:", progress)
    assert len(progress) >= 10 and all(0 < n < EVENTS for n in progress), progress

    refused = {r["id"] for r in run.records if r["id"] % 500 == REFUSED}
    good = sorted((r["id"], r["user_id"], r["event"], float(r["amount"]), r["ts"])
                  for r in run.records if r["id"] not in refused)
    for table in ("raw_events", "raw_copy"):  # the good rows: exactly once
        rows = pg_schema.rows(
            f'SELECT event_id, user_id, kind, amount, ts FROM "{pg_schema.schema}".{table}')
        assert sorted(rows) == good, table
    # every refused record's dead letter, at least once, with its position
    letters = [orjson.loads(line) for line in
               (tmp_path / "refused.jsonl").read_text().splitlines()]
    assert {d["record"]["event_id"] for d in letters} == refused
    assert all(d["error"]["step"] == "raw" and d["source"]["position"]["topic"]
               for d in letters)
    rows = pg_schema.rows(f'SELECT error, record FROM "{pg_schema.schema}".refused')
    assert {record["event_id"] for _, record in rows} == refused
    assert {error["step"] for error, _ in rows} == {"raw_copy"}
