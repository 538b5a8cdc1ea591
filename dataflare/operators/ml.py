"""The ``ml`` transformation: online learning with river; the models live in recovery state.

Each record is scored, then learned from (test-then-train), so a record's output never
depends on itself:

- ``kmeans``: river ``cluster.KMeans`` (``clusters``); the output is the cluster number;
- ``isolation_forest``: river ``anomaly.HalfSpaceTrees`` behind a ``MinMaxScaler`` (the
  trees expect features in [0, 1]); the output is the anomaly score (higher: more unusual);
- ``linear_regression``: river ``linear_model.LinearRegression`` behind a
  ``StandardScaler``; the output is the prediction of ``target``, learned when the record
  has a target.

A feature or target that is not a number, or beyond 1e150 (its square would overflow a
float, and the model would give null ever after), fails its record, which is not learned.

Without ``partition_by`` there is one model for the step, held by one shard (so one worker
scores every record, in arrival order, whatever the number of workers); with it, one model
per key, spread over the workers. Models are seeded, so a run is reproducible, and kept in
the recovery snapshots: a resumed run continues the same models.
"""

from __future__ import annotations

from typing import Any, Literal

from bytewax.dataflow import Stream
from pydantic import Field, model_validator

from dataflare.config import Paths, Strict
from dataflare.operators.keyed import (
    DOWN,
    ERRS,
    ShardLogic,
    component_id,
    key_getter,
    route_and_merge,
    shards_of,
    stateful_shards,
    tagged,
)
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import Failed, RecordError, a_or_an, getter, set_path
from dataflare.registry import BuildContext, Outputs, transformation

Algorithm = Literal["kmeans", "isolation_forest", "linear_regression"]


class MlConfig(Strict):
    """Settings of an ``ml`` transformation."""

    algorithm: Algorithm = Field(description="Model family.")
    features: list[str] = Field(min_length=1, description="Input field paths (numbers).")
    clusters: int | None = Field(None, ge=1, description="kmeans: number of clusters.")
    target: str | None = Field(None, description="linear_regression: path of the value learned.")
    output_field: str = Field(description="Path written with the model's output.")
    partition_by: Paths = Field(
        (), description="Key paths: one model per key (default: one model for the step)."
    )
    seed: int = Field(42, description="Random seed of the model.")

    @model_validator(mode="after")
    def _check(self) -> MlConfig:
        if self.algorithm == "kmeans" and self.clusters is None:
            msg = "kmeans needs 'clusters'"
            raise ValueError(msg)
        if self.algorithm != "kmeans" and self.clusters is not None:
            msg = f"'clusters' applies to kmeans, not {self.algorithm}"
            raise ValueError(msg)
        if self.algorithm == "linear_regression" and self.target is None:
            msg = "linear_regression needs 'target'"
            raise ValueError(msg)
        if self.algorithm != "linear_regression" and self.target is not None:
            msg = f"'target' applies to linear_regression, not {self.algorithm}"
            raise ValueError(msg)
        return self


def _river() -> Any:
    try:
        import river
        from river import anomaly, cluster, linear_model, preprocessing  # noqa: F401
    except ImportError:  # pragma: no cover - the extra is part of the default install
        msg = "the 'ml' transformation needs river: pip install 'dataflare[ml]'"
        raise ImportError(msg) from None
    return river


def new_model(cfg: MlConfig) -> Any:
    """A fresh model for ``cfg``."""
    river = _river()
    if cfg.algorithm == "kmeans":
        model = river.cluster.KMeans(n_clusters=cfg.clusters, seed=cfg.seed)
        # Its centers draw a random start per feature when first read, and its distance
        # reads the features in set order, which string hashing varies between processes:
        # drawing them here, in the features' order, makes the seed reproduce the clusters.
        for center in model.centers.values():
            for feature in cfg.features:
                center[feature]  # noqa: B018 - the defaultdict draws the start value
        return model
    if cfg.algorithm == "isolation_forest":
        return river.preprocessing.MinMaxScaler() | river.anomaly.HalfSpaceTrees(seed=cfg.seed)
    return river.preprocessing.StandardScaler() | river.linear_model.LinearRegression()


