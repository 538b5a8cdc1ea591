"""Kafka source and destination against a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from confluent_kafka import Consumer, Producer, TopicPartition

from dataflare.broker import LocalBroker, free_port
from dataflare.connectors.kafka import (
    KafkaDestinationConfig,
    KafkaSourceConfig,
    _KafkaPartition,
    _KafkaWriter,
    build_kafka_destination,
    build_kafka_source,
    produce_records,
)
from dataflare.dsl_compiler import models
from dataflare.records import Failed
from dataflare.registry import BuildContext
from tests.fixtures.workflows import run_cli


def source_ctx(step: str = "events", mode: str | None = None, **config: Any) -> BuildContext:
    cfg = KafkaSourceConfig(**config)
    component = models.Source(type="kafka", mode=mode, config=config)
    return BuildContext(step, "source", component, cfg, models.Workflow(), Path("."))


def dest_ctx(step: str = "out", **config: Any) -> BuildContext:
    cfg = KafkaDestinationConfig(**config)
    component = models.Destination(type="kafka", config=config)
    return BuildContext(step, "destination", component, cfg, models.Workflow(), Path("."))


def read_flow(ctx: BuildContext, out: list[Any]) -> Dataflow:
    flow = Dataflow("read")
    batches = op.input(ctx.step_id, flow, build_kafka_source(ctx))
    items = op.flat_map("flatten", batches, lambda b: b)
    op.output("sink", items, TestingSink(out))
    return flow


def consume_all(servers: str, topic: str, n: int, **settings: Any) -> list[Any]:
    consumer = Consumer(
        {"bootstrap.servers": servers, "group.id": "check", "enable.auto.commit": False,
         "enable.partition.eof": True, **settings}
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    got: list[Any] = []
    eof: set[int] = set()
    for _ in range(200):
        for msg in consumer.consume(1000, 0.2):
            if msg.error():
                eof.add(msg.partition())
                continue
            got.append(msg)
        if len(eof) == len(parts) and len(got) >= n:
            break
    consumer.close()
    return got


def test_config_accepts_the_seed_snippets() -> None:
    KafkaSourceConfig(bootstrap_servers="k:9092", topic="user_events",
                      consumer_group="etl_pipeline", auto_offset_reset="latest")
    KafkaSourceConfig(topic="user_clicks")
    KafkaSourceConfig(topic="web_events", consumer_group="etl-pipeline")
    with pytest.raises(ValueError, match="needs 'topic' or 'topics'"):
        KafkaSourceConfig()
    with pytest.raises(ValueError):
        KafkaSourceConfig(topic="x", partitions=3)


def test_bounded_read_of_every_partition(kafka_broker: LocalBroker, kafka_topic: Any) -> None:
    topic = kafka_topic(partitions=3)
    produce_records(kafka_broker.bootstrap_servers, topic,
                    ({"id": i, "user": {"id": f"u{i % 7}"}} for i in range(300)), partitions=3,
                    key=lambda i: f"k{i}".encode())
    # A second producer batch, and small polls: the end must be the true end of the log.
    produce_records(kafka_broker.bootstrap_servers, topic,
                    ({"id": i} for i in range(300, 330)), partitions=3)
    out: list[Any] = []
    run_main(read_flow(source_ctx(bootstrap_servers=kafka_broker.bootstrap_servers,
                                  topic=topic, stop_at_end=True, batch_size=7), out))
    assert sorted(r["id"] for r in out) == list(range(330))
    by_id = {r["id"]: r for r in out}
    meta = by_id[4]["_meta"]
    assert meta["topic"] == topic and meta["partition"] == 1 and meta["key"] == "k4"
    assert meta["offset"] == 1 and isinstance(meta["timestamp"], int)
    # Offsets increase within each partition.
    for p in range(3):
        offs = [r["_meta"]["offset"] for r in out if r["_meta"]["partition"] == p]
        assert offs == list(range(110))


def test_mode_full_stops_and_mode_streaming_tails(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic(partitions=2)
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, topic, ({"id": i} for i in range(10)), partitions=2)
    out: list[Any] = []
    run_main(read_flow(source_ctx(mode="full", bootstrap_servers=servers, topic=topic), out))
    assert len(out) == 10

    # Streaming: records produced after the start arrive; the run is ended by the sink.
    class Enough(Exception):
        pass

    seen: list[Any] = []

    def collect(batch: list[Any]) -> list[Any]:
        seen.extend(batch)
        if len(seen) >= 25:
            raise Enough
        return batch

    flow = Dataflow("tail")
    ctx = source_ctx(mode="streaming", bootstrap_servers=servers, topic=topic)
    batches = op.input("events", flow, build_kafka_source(ctx))
    op.output("sink", op.map("collect", batches, collect), TestingSink([]))
    later = threading.Timer(
        0.5, produce_records, (servers, topic, ({"id": i} for i in range(10, 25)), 2)
    )
    later.start()
    with pytest.raises(Exception) as info:  # noqa: PT011 - bytewax wraps the exception
        run_main(flow)
    later.join()
    cause: BaseException | None = info.value
    while cause is not None and not isinstance(cause, Enough):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, Enough)
    assert sorted(r["id"] for r in seen) == list(range(25))


def test_poison_pill_messages_become_failed(kafka_broker: LocalBroker, kafka_topic: Any) -> None:
    topic = kafka_topic(partitions=1)
    servers = kafka_broker.bootstrap_servers
    values: list[bytes] = []
    for i in range(20):
        values.append(orjson.dumps({"id": i}))
        if i % 5 == 0:
            values.append(b'{"id": ' + str(i).encode() + b", broken")
    values.append(b"[1, 2, 3]")
    values.append(b"\xff\xfe not utf-8")
    produce_records(servers, topic, values)
    out: list[Any] = []
    run_main(read_flow(source_ctx(step="clicks", bootstrap_servers=servers, topic=topic,
                                  stop_at_end=True), out))
    good = [r for r in out if isinstance(r, dict)]
    bad = [r for r in out if isinstance(r, Failed)]
    assert sorted(r["id"] for r in good) == list(range(20))
    assert len(bad) == 6
    assert [f.meta["offset"] for f in bad] == [1, 7, 13, 19, 24, 25]
    assert bad[0].record == '{"id": 0, broken' and bad[0].step == "clicks"
    assert "expected a string key, at column 11 of the message at " in bad[0].message
    assert bad[-2].record == "[1, 2, 3]" and "expected an object" in bad[-2].message
    assert bad[-1].record == b"\xff\xfe not utf-8"
    assert f"{topic}[0]@7" in bad[1].message and bad[1].position() == f"{topic}[0]@7"


def test_string_and_bytes_formats(kafka_broker: LocalBroker, kafka_topic: Any) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, topic, [b"plain text", b"\x00\x01"])
    out: list[Any] = []
    run_main(read_flow(source_ctx(bootstrap_servers=servers, topic=topic, stop_at_end=True,
                                  format="bytes"), out))
    assert [r["value"] for r in out] == [b"plain text", b"\x00\x01"]
    out = []
    run_main(read_flow(source_ctx(bootstrap_servers=servers, topic=topic, stop_at_end=True,
                                  format="string"), out))
    assert out[0]["value"] == "plain text"
    assert isinstance(out[1], dict) and out[1]["value"] == "\x00\x01"


def test_resume_from_recovery_state(
    kafka_broker: LocalBroker, kafka_topic: Any, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=3)
    servers = kafka_broker.bootstrap_servers
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    produce_records(servers, topic, ({"id": i} for i in range(30)), partitions=3)
    first: list[Any] = []
    ctx = source_ctx(bootstrap_servers=servers, topic=topic, stop_at_end=True)
    run_main(read_flow(ctx, first), recovery_config=recovery)
    assert sorted(r["id"] for r in first) == list(range(30))
    produce_records(servers, topic, ({"id": i} for i in range(30, 45)), partitions=3)
    second: list[Any] = []
    run_main(read_flow(ctx, second), recovery_config=recovery)
    assert sorted(r["id"] for r in second) == list(range(30, 45))


def test_consumer_group_offsets_are_the_stateless_start(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic(partitions=2)
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, topic, ({"id": i} for i in range(10)), partitions=2)
    ctx = source_ctx(bootstrap_servers=servers, topic=topic, stop_at_end=True,
                     consumer_group="g-" + topic)
    part = build_kafka_source(ctx).build_part("events", f"{topic}#0", None)
    got = []
    while True:
        try:
            for batch in part.next_batch():
                got.extend(batch)
        except StopIteration:
            break
    part.snapshot()  # remembers offset 5
    part.snapshot()  # commits offset 5 (one snapshot behind)
    part.close()
    assert len(got) == 5
    produce_records(servers, topic, ({"id": i} for i in range(10, 14)), partitions=2)
    again: list[Any] = []
    run_main(read_flow(ctx, again))
    # Partition 0 resumes at its committed offset; partition 1 had none: from the start.
    assert sorted(r["id"] for r in again) == [1, 3, 5, 7, 9, 10, 11, 12, 13]


def test_two_workers_share_the_partitions(kafka_broker: LocalBroker, kafka_topic: Any) -> None:
    topic = kafka_topic(partitions=4)
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, topic, ({"id": i} for i in range(200)), partitions=4)
    out: list[Any] = []
    flow = Dataflow("two")
    ctx = source_ctx(bootstrap_servers=servers, topic=topic, stop_at_end=True)
    batches = op.input("events", flow, build_kafka_source(ctx))
    tagged = op.map("tag", batches, lambda b: [(r["_meta"]["partition"], r["id"]) for r in b])
    op.output("sink", op.flat_map("flatten", tagged, lambda b: b), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert sorted(i for _, i in out) == list(range(200))


def test_source_survives_broker_restart_and_resumes_from_state(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, topic, ({"id": i} for i in range(5)))
    cfg = KafkaSourceConfig(bootstrap_servers=servers, topic=topic, idle_interval=0.01)

    def drain(part: _KafkaPartition, n: int, polls: int = 500) -> list[Any]:
        got: list[Any] = []
        for _ in range(polls):
            for batch in part.next_batch():
                got.extend(batch)
            if len(got) >= n:
                break
            threading.Event().wait(0.02)
        return got

    part = _KafkaPartition("events", topic, 0, cfg, False, None)
    assert [r["id"] for r in drain(part, 5)] == list(range(5))
    state = part.snapshot()
    kafka_broker.stop()
    # While the broker is down, polls return nothing and raise nothing.
    assert drain(part, 1, polls=10) == []
    kafka_broker.start()
    part.close()
    # Tansu keeps topics in memory: recreate it with more records than were read.
    kafka_broker.create_topic(topic)
    produce_records(servers, topic, ({"id": i} for i in range(8)))
    resumed = _KafkaPartition("events", topic, 0, cfg, False, state)
    assert [r["id"] for r in drain(resumed, 3)] == [5, 6, 7]
    resumed.close()


# ---------------------------------------------------------------------- destination


def write_flow(ctx: BuildContext, batches: list[list[Any]], errors: list[Any]) -> Dataflow:
    flow = Dataflow("write")
    up = op.input("in", flow, TestingSource(batches))
    errs = build_kafka_destination(ctx, up)
    op.output("failed", errs, TestingSink(errors))
    return flow


def test_destination_writes_json_keys_and_headers(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic(partitions=2)
    servers = kafka_broker.bootstrap_servers
    batches = [
        [{"id": i, "customer": {"id": f"c{i}"}, "_meta": {"topic": "src", "offset": i}}
         for i in range(j * 10, j * 10 + 10)]
        for j in range(5)
    ]
    batches[2].append({"id": 99, "customer": {"id": "c99"}, "bad": {1, 2}})  # a set: no JSON
    batches[3].append({"id": 98, "customer": {}})  # no key: it was sent under the key ""
    # A record of a dead letter's shape from `inputs` was taken for one and rewritten.
    batches[4].append({"id": 97, "customer": {"id": "c97"}, "error": {"step": "checkout"},
                       "record": {"order": 7}})
    errors: list[Any] = []
    ctx = dest_ctx(bootstrap_servers=servers, topic=topic, key_template="{{customer.id}}",
                   headers={"source": "dataflare", "cid": "{{customer.id}}"}, writers=2)
    run_main(write_flow(ctx, batches, errors))
    msgs = consume_all(servers, topic, 51)
    assert len(msgs) == 51
    values = sorted((json.loads(m.value()) for m in msgs), key=lambda r: r["id"])
    assert values[3] == {"id": 3, "customer": {"id": "c3"}}  # no _meta
    by_key = {m.key(): dict(m.headers()) for m in msgs}
    assert by_key[b"c7"] == {"source": b"dataflare", "cid": b"c7"}
    assert by_key[b"c97"] == {"source": b"dataflare", "cid": b"c97"}
    assert values[-1] == batches[4][-1]
    failed = sorted((e for batch in errors for e in batch), key=lambda f: f.record["id"])
    assert [f.record["id"] for f in failed] == [98, 99]
    assert "key_template '{{customer.id}}' needs 'customer.id', which the record lacks" \
        in failed[0].message
    assert "cannot encode" in failed[1].message


def test_several_writers_keep_each_keys_order(kafka_broker: LocalBroker, kafka_topic: Any) -> None:
    # Batches went to the writers in turn: one key's messages crossed producers and came
    # out of order (14,500 inversions in 20,000 messages in the trial).
    topic = kafka_topic(partitions=2)
    servers = kafka_broker.bootstrap_servers
    batches = [[{"k": f"k{i % 5}", "seq": j * 10 + i} for i in range(10)] for j in range(30)]
    ctx = dest_ctx(bootstrap_servers=servers, topic=topic, key_template="{{k}}", writers=3)
    run_main(write_flow(ctx, batches, []))
    msgs = sorted(consume_all(servers, topic, 300), key=lambda m: (m.partition(), m.offset()))
    by_key: dict[bytes, list[int]] = {}
    for m in msgs:
        by_key.setdefault(m.key(), []).append(json.loads(m.value())["seq"])
    assert len(msgs) == 300 and all(seqs == sorted(seqs) for seqs in by_key.values())


def test_dead_letters_carry_original_bytes_and_position(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    failed = Failed("clicks", "DecodeError", "bad json", '{"id": 1, broken',
                    {"topic": "clicks", "partition": 2, "offset": 41, "key": "u1"})
    other = Failed("clean", "RecordError", "amount is a str", {"amount": "x"},
                   {"file": "a.jsonl", "line": 3})
    errors: list[Any] = []
    ctx = dest_ctx(bootstrap_servers=servers, topic=topic)
    run_main(write_flow(ctx, [[failed.as_record(), other.as_record()]], errors))
    msgs = consume_all(servers, topic, 2)
    first, second = sorted(msgs, key=lambda m: m.offset())
    assert first.value() == b'{"id": 1, broken' and first.key() == b"u1"
    headers = dict(first.headers())
    assert headers["dataflare.error.step"] == b"clicks"
    assert headers["dataflare.error.message"] == b"bad json"
    assert headers["dataflare.source.offset"] == b"41"
    assert headers["dataflare.source.position"] == b"clicks[2]@41"
    assert json.loads(second.value()) == {"amount": "x"}
    assert dict(second.headers())["dataflare.source.position"] == b"a.jsonl:3"
    assert errors == []


def transactional_writer(servers: str, topic: str) -> _KafkaWriter:
    cfg = KafkaDestinationConfig(bootstrap_servers=servers, topic=topic, exactly_once=True,
                                 transactional_id=f"tx-{topic}", flush_timeout=2)
    return _KafkaWriter("out", cfg, "0")


def test_transactions_commit_per_epoch_and_fence_a_restarted_writer(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    writer = transactional_writer(servers, topic)
    writer.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(5)]])
    writer.snapshot()  # epoch 1 committed
    writer.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(5, 9)]])
    restarted = transactional_writer(servers, topic)  # same id: fences the old writer
    with pytest.raises(Exception):  # noqa: B017, PT011 - librdkafka's fencing error
        writer.snapshot()
    restarted.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(5, 9)]])
    restarted.snapshot()
    restarted.close()
    committed = consume_all(servers, topic, 9, **{"isolation.level": "read_committed"})
    assert {json.loads(m.value())["id"] for m in committed} == set(range(9))


@pytest.mark.xfail(
    reason="tansu 0.6 does not report aborted transactions in fetch responses, so "
    "read_committed consumers see aborted batches; passes on a broker that does",
    strict=True,  # the day the pinned broker reports them, this must be revisited
)
def test_read_committed_consumers_do_not_see_an_interrupted_epoch(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    writer = transactional_writer(servers, topic)
    writer.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(5)]])
    writer.snapshot()
    writer.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(5, 9)]])
    writer.producer.flush(10)  # the epoch reaches the broker, then the worker crashes
    restarted = transactional_writer(servers, topic)  # aborts the open transaction
    restarted.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(5, 9)]])
    restarted.snapshot()
    restarted.close()
    committed = consume_all(servers, topic, 9, **{"isolation.level": "read_committed"})
    assert sorted(json.loads(m.value())["id"] for m in committed) == list(range(9))


def test_destination_reconnects_after_broker_restart(
    kafka_broker: LocalBroker, kafka_topic: Any
) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    # Tansu's in-memory storage forgets producer ids on restart, which an idempotent
    # producer treats as fatal; a persistent broker keeps them. Plain acks here.
    cfg = KafkaDestinationConfig(bootstrap_servers=servers, topic=topic,
                                 properties={"enable.idempotence": False})
    writer = _KafkaWriter("out", cfg, "0")
    writer.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(3)]])
    writer.snapshot()
    kafka_broker.restart()
    kafka_broker.create_topic(topic)
    writer.write_batch([[(None, orjson.dumps({"id": i}), []) for i in range(3, 6)]])
    writer.snapshot()
    writer.close()
    msgs = consume_all(servers, topic, 3)
    assert sorted(json.loads(m.value())["id"] for m in msgs) == [3, 4, 5]


def test_a_source_without_a_broker_is_retried_per_the_policy_and_named() -> None:
    from dataflare.config import Retry
    from dataflare.connectors.kafka import KafkaSource
    from dataflare.retry import TransientError

    port = free_port()  # nothing listens on it
    cfg = KafkaSourceConfig.model_validate(
        {"bootstrap_servers": f"127.0.0.1:{port}", "topic": "t"})
    source = KafkaSource(cfg, True, "events", Retry(max_attempts=1))
    with pytest.raises(TransientError) as failed:
        source.list_parts()
    assert str(failed.value).startswith(f"step 'events': kafka 127.0.0.1:{port}: ")


def test_unreachable_broker_fails_the_run_once_with_a_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens on it
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    flow = tmp_path / "flow.yaml"
    flow.write_text(f"""
