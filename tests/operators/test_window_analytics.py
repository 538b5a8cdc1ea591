"""The ``window_analytics`` transformation: funnels, counts and durations per session."""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource
from pydantic import ValidationError

from dataflare.operators.keyed import iso_us
from dataflare.operators.window_analytics import (
    WindowAnalyticsConfig,
    build_window_analytics,
)
from dataflare.registry import BuildContext
from tests.operators.test_window import canon, run_flow

STEPS = ["view_product", "add_to_cart", "checkout", "purchase"]
KINDS = [*STEPS, "search"]
GAP = 1800


def make_events(n: int = 400, users: int = 7, seed: int = 3) -> list[dict[str, Any]]:
    """Events in time order per user (no late data), with gaps that split sessions."""
    rnd = random.Random(seed)
    clock = dict.fromkeys(range(users), 1_700_000_000)
    out = []
    for i in range(n):
        u = rnd.randrange(users)
        clock[u] += rnd.choice([5, 60, 300, 900, 2000, 4000])
        out.append({"user_id": u, "timestamp": iso_us(clock[u] * 1_000_000),
                    "event": rnd.choice(KINDS), "_meta": {"line": i + 1}})
    return out


EVENTS = make_events()
BATCHES = [EVENTS[i : i + 9] for i in range(0, len(EVENTS), 9)]
SEED_CONFIG = {
    "group_by": ["user_id"],
    "window": "session",
    "session_gap": "30m",
    "calculations": [
        {"type": "funnel_analysis", "steps": STEPS, "as": "conversion_funnel"},
        {"type": "count", "as": "events"},
        {"type": "duration"},
    ],
}


def ctx(cfg: dict[str, Any]) -> BuildContext:
    return BuildContext("web", "transformation", SimpleNamespace(inputs=["src"]),
                        WindowAnalyticsConfig.model_validate(cfg), None, Path("."))


def flow(cfg: dict[str, Any]) -> Any:
    def build(f: Dataflow, src: Any) -> dict[str, Any]:
        out = build_window_analytics(ctx(cfg), [src])
        return {"down": out.down, "errs": out.errs, **out.named}

    return build


def epoch(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text).timestamp())


def reference_sessions() -> list[dict[str, Any]]:
    """Sessions and funnels computed by hand from the events."""
    by_user: dict[int, list[dict[str, Any]]] = {}
    for e in EVENTS:
        by_user.setdefault(e["user_id"], []).append(e)
    out = []
    for u, evs in by_user.items():
        sessions: list[list[dict[str, Any]]] = []
        for e in sorted(evs, key=lambda e: epoch(e["timestamp"])):
            if sessions and epoch(e["timestamp"]) - epoch(sessions[-1][-1]["timestamp"]) < GAP:
                sessions[-1].append(e)
            else:
                sessions.append([e])
        for s in sessions:
            reached, times = [], []
            for e in s:
                if len(reached) < len(STEPS) and e["event"] == STEPS[len(reached)]:
                    reached.append(e["event"])
                    times.append(e["timestamp"])
            out.append({
                "user_id": u,
                "window_start": s[0]["timestamp"],
                "window_end": s[-1]["timestamp"],
                "conversion_funnel": {"reached": reached, "completed": reached == STEPS,
                                      "step_times": times},
                "events": len(s),
                "duration": float(epoch(s[-1]["timestamp"]) - epoch(s[0]["timestamp"])),
            })
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_session_funnels_match_a_computation_by_hand(workers):
    out = run_flow(flow(SEED_CONFIG), BATCHES, workers=workers)
    ref = reference_sessions()
    assert canon(out["down"]) == canon(ref)
    assert any(r["conversion_funnel"]["completed"] for r in ref)
    assert any(not r["conversion_funnel"]["completed"] for r in ref)
    assert out["errs"] == [] and out["late"] == []


@pytest.mark.parametrize("workers", [1, 2])
def test_tumbling_window_counts_and_durations(workers):
    cfg = {
        "group_by": "user_id",
        "window": {"type": "tumbling", "size": "1h"},
        "calculations": [{"type": "count"}, {"type": "duration", "as": "span"}],
    }
    out = run_flow(flow(cfg), BATCHES, workers=workers)
    groups: dict[tuple[int, int], list[int]] = {}
    for e in EVENTS:
        t = epoch(e["timestamp"])
        groups.setdefault((e["user_id"], t - t % 3600), []).append(t)
    ref = [
        {"user_id": u, "window_start": iso_us(s * 1_000_000),
         "window_end": iso_us((s + 3600) * 1_000_000), "count": len(ts),
         "span": float(max(ts) - min(ts))}
        for (u, s), ts in groups.items()
    ]
    assert canon(out["down"]) == canon(ref)


def test_late_event_goes_to_late_and_bad_time_to_errors():
    evs = [
        {"user_id": 1, "timestamp": 100, "event": "view_product"},
        {"user_id": 1, "timestamp": 5000, "event": "view_product"},
        {"user_id": 1, "timestamp": 50, "event": "purchase"},
        {"user_id": 1, "timestamp": "not a time", "event": "x", "_meta": {"line": 4}},
    ]
    out = run_flow(flow(SEED_CONFIG), [evs])
    assert [e["timestamp"] for e in out["late"]] == [50]
    assert [r["events"] for r in out["down"]] == [1, 1]
    [bad] = out["errs"]
    assert bad.step == "web" and bad.meta == {"line": 4}


@pytest.mark.parametrize("abort_at", [0, 2, 9, 30])
def test_resume_after_abort_gives_the_uninterrupted_sessions(tmp_path, abort_at):
    full = run_flow(flow(SEED_CONFIG), BATCHES)
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*BATCHES[:abort_at], TestingSource.ABORT(), *BATCHES[abort_at:]]
    first = run_flow(flow(SEED_CONFIG), items, epoch_interval=timedelta(0), recovery_config=rc)
    second = run_flow(flow(SEED_CONFIG), items, epoch_interval=timedelta(0), recovery_config=rc)
    assert canon(first["down"] + second["down"]) == canon(full["down"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"session_gap": None}, "needs 'session_gap'"),
        ({"window": "tumbling"}, "needs its size"),
        ({"calculations": [{"type": "funnel_analysis"}]}, "needs 'steps'"),
        ({"calculations": [{"type": "count", "steps": ["a"]}]}, "only apply to funnel"),
        ({"calculations": [{"type": "count", "as": "user_id"}]}, "written twice"),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        WindowAnalyticsConfig.model_validate({**SEED_CONFIG, **change})
