"""A workflow's monitoring: its metrics under its names, alerts fired and resolved live."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.pg_private import free_port
from tests.server.conftest import Receiver
from tests.test_exactly_once import produce

FLOW = """
workflow:
  id: watched
  sources:
    events:
      type: kafka
      mode: streaming
      config: {{bootstrap_servers: "{servers}", topic: {topic}, consumer_group: watched}}
      monitoring:
        metrics: [{{name: records_extracted, type: counter}}]
        alerts:
          - name: extraction_delay
            condition: "time_since_last_record > 2s"
            severity: warning
            notify: [{{channel: webhook, url: "{hook}"}}]
  destinations:
    cache:
      inputs: [events]
      type: redis
      config: {{url: "{redis}", key_template: "e:{{{{id}}}}"}}
      batch: {{flush_interval: 100ms}}
      monitoring:
        metrics:
          - {{name: records_loaded, type: counter}}
          - {{name: load_latency, type: histogram}}
        alerts:
          - {{name: high_latency, condition: "load_latency.p95 > 10s", severity: critical}}
"""


def wait(cond: Any, what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_an_idle_source_fires_an_alert_that_resolves_when_records_come(
        tmp_path: Path, kafka_broker: Any, kafka_topic: Any, redis_url: str) -> None:
    topic = kafka_topic(partitions=1)
    servers = kafka_broker.bootstrap_servers
    hook = Receiver()
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(servers=servers, topic=topic, hook=hook.url, redis=redis_url))
    produce(servers, topic, [{"id": i, "user_id": "u"} for i in range(50)])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "--log-format", "json", "run",
                             str(flow), "--http-port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def metric(name: str) -> float:
            try:
                text = httpx.get(url + "/metrics").text
            except httpx.HTTPError:
                return -1
            for line in text.splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
            return -1

        wait(lambda: metric('records_loaded_total{step="cache"}') == 50, "50 records loaded")
        assert metric(f'dataflare_kafka_consumer_lag{{partition="0",step="events",topic="{topic}"}}'
                      ) == 0
        assert metric('records_extracted_total{step="events"}') == 50
        # The write's time is observed as the write returns, just after its records count.
        wait(lambda: metric('load_latency_count{step="cache"}') >= 1, "the write timed")
        # The source goes quiet: the alert fires once, to the webhook.
        fired = wait(lambda: [b for b in hook.bodies if b["context"]["event"] == "fired"],
                     "the alert to fire")
        assert fired[0]["context"]["alert"] == "extraction_delay"
        assert fired[0]["context"]["step"] == "events"
        assert metric('dataflare_alerts_firing{alert="extraction_delay",severity="warning",'
                      'step="events"}') == 1
        produce(servers, topic, [{"id": i, "user_id": "u"} for i in range(50, 60)])
        wait(lambda: [b for b in hook.bodies if b["context"]["event"] == "resolved"],
             "the alert to resolve")
        assert len([b for b in hook.bodies if b["context"]["event"] == "fired"]) == 1
        assert not any(b["context"]["alert"] == "high_latency" for b in hook.bodies)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        hook.close()
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    alerts = [x for x in logged if "alert 'extraction_delay'" in x["message"]]
    assert [a["level"] for a in alerts][:2] == ["warning", "info"]
    assert alerts[0]["component"] == "events"
