"""The s3 destination and source against a real S3-protocol server (moto, on loopback)."""

import csv
import io
import os
import re
import subprocess
import sys
import threading

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataflare
from dataflare.connectors.s3 import S3DestinationConfig, S3Position, S3Source, S3SourceConfig
from tests.fixtures.s3 import KEY_ID, SECRET, Outage

SEED_LAKE = """\
workflow:
  sources:
    users: {type: file, config: {path: users.jsonl}}
    orders: {type: file, config: {path: orders.jsonl}}
  transformations:
    user_transform: {inputs: [users], type: filter, config: {condition: "id >= 0"}}
    order_transform: {inputs: [orders], type: filter, config: {condition: "id >= 0"}}
  destinations:
    data_lake:
      inputs: ["user_transform", "order_transform"]
      type: "s3"
      config:
        path_template: "year={{year}}/month={{month}}/day={{day}}/{{source}}_data.parquet"
        format: "parquet"
        partition_by: ["year", "month", "day", "source"]
CONNECTION
        time_field: ts
"""

NAME = re.compile(r"-[0-9a-f]{12}-(\d{6})(\.\w+)$")


def logical(keys: list[str]) -> dict[str, list[str]]:
    """Object keys by their templated name (run and number taken out)."""
    out: dict[str, list[str]] = {}
    for k in keys:
        if "_dataflare/" in k:
            continue
        m = NAME.search(k)
        assert m, k
        out.setdefault(k[: m.start()] + m.group(2), []).append(k)
    return out


