"""Shards of the stateful steps: where bytewax runs them, and the layout saved state keeps."""

from __future__ import annotations

import pickle
import threading
import zlib
from collections import Counter

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.testing import cluster_main

from dataflare.operators.keyed import (
    SHARDS,
    dump_state,
    load_state,
    shard_names,
    shard_of,
    shard_router,
)


def shard_workers(names: tuple[str, ...], workers: int) -> dict[str, int]:
    """The worker bytewax runs each shard on, with ``workers`` workers in this process."""
    worker_of_thread: dict[int, int] = {}
    thread_of_shard: dict[str, int] = {}

    class Names(StatelessSourcePartition[tuple[str, str]]):
        def __init__(self, worker: int) -> None:
            self.batches = iter([[(n, n) for n in names] if worker == 0 else []])

        def next_batch(self) -> list[tuple[str, str]]:
            return next(self.batches)

    class PerWorker(DynamicSource[tuple[str, str]]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> Names:
            worker_of_thread[threading.get_ident()] = worker_index
            return Names(worker_index)

    class Shard(StatefulBatchLogic[str, None, None]):
        def on_batch(self, values: list[str]) -> tuple[list[None], bool]:
            thread_of_shard[values[0]] = threading.get_ident()  # the shard's own name
            return [], StatefulBatchLogic.DISCARD

        def snapshot(self) -> None:
            return None

    flow = Dataflow("shards")
    keyed = op.input("names", flow, PerWorker())
    op.inspect("none", op.stateful_batch("shards", keyed, lambda resume: Shard()))
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return {name: worker_of_thread[t] for name, t in thread_of_shard.items()}


@pytest.mark.parametrize("workers", [2, 3, 4, 5, 6, 7, 8])
def test_the_shards_spread_evenly_over_the_workers(workers: int) -> None:
    names = shard_names(SHARDS)
    where = shard_workers(names, workers)
    assert set(where) == set(names)
    per_worker = Counter(where.values())
    assert len(per_worker) == workers
    assert max(per_worker.values()) - min(per_worker.values()) <= 1
    if SHARDS % workers == 0:  # shard i on worker i % workers
        assert [where[n] for n in names] == [i % workers for i in range(SHARDS)]


def test_sequential_shard_names_were_uneven() -> None:
    # Why the names are chosen: "000".."015" (before 2026-12-04) went 9:7 over 2 workers.
    assert sorted(Counter(shard_workers(shard_names(16), 2).values()).values()) == [7, 9]


def test_16_shards_are_the_layout_state_was_saved_in_before() -> None:
    # config.state_shards: 16 must route every key as DataFlare did, so it meets its state.
    assert shard_names(16) == tuple(f"{i:03d}" for i in range(16))
    keys = [f"u{i}" for i in range(500)]
    routed = shard_router(lambda r: r["k"], 16)([{"k": k} for k in keys])
    for name, batch in routed:
        for rec in batch:
            assert int(name) == zlib.crc32(repr(rec["k"]).encode()) % 16
            assert shard_of(rec["k"], 16) == int(name)


def test_snapshots_are_compressed_and_uncompressed_ones_still_load() -> None:
    state = {f"user-{i}": [i, i * 1_000_000, [1, 2, 2.5]] for i in range(10_000)}
    for tree in (True, False):
        blob = dump_state(state, tree)
        assert blob[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
        assert len(blob) < len(pickle.dumps(state)) / 3
        assert load_state(blob) == state
    assert load_state(pickle.dumps(state)) == state  # written before 2026-12-04
