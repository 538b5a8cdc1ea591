"""The join operator against a plain Python reference, single- and multi-worker.

Both sides come from one source of ``(side, batch)`` items, each its own epoch, so the
order in which the join sees the two sides is the order of the list, on any number of
workers.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from datetime import timedelta
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dataflare import registry
from dataflare.operators.join import JoinConfig, join
from tests.operators.test_window import FAST, canon, run_flow

EPOCHS = {"epoch_interval": timedelta(0)}


def join_flow(cfg: JoinConfig, fields: frozenset[str] | None = None) -> Any:
    def build(flow: Any, src: Any) -> dict[str, Any]:
        left = op.filter_map("left", src, lambda item: item[1] if item[0] == "L" else None)
        right = op.filter_map("right", src, lambda item: item[1] if item[0] == "R" else None)
        j = join("jn", left, right, cfg, fields=fields)
        return {"down": j.down, "late": j.late, "errs": j.errs}

    return build


def combine(left: Any, right: Any, prefix: dict[str, str] | None) -> dict[str, Any]:
    """A joined record: made of two, it has no source position (no ``_meta``)."""

    def strip(r: Any) -> Any:
        return None if r is None else {k: v for k, v in r.items() if k != "_meta"}

    if prefix:
        return {prefix["left"]: strip(left), prefix["right"]: strip(right)}
    return {**(strip(right) or {}), **(strip(left) or {})}


def ref_join(
    items: list[tuple[str, list[dict[str, Any]]]],
    join_type: str,
    window: dict[str, Any] | None,
    lateness: int,
    prefix: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(joined records, late records); key ``k``, time ``ts`` (seconds)."""
    keep_left = join_type in ("left", "full")
    keep_right = join_type in ("right", "full")
    out: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    latest: dict[Any, int] = {}
    kept: dict[Any, list[tuple[str, int, dict]]] = defaultdict(list)
    for side, batch in items:
        # A batch (one epoch here) is judged against the watermark before it.
        before = dict(latest)
        for r in batch:
            key = r.get("k")
            if key is None:
                if side == "L" and keep_left:
                    out.append(combine(r, None, prefix))
                if side == "R" and keep_right:
                    out.append(combine(None, r, prefix))
                continue
            if window is not None:
                t = r["ts"]
                if key in before and t < before[key] - lateness:
                    late.append(r)
                    continue
                latest[key] = max(latest.get(key, t), t)
            kept[key].append((side, r.get("ts", 0), r))

    def relational(group: list[tuple[str, int, dict]]) -> None:
        lefts = [r for s, _, r in group if s == "L"]
        rights = [r for s, _, r in group if s == "R"]
        if lefts and rights:
            out.extend(combine(lf, rt, prefix) for rt in rights for lf in lefts)
        elif lefts and keep_left:
            out.extend(combine(lf, None, prefix) for lf in lefts)
        elif rights and keep_right:
            out.extend(combine(None, rt, prefix) for rt in rights)

    for group in kept.values():
        if window is None:
            relational(group)
        elif window["type"] == "session":
            ordered = sorted(group, key=lambda x: x[1])
            sessions: list[list] = []
            for x in ordered:
                if sessions and x[1] - sessions[-1][-1][1] < window["gap"]:
                    sessions[-1].append(x)
                else:
                    sessions.append([x])
            for s in sessions:
                relational(s)
        else:
            size = window["size"]
            slide = window.get("slide", size)
            by_start: dict[int, list] = defaultdict(list)
            for x in group:
                start = (x[1] // slide) * slide
                while start > x[1] - size:
                    by_start[start].append(x)
                    start -= slide
            for g in by_start.values():
                relational(g)
    return out, late


@st.composite
def sides(draw: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    """Batches of left and right records: a few keys, times with jitter, null keys."""
    items = []
    t = 0
    n = 0
    for _ in range(draw(st.integers(0, 12))):
        side = draw(st.sampled_from("LR"))
        batch = []
        for _ in range(draw(st.integers(1, 4))):
            t += draw(st.integers(0, 3))
            rec: dict[str, Any] = {"ts": max(0, t + draw(st.sampled_from([0, 0, -2, -9])))}
            key = draw(st.sampled_from([1, 2, 3, None, "missing"]))
            if key != "missing":
                rec["k"] = key
            rec["lid" if side == "L" else "rid"] = n
            # Held compactly until the window closes: _meta like Kafka's (empty headers),
            # nested and empty objects, short and long strings come back unchanged.
            rec["_meta"] = {"topic": "t", "partition": 0, "offset": n, "key": str(key),
                            "headers": draw(st.sampled_from([{}, {"h": "v"}]))}
            extra = draw(st.sampled_from(["none", "empty", "nested", "text"]))
            if extra == "empty":
                rec["tags"] = {}
            elif extra == "nested":
                rec["geo"] = {"region": "eu", "at": {}}
            elif extra == "text":
                rec["name"] = draw(st.sampled_from(["ab", "x" * 40]))
            n += 1
            batch.append(rec)
        items.append((side, batch))
    return items


join_windows = st.one_of(
    st.none(),
    st.builds(lambda s: {"type": "tumbling", "size": s}, st.integers(1, 10)),
    st.builds(lambda s: {"type": "sliding", "size": 2 * s, "slide": s}, st.integers(1, 5)),
    st.builds(lambda g: {"type": "session", "gap": g}, st.integers(1, 6)),
)
join_types = st.sampled_from(["inner", "left", "right", "full"])


def check_join(items, join_type, window, lateness, workers, prefix=None, fields=None):
    cfg = JoinConfig.model_validate(
        {
            "join_key": "k",
            "join_type": join_type,
            "window": window,
            "time_field": "ts",
            "allowed_lateness": f"{lateness}s",
            "output_prefix": prefix,
        }
    )
    got = run_flow(join_flow(cfg, fields), items, workers=workers, **EPOCHS)
    want, late = ref_join(items, join_type, window, lateness, prefix)
    down = got["down"]
    if fields is not None:  # the same values of what downstream reads of each record
        down, want = ([{k: v for k, v in r.items() if k in fields} for r in rs]
                      for rs in (down, want))
    assert canon(down) == canon(want)
    assert canon(got["late"]) == canon(late)
    assert got["errs"] == []


@FAST
@given(sides(), join_types, join_windows, st.sampled_from([0, 3]))
def test_join_matches_reference_single_worker(items, join_type, window, lateness):
    check_join(items, join_type, window, lateness, workers=1)


@settings(FAST, max_examples=10)
@given(sides(), join_types, join_windows, st.sampled_from([0, 3]))
def test_join_matches_reference_two_workers(items, join_type, window, lateness):
    check_join(items, join_type, window, lateness, workers=2)


@settings(FAST, max_examples=8)
@given(sides(), join_types, join_windows)
def test_join_with_output_prefix(items, join_type, window):
    check_join(items, join_type, window, 2, workers=1, prefix={"left": "user", "right": "orders"})


@settings(FAST, max_examples=25)
@given(sides(), join_types, join_windows, st.sampled_from([
    frozenset({"lid", "rid"}), frozenset({"rid", "geo", "_meta"}), frozenset()]))
def test_join_holds_only_the_fields_read_downstream(items, join_type, window, fields):
    check_join(items, join_type, window, 3, workers=1, fields=fields)


def test_resume_holding_fewer_fields_is_allowed_and_more_refused(tmp_path):
    cfg = JoinConfig.model_validate(
        {"join_key": "k", "window": {"type": "tumbling", "size": "10s"}, "time_field": "ts"})
    items = [("L", [{"k": 1, "ts": i, "a": i, "b": -i}]) for i in range(3)]
    items += [("R", [{"k": 1, "ts": 3, "r": "x"}])]
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    aborted = [*items[:2], TestingSource.ABORT(), *items[2:]]
    # held whole before the abort (an older release, or no projection): any projection resumes
    run_flow(join_flow(cfg), aborted, recovery_config=rc, **EPOCHS)
    got = run_flow(join_flow(cfg, frozenset({"a", "b", "r"})), aborted, recovery_config=rc,
                   **EPOCHS)["down"]
    assert canon([{k: r[k] for k in "abr"} for r in got]) == canon(
        [{"a": i, "b": -i, "r": "x"} for i in range(3)])
    other = tmp_path / "other"
    other.mkdir()
    init_db_dir(other, 1)
    rc = RecoveryConfig(str(other))
    aborted = [*items[:2], TestingSource.ABORT(), *items[2:]]  # an ABORT aborts once
    run_flow(join_flow(cfg, frozenset({"a", "r"})), aborted, recovery_config=rc, **EPOCHS)
    with pytest.raises(Exception, match=r"step 'jn'.*held: \['a', 'r'\] -> \['a', 'b', 'r'\]"):
        run_flow(join_flow(cfg, frozenset({"a", "b", "r"})), aborted, recovery_config=rc,
                 **EPOCHS)


def test_composite_keys_and_different_paths():
    cfg = JoinConfig.model_validate(
        {"left_key": ["a.x", "b"], "right_key": ["x", "y.b"], "join_type": "inner"}
    )
    items = [
        ("L", [{"a": {"x": 1}, "b": 2, "l": 1}, {"a": {"x": 1}, "b": 3, "l": 2}]),
        ("R", [{"x": 1, "y": {"b": 2}, "r": 1}, {"x": 1, "y": {"b": None}, "r": 2}]),
    ]
    got = run_flow(join_flow(cfg), items, **EPOCHS)["down"]
    assert got == [{"x": 1, "y": {"b": 2}, "r": 1, "a": {"x": 1}, "b": 2, "l": 1}]


def test_unhashable_key_is_an_error():
    cfg = JoinConfig.model_validate({"join_key": "k"})
    got = run_flow(join_flow(cfg), [("L", [{"k": {"nested": 1}}])], **EPOCHS)
    assert [f.step for f in got["errs"]] == ["jn"]
    assert "join key: a key must be text, a number, a boolean or null, not an object" in \
        got["errs"][0].message


def test_windowed_join_reports_bad_records_and_goes_on():
    cfg = JoinConfig.model_validate({"join_key": "k", "window": {"type": "tumbling", "size": 10},
                                     "time_field": "ts"})
    items = [("L", [{"k": {"nested": 1}, "ts": 1}, {"k": 1, "ts": "soon"}, ["not", "a", "dict"],
                    {"k": 1, "ts": 2, "l": 1}]),
             ("R", [{"k": 1, "ts": 3, "r": 1}])]
    got = run_flow(join_flow(cfg), items, **EPOCHS)
    assert got["down"] == [{"k": 1, "ts": 2, "r": 1, "l": 1}]
    assert {f.step for f in got["errs"]} == {"jn"}
    assert [f.message.split(" (")[0].split(":")[0] for f in got["errs"]] == [
        "join key", "the record is not an object", "time field 'ts'"]
    assert got["errs"][0].message.startswith("join key: a key must be text, a number, a "
                                             "boolean or null")


def test_held_records_of_earlier_snapshots_unpack():
    """Held records pickled by earlier releases: 2-tuple shapes, ``_meta`` in the shape."""
    from functools import partial
    from operator import itemgetter

    from dataflare.operators.join import _one, _Packer

    packer = _Packer(frozenset({"id", "name"}))
    rec = {"id": 1, "name": "a", "x": 2, "_meta": {"offset": 3}}
    for held in (packer.pack(rec), pickle.loads(pickle.dumps(packer.pack(rec)))):
        assert _Packer.unpack(held) == {"id": 1, "name": "a"}
    assert _Packer.unpack(_Packer(frozenset({"id"})).pack(rec)) == {"id": 1}
    assert _Packer.unpack(_Packer(frozenset({"nope"})).pack(rec)) == {}
    assert _Packer.unpack(_Packer().pack(rec)) == {"id": 1, "name": "a", "x": 2}
    odd = {1: "int key", "it's": "quoted", "\n": None}
    assert _Packer.unpack(pickle.loads(pickle.dumps(_Packer().pack(odd)))) == odd
    older = [((("id", "name"), itemgetter("id", "name")), 1, "a"),
             ((("id",), partial(_one, "id")), 1),
             ((("id", "_meta"), 2), 1, {"offset": 3})]
    for held in older:
        assert _Packer.unpack(pickle.loads(pickle.dumps(held)))["id"] == 1
    assert _Packer.unpack(older[2]) == {"id": 1}


def run_two_inputs(cfg: JoinConfig, items: list[tuple[str, list[dict[str, Any]]]],
                   workers: int) -> dict[str, list[Any]]:
    """The join of two inputs of their own: the one with fewer batches ends first."""
    flow = Dataflow("test")
    lefts = [batch for side, batch in items if side == "L"]
    rights = [batch for side, batch in items if side == "R"]
    j = join("jn", op.input("left", flow, TestingSource(lefts)),
             op.input("right", flow, TestingSource(rights)), cfg)
    outs: dict[str, list[Any]] = {"down": [], "errs": []}
    op.output("out_down", j.down, TestingSink(outs["down"]))
    op.output("out_errs", j.errs, TestingSink(outs["errs"]))
    if workers == 1:
        run_main(flow, **EPOCHS)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers, **EPOCHS)
    return {name: [r for b in got for r in b] for name, got in outs.items()}


@settings(FAST, max_examples=25)
@given(sides(), join_types, st.sampled_from([None, {"left": "l", "right": "r"}]),
       st.sampled_from([1, 2]))
def test_relational_join_once_one_input_has_ended(items, join_type, prefix, workers):
    """Records arriving after the other input ended are joined at once, same result."""
    cfg = JoinConfig.model_validate(
        {"join_key": "k", "join_type": join_type, "output_prefix": prefix})
    # One input ends after its first batch, while the other still sends several.
    short = [{"k": 1, "lid": -1, "rid": -1}, {"k": 9, "lid": -2, "rid": -2}]
    for side in "LR":
        both = [(side, short)] + items
        got = run_two_inputs(cfg, both, workers)
        want, _ = ref_join(both, join_type, None, 0, prefix)
        assert canon(got["down"]) == canon(want)
        assert got["errs"] == []


def test_relational_join_after_the_left_input_ended():
    """The left input (one batch) ends first; the right's later batches join at once."""
    cfg = JoinConfig.model_validate({"join_key": "k", "join_type": "full",
                                     "output_prefix": {"left": "l", "right": "r"}})
    items = [("L", [{"k": 1, "a": 1, "_meta": {"line": 1}}, {"k": 2, "a": 2}])]
    items += [("R", [{"k": 1, "b": i, "_meta": {"line": 9}}]) for i in range(5)]
    items += [("R", [{"k": 3, "b": 9}])]
    got = run_two_inputs(cfg, items, workers=1)
    want, _ = ref_join(items, "full", None, 0, {"left": "l", "right": "r"})
    assert canon(got["down"]) == canon(want)
    assert len(got["down"]) == 7


def lookup_flow(cfg: JoinConfig) -> Any:
    return join_flow(cfg)


@pytest.mark.parametrize("join_type", ["inner", "left"])
def test_lookup_join_uses_the_latest_right_record(join_type):
    cfg = JoinConfig.model_validate(
        {"mode": "lookup", "left_key": "user_id", "right_key": "id", "join_type": join_type,
         "bootstrap_timeout": "0s"}  # no bootstrap: each record meets the table as it is
    )
    items = [
        ("L", [{"user_id": 1, "o": "early"}]),
        ("R", [{"id": 1, "name": "ann"}, {"id": 2, "name": "bob"}]),
        ("L", [{"user_id": 1, "o": "a"}, {"user_id": 2, "o": "b"}, {"user_id": 3, "o": "c"}]),
        ("R", [{"id": 1, "name": "ann v2"}]),
        ("L", [{"user_id": 1, "o": "d"}, {"user_id": None, "o": "e"}]),
    ]
    got = run_flow(lookup_flow(cfg), items, **EPOCHS)["down"]
    expected = [
        {"id": 1, "name": "ann", "user_id": 1, "o": "a"},
        {"id": 2, "name": "bob", "user_id": 2, "o": "b"},
        {"id": 1, "name": "ann v2", "user_id": 1, "o": "d"},
    ]
    if join_type == "left":
        expected += [{"user_id": 1, "o": "early"}, {"user_id": 3, "o": "c"}]
        expected += [{"user_id": None, "o": "e"}]
    assert canon(got) == canon(expected)


def test_lookup_ttl_forgets_old_right_records():
    def run(ttl: str) -> list[Any]:
        cfg = JoinConfig.model_validate(
            {"mode": "lookup", "join_key": "k", "join_type": "left", "ttl": ttl,
             "bootstrap_timeout": "0s"}
        )
        items = [
            ("R", [{"k": 1, "r": 1}]),
            TestingSource.PAUSE(timedelta(milliseconds=300)),
            ("L", [{"k": 1, "l": 1}]),
        ]
        return run_flow(lookup_flow(cfg), items, **EPOCHS)["down"]

    assert run("100ms") == [{"k": 1, "l": 1}]
    assert run("1h") == [{"k": 1, "r": 1, "l": 1}]


@pytest.mark.parametrize("workers", [1, 2])
def test_lookup_waits_for_the_table_to_be_loaded(workers):
    cfg = JoinConfig.model_validate({"mode": "lookup", "join_key": "k", "join_type": "left"})
    # the stream comes first; the table (a bounded read) ends after it
    items = [
        ("L", [{"k": 1, "o": "a"}, {"k": 2, "o": "b"}]),
        ("R", [{"k": 1, "name": "ann"}]),
        ("L", [{"k": 2, "o": "c"}, {"k": 3, "o": "d"}]),
        ("R", [{"k": 2, "name": "bob"}]),
    ]
    got = run_flow(lookup_flow(cfg), items, workers=workers, **EPOCHS)["down"]
    assert canon(got) == canon([
        {"k": 1, "name": "ann", "o": "a"}, {"k": 2, "name": "bob", "o": "b"},
        {"k": 2, "name": "bob", "o": "c"}, {"k": 3, "o": "d"},
    ])


def test_lookup_table_from_cdc_is_loaded_after_its_snapshot_and_follows_deletes():
    cfg = JoinConfig.model_validate({"mode": "lookup", "join_key": "k"})
    items = [
        ("L", [{"k": 1, "o": "early"}]),
        ("R", [{"k": 1, "name": "ann", "_meta": {"op": "read"}}]),
        ("R", [{"k": 2, "name": "bob", "_meta": {"op": "read"}}]),
        ("R", [{"k": 2, "name": "bob", "_meta": {"op": "delete"}}]),  # snapshot done
        ("L", [{"k": 2, "o": "late"}]),
        ("L", [{"k": 1, "o": "then"}]),
        TestingSource.PAUSE(timedelta(milliseconds=500)),  # the table is not over yet
        ("R", [{"k": 1, "name": "ann v2", "_meta": {"op": "update"}}]),
    ]
    got = run_flow(lookup_flow(cfg), items, **EPOCHS)["down"]
    assert canon(got) == canon([
        {"k": 1, "name": "ann", "o": "early", "_meta": {"op": "read"}},
        {"k": 1, "name": "ann", "o": "then", "_meta": {"op": "read"}},
    ])


def test_lookup_bootstrap_timeout_releases_waiting_records():
    cfg = JoinConfig.model_validate(
        {"mode": "lookup", "join_key": "k", "join_type": "left", "bootstrap_timeout": "100ms"})
    items = [
        ("L", [{"k": 1, "o": "waited"}]),
        TestingSource.PAUSE(timedelta(seconds=1)),
        ("R", [{"k": 1, "name": "ann"}]),
        ("L", [{"k": 1, "o": "after"}]),
    ]
    got = run_flow(lookup_flow(cfg), items, **EPOCHS)["down"]
    # released unmatched after 100 ms, before the table's record arrived
    assert canon(got) == canon([{"k": 1, "o": "waited"}, {"k": 1, "name": "ann", "o": "after"}])


@pytest.mark.parametrize("abort_at", [0, 1, 3, 5])
@pytest.mark.parametrize("chained", [False, True])
def test_resume_after_abort_gives_the_uninterrupted_output(tmp_path, abort_at, chained,
                                                           monkeypatch):
    import dataflare.operators.keyed as keyed

    if chained:  # snapshots chain the changed keys from the first key on
        monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 1)
    items = []
    for i in range(8):
        side = "L" if i % 3 else "R"
        items.append(
            (side, [{"k": (i + j) % 3, "ts": i * 4 + j, "n": i * 10 + j} for j in range(3)])
        )
    cfg = JoinConfig.model_validate(
        {
            "join_key": "k",
            "join_type": "full",
            "window": {"type": "tumbling", "size": "6s"},
            "time_field": "ts",
            "allowed_lateness": "3s",
        }
    )
    full = run_flow(join_flow(cfg), items, **EPOCHS)
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    aborted = [*items[:abort_at], TestingSource.ABORT(), *items[abort_at:]]
    first = run_flow(join_flow(cfg), aborted, recovery_config=rc, **EPOCHS)
    second = run_flow(join_flow(cfg), aborted, recovery_config=rc, **EPOCHS)
    for name in ("down", "late"):
        assert canon(first[name] + second[name]) == canon(full[name])


