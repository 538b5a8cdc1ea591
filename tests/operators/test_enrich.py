"""enrich end to end through ``dataflare run``: http_api against a loopback server, ml_scoring
with an ONNX model built here and checked against numpy."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from dataflare.operators.enrich import EnrichConfig
from tests.fixtures.workflows import read_jsonl, run_cli


class Server:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.inflight = 0
        self.max_inflight = 0
        self.faults: list[tuple[int, str | None]] = []
        self.times: list[float] = []
        self.url = ""


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            with state.lock:
                state.requests.append((self.path, body, dict(self.headers.items())))
                state.times.append(time.monotonic())
                fault = state.faults.pop(0) if state.faults else None
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
                state.lock.notify_all()
                if self.path == "/slow":  # wait until a second request is in flight
                    state.lock.wait_for(lambda: state.inflight >= 2, timeout=10)
            try:
                if fault is not None:
                    self.answer(fault[0], {"error": "busy"},
                                {"Retry-After": fault[1]} if fault[1] else {})
                elif self.path == "/broken":
                    self.answer(500, {"error": "down"})
                elif self.path.startswith("/seg/"):  # the path as received
                    self.answer(200, {"score": 0, "band": {"name": self.path}})
                elif self.path == "/thin":  # no score in the answer
                    self.answer(200, {"band": {"name": "b"}})
                elif body.get("customer_id") == "404":
                    self.answer(404, {"error": "unknown"})
                else:
                    cid = int(body["customer_id"])
                    self.answer(200, {"score": cid * 10, "band": {"name": f"b{cid % 2}"}})
            finally:
                with state.lock:
                    state.inflight -= 1

        def answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


HTTP_FLOW = """\
workflow:
  id: enrich_http
  config:
    retry: {max_attempts: 3, backoff: {initial: 0.01, max: 2, multiplier: 2}}
  sources:
    customers: {type: file, config: {path: customers.jsonl, batch_size: 100}}
  transformations:
    enriched:
      inputs: [customers]
      type: enrich
      config:
        enrichments:
          - type: http_api
            url: "URL/PATH"
            method: POST
            headers: {X-Customer: "{{customer_id}}"}
            body_template: '{"customer_id": "{{customer_id}}"}'
            concurrency: 4
            CACHE
            response_mapping:
              - {source: response.score, destination: credit_score}
              - {source: response.band.name, destination: credit.band}
      error_handling: {strategy: redirect, redirect_to: dead}
  destinations:
    out: {type: file, inputs: [enriched], config: {path: out/out.jsonl}}
    dead: {type: file, config: {path: out/dead.jsonl}}