# The models square their inputs (distances, variances): a larger value would overflow a
# float and leave the model's numbers infinite, so that every later output is null.
_LARGEST = 1e150


def _number(path: str, value: Any) -> float:
    if value.__class__ is bool or not isinstance(value, int | float):
        msg = f"feature {path!r} is {a_or_an(type(value).__name__)} ({value!r}), expected a number"
        raise RecordError(msg)
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not -_LARGEST <= number <= _LARGEST:
        msg = (f"{path!r} is {value!r}: the model takes numbers up to {_LARGEST:g} (their "
               "squares must fit a float); the record is not learned from")
        raise RecordError(msg)
    return number


class _Model:
    """The compiled settings of one ml step, shared by its shards."""

    def __init__(self, step_id: str, cfg: MlConfig, shards: int) -> None:
        self.step = component_id(step_id)
        self.cfg = cfg
        self.key = key_getter(cfg.partition_by)
        self.features = [(p, getter(p)) for p in cfg.features]
        self.target = getter(cfg.target) if cfg.target else None
        self.definition = {**cfg.model_dump(), "shards": shards}

    def apply(self, model: Any, rec: dict[str, Any]) -> dict[str, Any]:
        """Score ``rec``, learn from it, return it with the output field."""
        x = {p: _number(p, g(rec)) for p, g in self.features}
        algo = self.cfg.algorithm
        out = dict(rec)
        if algo == "kmeans":
            result: Any = model.predict_one(x)
            model.learn_one(x)
        elif algo == "isolation_forest":
            result = model.score_one(x)
            model.learn_one(x)
        else:
            result = model.predict_one(x)
            assert self.target is not None  # noqa: S101 - checked by the config
            y = self.target(rec)
            if y is not None:
                model.learn_one(x, _number(self.cfg.target or "", y))
        set_path(out, self.cfg.output_field, result)
        return out


class _MlShard(ShardLogic):
    """One shard: the models of its keys."""

    def __init__(self, m: _Model, resume: Any) -> None:
        super().__init__(m.step, m.definition, resume)
        self.m = m
        if self.state is None:
            self.state = {}

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        m, models = self.m, self.state
        down: list[Any] = []
        errs: list[Failed] = []
        for batch in batches:
            for rec in batch:
                try:
                    key = m.key(rec)
                    model = models.get(key)
                    if model is None:
                        model = models[key] = new_model(m.cfg)
                    down.append(m.apply(model, rec))
                except (RecordError, TypeError, ArithmeticError, ValueError) as exc:
                    errs.append(Failed.of(m.step, exc, rec))
        return tagged(m.step, down, errs)

    def has_state(self) -> bool:
        return False

    def idle(self) -> list[tuple[str, list[Any]]]:
        return []


def ml_schema(ctx: SchemaContext[MlConfig]) -> FieldType:
    """The input's fields plus ``output_field`` (a cluster number or a score)."""
    cfg = ctx.config
    origins: set[tuple[str, str]] = set()
    for i, path in enumerate(cfg.features):
        origins |= ctx.read(("features", i), path, want="number").all_origins()
    ctx.read(("target",), cfg.target, want="number")
    for i, path in enumerate(cfg.partition_by):
        ctx.read(("partition_by", i), path)
    score = FieldType.of("integer" if cfg.algorithm == "kmeans" else "number", origins)
    return ctx.input.with_path(cfg.output_field, score)


@transformation(
    "ml",
    config=MlConfig,
    description="Online learning with river (kmeans, isolation_forest, linear_regression); "
    "each record is scored, then learned from.",
    stateful=True,
    schema=ml_schema,
)
def build_ml(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``ml`` step."""
    m = _Model(ctx.step_id, ctx.config, shards_of(ctx))
    shards = m.definition["shards"] if ctx.config.partition_by else 1
    keyed = route_and_merge("partition", [(None, ups[0])], [m.key], shards)
    outs = stateful_shards("models", keyed, lambda resume: _MlShard(m, resume), (DOWN, ERRS))
    return Outputs(down=outs[DOWN], errs=outs[ERRS])