@pytest.mark.parametrize("abort_at", [1, 2, 4])
def test_lookup_records_waiting_for_the_table_survive_an_abort(tmp_path, abort_at):
    cfg = JoinConfig.model_validate({"mode": "lookup", "join_key": "k", "join_type": "left"})
    items = [
        ("L", [{"k": 1, "o": "a"}]),
        ("L", [{"k": 2, "o": "b"}]),
        ("R", [{"k": 1, "name": "ann", "_meta": {"op": "read"}}]),
        ("L", [{"k": 1, "o": "c"}]),
        ("R", [{"k": 2, "name": "bob", "_meta": {"op": "insert"}}]),  # loaded: snapshot done
        ("L", [{"k": 2, "o": "d"}]),
    ]
    # the waiting records meet the table as it is when it is loaded (with the first change)
    expected = [{"k": 1, "name": "ann", "o": o, "_meta": {"op": "read"}} for o in "ac"] + [
        {"k": 2, "name": "bob", "o": o, "_meta": {"op": "insert"}} for o in "bd"]
    assert canon(run_flow(lookup_flow(cfg), items, **EPOCHS)["down"]) == canon(expected)
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    aborted = [*items[:abort_at], TestingSource.ABORT(), *items[abort_at:]]
    first = run_flow(lookup_flow(cfg), aborted, recovery_config=rc, **EPOCHS)["down"]
    second = run_flow(lookup_flow(cfg), aborted, recovery_config=rc, **EPOCHS)["down"]
    assert canon(first + second) == canon(expected)