"""


def http_flow(tmp_path: Path, server: Server, ids: list[str], path: str = "score",
              cache: str = "") -> Path:
    lines = [orjson.dumps({"customer_id": i, "n": k}).decode() for k, i in enumerate(ids)]
    (tmp_path / "customers.jsonl").write_text("\n".join(lines) + "\n")
    flow = tmp_path / "flow.yaml"
    flow.write_text(HTTP_FLOW.replace("URL", server.url).replace("PATH", path)
                    .replace("CACHE", cache))
    return flow


def test_http_api_maps_answers_in_parallel(tmp_path, server):
    ids = [str(i) for i in range(1, 21)]
    result = run_cli("run", str(http_flow(tmp_path, server, ids, path="slow")))
    assert result.code == 0, result.stderr
    out = read_jsonl(tmp_path / "out" / "out.jsonl")
    assert sorted((r["n"], r["credit_score"], r["credit"]["band"]) for r in out) == [
        (k, int(i) * 10, f"b{int(i) % 2}") for k, i in enumerate(ids)
    ]
    assert len(server.requests) == 20
    assert all(h["X-Customer"] == b["customer_id"] for _, b, h in server.requests)
    assert 2 <= server.max_inflight <= 4


def test_http_api_url_values_are_escaped(tmp_path, server):
    # A value was put in the URL as it was: "1#frag" asked for /user/1, "../user/1" too
    # (a record enriched with another key's answer).
    # ".." alone was resolved by the client as the parent segment: another endpoint.
    flow = http_flow(tmp_path, server, ["1#frag", "../seg/1", "a b", ".."],
                     path="seg/{{customer_id}}/x")
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    got = {r["customer_id"]: r["credit"]["band"] for r in read_jsonl(tmp_path / "out/out.jsonl")}
    assert got == {"1#frag": "/seg/1%23frag/x", "../seg/1": "/seg/..%2Fseg%2F1/x",
                   "a b": "/seg/a%20b/x"}
    [dead] = read_jsonl(tmp_path / "out/dead.jsonl")
    assert dead["record"]["customer_id"] == ".."
    assert "the value '..' cannot be put in a URL: it would name another path" in \
        dead["error"]["message"]


def test_http_api_a_path_the_answer_lacks_leaves_the_field(tmp_path, server):
    # It wrote null over the record's own value, without a word.
    flow = http_flow(tmp_path, server, ["1"], path="thin")
    (tmp_path / "customers.jsonl").write_text('{"customer_id": "1", "credit_score": 5}\n')
    result = run_cli("run", str(flow), cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out/out.jsonl") == [
        {"customer_id": "1", "credit_score": 5, "credit": {"band": "b"}}]


def test_http_api_cache_by_rendered_request(tmp_path, server):
    ids = ["1", "2", "1", "1", "2", "3"]
    flow = http_flow(tmp_path, server, ids, cache="cache: {ttl: 1h, max_entries: 10}")
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    assert sorted(r["credit_score"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")) == [
        10, 10, 10, 20, 20, 30]
    assert sorted(b["customer_id"] for _, b, _ in server.requests) == ["1", "2", "3"]


def test_http_api_retries_429_with_retry_after(tmp_path, server):
    server.faults = [(429, "1"), (503, None)]
    started = time.monotonic()
    result = run_cli("run", str(http_flow(tmp_path, server, ["7"])))
    assert result.code == 0, result.stderr
    assert [r["credit_score"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == [70]
    assert len(server.requests) == 3
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured


def test_http_api_failures_follow_error_handling(tmp_path, server):
    result = run_cli("run", str(http_flow(tmp_path, server, ["1", "404"])))
    assert result.code == 0, result.stderr
    assert [r["credit_score"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == [10]
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [d["record"]["customer_id"] for d in dead] == ["404"]
    assert dead[0]["error"]["step"] == "enriched"
    assert "HTTP 404" in dead[0]["error"]["message"]

    flow = http_flow(tmp_path, server, ["5"], path="broken")
    flow.write_text(flow.read_text().replace("strategy: redirect, redirect_to: dead",
                                              "strategy: fail").replace(
        "    dead: {type: file, config: {path: out/dead.jsonl}}\n", ""))
    result = run_cli("run", str(flow))
    assert result.code != 0
    assert "'enriched'" in result.stderr
    assert "customers.jsonl:1" in result.stderr
    assert "giving up after 3 attempt(s): HTTP 500" in result.stderr


def logistic_model(path: Path, w: np.ndarray, b: float) -> None:
    from onnx import TensorProto, helper, save

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 1])
              for n in ("frequency", "value")]
    nodes = [
        helper.make_node("Concat", ["frequency", "value"], ["x"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["score"]),
    ]
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [2, 1], w.astype(np.float32).ravel().tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], [b]),
    ]
    graph = helper.make_graph(nodes, "churn", inputs,
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT,
                                                             [None, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))


ML_FLOW = """\
workflow:
  id: enrich_ml
  sources:
    profiles: {type: file, config: {path: profiles.jsonl}}
  transformations:
    scored:
      inputs: [profiles]
      type: enrich
      config:
        enrichments:
          - type: ml_scoring
            model: churn.onnx
            inputs:
              frequency: "{{orders.count}}/90"
              value: "{{orders.amount.avg}}"
            output_field: churn.risk
      error_handling: {strategy: redirect, redirect_to: dead}
  destinations:
    out: {type: file, inputs: [scored], config: {path: out/out.jsonl}}
    dead: {type: file, config: {path: out/dead.jsonl}}