def test_seed_data_lake_writes_partitioned_parquet_objects(tmp_path, s3_bucket):
    users = [{"id": i, "name": f"u{i}", "ts": f"2024-05-0{1 + i % 2}T10:00:00Z"} for i in range(6)]
    orders = [{"id": 100 + i, "amount": 1.5 * i, "ts": "2024-05-01T23:00:00Z"} for i in range(4)]
    for name, rows in (("users", users), ("orders", orders)):
        (tmp_path / f"{name}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    connection = "\n".join(f"        {item}" for item in s3_bucket.config().split(", "))
    flow = tmp_path / "flow.yaml"
    flow.write_text(SEED_LAKE.replace("CONNECTION", connection))
    result = dataflare.run(flow)
    assert result.ok, result.error
    objects = logical(s3_bucket.keys())
    assert sorted(objects) == [
        "year=2024/month=05/day=01/source=order_transform/order_transform_data.parquet",
        "year=2024/month=05/day=01/source=user_transform/user_transform_data.parquet",
        "year=2024/month=05/day=02/source=user_transform/user_transform_data.parquet",
    ]
    def rows(name: str) -> list[dict]:
        out = []
        for key in objects[name]:
            out += pq.read_table(pa.BufferReader(s3_bucket.read(key))).to_pylist()
        return sorted(out, key=lambda r: r["id"])

    assert rows("year=2024/month=05/day=02/source=user_transform/user_transform_data.parquet") \
        == [u for u in users if u["id"] % 2 == 1]
    assert rows("year=2024/month=05/day=01/source=order_transform/order_transform_data.parquet") \
        == orders


def test_jsonl_and_csv_objects_roll_and_credentials_come_from_the_environment(
        tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    rows = [{"id": i, "city": ["paris", "rome"][i % 2], "tags": {"n": i}} for i in range(250)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    conn = f"bucket: {s3_bucket.name}, endpoint_url: '{s3_bucket.endpoint_url}', region: us-east-1"
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    as_jsonl:
      inputs: [src]
      type: s3
      config: {{{conn}, path_template: "j/{{{{city}}}}/", format: jsonl, max_records: 50}}
    as_csv:
      inputs: [src]
      type: s3
      config: {{{conn}, path_template: "c/all.csv", format: csv, partition_by: [city]}}
""")
    result = dataflare.run(tmp_path / "flow.yaml", recovery_dir=tmp_path / "rec")
    assert result.ok, result.error
    # The journal of what the run published is gone once it completed: it stayed beside
    # the data, one object per object, for good.
    assert [k for k in s3_bucket.keys() if "_dataflare/" in k] == []
    objects = logical(s3_bucket.keys())
    assert {k: len(v) for k, v in objects.items()} == {
        "j/paris/part.jsonl": 3, "j/rome/part.jsonl": 3,
        "c/city=paris/all.csv": 1, "c/city=rome/all.csv": 1}
    paris = [orjson.loads(line) for k in objects["j/paris/part.jsonl"]
             for line in s3_bucket.read(k).splitlines()]
    assert sorted(paris, key=lambda r: r["id"]) == [r for r in rows if r["city"] == "paris"]
    [rome_csv] = objects["c/city=rome/all.csv"]
    table = list(csv.DictReader(io.StringIO(s3_bucket.read(rome_csv).decode())))
    assert table[0] == {"id": "1", "city": "rome", "tags": '{"n":1}'}
    assert len(table) == 125


def run_through_an_outage(tmp_path, s3_bucket, body: str):
    """Run a workflow (``body``, with ``CONN`` for the connection) whose S3 server is away
    for its first 1.5 s, retrying fast; the result."""
    outage = Outage(s3_bucket.endpoint_url)
    conn = s3_bucket.config().replace(s3_bucket.endpoint_url, outage.endpoint_url)
    flow = tmp_path / "flow.yaml"
    flow.write_text("workflow:\n  config: {retry: {max_attempts: 50, backoff: {initial: 50ms, "
                    "max: 200ms}}}\n" + body.replace("CONN", conn))
    outage.down.set()
    threading.Timer(1.5, outage.down.clear).start()
    try:
        result = dataflare.run(flow)
    finally:
        outage.down.clear()
        outage.close()
    assert outage.dropped > 0  # the run met the outage
    return result


def test_an_s3_outage_is_retried_per_the_workflows_retry_policy(tmp_path, s3_bucket):
    # S3 calls were not retried: an outage of two seconds (a MinIO restart) stopped the run.
    rows = [{"id": i, "city": ["paris", "rome"][i % 2]} for i in range(40)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    result = run_through_an_outage(tmp_path, s3_bucket, """\
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    lake:
      inputs: [src]
      type: s3
      config: {CONN, path_template: "o/{{city}}/", format: jsonl, max_records: 10}
""")
    assert result.ok, result.error
    got = [orjson.loads(line) for keys in logical(s3_bucket.keys()).values() for k in keys
           for line in s3_bucket.read(k).splitlines()]
    assert sorted(got, key=lambda r: r["id"]) == rows
    # The s3 source: listing and downloads are retried too.
    result = run_through_an_outage(tmp_path, s3_bucket, """\
  sources:
    lake: {type: s3, config: {CONN, prefix: o/, format: jsonl}}
  destinations:
    copy: {inputs: [lake], type: file, config: {path: copy.jsonl}}
""")
    assert result.ok, result.error
    copied = [orjson.loads(line) for line in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert sorted(copied, key=lambda r: r["id"]) == rows


def test_s3_source_reads_every_format_under_a_prefix_and_resumes_by_key(tmp_path, s3_bucket):
    s3_bucket.put("in/a.jsonl", b'{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    s3_bucket.put("in/b.csv", b"n,s\n4,x\n5,y\n6,z\n")
    sink = io.BytesIO()
    pq.write_table(pa.table({"n": [7, 8]}), sink)
    s3_bucket.put("in/c.parquet", sink.getvalue())
    s3_bucket.put("in/_dataflare/out/abc/00000001", b"not data")  # a journal is not read
    s3_bucket.put("other/d.jsonl", b'{"n": 99}\n')
    config = S3SourceConfig.model_validate({
        "bucket": s3_bucket.name, "endpoint_url": s3_bucket.endpoint_url, "region": "us-east-1",
        "access_key_id": KEY_ID, "secret_access_key": SECRET, "prefix": "in/",
        "batch_size": 2, "csv": {"infer_types": True}})
    source = S3Source("src", config)
    [part] = source.list_parts()

    def read(state, batches: int | None = None):
        reader = source.build_part("src", part, state)
        out = []
        try:
            while batches is None or batches > 0:
                for batch in reader.next_batch():
                    out.extend(batch)
                    if batches is not None:
                        batches -= 1
        except StopIteration:
            pass
        state = reader.snapshot()
        reader.close()
        return out, state

    everything, _ = read(None)
    assert [r["n"] for r in everything] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert everything[0]["_meta"] == {"file": f"s3://{s3_bucket.name}/in/a.jsonl", "line": 1}
    assert everything[4]["_meta"] == {"file": f"s3://{s3_bucket.name}/in/b.csv", "line": 3}
    for batches, key in ((1, "in/a.jsonl"), (2, "in/b.csv"), (3, "in/b.csv")):
        first, state = read(None, batches=batches)
        assert isinstance(state, S3Position) and state.key == key and len(first) < 8
        rest, _ = read(state)
        assert [r["n"] for r in first + rest] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_s3_source_feeds_a_workflow(tmp_path, s3_bucket):
    s3_bucket.put("data/x.jsonl", b'{"n": 1}\n{"n": 2}\n')
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  sources:
    lake: {{type: s3, config: {{{s3_bucket.config()}, prefix: data/}}}}
  destinations:
    out: {{inputs: [lake], type: file, config: {{path: out.jsonl}}}}
""")
    assert dataflare.run(tmp_path / "flow.yaml").ok
    assert (tmp_path / "out.jsonl").read_text() == '{"n":1}\n{"n":2}\n'


def test_a_bucket_that_does_not_exist_is_an_error_naming_the_step(tmp_path, s3_bucket):
    (tmp_path / "in.jsonl").write_text('{"n": 1}\n')
    config = s3_bucket.config().replace(f"bucket: {s3_bucket.name}", "bucket: no-such-bucket")
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    lake: {{inputs: [src], type: s3, config: {{{config}, path_template: "x/"}}}}
""")
    result = dataflare.run(tmp_path / "flow.yaml")
    assert not result.ok
    assert "step 'lake': cannot write s3://no-such-bucket/x/" in (result.error or "")
    assert SECRET not in (result.error or "")
    # A failed run left its local scratch directory (records' copies) in the temp dir.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "dataflare", "run", "flow.yaml", "-q"],
                          cwd=tmp_path, env={**os.environ, "TMPDIR": str(scratch)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "cannot write s3://no-such-bucket/x/" in proc.stderr
    assert list(scratch.glob("dataflare-s3-*")) == []


@pytest.mark.parametrize(("config", "message"), [
    ({"path_template": "/abs/"}, "must not start with '/'"),
    ({"path_template": "x/", "access_key_id": "a"}, "give both 'access_key_id'"),
    ({"path_template": "x/", "format": "jsonl", "columns": ["a"]}, "'columns' applies"),
])
def test_s3_settings_that_cannot_work_are_refused(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        S3DestinationConfig.model_validate({"bucket": "b", **config})


def test_secrets_are_masked_when_the_config_is_shown():
    cfg = S3DestinationConfig.model_validate({"bucket": "b", "path_template": "x/",
                                              "access_key_id": KEY_ID,
                                              "secret_access_key": SECRET})
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.model_dump())


def polled_source(s3_bucket, component=None, **config):
    from dataflare.dsl_compiler.models import Source

    cfg = S3SourceConfig.model_validate({
        "bucket": s3_bucket.name, "endpoint_url": s3_bucket.endpoint_url, "region": "us-east-1",
        "access_key_id": KEY_ID, "secret_access_key": SECRET, "prefix": "in/", **config})
    comp = Source.model_validate({"type": "s3", "config": cfg, "mode": "incremental",
                                  **(component or {})})
    return S3Source("src", cfg, comp)


def drain(source, state, batches=None):
    """Records until the input ends (or ``batches`` batches), and the state then."""
    [part] = source.list_parts()
    reader = source.build_part("src", part, state)
    out = []
    try:
        while batches is None or batches > 0:
            for batch in reader.next_batch():
                out.extend(r["n"] for r in batch)
                batches = None if batches is None else batches - 1
    except StopIteration:
        pass
    state = reader.snapshot()
    reader.close()
    return out, state


def test_an_incremental_s3_source_reads_new_and_replaced_objects_once(s3_bucket):
    s3_bucket.put("in/a.jsonl", b'{"n": 1}\n{"n": 2}\n')
    s3_bucket.put("in/b.jsonl", b'{"n": 3}\n')
    s3_bucket.put("in/_dataflare/out/x/1", b"journal")
    source = polled_source(s3_bucket, {"incremental": {"lookback": "2m"}}, stop_at_end=True,
                           batch_size=1)
    first, state = drain(source, None)
    assert first == [1, 2, 3]
    assert drain(source, state)[0] == []  # nothing new: a catch-up run ends at once
    s3_bucket.put("in/0-sorts-first.jsonl", b'{"n": 4}\n')  # new, though before 'a' by key
    s3_bucket.put("in/a.jsonl", b'{"n": 5}\n')  # replaced: a new ETag
    part, mid = drain(source, state, batches=1)  # stopped inside the new objects...
    rest, state = drain(source, mid)  # ...and resumed where it was
    assert sorted(part + rest) == [4, 5] and len(part) == 1
    assert drain(source, state)[0] == []
    # An object dated before the cursor (a multipart upload is dated when it began) is
    # read when it is within incremental.lookback of it, not otherwise.
    from dataflare.connectors.s3 import S3Polled

    ahead = S3Polled(state.cursor + 60, state.seen)
    s3_bucket.put("in/late.jsonl", b'{"n": 6}\n')
    assert drain(polled_source(s3_bucket, stop_at_end=True), ahead)[0] == []
    assert drain(source, ahead)[0] == [6]  # the others, read within the lookback, are not


def test_an_incremental_s3_source_lists_again_after_its_interval(s3_bucket):
    source = polled_source(s3_bucket, {"incremental": {"interval": "1h"}})
    [part] = source.list_parts()
    reader = source.build_part("src", part, None)
    assert reader.next_batch() == [] and reader.next_awake() is not None  # waits an hour
    reader.close()


@pytest.mark.parametrize(("component", "config", "message"), [
    ({"mode": "full"}, {"stop_at_end": True}, "config.stop_at_end has no effect in mode full"),
    ({"incremental": {"cursor_field": "ts"}}, {},
     "incremental.cursor_field has no effect on an s3 source"),
    ({"mode": "cdc"}, {}, "type 's3' supports modes full and incremental"),
    ({"incremental": {"start_value": "yesterday"}}, {}, "incremental.start_value: timestamp"),
])
def test_s3_source_settings_that_cannot_work_are_refused(s3_bucket, component, config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        polled_source(s3_bucket, component, **config)


def test_a_scheduled_sync_of_an_s3_prefix_writes_each_object_once(tmp_path, s3_bucket):
    s3_bucket.put("in/1.jsonl", b'{"n": 1}\n{"n": 2}\n')
    (tmp_path / "flow.yaml").write_text(f"""\
workflow:
  sources:
    lake:
      type: s3
      mode: incremental
      config: {{{s3_bucket.config()}, prefix: in/, stop_at_end: true}}
  destinations:
    out: {{inputs: [lake], type: file, config: {{path: out.jsonl}}, write_mode: {{type: append}}}}
""")
    rec = tmp_path / "rec"
    assert dataflare.run(tmp_path / "flow.yaml", recovery_dir=rec).ok
    s3_bucket.put("in/2.jsonl", b'{"n": 3}\n')
    assert dataflare.run(tmp_path / "flow.yaml", recovery_dir=rec).ok
    assert (tmp_path / "out.jsonl").read_text() == '{"n":1}\n{"n":2}\n{"n":3}\n'
