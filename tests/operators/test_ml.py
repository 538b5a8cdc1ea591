"""The ``ml`` transformation: river models scored then trained per record, in snapshots."""

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

from dataflare.operators.ml import MlConfig, build_ml, new_model
from dataflare.records import get_path
from dataflare.registry import BuildContext
from tests.operators.test_window import canon, run_flow

rnd = random.Random(11)
RECORDS = [
    {
        "id": i,
        "shop": i % 3,
        "user": {"value": rnd.gauss(100 * (i % 4), 10)},
        "clicks": rnd.randrange(0, 50),
        "price": 0.0,
    }
    for i in range(240)
]
for r in RECORDS:
    r["price"] = 3.0 * r["user"]["value"] - 2.0 * r["clicks"] + 7.0 + rnd.gauss(0, 1)
BATCHES = [RECORDS[i : i + 8] for i in range(0, len(RECORDS), 8)]

CONFIGS = {
    "kmeans": {"algorithm": "kmeans", "features": ["user.value", "clicks"], "clusters": 4,
               "output_field": "user.segment"},
    "isolation_forest": {"algorithm": "isolation_forest", "features": ["user.value", "clicks"],
                         "output_field": "anomaly"},
    "linear_regression": {"algorithm": "linear_regression", "features": ["user.value", "clicks"],
                          "target": "price", "output_field": "predicted"},
}


def ml_flow(cfg: dict[str, Any]) -> Any:
    ctx = BuildContext("seg", "transformation", SimpleNamespace(inputs=["src"]),
                       MlConfig.model_validate(cfg), None, Path("."))

    def build(flow: Dataflow, src: Any) -> dict[str, Any]:
        out = build_ml(ctx, [src])
        return {"down": out.down, "errs": out.errs}

    return build


def by_hand(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """river run directly over the records (per partition key), test then train."""
    c = MlConfig.model_validate(cfg)
    models: dict[Any, Any] = {}
    out = []
    for r in RECORDS:
        key = tuple(get_path(r, p) for p in c.partition_by)
        model = models.setdefault(key, new_model(c))
        x = {"user.value": r["user"]["value"], "clicks": float(r["clicks"])}
        rec = {**r, "user": dict(r["user"])}
        if c.algorithm == "kmeans":
            rec["user"]["segment"] = model.predict_one(x)
            model.learn_one(x)
        elif c.algorithm == "isolation_forest":
            rec["anomaly"] = model.score_one(x)
            model.learn_one(x)
        else:
            rec["predicted"] = model.predict_one(x)
            model.learn_one(x, r["price"])
        out.append(rec)
    return out


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("algorithm", list(CONFIGS))
@pytest.mark.parametrize("partition_by", [None, "shop"])
def test_outputs_equal_river_run_by_hand(algorithm, workers, partition_by):
    cfg = dict(CONFIGS[algorithm])
    if partition_by:
        cfg["partition_by"] = partition_by
    out = run_flow(ml_flow(cfg), BATCHES, workers=workers)
    assert out["errs"] == []
    assert canon(out["down"]) == canon(by_hand(cfg))


def test_models_learn():
    out = run_flow(ml_flow(CONFIGS["linear_regression"]), BATCHES)
    last = sorted(out["down"], key=lambda r: r["id"])[-40:]
    assert max(abs(r["predicted"] - r["price"]) for r in last) < 10
    clusters = {r["user"]["segment"] for r in run_flow(ml_flow(CONFIGS["kmeans"]), BATCHES)["down"]}
    assert len(clusters) > 1


@pytest.mark.parametrize("algorithm", list(CONFIGS))
@pytest.mark.parametrize("abort_at", [1, 9, 20])
@pytest.mark.parametrize("partition_by", [None, "shop"])
def test_resumed_run_continues_the_same_model(tmp_path, algorithm, abort_at, partition_by):
    """Records after the resume are scored by the model the first run had trained."""
    cfg = {**CONFIGS[algorithm], **({"partition_by": partition_by} if partition_by else {})}
    init_db_dir(tmp_path, 1)
    rc = RecoveryConfig(str(tmp_path))
    items = [*BATCHES[:abort_at], TestingSource.ABORT(), *BATCHES[abort_at:]]
    first = run_flow(ml_flow(cfg), items, epoch_interval=timedelta(0), recovery_config=rc)
    second = run_flow(ml_flow(cfg), items, epoch_interval=timedelta(0), recovery_config=rc)
    assert len(first["down"]) == abort_at * 8
    assert canon(first["down"] + second["down"]) == canon(by_hand(cfg))


def test_bad_feature_fails_alone_with_its_position():
    recs = [{"a": 1.0}, {"a": "x", "_meta": {"line": 2}}, {"a": 2.0}]
    cfg = {"algorithm": "kmeans", "features": ["a"], "clusters": 2, "output_field": "c"}
    out = run_flow(ml_flow(cfg), [recs])
    assert [r["a"] for r in out["down"]] == [1.0, 2.0]
    [bad] = out["errs"]
    assert bad.step == "seg" and bad.meta == {"line": 2}
    assert "feature 'a' is a str ('x'), expected a number" in bad.message


@pytest.mark.parametrize("algorithm", list(CONFIGS))
def test_a_value_too_large_for_the_model_fails_alone_and_is_not_learned(algorithm):
    # 1e308 overflowed kmeans' distance (the run stopped, naming no step) and left linear
    # regression's weights infinite: every later prediction was null.
    huge = {**RECORDS[100], "user": {"value": 1e308}, "_meta": {"line": 101}}
    out = run_flow(ml_flow(CONFIGS[algorithm]), [RECORDS[:100], [huge], RECORDS[100:]])
    [bad] = out["errs"]
    assert bad.meta == {"line": 101}
    assert "'user.value' is 1e+308: the model takes numbers up to 1e+150" in bad.message
    assert canon(out["down"]) == canon(by_hand(CONFIGS[algorithm]))  # as if never seen


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clusters": None}, "kmeans needs 'clusters'"),
        ({"algorithm": "linear_regression"}, "'clusters' applies to kmeans"),
        ({"target": "y"}, "'target' applies to linear_regression"),
        ({"features": []}, "at least 1 item"),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        MlConfig.model_validate({**CONFIGS["kmeans"], **change})


def test_kmeans_clusters_do_not_depend_on_string_hashing() -> None:
    """The same seed gives the same clusters in processes with different hash seeds."""
    import os
    import subprocess
    import sys

    script = (
        "from dataflare.operators.ml import MlConfig, new_model\n"
        "cfg = MlConfig(algorithm='kmeans', clusters=5, output_field='c', "
        "features=['user.value', 'clicks', 'orders.total'])\n"
        "m = new_model(cfg)\n"
        "out = []\n"
        "for i in range(30):\n"
        "    x = {'user.value': i % 7 * 3.0, 'clicks': i % 4, 'orders.total': i * 1.5}\n"
        "    out.append(m.predict_one(x)); m.learn_one(x)\n"
        "print(out)\n"
    )
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2, 3, 4)}
    assert len(runs) == 1, runs
