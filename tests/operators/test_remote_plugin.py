"""Remote plugins through ``dataflare run``: the seed's predict_churn step against a loopback
service, bearer auth from a secret, retries, 500 answers, wrong counts and per-record errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from dataflare.config import Retry
from dataflare.dsl_compiler.models import Plugin
from dataflare.operators.remote_plugin import RemotePlugin
from tests.fixtures.workflows import read_jsonl, run_cli, stop_while_retrying

TOKEN = "s3cr3t-token-value"


class Service:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.faults: list[int] = []
        self.url = ""


@pytest.fixture
def service() -> Iterator[Service]:
    state = Service()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.calls.append((self.path, body, self.headers.get("Authorization", "")))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.answer(401, {"error": "unauthorized"})
            if state.faults:
                return self.answer(state.faults.pop(0), {"error": "busy"})
            recs = body["records"]
            if self.path == "/broken":
                return self.answer(500, {"error": "down"})
            if self.path == "/short":
                return self.answer(200, {"records": recs[:-1]})
            if self.path == "/echo":
                return self.answer(200, {"records": recs})
            if self.path == "/bignum":  # numbers a float would round
                return self.answer(200, {"records": [{"account": 99999999999999999999123}]})
            if self.path == "/stray":  # an error for a record the batch does not have
                return self.answer(200, {"records": recs, "errors": [{"index": len(recs)}]})
            cfg = body["config"]
            out, errors = [], []
            for i, r in enumerate(recs):
                c = r["customer"]
                if not isinstance(c.get("activity_score"), int | float):
                    errors.append({"index": i, "message": "activity_score is not a number"})
                    out.append(None)
                    continue
                score = sum(float(c[f.split(".")[1]]) for f in cfg["features"]) / 1000
                out.append({**r, "customer": {**c, "churn_probability": score}})
            return self.answer(200, {"records": out, "errors": errors})

        def answer(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state
    httpd.shutdown()
    httpd.server_close()


FLOW = """\
workflow:
  id: remote
  config:
    retry: {max_attempts: 2, backoff: {initial: 0.01, max: 1, multiplier: 2}}
  plugins:
    ml_processor:
      type: remote
      url: "URL/PATH"
      timeout: 20s
      auth: {type: bearer, token: "${ML_API_TOKEN}"}
  sources:
    customers: {type: file, config: {path: customers.jsonl}}
  transformations:
    predict_churn:
      inputs: [customers]
      type: plugin
      plugin: ml_processor
      config:
        model: churn_prediction
        features:
          - customer.activity_score
          - customer.days_since_last_purchase
          - customer.total_purchases
        output_field: customer.churn_probability
      error_handling: {strategy: STRATEGY, redirect_to: dead}
  destinations:
    out: {type: file, inputs: [predict_churn], config: {path: out/out.jsonl}}
    dead: {type: file, config: {path: out/dead.jsonl}}