def test_resume_with_changed_window_is_refused(tmp_path):
    def cfg(size: str) -> JoinConfig:
        return JoinConfig.model_validate(
            {"join_key": "k", "window": {"type": "tumbling", "size": size}, "time_field": "ts"}
        )

    items = [("L", [{"k": 1, "ts": i}]) for i in range(5)]
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    aborted = [*items[:3], TestingSource.ABORT(), *items[3:]]
    run_flow(join_flow(cfg("10s")), aborted, recovery_config=rc, **EPOCHS)
    with pytest.raises(Exception, match=r"step 'jn'.*window\.size: 10\.0 -> 30\.0"):
        run_flow(join_flow(cfg("30s")), aborted, recovery_config=rc, **EPOCHS)


SEED_VARIANTS = [
    {
        "join_type": "left",
        "left_key": "customer.email",
        "right_key": "user_email",
        "window": {"type": "sliding", "size": "7d"},
    },
    {
        "join_type": "left",
        "left_key": "user.email",
        "right_key": "order.userId",
        "output_prefix": {"left": "user", "right": "orders"},
    },
    {"join_type": "inner", "left_key": "order.productId", "right_key": "product.id"},
    {
        "join_type": "left",
        "left_key": "user.id",
        "right_key": "user_id",
        "window": {"type": "session", "gap": "30m"},
    },
    {"join_key": "customer_id", "join_type": "left"},
]