"""


def test_ml_scoring_matches_numpy(tmp_path):
    w, b = np.array([1.5, -0.02]), 0.3
    logistic_model(tmp_path / "churn.onnx", w, b)
    rng = np.random.default_rng(7)
    rows = [{"id": i, "orders": {"count": int(rng.integers(0, 200)),
                                 "amount": {"avg": float(rng.uniform(1, 300))}}}
            for i in range(50)]
    rows.append({"id": 50, "orders": {"count": "many", "amount": {"avg": 3.0}}})
    (tmp_path / "profiles.jsonl").write_text(
        "\n".join(orjson.dumps(r).decode() for r in rows) + "\n")
    (tmp_path / "flow.yaml").write_text(ML_FLOW)
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}
    assert set(out) == set(range(50))
    for r in rows[:50]:
        x = np.array([r["orders"]["count"] / 90, r["orders"]["amount"]["avg"]])
        expected = 1 / (1 + np.exp(-(x @ w + b)))
        assert out[r["id"]]["churn"]["risk"] == pytest.approx(expected, rel=1e-5)
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [d["record"]["id"] for d in dead] == [50]
    assert dead[0]["error"]["step"] == "scored"


def test_ml_scoring_refuses_unknown_model_inputs(tmp_path):
    logistic_model(tmp_path / "churn.onnx", np.array([1.0, 1.0]), 0.0)
    (tmp_path / "profiles.jsonl").write_text('{"id": 1}\n')
    (tmp_path / "flow.yaml").write_text(ML_FLOW.replace("frequency:", "freq:"))
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code != 0
    assert "model inputs are ['frequency', 'value']" in result.stderr


@pytest.mark.parametrize(
    ("enrichment", "error"),
    [
        ({"type": "http_api"}, "http_api needs 'url'"),
        ({"type": "http_api", "url": "u", "model": "m"}, "model not used by a http_api"),
        ({"type": "ml_scoring", "model": "m"}, "ml_scoring needs"),
        ({"type": "http_api", "url": "u", "response_mapping": [{"source": "score",
                                                                "destination": "s"}]},
         "must start with 'response.'"),
    ],
)
def test_bad_enrichments_refused(enrichment, error):
    with pytest.raises(ValueError, match=error):
        EnrichConfig.model_validate({"enrichments": [enrichment]})


LOOKUP_FLOW = """\
workflow:
  id: enrich_lookup
  sources:
    orders: {type: file, config: {path: orders.jsonl}}
  transformations:
    with_customer:
      inputs: [orders]
      type: enrich
      config:
        enrichments:
          - type: lookup
            connection: CONNECTION
            key: customer.id
            lookup_key: id
            fields: [name, tier]
  destinations:
    out: {type: file, inputs: [with_customer], config: {path: out/out.jsonl}}
