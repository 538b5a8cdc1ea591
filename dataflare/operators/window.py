"""The ``window`` transformation: event-time tumbling, sliding and session windows.

Tumbling and sliding windows are aligned to the Unix epoch; a record at time ``t``
belongs to every window with ``start <= t < end``. A session holds a key's records while
consecutive records are less than ``gap`` apart. Each (group, window) gives one record:
the group-by fields at their own paths, ``window_start`` and ``window_end`` (ISO-8601
UTC; a session ends at its last record) and the aggregates.

The watermark is kept per group: the group's largest event time minus
``allowed_lateness`` (like bytewax's ``EventClock`` per key), so results do not depend on
how records are spread over workers. A window is emitted when the watermark reaches its
end; a record older than the watermark is late: it is not aggregated, it is counted
(``dataflare_late_records_total``) and goes to the ``late`` output. At the end of a
bounded input every open window is emitted; with an idle timeout, every open window of a
shard is emitted after that much system time without records (and later records for
those windows count as late).

Sliding windows are computed from *panes* of ``gcd(size, slide)``: a record updates
one pane, and a window merges its panes once when it closes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from bytewax.dataflow import Stream, operator
from pydantic import Field, model_validator

from dataflare.config import Duration, Paths, Strict
from dataflare.operators.aggregates import (
    Accumulators,
    Aggregate,
    BadValue,
    check_names,
    compile_aggregates,
)
from dataflare.operators.keyed import (
    DOWN,
    ERRS,
    LATE,
    SHARDS,
    ShardLogic,
    component_id,
    extraction_code,
    idle_timeout_of,
    indent_code,
    iso_us,
    key_getter,
    late_records,
    route_and_merge,
    stateful_shards,
    time_reader,
    to_us,
)
from dataflare.records import Failed, RecordError, set_path
from dataflare.registry import BuildContext, Outputs, transformation

WindowType = Literal["tumbling", "sliding", "session"]
_NEVER = 1 << 62


class WindowSpec(Strict):
    """A window: ``tumbling`` (size), ``sliding`` (size, slide) or ``session`` (gap)."""

    type: WindowType = Field("tumbling", description="Kind of window.")
    size: Duration | None = Field(None, description="Length of a tumbling or sliding window.")
    slide: Duration | None = Field(
        None, description="Distance between sliding window starts; defaults to `size`."
    )
    gap: Duration | None = Field(
        None, description="Session: records less than this apart belong to one session."
    )

    @model_validator(mode="after")
    def _check(self) -> WindowSpec:
        if self.type == "session":
            if self.gap is None or self.gap <= 0:
                msg = f"a session window needs a positive 'gap' (got {self.gap!r})"
                raise ValueError(msg)
            if self.size is not None or self.slide is not None:
                msg = "a session window takes 'gap', not 'size' or 'slide'"
                raise ValueError(msg)
            return self
        if self.size is None or self.size <= 0:
            msg = f"a {self.type} window needs a positive 'size' (got {self.size!r})"
            raise ValueError(msg)
        if self.gap is not None:
            msg = f"a {self.type} window takes 'size', not 'gap'"
            raise ValueError(msg)
        if self.type == "tumbling" and self.slide not in (None, self.size):
            msg = "a tumbling window has no 'slide' (use type 'sliding')"
            raise ValueError(msg)
        if self.slide is not None and not 0 < self.slide <= self.size:
            msg = f"'slide' ({self.slide}s) must be positive and at most 'size' ({self.size}s)"
            raise ValueError(msg)
        return self

    def definition(self) -> dict[str, Any]:
        """What recovery state depends on."""
        if self.type == "session":
            return {"window.type": "session", "window.gap": self.gap}
        return {
            "window.type": self.type,
            "window.size": self.size,
            "window.slide": self.slide or self.size,
        }


class WindowConfig(Strict):
    """Config of the ``window`` transformation."""

    window: WindowSpec = Field(
        default_factory=lambda: WindowSpec.model_validate({"type": "tumbling", "size": 60}),
        description="The window: tumbling, sliding or session.",
    )
    time_field: str = Field("timestamp", description="Dotted path of the event time.")
    time_unit: Literal["s", "ms"] = Field(
        "s", description="Unit of numeric event times: epoch seconds or milliseconds."
    )
    allowed_lateness: Duration = Field(
        0.0, description="How far behind the group's latest event time a record may arrive."
    )
    group_by: Paths = Field((), description="Dotted paths of the grouping fields.")
    aggregations: tuple[Aggregate, ...] = Field(
        (Aggregate.model_validate({"operations": ["count"]}),),
        description="Aggregates per window; the default counts the records.",
    )
    late_to: str | None = Field(None, description="Destination id receiving late records.")

    @model_validator(mode="after")
    def _check(self) -> WindowConfig:
        check_names(self.aggregations, (*self.group_by, "window_start", "window_end"))
        return self


@dataclass(frozen=True)
class WindowOut:
    """Outputs of :func:`window`."""

    down: Stream[list[dict[str, Any]]]
    """One record per (group, window), in batches."""
    late: Stream[list[dict[str, Any]]]
    """Late records, unchanged, in batches."""
    errs: Stream[list[Failed]]
    """Records that could not be aggregated (bad time, bad value)."""


def _definition(cfg: WindowConfig, shards: int) -> dict[str, Any]:
    d = cfg.window.definition()
    d["time_field"] = cfg.time_field
    d["time_unit"] = cfg.time_unit
    d["group_by"] = list(cfg.group_by)
    d["aggregations"] = [
        {"field": a.field, "operations": list(a.ops), "as": a.as_} for a in cfg.aggregations
    ]
    d["shards"] = shards
    return d


class _Output:
    """Builds the output record of a (group, window)."""

    def __init__(self, group_by: tuple[str, ...], accs: Accumulators) -> None:
        self.group_by = group_by
        self.flat = len(group_by) == 1 and "." not in group_by[0]
        self.finish = accs.finish
        self.iso_cache: dict[int, str] = {}

    def iso(self, us: int) -> str:
        """ISO text of a window boundary (boundaries repeat across groups: cached)."""
        text = self.iso_cache.get(us)
        if text is None:
            if len(self.iso_cache) > 100_000:
                self.iso_cache.clear()
            text = self.iso_cache[us] = iso_us(us)
        return text

    def head(self, key: Any, start: int, end: int) -> dict[str, Any]:
        """The output record without its aggregates."""
        if self.flat:
            return {
                self.group_by[0]: key,
                "window_start": self.iso(start),
                "window_end": self.iso(end),
            }
        out: dict[str, Any] = {}
        if len(self.group_by) == 1:
            set_path(out, self.group_by[0], key)
        elif self.group_by:
            for path, value in zip(self.group_by, key, strict=True):
                set_path(out, path, value)
        out["window_start"] = self.iso(start)
        out["window_end"] = self.iso(end)
        return out

    def record(self, key: Any, start: int, end: int, acc: list[Any]) -> dict[str, Any]:
        """The output record of a window."""
        out = self.head(key, start, end)
        self.finish(acc, out)
        return out


# Group state (a list, for speed): [max_t, late_before, panes_or_sessions, next_end, done].
_MAX, _LB, _W, _NEXT, _DONE = range(5)


class _PaneShard(ShardLogic):
    """Tumbling and sliding windows of one shard, kept as panes of gcd(size, slide)."""

    def __init__(self, op: _WindowOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume, op.idle_timeout)
        self.op = op
        if self.state is None:
            self.state = {}

    def has_state(self) -> bool:
        return any(g[_W] for g in self.state.values())

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        groups: dict[Any, list[Any]] = self.state
        late: list[Any] = []
        errs: list[Failed] = []
        due: list[Any] = []
        down: list[dict[str, Any]] = []
        o.ingest(groups, batches, late, errs, due, down)
        out: list[tuple[str, list[Any]]] = []
        for key in set(due):
            self._close(key, groups[key], groups[key][1], down)
        if down:
            out.append((DOWN, down))
        if late:
            late_records(o.step_id, len(late))
            out.append((LATE, late))
        if errs:
            out.append((ERRS, errs))
        return out

    def _windows(self, panes: dict[int, list[Any]], lo: int, hi: int) -> list[int]:
        """Starts of windows holding any pane, with end in (lo, hi]."""
        o = self.op
        pane, size, slide = o.pane, o.size, o.slide
        starts: set[int] = set()
        for p in panes:
            first = -((size - (p + 1) * pane) // slide)
            last = (p * pane) // slide
            for k in range(first, last + 1):
                end = k * slide + size
                if lo < end <= hi:
                    starts.add(k * slide)
        return sorted(starts)

    def _emit(self, key: Any, g: list[Any], hi: int, down: list[dict[str, Any]]) -> int:
        """Emit the windows of ``g`` ending in (done, hi]; the largest end emitted."""
        o = self.op
        panes = g[2]
        pane, size = o.pane, o.size
        top = g[4]
        for start in self._windows(panes, g[4], hi):
            end = start + size
            acc: list[Any] | None = None
            for p in range(start // pane, end // pane):
                part = panes.get(p)
                if part is None:
                    continue
                if acc is None:
                    acc = o.accs.copy(part)
                else:
                    o.accs.merge(acc, part)
            if acc is not None and acc[0]:
                down.append(o.output.record(key, start, end, acc))
            top = max(top, end)
        return top

    def _close(self, key: Any, g: list[Any], wm: int, down: list[dict[str, Any]]) -> None:
        o = self.op
        if o.tumbling:
            panes = g[2]
            size = o.size
            for p in [p for p in panes if (p + 1) * size <= wm]:
                down.append(o.output.record(key, p * size, (p + 1) * size, panes.pop(p)))
            g[3] = (min(panes) + 1) * size if panes else _NEVER
            g[4] = wm
            return
        self._emit(key, g, wm, down)
        g[4] = wm
        # Panes no open window needs: before the start of the first window ending after wm.
        first_open = ((wm - o.size) // o.slide + 1) * o.slide
        panes = g[2]
        for p in [p for p in panes if (p + 1) * o.pane <= first_open]:
            del panes[p]
        g[3] = _NEVER
        for p in panes:
            end = -((o.size - (p + 1) * o.pane) // o.slide) * o.slide + o.size
            while end <= wm:
                end += o.slide
            if end < g[3]:
                g[3] = end

    def flush(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        for key, g in self.state.items():
            if g[2]:
                self._emit(key, g, _NEVER, down)
        self.state = {}
        return [(DOWN, down)] if down else []

    def idle(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        for key, g in self.state.items():
            if g[2]:
                top = self._emit(key, g, _NEVER, down)
                g[2] = {}
                g[3] = _NEVER
                g[4] = top
                g[1] = max(g[1], top)
        return [(DOWN, down)] if down else []


class _SessionShard(ShardLogic):
    """Session windows of one shard: per group a list of [start, last, acc], by start."""

    def __init__(self, op: _WindowOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume, op.idle_timeout)
        self.op = op
        if self.state is None:
            self.state = {}

    def has_state(self) -> bool:
        return any(g[_W] for g in self.state.values())

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        groups: dict[Any, list[Any]] = self.state
        keyf, timef, new, update, merge = o.key, o.time, o.accs.new, o.accs.update, o.accs.merge
        lateness, gap = o.lateness, o.gap
        late: list[Any] = []
        errs: list[Failed] = []
        due: list[Any] = []
        for batch in batches:
            for rec in batch:
                try:
                    t = timef(rec)
                    key = keyf(rec)
                    g = groups.get(key)
                    if g is None:
                        g = groups[key] = [-_NEVER, -_NEVER, [], _NEVER, -_NEVER]
                    elif t < g[1]:
                        late.append(rec)
                        continue
                    ss: list[list[Any]] = g[2]
                    last = ss[-1] if ss else None
                    if last is not None and last[0] <= t and t - last[1] < gap:
                        update(last[2], rec, t)
                        if t > last[1]:
                            last[1] = t
                    elif last is None or t - last[1] >= gap and t > last[0]:
                        acc = new()
                        update(acc, rec, t)
                        ss.append([t, t, acc])
                    else:
                        # Out of order: join (and maybe bridge) the sessions within gap.
                        near = [s for s in ss if s[0] - gap < t < s[1] + gap]
                        if not near:
                            acc = new()
                            update(acc, rec, t)
                            ss.append([t, t, acc])
                            ss.sort(key=lambda s: s[0])
                        else:
                            head = near[0]
                            update(head[2], rec, t)
                            for s in near[1:]:
                                merge(head[2], s[2])
                                head[1] = max(head[1], s[1])
                                ss.remove(s)
                            head[0] = min(head[0], t)
                            head[1] = max(head[1], t)
                    g[3] = ss[0][1] + gap
                    if t > g[0]:
                        g[0] = t
                        lb = t - lateness
                        if lb > g[1]:
                            g[1] = lb
                    if g[1] >= g[3]:
                        due.append(key)
                except (RecordError, TypeError) as exc:
                    errs.append(Failed.of(o.step_id, _explain(exc, o.step_id), rec))
        out: list[tuple[str, list[Any]]] = []
        if due:
            down: list[dict[str, Any]] = []
            for key in set(due):
                self._close(key, groups[key], groups[key][1], down)
            if down:
                out.append((DOWN, down))
        if late:
            late_records(o.step_id, len(late))
            out.append((LATE, late))
        if errs:
            out.append((ERRS, errs))
        return out

    def _close(self, key: Any, g: list[Any], wm: int, down: list[dict[str, Any]]) -> None:
        gap = self.op.gap
        keep = []
        for s in g[2]:
            if s[1] + gap <= wm:
                down.append(self.op.output.record(key, s[0], s[1], s[2]))
            else:
                keep.append(s)
        g[2] = keep
        g[3] = min((s[1] + gap for s in keep), default=_NEVER)

    def flush(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        for key, g in self.state.items():
            for s in g[2]:
                down.append(self.op.output.record(key, s[0], s[1], s[2]))
        self.state = {}
        return [(DOWN, down)] if down else []

    def idle(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        for key, g in self.state.items():
            for s in g[2]:
                down.append(self.op.output.record(key, s[0], s[1], s[2]))
                g[1] = max(g[1], s[1])
            g[2] = []
            g[3] = _NEVER
        return [(DOWN, down)] if down else []


_PANE_INGEST = """
def ingest(groups, batches, late, errs, due, down):
    for batch in batches:
        for rec in batch:
            try:
{extract}
                g = groups.get(key)
                if g is None:
                    g = groups[key] = [-_NEVER, -_NEVER, {{}}, _NEVER, -_NEVER]
                elif t < g[1]:
                    late.append(rec)
                    continue
                panes = g[2]
                p = t // {pane}
                acc = panes.get(p)
                if acc is None:
                    acc = _new()
{update}
                    panes[p] = acc
                    end = {first_end}
                    if end < g[3]:
                        g[3] = end
                else:
{update}
                if t > g[0]:
                    g[0] = t
                    lb = t - {lateness}
                    if lb > g[1]:
                        g[1] = lb
                        if lb >= g[3]:
{close}
            except (RecordError, TypeError, AttributeError) as exc:
                errs.append(_failed(_step, _explain(exc, _step), rec))
