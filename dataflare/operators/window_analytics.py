"""The ``window_analytics`` transformation: funnels, counts and durations per session or window.

Per ``group_by`` key, the ``window`` operator collects each session (``session_gap``) or
tumbling/sliding window's records over ``time_field`` (same assignment, watermark, late
rules and recovery state as ``window``); when it closes, each calculation runs over its
records in event-time order:

- ``funnel_analysis``: walks ``steps`` in order over the step field (default ``event``):
  ``{reached: [steps reached, in order], completed: bool, step_times: [ISO time of each
  step reached]}``;
- ``count``: the number of records;
- ``duration``: seconds from the first record to the last.

One output record per group and window: the group-by fields, ``window_start``,
``window_end`` and one field per calculation (its ``as``, else its type).
"""

from __future__ import annotations

from typing import Any, Literal

import bytewax.operators as op
from bytewax.dataflow import Stream
from pydantic import Field, model_validator

from dataflare.config import Duration, Paths, Strict
from dataflare.operators.aggregates import collect_records
from dataflare.operators.keyed import (
    US,
    component_id,
    idle_timeout_of,
    iso_us,
    rejoined_upstream,
    shards_of,
    time_reader,
)
from dataflare.operators.window import WindowConfig, WindowSpec, window
from dataflare.record_schema import FieldType, SchemaContext, window_output
from dataflare.records import META, Failed, RecordError, get_path, without_meta
from dataflare.registry import BuildContext, Outputs, transformation


class Calculation(Strict):
    """An analytic computed per session or window."""

    type: Literal["funnel_analysis", "count", "duration"] = Field(description="Calculation.")
    steps: list[str] = Field(
        default_factory=list, description="funnel_analysis: the steps, in order."
    )
    field: str = Field("event", description="funnel_analysis: path of the step name.")
    as_: str | None = Field(None, alias="as", description="Output field (default: the type).")

    @model_validator(mode="after")
    def _check(self) -> Calculation:
        if self.type == "funnel_analysis" and not self.steps:
            msg = "a funnel_analysis needs 'steps'"
            raise ValueError(msg)
        if self.type != "funnel_analysis" and (self.steps or "field" in self.model_fields_set):
            msg = f"'steps' and 'field' only apply to funnel_analysis (not {self.type})"
            raise ValueError(msg)
        return self

    @property
    def name(self) -> str:
        """The output field."""
        return self.as_ or self.type


class WindowAnalyticsConfig(Strict):
    """Settings of a ``window_analytics`` transformation."""

    group_by: Paths = Field((), description="Key paths.")
    window: Literal["session", "tumbling", "sliding"] | WindowSpec = Field(
        description="`session` (with `session_gap`) or a window block as in `window`."
    )
    session_gap: Duration | None = Field(None, description="Session gap (`window: session`).")
    time_field: str = Field("timestamp", description="Dotted path of the event time.")
    time_unit: Literal["s", "ms"] = Field("s", description="Unit of numeric event times.")
    allowed_lateness: Duration = Field(
        0.0, description="How far behind the group's latest event time a record may arrive."
    )
    late_to: str | None = Field(None, description="Destination id receiving late records.")
    calculations: list[Calculation] = Field(
        default_factory=list, description="Analytics per group and window."
    )

    @model_validator(mode="after")
    def _check(self) -> WindowAnalyticsConfig:
        self.spec()
        seen = {*self.group_by, "window_start", "window_end"}
        for calc in self.calculations:
            if calc.name in seen:
                msg = f"output field {calc.name!r} is written twice; set a distinct 'as'"
                raise ValueError(msg)
            seen.add(calc.name)
        return self

    def spec(self) -> WindowSpec:
        """The window block."""
        if isinstance(self.window, WindowSpec):
            if self.session_gap is not None:
                msg = "'session_gap' applies to 'window: session'; give 'gap' in the window block"
                raise ValueError(msg)
            return self.window
        if self.window != "session":
            msg = (
                f"'window: {self.window}' needs its size: write a window block "
                f"({{type: {self.window}, size: 5m}})"
            )
            raise ValueError(msg)
        if self.session_gap is None:
            msg = "'window: session' needs 'session_gap'"
            raise ValueError(msg)
        return WindowSpec.model_validate({"type": "session", "gap": self.session_gap})

    def window_config(self) -> WindowConfig:
        """The ``window`` operator settings that collect each window's records."""
        return WindowConfig.model_validate(
            {
                "window": self.spec(),
                "time_field": self.time_field,
                "time_unit": self.time_unit,
                "allowed_lateness": self.allowed_lateness,
                "group_by": list(self.group_by),
                "late_to": self.late_to,
            }
        )


