"""The window operator against a plain Python reference, single- and multi-worker."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dataflare import registry
from dataflare.operators.aggregates import OPERATIONS
from dataflare.operators.keyed import iso_us, load_state
from dataflare.operators.window import WindowConfig, _WindowOp, window
from dataflare.records import get_path

US = 1_000_000
# Each example runs a dataflow: few examples, and no shrinking (print_blob to replay).
FAST = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    print_blob=True,
)


# ---------------------------------------------------------------- reference model


def ref_aggregate(aggs: list[dict[str, Any]], items: list[tuple[int, dict[str, Any]]]) -> dict:
    """Aggregates of (time, record) pairs, in arrival order, computed the obvious way."""
    out: dict[str, Any] = {}
    for agg in aggs:
        ops = list(agg.get("operations", ())) or [agg["type"]]
        fld = agg.get("field")
        base = agg.get("as") or fld
        for o in ops:
            name = agg["as"] if agg.get("as") and len(ops) == 1 else (f"{base}_{o}" if base else o)
            if fld is None:
                out[name] = len(items)
                continue
            vals = [(t, get_path(r, fld)) for t, r in items if get_path(r, fld) is not None]
            xs = [v for _, v in vals]
            if o == "count":
                out[name] = len(xs)
            elif o == "sum":
                out[name] = sum(xs) if xs else None
            elif o == "avg":
                out[name] = sum(xs) / len(xs) if xs else None
            elif o == "min":
                out[name] = min(xs) if xs else None
            elif o == "max":
                out[name] = max(xs) if xs else None
            elif o == "count_distinct":
                out[name] = len({(x,) if isinstance(x, bool) else x for x in xs})
            elif o == "first":
                out[name] = (
                    min(enumerate(vals), key=lambda iv: (iv[1][0], iv[0]))[1][1] if xs else None
                )
            elif o == "last":
                out[name] = (
                    max(enumerate(vals), key=lambda iv: (iv[1][0], iv[0]))[1][1] if xs else None
                )
    return out


def ref_windows(
    records: list[dict[str, Any]],
    window_spec: dict[str, Any],
    group_by: list[str],
    aggs: list[dict[str, Any]],
    lateness: int,
) -> tuple[list[dict], list[dict], int]:
    """(window records, late records, error count) of a record sequence; times in seconds."""
    groups: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
    latest: dict[Any, int] = {}
    late, errors = [], 0
    for r in records:
        t = r.get("ts")
        if not isinstance(t, int):
            errors += 1
            continue
        key = tuple(get_path(r, p) for p in group_by)
        if key in latest and t < latest[key] - lateness:
            late.append(r)  # a late record is not aggregated: its values are not read
            continue
        if not isinstance(r.get("v"), int | float | None):
            errors += 1
            continue
        latest[key] = max(latest.get(key, t), t)
        groups[key].append((t, r))
    out = []
    for key, items in groups.items():
        if window_spec["type"] == "session":
            gap = window_spec["gap"]
            order = sorted(range(len(items)), key=lambda i: items[i][0])
            sessions: list[list[int]] = []
            for i in order:
                if sessions and items[i][0] - items[sessions[-1][-1]][0] < gap:
                    sessions[-1].append(i)
                else:
                    sessions.append([i])
            spans = [
                (items[s[0]][0], items[s[-1]][0], [items[i] for i in sorted(s)]) for s in sessions
            ]
        else:
            size = window_spec["size"]
            slide = window_spec.get("slide", size)
            by_start: dict[int, list] = defaultdict(list)
            for t, r in items:
                start = (t // slide) * slide
                while start > t - size:
                    by_start[start].append((t, r))
                    start -= slide
            spans = [(s, s + size, its) for s, its in by_start.items()]
        for start, end, its in spans:
            rec: dict[str, Any] = {}
            for p, v in zip(group_by, key, strict=True):
                cur = rec
                parts = p.split(".")
                for part in parts[:-1]:
                    cur = cur.setdefault(part, {})
                cur[parts[-1]] = v
            rec["window_start"] = iso_us(start * US)
            rec["window_end"] = iso_us(end * US)
            rec.update(ref_aggregate(aggs, its))
            out.append(rec)
    return out, late, errors


# ---------------------------------------------------------------- running the operator


def run_flow(
    build: Callable[[Dataflow, Any], dict[str, Any]],
    batches: list[Any],
    workers: int = 1,
    **run: Any,
) -> dict[str, list[Any]]:
    """Run a flow whose input is ``batches``; the flattened items of each named output."""
    flow = Dataflow("test")
    src = op.input("in", flow, TestingSource(batches))
    outs: dict[str, list[Any]] = {}
    for name, stream in build(flow, src).items():
        outs[name] = []
        op.output(f"out_{name}", stream, TestingSink(outs[name]))
    if workers == 1:
        run_main(flow, **run)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers, **run)
    return {name: [r for b in items for r in b] for name, items in outs.items()}


def canon(records: list[Any]) -> list[str]:
    """A multiset of records, as sorted JSON (floats rounded)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return sorted(json.dumps(fix(r), sort_keys=True, default=str) for r in records)