workflow:
  id: unreachable
  sources:
    f: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    out:
      type: kafka
      inputs: [f]
      config: {{bootstrap_servers: "127.0.0.1:{port}", topic: t, flush_timeout: 1}}
""")
    result = run_cli("run", str(flow))
    assert result.code == 1, result.stderr  # was 134: the sink's close() raised again
    assert "panic in a destructor" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: step 'out': 2 message(s) to kafka topic 't' not "
                            f"acknowledged by 127.0.0.1:{port} within 1s")


def test_kafka_to_kafka_pipeline(kafka_broker: LocalBroker, kafka_topic: Any) -> None:
    src, dst = kafka_topic(partitions=3), kafka_topic(partitions=3)
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, src, ({"id": i, "event": "view" if i % 2 else "click"}
                                   for i in range(100)), partitions=3)
    flow = Dataflow("k2k")
    batches = op.input("events", flow, build_kafka_source(
        source_ctx(bootstrap_servers=servers, topic=src, stop_at_end=True)))
    clicks = op.map("clicks", batches, lambda b: [r for r in b if r["event"] == "click"])
    errs = build_kafka_destination(dest_ctx(bootstrap_servers=servers, topic=dst,
                                            exactly_once=True), clicks)
    op.output("failed", errs, TestingSink([]))
    run_main(flow)
    msgs = consume_all(servers, dst, 50, **{"isolation.level": "read_committed"})
    assert sorted(json.loads(m.value())["id"] for m in msgs) == list(range(0, 100, 2))


def test_producer_setting_typo_is_reported(kafka_broker: LocalBroker) -> None:
    cfg = KafkaDestinationConfig(bootstrap_servers=kafka_broker.bootstrap_servers, topic="x",
                                 properties={"linger.mss": 5})
    with pytest.raises(Exception, match="linger.mss"):
        _KafkaWriter("out", cfg, "0")


def test_raw_producer_is_unaffected(kafka_broker: LocalBroker) -> None:
    # Sanity check that the session broker is usable by a plain client after restarts.
    p = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
    assert p.list_topics(timeout=10) is not None


DLQ_FLOW = """
workflow:
  id: dead_letters
  sources:
    clicks:
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: "${SRC}", stop_at_end: true}
      error_handling: {strategy: redirect, redirect_to: dlq}
  destinations:
    good:
      inputs: [clicks]
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: "${GOOD}", key_template: "{{id}}"}
    dlq:
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: "${DLQ}"}
"""


def test_workflow_redirects_undecodable_messages_to_a_kafka_dead_letter_topic(
    kafka_broker: LocalBroker, kafka_topic: Any, tmp_path: Path
) -> None:
    from dataflare.dsl_compiler import compile_file

    src, good, dlq = kafka_topic(), kafka_topic(), kafka_topic()
    servers = kafka_broker.bootstrap_servers
    produce_records(servers, src, [b'{"id": 1}', b"\x00not json", b'{"id": 2}'])
    flow_file = tmp_path / "flow.yaml"
    flow_file.write_text(DLQ_FLOW)
    env = {"SERVERS": servers, "SRC": src, "GOOD": good, "DLQ": dlq}
    run_main(compile_file(flow_file, env=env))
    assert sorted(m.key() for m in consume_all(servers, good, 2)) == [b"1", b"2"]
    (dead,) = consume_all(servers, dlq, 1)
    assert dead.value() == b"\x00not json"
    headers = dict(dead.headers())
    assert headers["dataflare.error.step"] == b"clicks"
    assert headers["dataflare.source.topic"] == src.encode()
    assert headers["dataflare.source.offset"] == b"1"


RECREATED_FLOW = """
workflow:
  sources:
    events:
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: recreated, stop_at_end: true,
               offset_out_of_range: "${POLICY:-fail}"}
  destinations:
    out: {type: file, inputs: [events], config: {path: out.jsonl}}
