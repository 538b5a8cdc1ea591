"""The dedupe operator against a plain Python reference, single- and multi-worker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflare import registry
from dataflare.operators.dedupe import DedupeConfig, dedupe
from tests.operators.test_window import FAST, canon, chunks, run_flow


def dedupe_flow(cfg: DedupeConfig) -> Any:
    def build(flow: Any, src: Any) -> dict[str, Any]:
        d = dedupe("dd", src, cfg)
        return {"down": d.down, "errs": d.errs}

    return build


def ref_dedupe(records: list[dict[str, Any]], keys: list[str], ttl: int | None) -> list[dict]:
    kept: dict[Any, int] = {}
    out = []
    for r in records:
        key = (
            tuple(r.get(k) for k in keys)
            if keys
            else repr(sorted((k, v) for k, v in r.items() if k != "_meta"))
        )
        t = r["ts"]
        if key in kept and (ttl is None or t - kept[key] < ttl):
            continue
        kept[key] = t
        out.append(r)
    return out


@st.composite
def repeats(draw: Any) -> list[dict[str, Any]]:
    """Records with repeated keys; times move forward with jitter smaller than the ttl."""
    out = []
    t = 0
    for i in range(draw(st.integers(0, 50))):
        t += draw(st.integers(0, 3))
        out.append(
            {
                "ts": max(0, t - draw(st.sampled_from([0, 0, 1, 2]))),
                "a": draw(st.sampled_from([1, 2, None])),
                "b": draw(st.sampled_from(["x", "y"])),
                "_meta": {"line": i},
            }
        )
    return out


def check_dedupe(records, keys, ttl, sizes, workers):
    cfg = DedupeConfig.model_validate(
        {"keys": keys, "ttl": None if ttl is None else f"{ttl}s", "time_field": "ts"}
    )
    got = run_flow(dedupe_flow(cfg), chunks(records, sizes), workers=workers)
    assert canon(got["down"]) == canon(ref_dedupe(records, keys, ttl))
    assert got["errs"] == []


keysets = st.sampled_from([["a"], ["a", "b"], []])
ttls = st.sampled_from([None, 3, 8])


@FAST
@given(repeats(), keysets, ttls, st.lists(st.integers(1, 9), max_size=3))
def test_dedupe_matches_reference_single_worker(records, keys, ttl, sizes):
    check_dedupe(records, keys, ttl, sizes, workers=1)


@settings(FAST, max_examples=8)
@given(repeats(), keysets, ttls, st.lists(st.integers(1, 9), max_size=3))
def test_dedupe_matches_reference_two_workers(records, keys, ttl, sizes):
    check_dedupe(records, keys, ttl, sizes, workers=2)


def test_whole_record_key_ignores_meta_and_bad_keys_are_errors():
    cfg = DedupeConfig.model_validate({})
    recs = [{"a": 1, "_meta": {"line": 1}}, {"a": 1, "_meta": {"line": 2}}, {"a": 2}]
    # Order across keys is not kept (keys live in different shards).
    assert canon(run_flow(dedupe_flow(cfg), [recs])["down"]) == canon([recs[0], recs[2]])
    keyed = DedupeConfig.model_validate({"keys": "a"})
    got = run_flow(dedupe_flow(keyed), [[{"a": [1]}, {"a": 1}]])
    assert got["down"] == [{"a": 1}]
    assert [f.step for f in got["errs"]] == ["dd"]


def test_arrival_time_ttl():
    cfg = DedupeConfig.model_validate({"keys": "a", "ttl": "100ms"})
    items = [
        [{"a": 1, "n": 1}, {"a": 1, "n": 2}],
        TestingSource.PAUSE(timedelta(milliseconds=300)),
        [{"a": 1, "n": 3}],
    ]
    assert [r["n"] for r in run_flow(dedupe_flow(cfg), items)["down"]] == [1, 3]


@pytest.mark.parametrize("abort_at", [0, 2, 5])
@pytest.mark.parametrize("chained", [False, True])
def test_resume_after_abort_gives_the_uninterrupted_output(tmp_path, abort_at, chained,
                                                           monkeypatch):
    import dataflare.operators.keyed as keyed

    if chained:  # snapshots chain the changed keys from the first key on
        monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 1)
    recs = [{"a": i % 5, "ts": i} for i in range(40)]
    batches = [recs[i : i + 4] for i in range(0, 40, 4)]
    cfg = DedupeConfig.model_validate({"keys": "a", "ttl": "12s", "time_field": "ts"})
    full = run_flow(dedupe_flow(cfg), batches)["down"]
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*batches[:abort_at], TestingSource.ABORT(), *batches[abort_at:]]
    run = {"epoch_interval": timedelta(0), "recovery_config": rc}
    first = run_flow(dedupe_flow(cfg), items, **run)["down"]
    second = run_flow(dedupe_flow(cfg), items, **run)["down"]
    assert canon(first + second) == canon(full)


def test_resume_with_changed_keys_is_refused(tmp_path):
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [[{"a": 1, "b": 2}], TestingSource.ABORT(), [{"a": 1, "b": 3}]]
    run = {"epoch_interval": timedelta(0), "recovery_config": rc}
    run_flow(dedupe_flow(DedupeConfig.model_validate({"keys": "a"})), items, **run)
    with pytest.raises(Exception, match=r"step 'dd'.*keys: \['a'\] -> \['b'\]"):
        run_flow(dedupe_flow(DedupeConfig.model_validate({"keys": "b"})), items, **run)


def test_registered():
    spec = registry.lookup("transformation", "dedupe")
    assert spec is not None and spec.stateful and spec.config is DedupeConfig


def test_dropped_repeats_are_counted_in_a_metric():
    from dataflare.metrics import DUPLICATES_DROPPED, value

    before = value(DUPLICATES_DROPPED, step="dd")
    cfg = DedupeConfig.model_validate({"keys": "a"})
    assert len(run_flow(dedupe_flow(cfg), [[{"a": 1}, {"a": 1}, {"a": 1}]])["down"]) == 1
    assert value(DUPLICATES_DROPPED, step="dd") == before + 2


def test_chained_snapshots_resume_to_the_state_they_were_taken_from(monkeypatch):
    import dataflare.operators.keyed as keyed
    from dataflare.operators.dedupe import _DedupeOp

    monkeypatch.setattr(keyed, "CHAIN_MIN_KEYS", 2)
    cfg = DedupeConfig.model_validate({"keys": "a", "ttl": "20s", "time_field": "ts"})
    op_ = _DedupeOp("dd", cfg, 16)
    shard = op_.build(None)
    chains = []
    for i in range(30):  # keys come back after the ttl, and old ones are pruned
        shard.process([[{"a": (i * 3 + j) % 11, "ts": i * 4 + j} for j in range(3)]])
        snap = shard.snapshot()
        chains.append(len(shard._chain))
        assert op_.build(snap).state == shard.state, i
    assert max(chains) > 2 and 1 in chains[5:]  # chained, and whole again after a prune


def test_records_without_the_key_dropped_as_repeats_are_warned_of(caplog):
    # A typo in the key (kk for k) dropped every record but the first, silently.
    cfg = DedupeConfig.model_validate({"keys": ["kk"]})
    recs = [{"k": i, "_meta": {"file": "in.jsonl", "line": i + 1}} for i in range(5)]
    assert len(run_flow(dedupe_flow(cfg), [recs])["down"]) == 1
    assert caplog.text.count("step 'dd': the record at in.jsonl:2 has no 'kk' (or null): "
                             "records without the key are one key") == 1


def test_an_object_key_fails_its_record_saying_what_a_key_may_be():
    # It failed with a bare "unhashable type: 'dict'".
    cfg = DedupeConfig.model_validate({"keys": ["k"]})
    out = run_flow(dedupe_flow(cfg), [[{"k": {"a": 1}}, {"k": 1}]])
    assert [r["k"] for r in out["down"]] == [1]
    [bad] = out["errs"]
    assert bad.message.startswith("a key must be text, a number, a boolean or null, not an "
                                  "object or a list (unhashable type: 'dict')")