@pytest.mark.parametrize("seed", SEED_VARIANTS)
def test_seed_configs_validate(seed):
    cfg = JoinConfig.model_validate(seed)
    if cfg.window is not None and cfg.window.type == "sliding":
        assert cfg.window.definition()["window.slide"] == 7 * 86400  # slide defaults to size


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"join_key": "k", "join_type": "outer"}, "'inner', 'left', 'right' or 'full'"),
        ({"join_type": "left"}, "needs 'join_key', or both 'left_key' and 'right_key'"),
        ({"join_key": "k", "left_key": "a", "right_key": "b"}, "not both"),
        ({"left_key": ["a", "b"], "right_key": "c"}, "'left_key' has 2 paths"),
        ({"join_key": "k", "mode": "lookup", "join_type": "full"}, "'inner' or 'left'"),
        ({"join_key": "k", "ttl": "5m"}, "mode 'lookup' only"),
    ],
)
def test_bad_configs(config, message):
    with pytest.raises(ValidationError, match=message):
        JoinConfig.model_validate(config)


def test_registered_with_two_inputs():
    spec = registry.lookup("transformation", "join")
    assert spec is not None and spec.inputs == (2, 2) and spec.stateful


LOOKUP_FLOW = """
workflow:
  sources:
    orders:
      type: kafka
      config: {bootstrap_servers: "${SERVERS}", topic: "${TOPIC}", stop_at_end: true}
    customers:
      type: mysql
      mode: full
      config: {host: 127.0.0.1, port: "${PORT}", username: "${USER}", database: "${DB}",
               table: lookup_customers, batch_size: 5}
  transformations:
    enriched:
      inputs: [orders, customers]
      type: join
      config: {mode: lookup, left_key: customer_id, right_key: id, join_type: left}
  destinations:
    out: {type: file, inputs: [enriched], config: {path: "${OUT}"}}
"""