"""


def test_a_saved_offset_the_recreated_topic_lacks_is_reported_not_skipped(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    flow = tmp_path / "flow.yaml"
    flow.write_text(RECREATED_FLOW)
    # A broker of its own: it is restarted (memory only: the topic is gone) and recreated.
    with LocalBroker(log_path=tmp_path / "tansu.log") as broker:
        env = {**os.environ, "SERVERS": broker.bootstrap_servers}
        cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(tmp_path / "rec")]

        def run(**extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True,
                                  timeout=120)

        broker.create_topic("recreated", partitions=1)
        produce_records(broker.bootstrap_servers, "recreated",
                        [json.dumps({"id": i}).encode() for i in range(100)])
        first = run()
        assert first.returncode == 0, first.stderr
        broker.restart()
        broker.create_topic("recreated", partitions=1)
        produce_records(broker.bootstrap_servers, "recreated",
                        [json.dumps({"id": 1000 + i}).encode() for i in range(30)])
        refused = run()
        assert refused.returncode == 1
        assert "step 'events': the saved offset 100 of recreated[0] is not in the partition" \
            in refused.stderr and "offset_out_of_range" in refused.stderr
        resumed = run(POLICY="earliest")
        assert resumed.returncode == 0, resumed.stderr
        assert "going on from the earliest offset 0" in resumed.stderr
    ids = [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == [*range(100), *range(1000, 1030)]


TOO_LARGE_FLOW = """
workflow:
  sources:
    docs: {type: file, config: {path: "${DIR}/in.jsonl"}}
  destinations:
    topic:
      inputs: [docs]
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: "${TOPIC}", key_template: "{{id}}"}
      error_handling: {strategy: redirect, redirect_to: dlq}
    dlq: {type: file, config: {path: "${DIR}/dlq.jsonl"}}
