"""``dataflare run --otlp-url``: bytewax's spans reach an OpenTelemetry collector (OTLP/gRPC)."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A local OTLP trace receiver keeping (service name, span name) pairs."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                self.spans.extend((attrs.get("service.name", ""), s.name) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_of_a_run_reach_the_collector_under_the_workflow_id(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    flow = tmp_path / "wf.yaml"
    flow.write_text("""
workflow:
  id: traced
  sources: {g: {type: generator, config: {preset: orders, count: 200, rate: 400}}}
  destinations: {o: {type: file, inputs: [g], config: {path: out.jsonl}}}
""")
    try:
        out = subprocess.run([sys.executable, "-m", "dataflare", "run", str(flow),
                              "--otlp-url", f"http://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=120)
    finally:
        server.stop(grace=5).wait()
    assert out.returncode == 0, out.stderr
    names = {name for service, name in collector.spans if service == "traced"}
    assert {"step", "operator"} <= names, collector.spans[:20]
