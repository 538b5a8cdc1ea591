"""Generator source: deterministic records, partitions, resume at an index."""

import random

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, cluster_main, run_main

from dataflare.connectors.generator import (
    GeneratorConfig,
    GeneratorSource,
    make_records,
    record_maker,
)


def collect(config: GeneratorConfig, workers: int = 1) -> list[dict]:
    flow = Dataflow("gen")
    out: list = []
    op.output("out", op.input("in", flow, GeneratorSource("g", config)), TestingSink(out))
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return [r for batch in out for r in batch]


def test_presets_are_deterministic_and_shaped_like_the_benchmark_events():
    config = GeneratorConfig(preset="clickstream", count=2500, batch_size=300, seed=7)
    a, b = collect(config), collect(config.model_copy(update={"batch_size": 1000}))
    strip = [{k: v for k, v in r.items() if k != "_meta"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "_meta"} for r in b]
    assert [r["id"] for r in a] == list(range(2500))
    assert {r["event"] for r in a} == {"view", "click", "add_to_cart", "purchase"}
    assert all(0 <= r["amount"] <= 100 and r["user_id"].startswith("u") for r in a)
    assert a[1]["ts"] - a[0]["ts"] == 10
    assert a[0]["_meta"] == {"generator": "g", "index": 0}


def test_partitions_split_the_index_range_across_workers():
    config = GeneratorConfig(preset="orders", count=1001, partitions=3)
    records = collect(config, workers=2)
    assert sorted(r["order_id"] for r in records) == list(range(1001))


def test_records_do_not_depend_on_where_a_batch_starts():
    make = record_maker(GeneratorConfig(fields={"n": {"type": "int", "min": 0, "max": 10**9}}))
    whole = make_records(make, 1, 0, 3000)
    assert make_records(make, 1, 1500, 700) == whole[1500:2200]
    assert make(0, random.Random(0)) == make(0, random.Random(0))


def test_custom_fields():
    config = GeneratorConfig(count=3, fields={
        "seq": {"type": "sequence", "start": 10, "step": 5},
        "at": {"type": "timestamp", "start": "2024-01-01T00:00:00Z", "step": "1m"},
        "kind": {"type": "choice", "values": ["a"]},
        "c": {"type": "constant", "value": {"x": 1}},
    })
    records = collect(config)
    assert [r["seq"] for r in records] == [10, 15, 20]
    assert [r["at"] for r in records] == ["2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z",
                                          "2024-01-01T00:02:00Z"]
    assert all(r["kind"] == "a" and r["c"] == {"x": 1} for r in records)