"""

# Tumbling windows close inline: the panes are the windows.
_TUMBLING_CLOSE = """
for q in [q for q in panes if (q + 1) * {size} <= lb]:
    a = panes.pop(q)
    row = {row}
    _finish(a, row)
    down.append(row)
g[3] = (min(panes) + 1) * {size} if panes else _NEVER
g[4] = lb
"""


def _compile_pane_ingest(o: _WindowOp, cfg: WindowConfig) -> Any:
    """The per-step loop adding sub-batches to panes (key, time and aggregates inlined)."""
    env: dict[str, Any] = dict(o.accs.update_env)
    extract = extraction_code(cfg.group_by, cfg.time_field, cfg.time_unit, env, " " * 16)
    cache = o.output.iso_cache
    env.update(
        _NEVER=_NEVER,
        _new=o.accs.new,
        _finish=o.accs.finish,
        _head=o.output.head,
        _iso=o.output.iso,
        _isoc=cache,
        _failed=Failed.of,
        _step=o.step_id,
        _explain=_explain,
        RecordError=RecordError,
    )
    size, slide, pane = o.size, o.slide, o.pane
    if o.tumbling:
        first_end = f"(p + 1) * {size}"
        start, end = f"q * {size}", f"(q + 1) * {size}"
        if o.output.flat:
            row = (
                f"{{{cfg.group_by[0]!r}: key, "
                f"'window_start': _isoc.get({start}) or _iso({start}), "
                f"'window_end': _isoc.get({end}) or _iso({end})}}"
            )
        else:
            row = f"_head(key, {start}, {end})"
        close = _TUMBLING_CLOSE.format(size=size, row=row)
    else:
        first_end = f"-(({size} - (p + 1) * {pane}) // {slide}) * {slide} + {size}"
        close = "due.append(key)"
    code = _PANE_INGEST.format(
        extract="\n".join(extract),
        update="\n".join(indent_code(o.accs.update_code, " " * 20)),
        pane=pane,
        first_end=first_end,
        lateness=o.lateness,
        close="\n".join(" " * 28 + line for line in close.strip().split("\n")),
    )
    exec(compile(code, f"<window {o.step_id}>", "exec"), env)  # noqa: S102
    return env["ingest"]


def _explain(exc: BaseException, step_id: str) -> BaseException:
    if isinstance(exc, TypeError):
        return BadValue(f"step {step_id!r}: group key cannot be hashed ({exc})")
    return exc


class _WindowOp:
    """The compiled settings of one window step, shared by its shards."""

    def __init__(
        self, step_id: str, cfg: WindowConfig, shards: int, idle_timeout: float | None
    ) -> None:
        self.step_id = component_id(step_id)
        self.definition = _definition(cfg, shards)
        self.idle_timeout = idle_timeout
        self.key = key_getter(cfg.group_by)
        self.time = time_reader(cfg.time_field, cfg.time_unit)
        self.accs = compile_aggregates(cfg.aggregations)
        self.output = _Output(tuple(cfg.group_by), self.accs)
        self.lateness = to_us(cfg.allowed_lateness)
        spec = cfg.window
        if spec.type == "session":
            self.gap = to_us(spec.gap or 0)
            self.size = self.slide = self.pane = 0
        else:
            self.size = to_us(spec.size or 0)
            self.slide = to_us(spec.slide or spec.size or 0)
            self.pane = math.gcd(self.size, self.slide)
            self.gap = 0
        self.session = spec.type == "session"
        self.tumbling = not self.session and self.slide == self.size
        self.ingest = None if self.session else _compile_pane_ingest(self, cfg)

    def build(self, resume: Any) -> ShardLogic:
        if self.session:
            return _SessionShard(self, resume)
        return _PaneShard(self, resume)


@operator
def window(
    step_id: str,
    up: Stream[list[dict[str, Any]]],
    config: WindowConfig,
    idle_timeout: float | None = None,
    shards: int = SHARDS,
) -> WindowOut:
    """Aggregate batches of records per group and event-time window.

    :arg step_id: Unique step id (the workflow component id).
    :arg up: Stream of record batches.
    :arg config: Window, grouping, aggregates and lateness.
    :arg idle_timeout: Emit a shard's open windows after this many seconds of system time
        without records (``None``: only at the watermark and the end of input).
    :arg shards: State shards spread over the workers (part of the recovery state).
    :returns: Window records, late records and errors, each as batches.
    """
    wop = _WindowOp(step_id, config, shards, idle_timeout)
    keyed = route_and_merge(step_id, [(None, up)], [wop.key], shards)
    outs = stateful_shards("windows", keyed, wop.build)
    return WindowOut(down=outs[DOWN], late=outs[LATE], errs=outs[ERRS])


@transformation(
    "window",
    config=WindowConfig,
    description="Aggregate records per group in event-time tumbling, sliding or session windows.",
    inputs=(1, None),
    stateful=True,
    named_outputs=lambda cfg: ["late"],
)
def build_window(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``window`` step."""
    import bytewax.operators as op

    up = ups[0] if len(ups) == 1 else op.merge(f"{ctx.step_id}_inputs", *ups)
    out = window(ctx.step_id, up, ctx.config, idle_timeout=idle_timeout_of(ctx))
    return Outputs(down=out.down, errs=out.errs, named={"late": out.late})
