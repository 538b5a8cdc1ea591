"""Redis destination against the local Redis server (a dedicated, emptied database)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflare.connectors.batching import Flush
from dataflare.connectors.redis import (
    RedisDestinationConfig,
    _Commands,
    _RedisWriter,
    build_redis_destination,
)
from dataflare.dsl_compiler import models
from dataflare.registry import BuildContext

FAST_RETRY = models.Retry(max_attempts=3, backoff=models.Backoff(initial=0.01, max=0.05))


def run(url: str, batches: list[list[Any]], batch_size: int = 10_000, **config: Any) -> list[Any]:
    config = {"url": url, **config}
    component = models.Destination(type="redis", config=config,
                                   batch=models.BatchSettings(size=batch_size))
    workflow = models.Workflow(config=models.WorkflowConfig(retry=FAST_RETRY))
    ctx = BuildContext("cache", "destination", component, RedisDestinationConfig(**config),
                       workflow, Path("."))
    flow = Dataflow("redis")
    up = op.input("in", flow, TestingSource(batches))
    errors: list[Any] = []
    op.output("failed", build_redis_destination(ctx, up), TestingSink(errors))
    run_main(flow)
    return [f for b in errors for f in b]


def test_seed_snippets_validate() -> None:
    RedisDestinationConfig(data_structure="hash", key_template="customer:{{user.id}}", fields=[
        {"source": "user.email", "destination": "email"},
        {"source": "user.customerValue", "destination": "value"},
        {"source": "user.segment", "destination": "segment"}])
    RedisDestinationConfig(data_structure="hash", key_template="customer:{{customer_id}}")
    with pytest.raises(ValueError, match="needs 'score_field'"):
        RedisDestinationConfig(data_structure="sorted_set", key_template="k")


@pytest.mark.parametrize(("config", "message"), [
    ({"value_field": "name", "score_field": "n"}, "'value_field', 'score_field' has no effect "
     "with data_structure 'hash'"),
    ({"data_structure": "stream", "value_field": "name"}, "'value_field' has no effect"),
    ({"data_structure": "list", "stream_max_length": 5}, "'stream_max_length' has no effect"),
    ({"url": "redis://127.0.0.1:6379/0", "db": 3}, "give 'url' or host/port/db"),
    ({"ttl": 0}, "ttl must be at least 1ms"),
])
def test_settings_the_data_structure_ignores_are_refused(config: dict[str, Any],
                                                          message: str) -> None:
    # They were accepted and did nothing (a hash's value_field, a url beside db: 3).
    with pytest.raises(ValueError, match=re.escape(message)):
        RedisDestinationConfig(key_template="k", **config)


def test_hash_with_field_mapping_and_ttl(redis_url: str) -> None:
    users = [{"user": {"id": i, "email": f"u{i}@x.io", "customerValue": i * 1.5,
                       "segment": None if i == 2 else "gold"}, "_meta": {"offset": i}}
             for i in range(1, 4)]
    errors = run(redis_url, [users[:2], users[2:]], batch_size=2, data_structure="hash",
                 key_template="customer:{{user.id}}", ttl="1h", fields=[
                     {"source": "user.email", "destination": "email"},
                     {"source": "user.customerValue", "destination": "value"},
                     {"source": "user.segment", "destination": "segment"}])
    assert errors == []
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert r.hgetall("customer:1") == {"email": "u1@x.io", "value": "1.5", "segment": "gold"}
    assert r.hgetall("customer:2") == {"email": "u2@x.io", "value": "3.0"}
    assert 0 < r.pttl("customer:3") <= 3_600_000


def test_whole_record_hash_replay_is_idempotent_and_cdc_deletes(redis_url: str) -> None:
    recs = [{"customer_id": "c1", "total": 5, "tags": ["a"]}, {"customer_id": "c2", "total": 7}]
    cfg = {"data_structure": "hash", "key_template": "customer:{{customer_id}}"}
    run(redis_url, [recs], **cfg)
    run(redis_url, [recs], **cfg)  # a replay writes the same fields again
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert r.hgetall("customer:c1") == {"customer_id": "c1", "total": "5", "tags": '["a"]'}
    errors = run(redis_url, [[{"customer_id": "c2", "_meta": {"op": "delete"}},
                              {"_meta": {"op": "truncate", "table": "public.customers"}}]], **cfg)
    assert errors == []  # the truncate names no key: ignored
    assert sorted(r.keys()) == ["customer:c1"]


def test_a_null_field_is_removed_from_the_hash_and_a_missing_one_kept(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    cfg = {"data_structure": "hash", "key_template": "customer:{{id}}"}
    run(redis_url, [[{"id": 1, "name": "a", "status": "x", "tier": "gold"}]], **cfg)
    # One batch, one pipeline: the HDEL follows the HSET of the same field.
    run(redis_url, [[{"id": 1, "name": "a2", "status": "y"}, {"id": 1, "status": None}]], **cfg)
    assert r.hgetall("customer:1") == {"id": "1", "name": "a2", "tier": "gold"}
    fields = [{"source": "user.status", "destination": "status"},
              {"source": "user.tier", "destination": "tier"}]
    cfg = {"data_structure": "hash", "key_template": "user:{{user.id}}", "fields": fields}
    run(redis_url, [[{"user": {"id": 2, "status": "x", "tier": "gold"}}]], **cfg)
    run(redis_url, [[{"user": {"id": 2, "status": None}}]], **cfg)
    assert r.hgetall("user:2") == {"tier": "gold"}


def test_string_list_set_sorted_set_and_stream(redis_url: str) -> None:
    recs = [{"user": "u1", "page": "/a", "score": 3}, {"user": "u1", "page": "/b", "score": 1},
            {"user": "u2", "page": "/a", "score": 2}]
    run(redis_url, [recs], data_structure="string", key_template="last:{{user}}",
        value_field="page")
    run(redis_url, [recs], data_structure="list", key_template="pages:{{user}}")
    run(redis_url, [recs, recs], data_structure="set", key_template="seen:{{user}}",
        value_field="page")
    errors = run(redis_url, [recs + [{"user": "u3", "page": "/c", "score": "high"}]],
                 data_structure="sorted_set", key_template="top", value_field="page",
                 score_field="score")
    run(redis_url, [recs], data_structure="stream", key_template="events",
        stream_max_length=1000)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert r.get("last:u1") == "/b"
    assert [json.loads(x)["page"] for x in r.lrange("pages:u1", 0, -1)] == ["/a", "/b"]
    assert r.smembers("seen:u1") == {"/a", "/b"}
    assert r.zrange("top", 0, -1, withscores=True) == [("/b", 1.0), ("/a", 2.0)]
    assert len(errors) == 1 and "expected a number" in errors[0].message
    entries = r.xrange("events")
    assert [e[1] for e in entries] == [{"user": "u1", "page": "/a", "score": "3"},
                                       {"user": "u1", "page": "/b", "score": "1"},
                                       {"user": "u2", "page": "/a", "score": "2"}]


def test_reconnects_after_the_connection_is_killed(redis_url: str) -> None:
    cfg = RedisDestinationConfig(url=redis_url, key_template="k:{{id}}", data_structure="string",
                                 value_field="v")
    writer = _RedisWriter("cache", cfg, FAST_RETRY)
    cmds = _Commands("cache", cfg)

    def flush(recs: list[dict[str, Any]]) -> Flush:
        ok, bad = cmds.prepare(recs)
        assert bad == []
        return Flush(0, ok)

    assert writer.write_flush(flush([{"id": 1, "v": "a"}])) == []
    admin = redis.Redis.from_url(redis_url)
    me = writer.client.client_id()
    admin.client_kill_filter(_id=me)
    assert writer.write_flush(flush([{"id": 2, "v": "b"}])) == []
    assert writer.client.client_id() != me
    writer.close()
    assert admin.mget("k:1", "k:2") == [b"a", b"b"]


def test_a_record_without_its_key_is_rejected(redis_url: str) -> None:
    errors = run(redis_url, [[{"user": {"id": 1}}, {"user": {}, "_meta": {"line": 4}}]],
                 key_template="customer:{{user.id}}")
    assert len(errors) == 1 and "needs 'user.id'" in errors[0].message
    assert redis.Redis.from_url(redis_url).keys() == [b"customer:1"]


def test_a_command_redis_refuses_fails_its_record_alone(redis_url: str) -> None:
    admin = redis.Redis.from_url(redis_url)
    admin.set("user:2", "a string, not a hash")
    recs = [{"id": 1, "n": 1}, {"id": 2, "n": 2, "_meta": {"file": "in.jsonl", "line": 2}},
            {"id": 3, "n": None}, {"id": 4, "n": 4}]
    errors = run(redis_url, [recs], key_template="user:{{id}}", ttl=60)
    assert [(e.type, e.position(), e.record["id"]) for e in errors] == [
        ("ResponseError", "in.jsonl:2", 2)]
    assert "WRONGTYPE" in errors[0].message
    assert admin.hgetall("user:1") == {b"id": b"1", b"n": b"1"}
    assert admin.hgetall("user:4") == {b"id": b"4", b"n": b"4"}
    assert admin.get("user:2") == b"a string, not a hash"
    assert admin.ttl("user:2") == -1 and 0 < admin.ttl("user:1") <= 60  # no TTL on it


def test_a_wrong_password_is_not_retried(redis_server: str) -> None:
    # AuthenticationError is a ConnectionError to redis-py: retried for max_elapsed.
    host, port = redis_server.removeprefix("redis://").split(":")
    cfg = RedisDestinationConfig(host=host, port=int(port), password="WrongPassw0rd",
                                 key_template="k:{{id}}")
    writer = _RedisWriter("cache", cfg, models.Retry(max_attempts=5))
    ok, _ = _Commands("cache", cfg).prepare([{"id": 1}])
    calls: list[int] = []
    send = writer._send
    writer._send = lambda items: (calls.append(1), send(items))[1]  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="AuthenticationError"):
        writer.write_flush(Flush(0, ok))
    assert len(calls) == 1


@pytest.mark.parametrize(("model", "config", "message"), [
    ("http", {"url": "ftp://127.0.0.1/x"}, "url must start with http:// or https://"),
    ("http", {"url": "127.0.0.1:8/x"}, "url must start with http:// or https://"),
    ("http", {"url": "http://127.0.0.1/", "timeout": 0}, "greater than 0"),
    ("redis", {"key_template": "k", "port": 99999}, "less than or equal to 65535"),
    ("redis", {"key_template": "k", "socket_timeout": 0}, "greater than 0"),
    ("kafka", {"topic": ""}, "at least 1 character"),
    ("kafka", {"topic": "t", "flush_timeout": 0}, "greater than 0"),
    # it overrode bootstrap_servers silently, and errors named the other broker
    ("kafka", {"topic": "t", "properties": {"bootstrap.servers": "h:1"}},
     "'bootstrap.servers' in properties: give the brokers as bootstrap_servers"),
])
def test_destination_settings_that_cannot_work_are_refused(
        model: str, config: dict[str, Any], message: str) -> None:
    # Each was accepted, then failed every write (retried a minute as if transient).
    from dataflare.connectors.http import HttpDestinationConfig
    from dataflare.connectors.kafka import KafkaDestinationConfig

    cls = {"http": HttpDestinationConfig, "redis": RedisDestinationConfig,
           "kafka": KafkaDestinationConfig}[model]
    with pytest.raises(ValueError, match=re.escape(message)):
        cls.model_validate(config)
    assert cls.model_validate({**config, **{k: v for k, v in {
        "url": "http://h/{{id}}", "timeout": 1, "port": 6380, "socket_timeout": 1,
        "topic": "t", "flush_timeout": 1, "properties": {}}.items() if k in config}})


def test_the_default_retry_policy_rides_out_a_server_restart() -> None:
    from tests.fixtures.services import RedisProcess

    server = RedisProcess()  # its own server: this test stops it
    server.start()
    try:
        cfg = RedisDestinationConfig(url=f"{server.url}/0", key_template="k:{{id}}",
                                     data_structure="string", value_field="v")
        writer = _RedisWriter("cache", cfg, models.Retry())  # the defaults
        cmds = _Commands("cache", cfg)
        ok, _ = cmds.prepare([{"id": 1, "v": "a"}])
        assert writer.write_flush(Flush(0, ok)) == []
        server.stop()
        # down for longer than the old default policy (3 attempts, ~3 s) waited
        restart = threading.Timer(6.0, server.start)
        restart.start()
        ok, _ = cmds.prepare([{"id": 2, "v": "b"}])
        assert writer.write_flush(Flush(1, ok)) == []
        restart.join()
        writer.close()
        client = redis.Redis.from_url(f"{server.url}/0")
        assert client.get("k:2") == b"b"
        client.close()
    finally:
        server.remove()


def test_retries_are_bounded_by_max_elapsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataflare import retry

    now = [0.0]
    monkeypatch.setattr(retry, "monotonic", lambda: now[0])
    calls: list[float] = []

    def down() -> None:
        calls.append(now[0])
        raise retry.TransientError("connection refused")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(retry.TransientError) as failed:
        retry.call_with_retry("step 'x': write", down, models.Retry(), sleep=sleep)
    assert calls[-1] == pytest.approx(60.0)  # the last attempt lands on max_elapsed
    assert 8 <= len(calls) <= 10
    assert failed.value.attempts == len(calls)  # type: ignore[attr-defined]  # as reported
    now[0] = 0.0
    calls.clear()
    unbounded = models.Retry(max_elapsed=None, max_attempts=4)
    with pytest.raises(retry.TransientError):
        retry.call_with_retry("step 'x': write", down, unbounded, sleep=sleep)
    assert len(calls) == 4


def test_a_graceful_stop_ends_the_retry_wait() -> None:
    import time

    from dataflare import retry, stopping

    def down() -> None:
        raise retry.TransientError("connection refused")

    threading.Timer(0.3, stopping.REQUESTED.set).start()
    started = time.monotonic()
    try:
        with pytest.raises(retry.TransientError):
            retry.call_with_retry("step 'x': write", down, models.Retry())  # ~60 s of retries
        assert time.monotonic() - started < 10
    finally:
        stopping.REQUESTED.clear()