def window_flow(cfg: WindowConfig, **kw: Any) -> Callable[[Dataflow, Any], dict[str, Any]]:
    def build(flow: Dataflow, src: Any) -> dict[str, Any]:
        w = window("win", src, cfg, **kw)
        return {"down": w.down, "late": w.late, "errs": w.errs}

    return build


def chunks(records: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, i, k = [], 0, 0
    while i < len(records):
        n = sizes[k % len(sizes)] if sizes else 3
        out.append(records[i : i + n])
        i += n
        k += 1
    return out


# ---------------------------------------------------------------- generated streams

window_specs = st.one_of(
    st.builds(lambda s: {"type": "tumbling", "size": s}, st.integers(1, 15)),
    st.tuples(st.integers(1, 6), st.integers(1, 4)).map(
        lambda ab: {"type": "sliding", "size": ab[0] * ab[1], "slide": ab[1]}
    ),
    st.tuples(st.integers(2, 12), st.integers(1, 12))
    .filter(lambda ab: ab[1] <= ab[0])
    .map(lambda ab: {"type": "sliding", "size": ab[0], "slide": ab[1]}),
    st.builds(lambda g: {"type": "session", "gap": g}, st.integers(1, 8)),
)

values = st.one_of(st.integers(-5, 20), st.sampled_from([0.25, 1.5, -2.75]), st.none())


@st.composite
def streams(draw: Any, bad: bool = True) -> list[dict[str, Any]]:
    """Records with a few keys, times drifting forward with jitter (out of order, late)."""
    n = draw(st.integers(0, 40))
    t = draw(st.integers(0, 30))
    out = []
    for i in range(n):
        t += draw(st.integers(0, 4))
        jitter = draw(st.sampled_from([0, 0, 0, -1, -3, -8, -20]))
        rec: dict[str, Any] = {"id": i, "ts": max(0, t + jitter)}
        user = draw(st.sampled_from(["a", "b", "c", None, "missing"]))
        if user != "missing":
            rec["user"] = user
        rec["geo"] = {"region": draw(st.sampled_from(["eu", "us"]))}
        v = draw(values)
        if v is not None or draw(st.booleans()):
            rec["v"] = v
        rec["_meta"] = {"file": "gen", "line": i}
        if bad and draw(st.integers(0, 30)) == 0:
            rec[draw(st.sampled_from(["ts", "v"]))] = "oops"
        out.append(rec)
    return out


ALL_AGGS = [
    {"field": "v", "operations": ["count", "sum", "avg", "min", "max", "first", "last"]},
    {"type": "count_distinct", "field": "v", "as": "distinct_v"},
    {"operations": ["count"], "as": "records"},
]
group_bys = st.sampled_from([[], ["user"], ["user", "geo.region"]])


# Without min and max the aggregates merge, so sliding windows are cut into panes.
PANE_AGGS = [
    {"field": "v", "operations": ["count", "sum", "avg", "first", "last"]},
    {"type": "count_distinct", "field": "v", "as": "distinct_v"},
    {"operations": ["count"], "as": "records"},
]
sliding_specs = st.tuples(st.integers(1, 12), st.integers(1, 12)).map(
    lambda ab: {"type": "sliding", "size": max(ab), "slide": min(ab)}
)


def check_window(records, spec, group_by, lateness, sizes, workers, aggs=ALL_AGGS):
    cfg = WindowConfig.model_validate(
        {
            "window": spec,
            "time_field": "ts",
            "group_by": group_by,
            "allowed_lateness": f"{lateness}s",
            "aggregations": aggs,
        }
    )
    frozen = json.dumps(records, sort_keys=True)
    got = run_flow(window_flow(cfg), chunks(records, sizes), workers=workers)
    assert json.dumps(records, sort_keys=True) == frozen, "input records were changed"
    want, late, errors = ref_windows(records, spec, group_by, aggs, lateness)
    assert canon(got["down"]) == canon(want)
    assert canon(got["late"]) == canon(late)
    assert len(got["errs"]) == errors
    assert all(f.step == "win" for f in got["errs"])


@FAST
@given(
    streams(),
    window_specs,
    group_bys,
    st.sampled_from([0, 2, 10]),
    st.lists(st.integers(1, 7), max_size=4),
)
def test_window_matches_reference_single_worker(records, spec, group_by, lateness, sizes):
    check_window(records, spec, group_by, lateness, sizes, workers=1)


@settings(FAST, max_examples=8)
@given(
    streams(),
    window_specs,
    group_bys,
    st.sampled_from([0, 5]),
    st.lists(st.integers(1, 7), max_size=4),
)
def test_window_matches_reference_two_workers(records, spec, group_by, lateness, sizes):
    check_window(records, spec, group_by, lateness, sizes, workers=2)


@FAST
@given(
    streams(),
    sliding_specs,
    group_bys,
    st.sampled_from([0, 2, 10]),
    st.lists(st.integers(1, 7), max_size=4),
)
def test_sliding_panes_match_reference_single_worker(records, spec, group_by, lateness, sizes):
    check_window(records, spec, group_by, lateness, sizes, workers=1, aggs=PANE_AGGS)


@settings(FAST, max_examples=8)
@given(
    streams(),
    sliding_specs,
    group_bys,
    st.sampled_from([0, 5]),
    st.lists(st.integers(1, 7), max_size=4),
)
def test_sliding_panes_match_reference_two_workers(records, spec, group_by, lateness, sizes):
    check_window(records, spec, group_by, lateness, sizes, workers=2, aggs=PANE_AGGS)


def test_sliding_windows_use_panes_of_the_gcd_when_aggregates_merge():
    def op_of(aggs):
        cfg = WindowConfig.model_validate(
            {"window": {"type": "sliding", "size": "10s", "slide": "4s"}, "aggregations": aggs}
        )
        return _WindowOp("w", cfg, 16, None)

    merging = op_of(PANE_AGGS)
    assert merging.pane == 2 * US and merging.definition["window.pane"] == 2 * US
    assert op_of(ALL_AGGS).pane == 0  # min/max check types per window: one update each


def test_sliding_panes_fire_on_idle_timeout():
    cfg = WindowConfig.model_validate(
        {"window": {"type": "sliding", "size": "1h", "slide": "30m"}, "time_field": "ts",
         "group_by": ["k"]}
    )
    items = [
        [{"k": "a", "ts": 1}],
        TestingSource.PAUSE(timedelta(milliseconds=400)),
        [{"k": "a", "ts": 2}, {"k": "a", "ts": 5000}],
    ]
    got = run_flow(window_flow(cfg, idle_timeout=0.05), items)
    assert sorted((r["window_start"], r["count"]) for r in got["down"]) == [
        ("1969-12-31T23:30:00Z", 1),
        ("1970-01-01T00:00:00Z", 1),
        ("1970-01-01T00:30:00Z", 1),
        ("1970-01-01T01:00:00Z", 1),
    ]
    assert got["late"] == [{"k": "a", "ts": 2}]


# ---------------------------------------------------------------- specific behaviour


def test_session_gap_exactly_at_boundary_splits():
    recs = [{"k": 1, "ts": t} for t in (0, 4, 9, 10, 20)]
    cfg = WindowConfig.model_validate(
        {"window": {"type": "session", "gap": "5s"}, "time_field": "ts", "group_by": ["k"]}
    )
    got = run_flow(window_flow(cfg), [recs])["down"]
    spans = sorted((r["window_start"], r["window_end"], r["count"]) for r in got)
    assert spans == [
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:04Z", 2),
        ("1970-01-01T00:00:09Z", "1970-01-01T00:00:10Z", 2),
        ("1970-01-01T00:00:20Z", "1970-01-01T00:00:20Z", 1),
    ]


def test_out_of_order_record_bridges_two_sessions():
    recs = [{"ts": 0}, {"ts": 10}, {"ts": 5}]
    cfg = WindowConfig.model_validate(
        {"window": {"type": "session", "gap": "6s"}, "time_field": "ts", "allowed_lateness": "20s"}
    )
    got = run_flow(window_flow(cfg), [recs[:2], recs[2:]])["down"]
    assert [(r["window_start"], r["window_end"], r["count"]) for r in got] == [
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:10Z", 3)
    ]


def test_windows_close_on_watermark_before_end_of_input():
    recs = [{"k": "a", "ts": 1}, {"k": "a", "ts": 2}, {"k": "a", "ts": 12}]
    cfg = WindowConfig.model_validate(
        {"window": {"type": "tumbling", "size": "10s"}, "time_field": "ts", "group_by": ["k"]}
    )
    flow = Dataflow("close")
    src = op.input("in", flow, TestingSource([recs, TestingSource.ABORT(), [{"k": "a", "ts": 30}]]))
    out: list[Any] = []
    op.output("o", window("win", src, cfg).down, TestingSink(out))
    run_main(flow)
    # The first window closed when ts 12 arrived, before the input was cut off.
    assert [r for b in out for r in b] == [
        {
            "k": "a",
            "window_start": "1970-01-01T00:00:00Z",
            "window_end": "1970-01-01T00:00:10Z",
            "count": 2,
        }
    ]


def test_iso_times_milliseconds_and_nested_output():
    recs = [
        {"u": {"id": 7}, "at": "2024-01-01T00:00:59.999Z", "amount": 2},
        {"u": {"id": 7}, "at": "2024-01-01T01:00:30+01:00", "amount": 3},
        {"u": {"id": 7}, "at": "2024-01-01T00:01:00", "amount": 5},
    ]
    cfg = WindowConfig.model_validate(
        {
            "window": {"type": "tumbling", "size": "1m"},
            "time_field": "at",
            "allowed_lateness": "1m",
            "group_by": "u.id",
            "aggregations": [{"field": "amount", "operations": ["sum"], "as": "total"}],
        }
    )
    got = run_flow(window_flow(cfg), [recs])["down"]
    assert sorted(got, key=lambda r: r["window_start"]) == [
        {
            "u": {"id": 7},
            "window_start": "2024-01-01T00:00:00Z",
            "window_end": "2024-01-01T00:01:00Z",
            "total": 5,
        },
        {
            "u": {"id": 7},
            "window_start": "2024-01-01T00:01:00Z",
            "window_end": "2024-01-01T00:02:00Z",
            "total": 5,
        },
    ]
    ms = WindowConfig.model_validate(
        {"window": {"type": "tumbling", "size": "100ms"}, "time_field": "t", "time_unit": "ms"}
    )
    got = run_flow(window_flow(ms), [[{"t": 1700000000300}, {"t": 1700000000399}]])["down"]
    assert got == [
        {
            "window_start": "2023-11-14T22:13:20.300Z",
            "window_end": "2023-11-14T22:13:20.400Z",
            "count": 2,
        }
    ]


def test_bad_values_go_to_errors_without_touching_the_window():
    cfg = WindowConfig.model_validate(
        {
            "window": {"type": "tumbling", "size": "10s"},
            "time_field": "ts",
            "aggregations": [{"field": "amount", "operations": ["sum", "max"]}, {"type": "count"}],
        }
    )
    recs = [
        {"ts": 1, "amount": 2},
        {"ts": 2, "amount": "12,5"},
        {"ts": "x"},
        ["not", "an", "object"],
        {"ts": 3, "amount": 1},
    ]
    got = run_flow(window_flow(cfg), [recs])
    assert got["down"][0]["amount_sum"] == 3
    assert got["down"][0]["count"] == 2
    messages = sorted(f.message for f in got["errs"])
    assert "field 'amount' is a str ('12,5'), sum/avg needs a number" in messages
    assert any("time field 'ts'" in m and "'x'" in m for m in messages)
    assert any(m.startswith("the record is not an object") for m in messages)


def test_idle_timeout_fires_open_windows():
    cfg = WindowConfig.model_validate(
        {"window": {"type": "tumbling", "size": "1h"}, "time_field": "ts", "group_by": ["k"]}
    )
    items = [
        [{"k": "a", "ts": 1}],
        TestingSource.PAUSE(timedelta(milliseconds=400)),
        [{"k": "a", "ts": 2}, {"k": "a", "ts": 5000}],
    ]
    got = run_flow(window_flow(cfg, idle_timeout=0.05), items)
    # The first record's window fired while the input paused; the next record for the
    # same window is late.
    assert sorted((r["window_start"], r["count"]) for r in got["down"]) == [
        ("1970-01-01T00:00:00Z", 1),
        ("1970-01-01T01:00:00Z", 1),
    ]
    assert got["late"] == [{"k": "a", "ts": 2}]


# ---------------------------------------------------------------- recovery

RECOVERY_RECORDS = [{"u": i % 3, "ts": i * 2 + (i % 4 == 3) * -5, "v": i} for i in range(60)]
RECOVERY_BATCHES = [RECOVERY_RECORDS[i : i + 4] for i in range(0, 60, 4)]


def recovery_cfg(size: str = "10s", kind: str = "tumbling") -> WindowConfig:
    spec: dict[str, Any] = {"type": kind, "gap" if kind == "session" else "size": size}
    if kind == "sliding":
        spec["slide"] = "4s"  # panes of 2 s
    return WindowConfig.model_validate(
        {
            "window": spec,
            "time_field": "ts",
            "group_by": ["u"],
            "allowed_lateness": "4s",
            "aggregations": [{"field": "v", "operations": ["sum", "first", "last"]}],
        }
    )


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
@pytest.mark.parametrize("abort_at", [0, 1, 2, 4, 7, 14])
@pytest.mark.parametrize("chained", [False, True])
def test_resume_after_abort_gives_the_uninterrupted_output(tmp_path, kind, abort_at, chained,
                                                           monkeypatch):
    import dataflare.operators.keyed as keyed

    if chained:  # snapshots chain the changed groups from the first group on
        monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 1)
    size = "3s" if kind == "session" else "10s"
    full = run_flow(window_flow(recovery_cfg(size, kind)), RECOVERY_BATCHES)
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*RECOVERY_BATCHES[:abort_at], TestingSource.ABORT(), *RECOVERY_BATCHES[abort_at:]]
    build = window_flow(recovery_cfg(size, kind))
    first = run_flow(build, items, epoch_interval=timedelta(0), recovery_config=rc)
    second = run_flow(build, items, epoch_interval=timedelta(0), recovery_config=rc)
    for name in ("down", "late"):
        assert canon(first[name] + second[name]) == canon(full[name])