"""


def test_a_message_over_the_size_limit_is_a_dead_letter_not_a_failed_run(
    kafka_broker: LocalBroker, kafka_topic: Any, tmp_path: Path
) -> None:
    topic = kafka_topic()
    servers = kafka_broker.bootstrap_servers
    big = "x" * 1_500_000  # over librdkafka's default message.max.bytes (1,000,000)
    lines = [{"id": 1, "text": "small"}, {"id": 2, "text": big}, {"id": 3, "text": "also small"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "flow.yaml").write_text(TOO_LARGE_FLOW)
    from dataflare.dsl_compiler import compile_file

    env = {"SERVERS": servers, "TOPIC": topic, "DIR": str(tmp_path)}
    run_main(compile_file(tmp_path / "flow.yaml", env=env))  # raised before: MSG_SIZE_TOO_LARGE
    assert sorted(m.key() for m in consume_all(servers, topic, 2)) == [b"1", b"3"]
    [dead] = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    assert dead["record"]["id"] == 2 and len(dead["record"]["text"]) == 1_500_000
    assert dead["error"]["step"] == "topic" and dead["error"]["type"] == "MessageTooLarge"
    assert "exceeds the limit of 1000000 bytes" in dead["error"]["message"]
    assert dead["source"]["position"]["line"] == 2

    # a smaller producer limit set in properties is the limit
    errors: list[Any] = []
    run_main(write_flow(dest_ctx(bootstrap_servers=servers, topic=topic,
                                 properties={"message.max.bytes": 2000}),
                        [[{"id": 4, "text": "y" * 3000}, {"id": 5}]], errors))
    [[refused]] = errors
    assert refused.record["id"] == 4 and "limit of 2000 bytes" in refused.message


EXACT_FLOW = """
workflow:
  sources:
    events:
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: "${SRC}", stop_at_end: true}
  destinations:
    table:
      inputs: [events]
      type: postgres
      config: {dsn: "${DSN}", schema: "${SCHEMA}", table: amounts,
               columns: {amt: "numeric(38,10)", big: "numeric(40,0)", neg: "numeric(20,0)"}}