def _funnel(calc: Calculation, timed: list[tuple[int, Any]]) -> dict[str, Any]:
    steps, path = calc.steps, calc.field
    reached: list[str] = []
    times: list[str] = []
    for t, rec in timed:
        if len(reached) == len(steps):
            break
        if get_path(rec, path) == steps[len(reached)]:
            reached.append(steps[len(reached)])
            times.append(iso_us(t))
    return {"reached": reached, "completed": len(reached) == len(steps), "step_times": times}


class _Analytics:
    """Computes the calculations of one closed window."""

    def __init__(self, step: str, cfg: WindowAnalyticsConfig) -> None:
        self.step = step
        self.calculations = cfg.calculations
        self.time = time_reader(cfg.time_field, cfg.time_unit)

    def row(self, records: list[Any]) -> dict[str, Any]:
        timed = sorted(((self.time(r), r) for r in records), key=lambda p: p[0])
        out: dict[str, Any] = {}
        for calc in self.calculations:
            if calc.type == "count":
                out[calc.name] = len(timed)
            elif calc.type == "duration":
                out[calc.name] = (timed[-1][0] - timed[0][0]) / US if timed else 0.0
            else:
                out[calc.name] = _funnel(calc, timed)
        return out

    def __call__(self, windows: list[dict[str, Any]]) -> tuple[list[Any], list[Failed]]:
        down: list[Any] = []
        errs: list[Failed] = []
        for w in windows:
            head = dict(w)
            records = head.pop("_records")
            try:
                head.update(self.row(records))
            except (RecordError, TypeError, ValueError) as exc:
                msg = f"step {self.step!r}: window {head['window_start']}: {exc}"
                meta = records[0].get(META, {}) if records else {}
                failed = {**head, "records": [without_meta(r) for r in records]}
                errs.append(Failed(self.step, type(exc).__name__, msg, failed, meta))
                continue
            down.append(head)
        return down, errs


def window_analytics_schema(ctx: SchemaContext[WindowAnalyticsConfig]) -> FieldType:
    """One record per group and window: group-by fields, window bounds, calculations."""
    cfg = ctx.config
    when = ctx.read(("time_field",), cfg.time_field, want="time").all_origins()
    fields = {"window_start": FieldType.of("string", when),
              "window_end": FieldType.of("string", when)}
    for i, calc in enumerate(cfg.calculations):
        if calc.type == "count":
            fields[calc.name] = FieldType.of("integer")
        elif calc.type == "duration":
            fields[calc.name] = FieldType.of("number", ctx.type_of(cfg.time_field).origins)
        else:
            step = ctx.read(("calculations", i, "field"), calc.field)
            fields[calc.name] = FieldType.record({
                "reached": FieldType.of("array", step.origins),
                "completed": FieldType.of("boolean", step.origins),
                "step_times": FieldType.of("array")})
    return window_output(ctx, cfg.group_by, fields)


@transformation(
    "window_analytics",
    config=WindowAnalyticsConfig,
    description="Session and window analytics per group: funnels, counts, durations.",
    inputs=(1, None),
    stateful=True,
    named_outputs=lambda cfg: ["late"],
    schema=window_analytics_schema,
)
def build_window_analytics(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``window_analytics`` step."""
    cfg: WindowAnalyticsConfig = ctx.config
    win = window(
        ctx.step_id,
        ups[0],
        cfg.window_config(),
        idle_timeout=idle_timeout_of(ctx),
        shards=shards_of(ctx),
        in_time_order=rejoined_upstream(ctx),
        accs=collect_records(),  # calculations run at close: changing them keeps the state
    )
    pairs = op.map("analytics", win.down, _Analytics(component_id(ctx.step_id), cfg))
    down = op.filter_map("analytics_down", pairs, lambda p: p[0] or None)
    errs = op.filter_map("analytics_errs", pairs, lambda p: p[1] or None)
    return Outputs(down=down, errs=op.merge("errors", win.errs, errs), named={"late": win.late})