def test_resume_with_changed_window_is_refused(tmp_path):
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*RECOVERY_BATCHES[:5], TestingSource.ABORT(), *RECOVERY_BATCHES[5:]]
    run_flow(
        window_flow(recovery_cfg("10s")), items, epoch_interval=timedelta(0), recovery_config=rc
    )
    with pytest.raises(Exception, match=r"step 'win'.*window\.size: 10\.0 -> 20\.0"):
        run_flow(
            window_flow(recovery_cfg("20s")), items, epoch_interval=timedelta(0), recovery_config=rc
        )


# ---------------------------------------------------------------- config


SEED = {
    "window": {"type": "sliding", "size": "5m", "slide": "1m"},
    "group_by": ["user_id"],
    "aggregations": [{"field": "event", "operations": ["count"], "as": "click_count"}],
}


def test_seed_config_validates():
    cfg = WindowConfig.model_validate(SEED)
    assert (cfg.window.size, cfg.window.slide) == (300.0, 60.0)
    assert cfg.aggregations[0].output_names() == ["click_count"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aggregations": [{"field": "x", "operations": ["summ"]}]}, "'count', 'sum', 'avg'"),
        ({"window": {"type": "hopping", "size": "1m"}}, "'tumbling', 'sliding' or 'session'"),
        ({"window": {"type": "sliding", "size": "1m", "slide": "2m"}}, "at most 'size'"),
        ({"window": {"type": "session"}}, "needs a positive 'gap'"),
        ({"windw": {}}, "Extra inputs are not permitted"),
        (
            {
                "aggregations": [
                    {"field": "a", "operations": ["sum"], "as": "n"},
                    {"field": "b", "operations": ["max"], "as": "n"},
                ]
            },
            "'n' is written twice",
        ),
    ],
)
def test_bad_config_is_refused_with_alternatives(change, message):
    with pytest.raises(ValidationError, match=message):
        WindowConfig.model_validate({**SEED, **change})