"""


def test_numbers_a_float_would_round_arrive_exact(
    kafka_broker: LocalBroker, kafka_topic: Any, pg_schema: Any, tmp_path: Path
) -> None:
    # orjson reads an integer beyond 64 bits and every fraction as a float: these were
    # stored rounded (12345678901234567000.0000000000), without a word.
    from dataflare.dsl_compiler import compile_file

    src, servers = kafka_topic(), kafka_broker.bootstrap_servers
    produce_records(servers, src, [
        b'{"id": 1, "amt": 12345678901234567890.12, "big": 123456789012345678901234567890,'
        b' "neg": -9223372036854775809, "ns": 1733400000123456789}',
        b'{"id": 2, "amt": 12.5, "big": 7, "neg": -1, "ns": 1}'])
    flow_file = tmp_path / "flow.yaml"
    flow_file.write_text(EXACT_FLOW)
    run_main(compile_file(flow_file, env={"SERVERS": servers, "SRC": src, "DSN": pg_schema.dsn,
                                          "SCHEMA": pg_schema.schema}))
    with pg_schema.connect() as conn:
        rows = conn.execute(f'SELECT amt::text, big::text, neg::text, ns FROM '
                            f'"{pg_schema.schema}".amounts ORDER BY id').fetchall()
    assert rows == [
        ("12345678901234567890.1200000000", "123456789012345678901234567890",
         "-9223372036854775809", 1733400000123456789),
        ("12.5000000000", "7", "-1", 1)]


@pytest.mark.parametrize(("handling", "expected"), [
    ("number", {"a": "12345678901234567890.12", "b": 12.5, "c": "123456789012345678901",
                "d": 18446744073709551615, "s": "12345678901234567890.12", "n": [0.1]}),
    ("string", {"a": "12345678901234567890.12", "b": "12.50", "c": "123456789012345678901",
                "d": 18446744073709551615, "s": "12345678901234567890.12", "n": ["0.1"]}),
    ("float", {"a": 1.2345678901234567e19, "b": 12.5, "c": 1.2345678901234568e20,
               "d": 18446744073709551615, "s": "12345678901234567890.12", "n": [0.1]}),
])
def test_decimal_handling_of_json_numbers(handling: str, expected: dict[str, Any]) -> None:
    from dataflare.connectors.schema import json_loader

    text = (b'{"a": 12345678901234567890.12, "b": 12.50, "c": 123456789012345678901, '
            b'"d": 18446744073709551615, "s": "12345678901234567890.12", "n": [0.1]}')
    assert json_loader(handling)(text) == expected  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decimal_handling reads JSON numbers"):
        KafkaSourceConfig.model_validate({"topic": "t", "format": "string",
                                          "decimal_handling": "string"})


def test_a_batch_without_long_numbers_is_read_by_orjson_alone() -> None:
    import orjson

    from dataflare.connectors.schema import batch_loader, json_loader

    exact = json_loader("number")
    short = [b'{"a": 123456789012345}', b'{"b": 0.25}']
    assert batch_loader(exact, short) is orjson.loads
    # Runs of two texts do not join across them; one long run checks the whole batch.
    assert batch_loader(exact, [b'{"a": 12345678}', b'{"b": 12345678}']) is orjson.loads
    assert batch_loader(exact, [*short, b'{"c": 1234567890123456789012}']) is exact
    assert batch_loader(json_loader("float"), short) is orjson.loads  # no check at all
    as_text = json_loader("string")
    assert batch_loader(as_text, short) is as_text  # every fraction as its text


GROUP_FLOW = """
workflow:
  sources:
    events:
      type: kafka
      config: {{bootstrap_servers: "{servers}", topic: {topic}, stop_at_end: true,
               consumer_group: {group}}}
  destinations:
    out: {{type: file, inputs: [events], config: {{path: {out}}},
           write_mode: {{type: append}}}}
