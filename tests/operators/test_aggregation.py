"""The aggregation operator against a plain Python reference, single- and multi-worker."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dataflare import registry
from dataflare.operators.aggregation import AggregationConfig, aggregation
from dataflare.records import get_path
from tests.operators.test_window import FAST, canon, chunks, ref_aggregate, run_flow, streams

AGGS = [
    {"field": "v", "operations": ["count", "sum", "avg", "min", "max", "first", "last"]},
    {"type": "count_distinct", "field": "v", "as": "distinct_v"},
    {"operations": ["count"], "as": "records"},
]


def agg_flow(cfg: AggregationConfig, emit: str = "final") -> Any:
    def build(flow: Any, src: Any) -> dict[str, Any]:
        a = aggregation("agg", src, cfg, emit=emit)
        return {"down": a.down, "errs": a.errs}

    return build


def ref_groups(
    records: list[dict[str, Any]], group_by: list[str], aggs: list[dict[str, Any]], trailing: bool
) -> tuple[list[dict[str, Any]], int]:
    """One record per group (arrival order is the time of first/last); the error count."""
    groups: dict[tuple, list] = defaultdict(list)
    errors = 0
    for i, r in enumerate(records):
        if not isinstance(r.get("v"), int | float | None) or (
            trailing and not isinstance(r.get("ts"), int)
        ):
            errors += 1
            continue
        key = tuple(get_path(r, p) for p in group_by)
        groups[key].append((r["ts"] if trailing else i, r))
    out = []
    for key, items in groups.items():
        rec: dict[str, Any] = {}
        for p, v in zip(group_by, key, strict=True):
            cur = rec
            parts = p.split(".")
            for part in parts[:-1]:
                cur = cur.setdefault(part, {})
            cur[parts[-1]] = v
        rec.update(ref_aggregate(aggs, items))
        if trailing:
            latest = max(t for t, _ in items)
            recent = [(t, r) for t, r in items if latest - t < 10]
            rec.update(
                ref_aggregate([{"field": "v", "operations": ["sum"], "as": "v_10s"}], recent)
            )
        out.append(rec)
    return out, errors


group_bys = st.sampled_from([[], ["user"], ["user", "geo.region"]])


def check_aggregation(records, group_by, sizes, workers, trailing=False):
    aggs = (
        [*AGGS, {"field": "v", "type": "sum", "as": "v_10s", "window": "10s"}] if trailing else AGGS
    )
    cfg = AggregationConfig.model_validate(
        {"group_by": group_by, "aggregations": aggs, "time_field": "ts" if trailing else None}
    )
    got = run_flow(agg_flow(cfg), chunks(records, sizes), workers=workers)
    want, errors = ref_groups(records, group_by, AGGS, trailing)
    assert canon(got["down"]) == canon(want)
    assert len(got["errs"]) == errors


@FAST
@given(streams(), group_bys, st.lists(st.integers(1, 7), max_size=4))
def test_aggregation_matches_reference_single_worker(records, group_by, sizes):
    check_aggregation(records, group_by, sizes, workers=1)


@settings(FAST, max_examples=8)
@given(streams(), group_bys, st.lists(st.integers(1, 7), max_size=4))
def test_aggregation_matches_reference_two_workers(records, group_by, sizes):
    check_aggregation(records, group_by, sizes, workers=2)


@FAST
@given(streams(), group_bys, st.lists(st.integers(1, 7), max_size=4), st.sampled_from([1, 2]))
def test_trailing_range_matches_reference(records, group_by, sizes, workers):
    check_aggregation(records, group_by, sizes, workers=workers, trailing=True)


@FAST
@given(streams(bad=False), st.lists(st.integers(1, 7), max_size=4))
def test_updates_mode_emits_the_running_aggregate(records, sizes):
    cfg = AggregationConfig.model_validate({"group_by": ["user"], "aggregations": AGGS})
    batches = chunks(records, sizes)
    got = run_flow(agg_flow(cfg, emit="updates"), batches)["down"]
    # The last update of each group is the final aggregate; there is at most one update
    # per group per batch.
    last: dict[Any, dict[str, Any]] = {}
    for r in got:
        last[r["user"]] = r
    want, _ = ref_groups(records, ["user"], AGGS, False)
    assert canon(list(last.values())) == canon(want)
    assert len(got) <= sum(len({r.get("user") for r in b}) for b in batches)


def test_seed_config_and_trailing_window():
    seed = {
        "group_by": ["customer_id"],
        "aggregations": [
            {"field": "amount", "operations": ["sum", "avg", "max"], "window": "last_90_days"},
            {"type": "count_distinct", "field": "product_id", "as": "unique_products_purchased"},
        ],
    }
    cfg = AggregationConfig.model_validate(seed)
    assert cfg.aggregations[0].window == 90 * 86400
    with pytest.raises(ValueError, match=r"step 'ltv'.*'amount'.*config.time_field is not set"):
        run_flow(lambda flow, src: {"down": aggregation("ltv", src, cfg).down}, [[]])
    day = 86400
    recs = [
        {"customer_id": 1, "amount": 10, "product_id": "a", "ts": 0},
        {"customer_id": 1, "amount": 20, "product_id": "b", "ts": 100 * day},
        {"customer_id": 1, "amount": 30, "product_id": "a", "ts": 150 * day},
        {"customer_id": 2, "amount": 5, "product_id": "a", "ts": 3 * day},
    ]
    timed = AggregationConfig.model_validate({**seed, "time_field": "ts"})
    got = run_flow(agg_flow(timed), [recs])["down"]
    assert sorted(got, key=lambda r: r["customer_id"]) == [
        {
            "customer_id": 1,
            "amount_sum": 50,
            "amount_avg": 25.0,
            "amount_max": 30,
            "unique_products_purchased": 2,
        },
        {
            "customer_id": 2,
            "amount_sum": 5,
            "amount_avg": 5.0,
            "amount_max": 5,
            "unique_products_purchased": 1,
        },
    ]


def test_errors_name_the_field_and_value():
    cfg = AggregationConfig.model_validate(
        {"group_by": "k", "aggregations": [{"field": "x.y", "operations": ["min", "max"]}]}
    )
    recs = [{"k": 1, "x": {"y": 3}}, {"k": 1, "x": {"y": "3"}}, {"k": 1, "x": {"y": [1]}}]
    got = run_flow(agg_flow(cfg), [recs])
    assert got["down"] == [{"k": 1, "x": {"y_min": 3, "y_max": 3}}]  # dotted names nest
    assert [f.message for f in got["errs"]] == [
        "field 'x.y' is a str ('3'), min/max needs values of one type",
        "field 'x.y' is a list ([1]), min/max needs a number or a string",
    ]
    assert {f.step for f in got["errs"]} == {"agg"}


def test_count_distinct_tells_true_from_one():
    cfg = AggregationConfig.model_validate(
        {"aggregations": [{"field": "v", "operations": ["count_distinct"]}]}
    )
    recs = [{"v": v} for v in (1, True, 1.0, False, 0, "1", None)]
    assert run_flow(agg_flow(cfg), [recs])["down"] == [{"v_count_distinct": 5}]


@pytest.mark.parametrize("abort_at", [0, 1, 3, 6])
@pytest.mark.parametrize("chained", [False, True])
def test_resume_after_abort_gives_the_uninterrupted_output(tmp_path, abort_at, chained,
                                                           monkeypatch):
    import dataflare.operators.keyed as keyed

    if chained:  # snapshots chain the changed groups from the first group on
        monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 1)
    recs = [{"k": i % 4, "v": i, "ts": i} for i in range(40)]
    batches = [recs[i : i + 5] for i in range(0, 40, 5)]
    cfg = AggregationConfig.model_validate({"group_by": "k", "aggregations": AGGS})
    full = run_flow(agg_flow(cfg), batches)["down"]
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*batches[:abort_at], TestingSource.ABORT(), *batches[abort_at:]]
    first = run_flow(agg_flow(cfg), items, epoch_interval=timedelta(0), recovery_config=rc)
    second = run_flow(agg_flow(cfg), items, epoch_interval=timedelta(0), recovery_config=rc)
    assert canon(first["down"] + second["down"]) == canon(full)


def test_resume_with_changed_keys_is_refused(tmp_path):
    batches = [[{"k": i, "j": 1}] for i in range(6)]
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*batches[:3], TestingSource.ABORT(), *batches[3:]]
    old = AggregationConfig.model_validate({"group_by": "k"})
    run_flow(agg_flow(old), items, epoch_interval=timedelta(0), recovery_config=rc)
    new = AggregationConfig.model_validate({"group_by": "j"})
    with pytest.raises(Exception, match=r"step 'agg'.*group_by: \['k'\] -> \['j'\]"):
        run_flow(agg_flow(new), items, epoch_interval=timedelta(0), recovery_config=rc)


def test_unknown_operation_lists_the_known_ones():
    with pytest.raises(ValidationError, match="'count', 'sum', 'avg', 'min', 'max'"):
        AggregationConfig.model_validate({"aggregations": [{"type": "median", "field": "x"}]})
    with pytest.raises(ValidationError, match="invalid trailing range"):
        AggregationConfig.model_validate(
            {"aggregations": [{"type": "sum", "field": "x", "window": "last_month"}]}
        )


def test_registered():
    spec = registry.lookup("transformation", "aggregation")
    assert spec is not None and spec.stateful and spec.config is AggregationConfig


def test_builder_emits_updates_for_unbounded_sources():
    from pathlib import Path

    from dataflare.dsl_compiler import models
    from dataflare.operators.keyed import idle_timeout_of, unbounded_upstream
    from dataflare.registry import BuildContext

    def workflow(mode: str) -> models.Workflow:
        return models.Workflow.model_validate(
            {
                "sources": {
                    "s": {"type": "kafka", "mode": mode, "streaming": {"idle_timeout": "5s"}}
                    if mode == "streaming"
                    else {"type": "file", "mode": mode}
                },
                "transformations": {
                    "m": {"type": "filter", "inputs": ["s"]},
                    "agg": {"type": "aggregation", "inputs": ["m"]},
                },
            }
        )

    cfg = AggregationConfig.model_validate({"group_by": "k"})
    spec = registry.lookup("transformation", "aggregation")
    for mode, emits in (("streaming", 3), ("full", 2)):
        wf = workflow(mode)
        ctx = BuildContext("agg", "transformation", wf.transformations["agg"], cfg, wf, Path("."))
        assert unbounded_upstream(ctx) is (mode == "streaming")
        assert idle_timeout_of(ctx) == (5.0 if mode == "streaming" else None)
        got = run_flow(
            lambda flow, src, ctx=ctx: {"down": spec.build(ctx, [src]).down},
            [[{"k": 1}, {"k": 2}], [{"k": 1}]],
        )["down"]
        assert len(got) == emits
        assert {(r["k"], r["count"]) for r in got} >= {(1, 2), (2, 1)}


@pytest.mark.parametrize("emit", ["final", "updates"])
def test_chained_snapshots_resume_to_the_state_they_were_taken_from(emit, monkeypatch):
    import dataflare.operators.keyed as keyed
    from dataflare.operators.aggregation import _AggregationOp

    monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 2)
    cfg = AggregationConfig.model_validate({"group_by": "k", "aggregations": AGGS})
    op_ = _AggregationOp("agg", cfg, emit, 16)
    shard = op_.build(None)
    chains = []
    for i in range(12):
        shard.process([[{"k": (i * 3 + j) % 7, "v": i * 10 + j, "ts": i} for j in range(3)]])
        snap = shard.snapshot()
        chains.append(len(shard._chain))
        assert op_.build(snap).state == shard.state, i
    assert max(chains) > 2


def test_a_chain_of_snapshots_restarts_by_the_keys_it_holds_not_its_first_size(monkeypatch):
    """A state that grows by new keys is pickled once; keys changed at every epoch are
    not kept more than about twice over (the chain is written whole again)."""
    import dataflare.operators.keyed as keyed
    from dataflare.operators.aggregation import _AggregationOp

    monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 2)
    pickled: list[int] = []
    dump = keyed.dump_state
    monkeypatch.setattr(keyed, "dump_state", lambda state, tree=False: (
        pickled.append(len(state["groups"] if isinstance(state, dict) else state[1])),
        dump(state, tree))[1])
    cfg = AggregationConfig.model_validate({"group_by": "k", "aggregations": AGGS})
    op_ = _AggregationOp("agg", cfg, "final", 16)
    growing = op_.build(None)
    for i in range(10):  # 5 new keys an epoch
        growing.process([[{"k": i * 5 + j, "v": j, "ts": i} for j in range(5)]])
        snap = growing.snapshot()
    assert op_.build(snap).state == growing.state
    assert sum(pickled) == 50, pickled  # each key once, though the chain is 10x its head
    pickled.clear()
    steady = op_.build(None)
    for i in range(10):  # the same 5 keys every epoch
        steady.process([[{"k": j, "v": i, "ts": i} for j in range(5)]])
        snap = steady.snapshot()
        assert steady._chained_keys <= 2 * 5, i
    assert op_.build(snap).state == steady.state
    assert len(steady._chain) < 3
