"""The ``aggregation`` transformation: aggregates per group, without event-time windows.

On a bounded input it emits one record per group at the end (``emit: final``); on an
unbounded one (``emit: updates``) it emits the group's current aggregates each time a
batch changes them. ``emit: auto`` (the default) picks ``updates`` when a source upstream
is unbounded (``mode: streaming | cdc | hybrid``) and ``final`` otherwise.

An aggregate may carry a trailing range (``window: last_90_days``): it then covers only
the records less than that range before the group's latest event time (read from
``time_field``). ``first`` and ``last`` follow event time when ``time_field`` is set,
arrival order otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bytewax.dataflow import Stream, operator
from pydantic import Field, model_validator

from dataflare.config import Paths, Strict
from dataflare.operators.aggregates import (
    Accumulators,
    TrailingAggregate,
    check_names,
    compile_aggregates,
)
from dataflare.operators.keyed import (
    DOWN,
    ERRS,
    SHARDS,
    ShardLogic,
    component_id,
    from_key,
    key_getter,
    key_problem,
    route_and_merge,
    shards_of,
    stateful_shards,
    time_reader,
    to_us,
    unbounded_upstream,
)
from dataflare.record_schema import FieldType, SchemaContext, aggregate_fields, window_output
from dataflare.records import Failed, RecordError, set_path
from dataflare.registry import BuildContext, Outputs, transformation


class AggregationConfig(Strict):
    """Config of the ``aggregation`` transformation."""

    group_by: Paths = Field((), description="Dotted paths of the grouping fields.")
    aggregations: tuple[TrailingAggregate, ...] = Field(
        (TrailingAggregate.model_validate({"operations": ["count"]}),),
        description="Aggregates per group; the default counts the records.",
    )
    time_field: str | None = Field(
        None, description="Dotted path of the event time (for trailing ranges, first/last)."
    )
    time_unit: Literal["s", "ms"] = Field(
        "s", description="Unit of numeric event times: epoch seconds or milliseconds."
    )
    emit: Literal["auto", "final", "updates"] = Field(
        "auto",
        description="'final': one record per group at the end of input; 'updates': the "
        "group's aggregates after each batch that changed them; 'auto': 'updates' for "
        "unbounded sources.",
    )

    @model_validator(mode="after")
    def _check(self) -> AggregationConfig:
        check_names(self.aggregations, self.group_by)
        if "time_unit" in self.model_fields_set and self.time_field is None:
            msg = "'time_unit' has no effect without 'time_field'"
            raise ValueError(msg)
        return self


@dataclass(frozen=True)
class AggregationOut:
    """Outputs of :func:`aggregation`."""

    down: Stream[list[dict[str, Any]]]
    """Aggregate records, in batches."""
    errs: Stream[list[Failed]]
    """Records that could not be aggregated."""


class _AggregationOp:
    """The compiled settings of one aggregation step, shared by its shards."""

    def __init__(self, step_id: str, cfg: AggregationConfig, emit: str, shards: int) -> None:
        self.step_id = component_id(step_id)
        trailing = [a for a in cfg.aggregations if a.window is not None]
        if trailing and cfg.time_field is None:
            names = ", ".join(repr(a.field) for a in trailing)
            msg = (
                f"step {self.step_id!r}: aggregations of {names} have a trailing 'window' "
                "but config.time_field is not set"
            )
            raise ValueError(msg)
        self.group_by = tuple(cfg.group_by)
        self.key = key_getter(cfg.group_by)
        self.time = time_reader(cfg.time_field, cfg.time_unit) if cfg.time_field else None
        self.accs = compile_aggregates(cfg.aggregations)
        ranges = sorted({to_us(a.window) for a in trailing if a.window is not None})
        self.trailing: list[tuple[int, Accumulators]] = [
            (r, compile_aggregates([a for a in trailing if to_us(a.window or 0) == r]))
            for r in ranges
        ]
        self.horizon = max(ranges, default=0)
        self.updates = emit == "updates"
        self.definition = {
            "group_by": list(cfg.group_by),
            "aggregations": [
                {"field": a.field, "operations": list(a.ops), "as": a.as_, "window": a.window}
                for a in cfg.aggregations
            ],
            "time_field": cfg.time_field,
            "time_unit": cfg.time_unit,
            "emit": emit,
            "shards": shards,
        }

    def record(self, key: Any, group: list[Any]) -> dict[str, Any]:
        key = from_key(key)
        out: dict[str, Any] = {}
        if len(self.group_by) == 1:
            set_path(out, self.group_by[0], key)
        elif self.group_by:
            for path, value in zip(self.group_by, key, strict=True):
                set_path(out, path, value)
        self.accs.finish(group[0], out)
        if self.trailing:
            latest = group[1]
            history = group[2]
            for span, accs in self.trailing:
                acc = accs.new()
                for t, rec in history:
                    if latest - t < span:
                        accs.update(acc, rec, t)
                accs.finish(acc, out)
        return out

    def build(self, resume: Any) -> ShardLogic:
        return _AggregationShard(self, resume)


# Group state: [acc, latest event time, history of (t, record) for trailing ranges].
class _AggregationShard(ShardLogic):
    keyed = "groups"

    def __init__(self, op: _AggregationOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume)
        self.op = op
        self.tree_state = not op.trailing  # the history of trailing ranges keeps records
        self.tracks_keys = not op.trailing  # the history is pruned in every group
        if self.state is None:
            self.state = {"groups": {}, "seq": 0}

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        groups: dict[Any, list[Any]] = self.state["groups"]
        seq: int = self.state["seq"]
        keyf, timef, new, update = o.key, o.time, o.accs.new, o.accs.update
        keep_history = bool(o.trailing)
        touched = self.touched
        errs: list[Failed] = []
        changed: dict[Any, list[Any]] = {}
        for batch in batches:
            for rec in batch:
                try:
                    if timef is None:
                        seq += 1
                        t = seq
                    else:
                        t = timef(rec)
                    key = keyf(rec)
                    g = groups.get(key)
                    if g is None:
                        acc = new()
                        update(acc, rec, t)
                        g = groups[key] = [acc, t, []]
                    else:
                        update(g[0], rec, t)
                        if t > g[1]:
                            g[1] = t
                    if keep_history:
                        g[2].append((t, rec))
                    if o.updates:
                        changed[key] = g
                    if touched is not None:
                        touched[key] = g
                except (RecordError, TypeError) as exc:
                    errs.append(Failed.of(o.step_id, key_problem(exc), rec))
        self.state["seq"] = seq
        if keep_history:
            for g in groups.values():
                history = g[2]
                if len(history) > 64 and history[0][0] <= g[1] - o.horizon:
                    g[2] = [(t, r) for t, r in history if g[1] - t < o.horizon]
        out: list[tuple[str, list[Any]]] = []
        if changed:
            out.append((DOWN, [o.record(k, g) for k, g in changed.items()]))
        if errs:
            out.append((ERRS, errs))
        return out

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Each group's current aggregates, as the step emits them."""
        return [(k, self.op.record(k, g)) for k, g in state["groups"].items()]

    def flush(self) -> list[tuple[str, list[Any]]]:
        if self.op.updates:
            return []
        groups = self.state["groups"]
        down = [self.op.record(k, g) for k, g in groups.items()]
        self.state = {"groups": {}, "seq": 0}
        self.touched = None
        return [(DOWN, down)] if down else []