def test_every_operation_is_known():
    assert set(OPERATIONS) == {
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "count_distinct",
        "first",
        "last",
    }


def test_registered_as_stateful_transformation():
    spec = registry.lookup("transformation", "window")
    assert spec is not None and spec.stateful and spec.config is WindowConfig
    assert spec.named_outputs is not None and spec.named_outputs(None) == ["late"]


def test_late_records_are_counted_in_a_metric():
    from dataflare.metrics import LATE_RECORDS, value

    before = value(LATE_RECORDS, step="win")
    cfg = WindowConfig.model_validate(
        {"window": {"type": "tumbling", "size": "10s"}, "time_field": "ts"}
    )
    got = run_flow(window_flow(cfg), [[{"ts": 30}, {"ts": 1}, {"ts": 2}, {"ts": 31}]])
    assert len(got["late"]) == 2
    assert value(LATE_RECORDS, step="win") == before + 2


def test_snapshots_are_skipped_only_while_runs_keep_no_recovery():
    from dataflare.operators.keyed import run_recovery, skip_snapshots

    cfg = WindowConfig.model_validate({"window": {"type": "tumbling", "size": "10s"},
                                       "time_field": "ts"})
    shard = _WindowOp("w", cfg, 16, None).build(None)
    shard.process([[{"ts": 1}]])
    assert not skip_snapshots() and load_state(shard.snapshot()[1])  # by default: taken
    with run_recovery(False):
        assert skip_snapshots() and shard.snapshot()[1] == b""  # discarded by bytewax anyway
        with run_recovery(True):  # another run in the process keeps recovery: taken
            assert not skip_snapshots() and load_state(shard.snapshot()[1])
    assert not skip_snapshots()