def test_kafka_orders_meet_a_mysql_table_loaded_first(
    kafka_broker, kafka_topic, mariadb_private, tmp_path
):
    from bytewax.testing import run_main

    from dataflare.connectors.kafka import produce_records
    from dataflare.dsl_compiler import compile_file
    from tests.fixtures.workflows import read_jsonl

    mariadb_private.execute(
        "DROP TABLE IF EXISTS lookup_customers",
        "CREATE TABLE lookup_customers (id INT PRIMARY KEY, name VARCHAR(20))",
        "INSERT INTO lookup_customers VALUES "
        + ", ".join(f"({i}, 'c{i}')" for i in range(20)),
    )
    topic = kafka_topic()
    produce_records(kafka_broker.bootstrap_servers, topic,
                    [{"order": n, "customer_id": n % 20} for n in range(40)])
    flow = tmp_path / "flow.yaml"
    flow.write_text(LOOKUP_FLOW)
    out = tmp_path / "out.jsonl"
    env = {"SERVERS": kafka_broker.bootstrap_servers, "TOPIC": topic, "OUT": str(out),
           "PORT": str(mariadb_private.port), "USER": mariadb_private.user,
           "DB": mariadb_private.database}
    run_main(compile_file(flow, env=env))
    rows = read_jsonl(out)
    assert len(rows) == 40
    assert sorted((r["order"], r.get("name")) for r in rows) == [
        (n, f"c{n % 20}") for n in range(40)]  # every order enriched (0 of 40 before)


