"""What later steps read of a step's records, and the joins that hold only that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataflare.dsl_compiler import validate_text
from dataflare.dsl_compiler.compiler import compile_validated
from dataflare.dsl_compiler.projection import read_downstream
from dataflare.operators.keyed import shard_builders
from dataflare.runner import run

HEAD = """\
workflow:
  sources:
    events: {type: file, config: {path: events.jsonl}}
    orders: {type: file, config: {path: orders.jsonl}}
  transformations:
    j:
      type: join
      inputs: [events, orders]
      config: {join_key: user_id, window: {type: tumbling, size: 5m}, time_field: ts,
               time_unit: ms, allowed_lateness: 1d}
"""


def _read(transformations: str, destinations: str) -> frozenset[str] | None:
    v = validate_text(HEAD + transformations + "  destinations:\n" + destinations)
    assert not v.errors(), v.errors()
    assert v.graph is not None and v.types is not None
    return read_downstream(v.graph, v.types, "j")


PAIRS = """\
    pairs:
      type: mapping
      inputs: [j]
      config:
        mappings:
          - {source: id, destination: event_id}
          - {source: order_id, destination: order_id}
"""
OUT = "    out: {type: file, inputs: [pairs], config: {path: out.jsonl}}\n"


@pytest.mark.parametrize(("transformations", "destinations", "expected"), [
    (PAIRS, OUT, {"id", "order_id", "_meta"}),
    ("""\
    big: {type: filter, inputs: [j], config: {condition: "total > 10"}}
    pairs:
      type: mapping
      inputs: [big]
      config: {mappings: [{expression: "id * 2", destination: twice}]}
""", OUT, {"total", "id", "_meta"}),
    # the late records are the join's inputs, not what it holds
    (PAIRS, OUT + "    late: {type: file, inputs: [j.late], config: {path: late.jsonl}}\n",
     {"id", "order_id", "_meta"}),
    ("", "    out: {type: file, inputs: [j], config: {path: out.jsonl}}\n", None),
    (PAIRS, OUT + "    all: {type: file, inputs: [j], config: {path: all.jsonl}}\n", None),
    (PAIRS.replace("mappings:", "keep_unmapped: true\n        mappings:"), OUT, None),
    ("""\
    w:
      type: window
      inputs: [j]
      config: {window: {type: tumbling, size: 1m}, time_field: ts, time_unit: ms,
               aggregations: [{field: id, operations: [count]}]}
""", "    out: {type: file, inputs: [w], config: {path: out.jsonl}}\n", None),
])
def test_fields_read_after_a_join(transformations, destinations, expected):
    got = _read(transformations, destinations)
    assert got == (None if expected is None else frozenset(expected))


def test_a_join_feeding_a_mapping_holds_only_what_it_maps(tmp_path: Path):
    events = [{"id": i, "user_id": i % 3, "ts": i * 1000, "event": "click", "pad": "x" * 50}
              for i in range(30)]
    orders = [{"order_id": 100 + i, "user_id": i % 3, "ts": i * 2000, "total": i}
              for i in range(5)]
    for name, rows in (("events", events), ("orders", orders)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flow = tmp_path / "flow.yaml"
    flow.write_text(HEAD + PAIRS + "  destinations:\n" + OUT)
    v = validate_text(flow.read_text(), str(flow))
    held = {step: b.definition().get("held") for step, b in
            shard_builders(compile_validated(v)).items()}
    assert list(held.values()) == [["id", "order_id"]]
    assert run(flow).ok
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = [{"event_id": e["id"], "order_id": o["order_id"]} for e in events for o in orders
            if e["user_id"] == o["user_id"] and e["ts"] // 300_000 == o["ts"] // 300_000]
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, want))
    assert len(want) > 30