@operator
def aggregation(
    step_id: str,
    up: Stream[list[dict[str, Any]]],
    config: AggregationConfig,
    emit: Literal["final", "updates"] = "final",
    shards: int = SHARDS,
) -> AggregationOut:
    """Aggregate batches of records per group.

    :arg step_id: Unique step id (the workflow component id).
    :arg up: Stream of record batches.
    :arg config: Grouping and aggregates.
    :arg emit: ``final`` (one record per group at the end of input) or ``updates``.
    :arg shards: State shards spread over the workers (part of the recovery state).
    :returns: Aggregate records and errors, as batches.
    """
    aop = _AggregationOp(step_id, config, emit, shards)
    keyed = route_and_merge(step_id, [(None, up)], [aop.key], shards)
    outs = stateful_shards("groups", keyed, aop.build, outputs=(DOWN, ERRS))
    return AggregationOut(down=outs[DOWN], errs=outs[ERRS])


def aggregation_schema(ctx: SchemaContext[AggregationConfig]) -> FieldType:
    """One record per group: the group-by fields and the aggregates."""
    cfg = ctx.config
    ctx.read(("time_field",), cfg.time_field, want="time")
    return window_output(ctx, cfg.group_by, aggregate_fields(ctx, cfg.aggregations))


@transformation(
    "aggregation",
    config=AggregationConfig,
    description="Aggregate records per group (count, sum, avg, min, max, count_distinct...).",
    inputs=(1, None),
    stateful=True,
    serves=True,
    schema=aggregation_schema,
)
def build_aggregation(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``aggregation`` step."""
    cfg: AggregationConfig = ctx.config
    emit = cfg.emit
    if emit == "auto":
        emit = "updates" if unbounded_upstream(ctx) else "final"
    up = ups[0]
    out = aggregation(ctx.step_id, up, cfg, emit=emit, shards=shards_of(ctx))
    return Outputs(down=out.down, errs=out.errs)