@pytest.mark.parametrize("kind", ["tumbling", "sliding", "session"])
def test_snapshot_without_memo_resumes_to_the_same_output(kind):
    # Window state is pickled without pickle's memo (``tree_state``): a shard restored
    # from its snapshot must go on exactly as the shard it was taken from.
    cfg = WindowConfig.model_validate({
        "window": {"type": kind, "gap" if kind == "session" else "size": "10s",
                   **({"slide": "4s"} if kind == "sliding" else {})},
        "time_field": "ts", "group_by": ["u"],
        "aggregations": [{"field": "v", "operations": ["sum", "first", "last", "count_distinct",
                                                       "min"]}],
    })
    op_ = _WindowOp("w", cfg, 16, None)
    shard = op_.build(None)
    assert shard.tree_state
    shard.process(RECOVERY_BATCHES[:7])
    resumed = op_.build(shard.snapshot())
    assert resumed.state == shard.state
    rest = RECOVERY_BATCHES[7:]

    def rest_of(s: Any) -> list[Any]:
        return [rec for _, batch in s.process(rest) + s.flush() for rec in batch]

    assert canon(rest_of(resumed)) == canon(rest_of(shard))


def test_state_with_shared_records_keeps_the_memo():
    from dataflare.operators.aggregates import collect_records
    from dataflare.operators.keyed import pickle_tree

    cfg = WindowConfig.model_validate({"window": {"type": "sliding", "size": "10s",
                                                  "slide": "5s"}, "time_field": "ts"})
    assert not _WindowOp("w", cfg, 16, None, accs=collect_records()).build(None).tree_state
    looped: list[Any] = [1]
    looped.append(looped)  # a cycle is pickled with the memo rather than failing
    restored = pickle.loads(pickle_tree(looped))  # noqa: S301
    assert restored[1] is restored