"""


def test_a_run_that_succeeded_commits_where_it_ended_to_its_consumer_group(
    kafka_broker: LocalBroker, kafka_topic: Any, tmp_path: Path
) -> None:
    # The group commit ran one snapshot behind, so the last snapshot's offsets were never
    # committed: each run without recovery read the whole topic again.
    from tests.fixtures.workflows import read_jsonl, run_cli

    topic, servers = kafka_topic(partitions=2), kafka_broker.bootstrap_servers
    produce_records(servers, topic, ({"id": i} for i in range(10)), partitions=2)
    out = tmp_path / "out.jsonl"
    flow = tmp_path / "flow.yaml"
    flow.write_text(GROUP_FLOW.format(servers=servers, topic=topic, group=f"g-{topic}",
                                      out=out))
    for new in (range(10, 13), range(13, 13)):
        done = run_cli("run", str(flow))
        assert done.code == 0, done.stderr
        produce_records(servers, topic, ({"id": i} for i in new), partitions=2)
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(13))  # each once
    # A run that failed commits nothing: its records are read again.
    produce_records(servers, topic, [{"id": 13}], partitions=2)
    flow.write_text(flow.read_text().replace(f"path: {out}", f"path: {tmp_path}"))  # a dir
    assert run_cli("run", str(flow)).code == 1
    flow.write_text(flow.read_text().replace(f"path: {tmp_path}", f"path: {out}"))
    assert run_cli("run", str(flow)).code == 0
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(14))


def test_a_property_librdkafka_refuses_names_the_step() -> None:
    # The run ended with librdkafka's KafkaError{...} alone, naming no step.
    from confluent_kafka import Producer

    from dataflare.connectors.kafka import _client

    with pytest.raises(ValueError, match=r"^step 'k1': kafka properties: No such "
                       r"configuration property: \"linger.mss\""):
        _client(Producer, "k1", {"bootstrap.servers": "127.0.0.1:1", "linger.mss": 5})