"""

ROWS = [
    {"id": 1, "customer": {"activity_score": 10, "days_since_last_purchase": 20,
                           "total_purchases": 30}},
    {"id": 2, "customer": {"activity_score": "high", "days_since_last_purchase": 1,
                           "total_purchases": 1}},
    {"id": 3, "customer": {"activity_score": 100, "days_since_last_purchase": 200,
                           "total_purchases": 300}},
]


def run(tmp_path: Path, service: Service, path: str = "predict",
        strategy: str = "redirect") -> Any:
    (tmp_path / "customers.jsonl").write_text(
        "\n".join(orjson.dumps(r).decode() for r in ROWS) + "\n")
    text = FLOW.replace("URL", service.url).replace("PATH", path).replace("STRATEGY", strategy)
    if strategy != "redirect":
        text = text.replace(", redirect_to: dead", "").replace(
            "    dead: {type: file, config: {path: out/dead.jsonl}}\n", "")
    (tmp_path / "flow.yaml").write_text(text)
    import os
    env_before = os.environ.get("ML_API_TOKEN")
    os.environ["ML_API_TOKEN"] = TOKEN
    try:
        return run_cli("run", str(tmp_path / "flow.yaml"))
    finally:
        if env_before is None:
            del os.environ["ML_API_TOKEN"]
        else:
            os.environ["ML_API_TOKEN"] = env_before


def test_predict_churn_against_a_local_service(tmp_path, service):
    service.faults = [503]
    result = run(tmp_path, service)
    assert result.code == 0, result.stderr
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}
    assert out[1]["customer"]["churn_probability"] == pytest.approx(0.06)
    assert out[3]["customer"]["churn_probability"] == pytest.approx(0.6)
    assert set(out) == {1, 3}
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [d["record"]["id"] for d in dead] == [2]
    assert dead[0]["error"]["step"] == "predict_churn"
    assert "activity_score is not a number" in dead[0]["error"]["message"]
    assert len(service.calls) == 2  # a 503, then the retry
    path, body, auth = service.calls[-1]
    assert auth == f"Bearer {TOKEN}"
    assert body["config"]["model"] == "churn_prediction"
    assert all("_meta" not in r for r in body["records"])
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.parametrize(("path", "message"), [
    ("broken", "HTTP 500 (after 2 attempt(s))"),
    ("short", "answered 2 records for 3"),
    ("stray", "an error for index 3, not in the batch of 3 records"),
])
def test_unusable_answers_follow_error_handling(tmp_path, service, path, message):
    result = run(tmp_path, service, path)
    assert result.code == 0, result.stderr
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert sorted(d["record"]["id"] for d in dead) == [1, 2, 3]
    assert message in dead[0]["error"]["message"]
    failed = run(tmp_path, service, path, strategy="fail")
    assert failed.code != 0
    assert "'predict_churn'" in failed.stderr
    assert "customers.jsonl:1" in failed.stderr
    assert message in failed.stderr


def test_a_stop_while_the_plugin_is_retried_leaves_the_batch_to_the_resume(tmp_path, service):
    # The batch's records were dead-lettered (or the run failed) because SIGTERM cut the
    # retries short: a stop is no verdict on them, and the resumed run sends them again.
    import os
    import subprocess
    import sys

    (tmp_path / "customers.jsonl").write_text(
        "\n".join(orjson.dumps(r).decode() for r in ROWS) + "\n")
    text = FLOW.replace("URL", service.url).replace("PATH", "predict").replace(
        "STRATEGY", "redirect").replace(
        "max_attempts: 2, backoff: {initial: 0.01, max: 1, multiplier: 2}",
        "max_attempts: 10, backoff: {initial: 0.5, max: 30, multiplier: 20}")
    (tmp_path / "flow.yaml").write_text(text)
    cmd = [sys.executable, "-m", "dataflare", "run", "flow.yaml", "-r", "rec"]
    env = {**os.environ, "ML_API_TOKEN": TOKEN, "RUST_BACKTRACE": "0"}
    service.faults = [503] * 1000
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    err = stop_while_retrying(proc)
    assert "stopped on SIGTERM during retries: plugin 'ml_processor'" in err, err
    assert "the next run reads its records again from the last snapshot" in err
    assert not (tmp_path / "out" / "dead.jsonl").exists() or read_jsonl(
        tmp_path / "out" / "dead.jsonl") == []
    service.faults = []
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "out.jsonl")] == [1, 3]
    assert [d["record"]["id"] for d in read_jsonl(tmp_path / "out" / "dead.jsonl")] == [2]


def test_an_integer_beyond_64_bits_goes_to_the_service_as_its_text(service):
    # orjson refuses such an integer (a mapping's to_int makes one) before asking for a
    # fallback: the run stopped, with no step and no record named.
    plugin = RemotePlugin("ml", Plugin(type="remote", url=f"{service.url}/echo", auth={
        "type": "bearer", "token": TOKEN}), {}, Retry())
    assert plugin.call([{"n": 10**30}, {"n": 1}]) == ([{"n": str(10**30)}, {"n": 1}], {})


def test_numbers_of_the_answer_a_float_would_round_come_as_their_text(service):
    # They were read as floats: the 23-digit account came back as 1e+23.
    plugin = RemotePlugin("ml", Plugin(type="remote", url=f"{service.url}/bignum", auth={
        "type": "bearer", "token": TOKEN}), {}, Retry())
    assert plugin.call([{"n": 1}]) == ([{"account": "99999999999999999999123"}], {})