@settings(FAST, max_examples=300)
@given(st.one_of(
    st.integers(-62135596800 * US, 253402300799 * US + US - 1),  # years 1 to 9999
    st.integers(-62135596800 * 1000, 253402300799 * 1000).map(lambda ms: ms * 1000),
    st.integers(-62135596800, 253402300799).map(lambda s: s * US),
))
def test_window_bounds_text_is_the_iso_text_of_the_instant(us):
    from types import SimpleNamespace

    from dataflare.operators.window import _Output

    out = _Output(("k",), SimpleNamespace(finish=None))  # type: ignore[arg-type]
    assert out.iso(us) == iso_us(us)
    assert out.iso(us) == iso_us(us)  # cached


def test_one_open_window_is_held_inline_and_a_dict_only_while_two_are():
    cfg = WindowConfig.model_validate({
        "window": {"type": "tumbling", "size": "10s"}, "time_field": "ts", "group_by": ["u"],
        "allowed_lateness": "5s", "aggregations": [{"field": "v", "operations": ["sum"]}],
    })
    shard = _WindowOp("w", cfg, 16, None).build(None)

    def step(*times: int) -> list[tuple[str, int]]:
        out = shard.process([[{"u": "a", "ts": t, "v": t} for t in times]])
        return [(r["window_start"], r["v_sum"]) for _, batch in out for r in batch]

    def windows() -> Any:
        return shard.state["a"][2]

    assert step(1) == []
    assert windows() == [1, 1, 1]  # one window [0, 10): its accumulator
    assert step(12, 8) == []  # [10, 20) opens while [0, 10) is open (watermark 7 s)
    assert windows() == {0: [2, 2, 9], 10 * US: [1, 1, 12]}
    assert step(16) == [("1970-01-01T00:00:00Z", 9)]  # watermark 11 s: [0, 10) closes
    assert windows() == [2, 2, 28]  # [10, 20) alone again: inline
    assert step(26) == [("1970-01-01T00:00:10Z", 28)]  # opens [20, 30), closes [10, 20)
    assert windows() == [1, 1, 26]
    assert shard.state["a"][3] == 30 * US
    assert [(r["window_start"], r["v_sum"]) for r in shard.flush()[0][1]] == [
        ("1970-01-01T00:00:20Z", 26)
    ]