@pytest.mark.parametrize("window", [{"type": "tumbling", "size": "6s"},
                                    {"type": "sliding", "size": "6s", "slide": "2s"},
                                    {"type": "session", "gap": "3s"}])
def test_chained_join_snapshots_resume_to_the_state_they_were_taken_from(window, monkeypatch):
    import dataflare.operators.keyed as keyed
    from dataflare.operators.join import _JoinOp

    monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 2)
    cfg = JoinConfig.model_validate({"join_key": "k", "join_type": "full", "window": window,
                                     "time_field": "ts", "allowed_lateness": "3s"})
    op_ = _JoinOp("j", cfg, 16, None)
    shard = op_.build(None)
    chains = []
    for i in range(12):
        side = "left" if i % 3 else "right"
        shard.process([(side, [{"k": (i + j) % 5, "ts": i * 2 + j, "n": i} for j in range(3)])])
        snap = shard.snapshot()
        chains.append(len(shard._chain))
        assert plain(op_.build(snap).state) == plain(shard.state), i
    assert max(chains) > 2


def plain(state: Any) -> Any:
    """``state`` with its held records' shapes as their field names (a Shape has no ==)."""
    from dataflare.operators.join import Shape

    if isinstance(state, Shape):
        return ("shape", state.names)
    if isinstance(state, dict):
        return {k: plain(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [plain(v) for v in state]
    return state


def test_keys_of_two_kinds_never_match_and_the_join_says_so(caplog: Any) -> None:
    """Text "1" (a CSV column) and the number 1 are different keys: said once, by name."""
    items = [("L", [{"uid": 1, "amt": 5}]), ("R", [{"id": "1", "name": "ada"}]),
             ("L", [{"uid": 2, "amt": 7}]), ("R", [{"id": "2", "name": "bob"}])]
    cfg = JoinConfig.model_validate({"left_key": "uid", "right_key": "id"})
    with caplog.at_level("WARNING", logger="dataflare.operators.join"):
        got = run_flow(join_flow(cfg), items, **EPOCHS)
    assert got["down"] == []
    said = [r.getMessage() for r in caplog.records if "never match" in r.getMessage()]
    assert said == ["step 'jn': the left key (uid) is a number, the right key (id) text: they "
                    "never match. A CSV column is text unless csv: {infer_types: true}; or "
                    "convert one side in a mapping"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dataflare.operators.join"):  # same kinds: quiet
        got = run_flow(join_flow(cfg), [("L", [{"uid": 1}]), ("R", [{"id": 1.0}])], **EPOCHS)
    assert len(got["down"]) == 1
    assert not [r for r in caplog.records if "never match" in r.getMessage()]