"""


def lookup_run(tmp_path: Path, connection: str) -> dict[int, dict[str, Any]]:
    orders = [{"order": i, "customer": {"id": c}} for i, c in enumerate([1, 2, 1, 9])]
    (tmp_path / "orders.jsonl").write_text(
        "\n".join(orjson.dumps(r).decode() for r in orders) + "\n")
    (tmp_path / "flow.yaml").write_text(LOOKUP_FLOW.replace("CONNECTION", connection))
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    return {r["order"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}


def check_lookup(out: dict[int, dict[str, Any]]) -> None:
    assert {k: (r.get("name"), r.get("tier")) for k, r in out.items()} == {
        0: ("ann", "gold"), 1: ("bob", "silver"), 2: ("ann", "gold"), 3: (None, None)}


def test_lookup_from_postgres(tmp_path, pg_schema):
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".customers '
                     "(id int primary key, name text, tier text, secret text)")
        conn.execute(f'INSERT INTO "{pg_schema.schema}".customers VALUES '
                     "(1, 'ann', 'gold', 'x'), (2, 'bob', 'silver', 'y')")
    out = lookup_run(tmp_path, f'{{type: postgres, dsn: "{pg_schema.dsn}", '
                               f'schema: {pg_schema.schema}, table: customers}}')
    check_lookup(out)
    assert "secret" not in out[0]


def test_lookup_keys_equal_as_numbers_are_one_key(tmp_path, pg_schema):
    # Keys compared as Python's text: the record's 1 missed a double precision 1 ('1.0').
    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".customers '
                     "(id double precision, name text, tier text)")
        conn.execute(f'INSERT INTO "{pg_schema.schema}".customers VALUES '
                     "(1, 'ann', 'gold'), (2, 'bob', 'silver')")
    check_lookup(lookup_run(tmp_path, f'{{type: postgres, dsn: "{pg_schema.dsn}", '
                                      f'schema: {pg_schema.schema}, table: customers}}'))


def test_lookup_from_mysql(tmp_path, mariadb_private):
    mariadb_private.execute(
        "DROP TABLE IF EXISTS lookup_enrich_customers",
        "CREATE TABLE lookup_enrich_customers (id INT PRIMARY KEY, name VARCHAR(20), "
        "tier VARCHAR(10), since DATETIME, secret TEXT)",
        "INSERT INTO lookup_enrich_customers VALUES (1, 'ann', 'gold', '2024-01-02 03:04:05', "
        "'x'), (2, 'bob', 'silver', NULL, 'y')",
    )
    db = mariadb_private
    connection = (f"{{type: mysql, host: {db.host}, port: {db.port}, username: {db.user}, "
                  f"database: {db.database}, table: lookup_enrich_customers}}")
    out = lookup_run(tmp_path, connection)
    check_lookup(out)
    assert "secret" not in out[0]
    # whole rows (no 'fields'), with values as the mysql source gives them
    (tmp_path / "flow.yaml").write_text(
        LOOKUP_FLOW.replace("CONNECTION", connection).replace("fields: [name, tier]", ""))
    result = run_cli("run", str(tmp_path / "flow.yaml"))
    assert result.code == 0, result.stderr
    first = read_jsonl(tmp_path / "out" / "out.jsonl")[0]
    assert first["since"] == "2024-01-02T03:04:05" and first["secret"] == "x"


def test_lookup_from_csv_file(tmp_path):
    (tmp_path / "customers.csv").write_text("id,name,tier\n1,ann,gold\n2,bob,silver\n")
    check_lookup(lookup_run(tmp_path, "{type: file, path: customers.csv}"))


def test_lookup_refreshes(tmp_path, pg_schema):
    from dataflare.operators.enrich import Enrichment, LookupStage

    with pg_schema.connect() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema.schema}".c (id int, name text)')
        conn.execute(f"INSERT INTO \"{pg_schema.schema}\".c VALUES (1, 'ann')")
    cfg = Enrichment.model_validate({
        "type": "lookup", "key": "id", "lookup_key": "id", "fields": ["name"], "refresh": 0,
        "connection": {"type": "postgres", "dsn": pg_schema.dsn, "schema": pg_schema.schema,
                       "table": "c"},
    })
    stage = LookupStage("s", cfg, Path)
    batch: list[Any] = [{"id": 1}, {"id": 2}]
    stage(batch, [None, None])
    assert batch == [{"id": 1, "name": "ann"}, {"id": 2, "name": None}]
    with pg_schema.connect() as conn:
        conn.execute(f"INSERT INTO \"{pg_schema.schema}\".c VALUES (2, 'bob')")
    batch = [{"id": 2}]
    stage(batch, [None])
    assert batch == [{"id": 2, "name": "bob"}]
    # without refresh, the table loaded first stays
    stage2 = LookupStage("s", cfg.model_copy(update={"refresh": None}), Path)
    batch = [{"id": 3}]
    stage2(batch, [None])
    with pg_schema.connect() as conn:
        conn.execute(f"INSERT INTO \"{pg_schema.schema}\".c VALUES (3, 'cy')")
    batch = [{"id": 3}]
    stage2(batch, [None])
    assert batch == [{"id": 3, "name": None}]


def test_a_lookup_that_cannot_be_read_names_the_step_and_a_failed_refresh_keeps_the_table(
        tmp_path, pg_schema, caplog):
    from dataflare.operators.enrich import Enrichment, LookupStage

    table = f'"{pg_schema.schema}".c'
    with pg_schema.connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int, name text)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'ann')")
    cfg = Enrichment.model_validate({
        "type": "lookup", "key": "id", "lookup_key": "id", "fields": ["name"], "refresh": 0,
        "connection": {"type": "postgres", "dsn": pg_schema.dsn, "schema": pg_schema.schema,
                       "table": "c"},
    })
    stage = LookupStage("s", cfg, Path)
    batch: list[Any] = [{"id": 1}]
    stage(batch, [None])
    with pg_schema.connect() as conn:
        conn.execute(f"ALTER TABLE {table} RENAME TO c_gone")
    batch = [{"id": 1}]
    stage(batch, [None])  # the refresh fails: the table read before goes on
    assert batch == [{"id": 1, "name": "ann"}]
    assert f"step 's': lookup: cannot read postgres table {pg_schema.schema}.c: " \
        "relation" in caplog.text
    first = LookupStage("s", cfg, Path)
    with pytest.raises(RuntimeError, match=f"step 's': lookup: cannot read postgres table "
                       f"{pg_schema.schema}.c: relation"):
        first([{"id": 1}], [None])


def test_lookup_connection_refused():
    with pytest.raises(ValueError, match="lookup connection type 'mongo' is not supported"):
        EnrichConfig.model_validate({"enrichments": [{
            "type": "lookup", "key": "k", "lookup_key": "k", "connection": {"type": "mongo"}}]})


def test_lookup_from_redis_hashes(tmp_path, redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.hset("customer:1", mapping={"id": 1, "name": "ann", "tier": "gold"})
    client.hset("customer:2", mapping={"id": 2, "name": "bob", "tier": "silver"})
    client.hset("other:1", mapping={"id": 1, "name": "wrong", "tier": "wrong"})
    client.set("customer:note", "not a hash")  # stopped the run with WRONGTYPE: left out
    client.close()
    check_lookup(lookup_run(tmp_path, f'{{type: redis, url: "{redis_url}", '
                                      'pattern: "customer:*"}'))


def test_http_api_rate_limit_spaces_requests(tmp_path, server):
    flow = http_flow(tmp_path, server, [str(i) for i in range(1, 7)])
    flow.write_text(flow.read_text().replace("concurrency: 4", "concurrency: 4\n"
                                             "            rate_limit: 5"))
    result = run_cli("run", str(flow))
    assert result.code == 0, result.stderr
    assert len(read_jsonl(tmp_path / "out" / "out.jsonl")) == 6
    # 6 requests at 5 per second: the last starts at least 1 s after the first
    assert server.times[-1] - server.times[0] >= 0.95


def test_a_stop_while_a_call_is_retried_leaves_the_records_to_the_resume(tmp_path, server):
    # The backoff ran out before the stop took effect (minutes), and the records were then
    # dead-lettered: a stop is no verdict on them, and the resumed run calls again.
    import os
    import signal
    import subprocess
    import sys

    flow = http_flow(tmp_path, server, ["1", "2"])
    flow.write_text(flow.read_text().replace(
        "max_attempts: 3, backoff: {initial: 0.01, max: 2, multiplier: 2}",
        "max_attempts: 10, backoff: {initial: 30, max: 60, multiplier: 2}"))
    server.faults = [(503, None)] * 1000
    cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "-r", str(tmp_path / "rec")]
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    with server.lock:  # both calls failed once: their retries wait
        assert server.lock.wait_for(lambda: len(server.requests) >= 2, timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped on SIGTERM during retries: step 'enriched'" in err, err
    dead = tmp_path / "out" / "dead.jsonl"
    assert not dead.exists() or read_jsonl(dead) == []
    server.faults = []
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(r["credit_score"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")) == [
        10, 20]
    assert read_jsonl(dead) == []