@pytest.mark.parametrize("kind", ["tumbling", "sliding"])
def test_snapshot_of_the_dict_layout_resumes_to_the_same_output(kind):
    # Snapshots taken before the inline layout hold each group's windows as a dict, also
    # with one window or none: resumed, the shard holds the new layout and goes on as
    # the shard the snapshot was taken from.
    cfg = WindowConfig.model_validate({
        "window": {"type": kind, "size": "10s", **({"slide": "4s"} if kind == "sliding" else {})},
        "time_field": "ts", "group_by": ["u"], "allowed_lateness": "4s",
        "aggregations": [{"field": "v", "operations": ["sum", "min", "last"]}],  # no panes
    })
    op_ = _WindowOp("w", cfg, 16, None)
    shard = op_.build(None)
    shard.process(RECOVERY_BATCHES[:7])
    layouts = {g[2].__class__ for g in shard.state.values()}
    # groups with one window and with several (sliding windows overlap)
    assert layouts == ({list, dict} if kind == "tumbling" else {dict})

    def dict_layout(g: list[Any]) -> dict[int, Any]:
        wins = g[2]
        return {g[3] - 10 * US: wins} if isinstance(wins, list) else wins or {}

    old = {key: [g[0], g[1], dict_layout(g), g[3]] for key, g in shard.state.items()}
    old["idle"] = [5 * US, 5 * US, {}, 1 << 62]  # its windows were emitted by the idle timeout
    resumed = op_.build((op_.definition, pickle.dumps(old)))
    assert resumed.state.pop("idle") == [5 * US, 5 * US, None, 1 << 62]
    assert resumed.state == shard.state
    rest = RECOVERY_BATCHES[7:]

    def rest_of(s: Any) -> list[Any]:
        return [rec for _, batch in s.process(rest) + s.flush() for rec in batch]

    assert canon(rest_of(resumed)) == canon(rest_of(shard))


CHAIN_KINDS = [("tumbling", {}), ("sliding", {"slide": "4s"}), ("session", {})]


@pytest.mark.parametrize(("kind", "extra"), CHAIN_KINDS)
@pytest.mark.parametrize("ops", [["sum", "first", "last"], ["sum", "min", "last"]])
def test_snapshots_of_a_large_state_chain_the_changed_groups(kind, extra, ops, monkeypatch):
    # From CHAIN_MIN_KEYS groups a snapshot holds the last whole state and the groups
    # changed since, until the chain holds twice the state's groups: resumed from any
    # snapshot, a shard holds the state it was taken from and goes on as that shard would.
    # (Panes: sum/first/last.) One record per epoch, so an epoch changes one group of three.
    import dataflare.operators.keyed as keyed

    monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 2)
    cfg = WindowConfig.model_validate({
        "window": {"type": kind, "gap" if kind == "session" else "size": "10s", **extra},
        "time_field": "ts", "group_by": ["u"], "allowed_lateness": "4s",
        "aggregations": [{"field": "v", "operations": ops}],
    })
    op_ = _WindowOp("w", cfg, 16, None)
    shard = op_.build(None)
    frames = []
    for i, record in enumerate(RECOVERY_RECORDS):
        shard.process([[record]])
        if i == 30:
            shard.idle()  # every group changes: the next snapshot is whole
        snap = shard.snapshot()
        frames.append(len(shard._chain))
        resumed = op_.build(snap)
        assert resumed.state == shard.state, i
    # whole from 2 groups; the third group and 3 changes chained; 7 > 2 x 3: whole again
    assert frames[:7] == [1, 1, 2, 3, 4, 5, 1]
    assert frames[30] == 1  # ...whole after idle()
    assert max(frames[31:]) > 2 and 1 in frames[32:]
    more = [[{"u": u, "ts": 200 + t, "v": t} for u in range(5) for t in range(3)]]

    def rest_of(s: Any) -> list[Any]:
        return [rec for _, batch in s.process(more) + s.flush() for rec in batch]

    assert canon(rest_of(op_.build(shard.snapshot()))) == canon(rest_of(shard))
