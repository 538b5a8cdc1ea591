"""The ``window`` transformation: event-time tumbling, sliding and session windows.

Tumbling and sliding windows are aligned to the Unix epoch; a record at time ``t``
belongs to every window with ``start <= t < end``. A session holds a key's records while
consecutive records are less than ``gap`` apart. Each (group, window) gives one record:
the group-by fields at their own paths, ``window_start`` and ``window_end`` (ISO-8601
UTC; a session ends at its last record) and the aggregates.

The watermark is kept per group: the group's largest event time minus
``allowed_lateness`` (like bytewax's ``EventClock`` per key), so results do not depend on
how keys are spread over workers. A group's records that come from several source
partitions (or inputs) arrive in the order those are read, which varies from run to run:
``allowed_lateness`` must cover how far one partition may run ahead of another. Branches
of one source that meet again (two filters, a route's outputs) are not such inputs: the
records that reach a shard together are taken in event-time order. A
window is emitted when the watermark reaches its end; a record older than the watermark
is late: it is not aggregated, it is counted
(``dataflare_late_records_total``) and goes to the ``late`` output. At the end of a
bounded input every open window is emitted; with an idle timeout, every open window of a
shard is emitted after that much system time without records (and later records for
those windows count as late).

Each record updates its windows in a loop generated for the step (key, time and aggregates
inlined), so it costs no Python call per record in the common case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
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
    KEY_KINDS,
    LATE,
    SHARDS,
    US,
    BoolKey,
    ShardLogic,
    component_id,
    extraction_code,
    from_key,
    idle_timeout_of,
    indent_code,
    iso_us,
    key_getter,
    not_an_object,
    rejoined_upstream,
    route_and_merge,
    shards_of,
    stateful_shards,
    tagged,
    time_reader,
    to_us,
    touch_code,
)
from dataflare.record_schema import FieldType, SchemaContext, aggregate_fields, window_output
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
        self._minutes: dict[int, str] = {}

    def iso(self, us: int) -> str:
        """ISO text of a window boundary (boundaries repeat across groups: cached).

        Session boundaries are event times and seldom repeat: the text is made of the
        minute's (cached) and the seconds' (a table of the 60,000 milliseconds of a
        minute), without a datetime.
        """
        text = self.iso_cache.get(us)
        if text is None:
            if len(self.iso_cache) > 100_000:
                self.iso_cache.clear()
            minute, rem = divmod(us, _MINUTE_US)
            head = self._minutes.get(minute)
            if head is None:
                if len(self._minutes) > 10_000:
                    self._minutes.clear()
                head = self._minutes[minute] = iso_us(minute * _MINUTE_US)[:17]  # ...THH:MM:
            if rem % 1000:
                text = f"{head}{rem // US:02d}.{rem % US:06d}Z"
            else:
                text = head + _seconds()[rem // 1000]
            self.iso_cache[us] = text
        return text

    def head(self, key: Any, start: int, end: int) -> dict[str, Any]:
        """The output record without its aggregates."""
        key = from_key(key)
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


# Group state (a list, for speed): [max_t, late_before, windows, next_end]. For tumbling
# and sliding windows, ``windows`` is None (no open window), the accumulator of the one
# open window (the common case: it starts at ``next_end - size``) or, while two or more
# are open, {start: accumulator}; with panes it is {pane start: accumulator}; for
# sessions a list of [start, last, accumulator] ordered by start. ``next_end`` is when
# the first window closes.
_MAX, _LB, _W, _NEXT, _PANE_NEXT = range(5)
_MINUTE_US = 60 * US


@cache
def _seconds() -> tuple[str, ...]:
    """The ISO text of each millisecond of a minute: ``SSZ`` or ``SS.mmmZ``."""
    return tuple(f"{ms // 1000:02d}Z" if ms % 1000 == 0 else f"{ms // 1000:02d}.{ms % 1000:03d}Z"
                 for ms in range(60_000))


class _WindowShard(ShardLogic):
    """One shard of a window step: every group of the shard with its open windows."""

    tracks_keys = True

    def __init__(self, op: _WindowOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume, op.idle_timeout)
        self.op = op
        # Groups, windows and accumulators are each held once; records collected for
        # ``sql`` are not (a sliding window's record is in each of its windows).
        self.tree_state = not op.accs.collects
        if self.state is None:
            self.state = {}
        elif not (op.session or op.pane):
            _compact(self.state)

    def has_state(self) -> bool:
        return any(g[_W] for g in self.state.values())  # None, {} and [] hold no window

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        late: list[Any] = []
        errs: list[Failed] = []
        down: list[dict[str, Any]] = []
        if o.time_order is not None:
            batches = [sorted([r for b in batches for r in b], key=o.time_order)]
        if self.touched is None:
            o.ingest(self.state, batches, late, errs, down)
        else:  # the keys changed go to the next snapshot
            o.ingest_touching(self.state, batches, late, errs, down, self.touched)
        return tagged(o.step_id, down, errs, late)

    def _spans(self, g: list[Any]) -> list[tuple[int, int, list[Any]]]:
        o = self.op
        if o.session:
            return [(s[0], s[1], s[2]) for s in g[_W]]
        if o.pane:
            return o.pane_windows(g[_W], g[_PANE_NEXT])
        wins = g[_W]
        if wins.__class__ is list:
            return [(g[_NEXT] - o.size, g[_NEXT], wins)]
        return [(start, start + o.size, acc) for start, acc in (wins or {}).items()]

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Each open window of each group with its aggregates so far."""
        record = self.op.output.record
        return [(key, record(key, start, end, acc))
                for key, g in state.items() for start, end, acc in self._spans(g)]

    def flush(self) -> list[tuple[str, list[Any]]]:
        record = self.op.output.record
        state, self.state = self.state, {}
        self.touched = None
        down: list[dict[str, Any]] = []
        while state:  # each group's state is freed as its rows are made
            key, g = state.popitem()
            down.extend(record(key, start, end, acc) for start, end, acc in self._spans(g))
        return [(DOWN, down)] if down else []

    def idle(self) -> list[tuple[str, list[Any]]]:
        record = self.op.output.record
        down: list[dict[str, Any]] = []
        self.touched = None  # every group changes
        for key, g in self.state.items():
            for start, end, acc in self._spans(g):
                down.append(record(key, start, end, acc))
                # Records for a window that fired are late from now on.
                g[_LB] = max(g[_LB], end)
            g[_W] = [] if self.op.session else {} if self.op.pane else None
            g[_NEXT] = _NEVER
            if self.op.pane:
                g[_PANE_NEXT] = _NEVER
        return [(DOWN, down)] if down else []


def margin(window: WindowSpec) -> int:
    """Whole seconds a window reaches from its records' times (a year-9999 end can't be dated)."""
    return math.ceil(max(window.size or 0.0, window.gap or 0.0, window.slide or 0.0)) + 1


def _event_time(cfg: WindowConfig) -> Callable[[Any], int]:
    """A sort key: the record's event time; a record without one sorts first (and fails)."""
    read = time_reader(cfg.time_field, cfg.time_unit, margin(cfg.window))

    def event_time(rec: Any) -> int:
        try:
            return read(rec)
        except (RecordError, TypeError, AttributeError):
            return -_NEVER

    return event_time


def _compact(groups: dict[Any, list[Any]]) -> None:
    """Hold a resumed group's one open window inline (older snapshots hold a dict)."""
    for g in groups.values():
        wins = g[_W]
        if wins.__class__ is dict and len(wins) < 2:
            g[_W] = next(iter(wins.values()), None)


def _explain(exc: BaseException, step_id: str) -> BaseException:
    if isinstance(exc, TypeError):
        return BadValue(f"step {step_id!r}: {KEY_KINDS} ({exc})")
    if isinstance(exc, AttributeError):
        return not_an_object(exc)
    return exc


# The per-step loops below are generated once per step: key and time extraction and the
# aggregate updates are inlined, so a record costs no Python call in the common case.
_WINDOWS_INGEST = """
def ingest(groups, batches, late, errs, down{touched}):
    for batch in batches:
        for rec in batch:
            try:
{extract}
                g = groups.get(key)
                if g is None:
                    g = groups[key] = [-_NEVER, -_NEVER, None, _NEVER]
                elif t < g[1]:
                    late.append(rec)
                    continue
{touch}
{place}
                if t > g[0]:
                    g[0] = t
                    lb = {late_bound}
                    if lb > g[1]:
                        g[1] = lb
                        while lb >= g[3]:
                            s = g[3] - {size}
                            wins = g[2]
                            if wins.__class__ is list:
                                acc = wins
                                g[2] = None
                                g[3] = _NEVER
                            else:
                                acc = wins.pop(s)
                                if len(wins) == 1:  # the last open window goes inline
                                    ((first, g[2]),) = wins.items()
                                    g[3] = first + {size}
                                else:
                                    g[3] = min(wins) + {size}
{emit}
            except (RecordError, TypeError, AttributeError) as exc:
                errs.append(_failed(_step, _explain(exc, _step), rec))
"""

# Adds the record to the window starting at ``s``. A tumbling window holds each record
# once...
_PLACE = """
wins = g[2]
if wins.__class__ is list and s + {size} == g[3]:
    acc = wins
{update}
else:
    acc = wins.get(s) if wins.__class__ is dict else None
    if acc is None:
        acc = {new}
{update_in}
        if wins is None:
            g[2] = acc
            g[3] = s + {size}
        else:
            _open(g, s, acc)
    else:
{update_in}
"""
_TUMBLING_PLACE = """
s = t - t % {size}
{place}
"""

# ...a sliding window every window with start <= t < start + size. A record that does
# not fit raises in the first update, before anything changed.
_SLIDING_PLACE = """
last = t - t % {slide}
for s in range(last - (last - t + {size} - 1) // {slide} * {slide}, last + 1, {slide}):
{place}
"""

# ...or, when the aggregates merge (see ``Accumulators.merge_code``), a sliding window is
# cut into panes of gcd(size, slide): a record updates its one pane, and a window is the
# merge of its panes when it closes (Flink's slicing). The group state then holds the
# panes and, in slot 4, the start of the next window to emit.
_PANES_INGEST = """
def ingest(groups, batches, late, errs, down{touched}):
    for batch in batches:
        for rec in batch:
            try:
{extract}
                g = groups.get(key)
                if g is None:
                    g = groups[key] = [-_NEVER, -_NEVER, {{}}, _NEVER, _NEVER]
                elif t < g[1]:
                    late.append(rec)
                    continue
{touch}
                wins = g[2]
                p = t - t % {pane}
                acc = wins.get(p)
                if acc is None:
                    acc = {new}
{update_new}
                    wins[p] = acc
                    s = (p - {size}) // {slide} * {slide} + {slide}
                    if s < g[4]:
                        g[4] = s
                        g[3] = s + {size}
                else:
{update_new}
                if t > g[0]:
                    g[0] = t
                    lb = {late_bound}
                    if lb > g[1]:
                        g[1] = lb
                        while lb >= g[3]:
                            s = g[4]
                            acc = {new}
                            nxt = False
                            for p in range(s, s + {size}, {pane}):
                                pa = wins.get(p)
                                if pa is not None:
{merge}
                                    if p >= s + {slide}:
                                        nxt = True
                            if acc[0]:
{emit}
                            for p in range(s, s + {slide}, {pane}):
                                if p in wins:
                                    del wins[p]
                            if nxt:
                                s += {slide}
                            elif wins:
                                s = (min(wins) - {size}) // {slide} * {slide} + {slide}
                            else:
                                s = _NEVER - {size}
                            g[4] = s
                            g[3] = s + {size}
            except (RecordError, TypeError, AttributeError) as exc:
                errs.append(_failed(_step, _explain(exc, _step), rec))
"""

_SESSIONS_INGEST = """
def ingest(groups, batches, late, errs, down{touched}):
    for batch in batches:
        for rec in batch:
            try:
{extract}
                g = groups.get(key)
                if g is None:
                    g = groups[key] = [-_NEVER, -_NEVER, [], _NEVER]
                elif t < g[1]:
                    late.append(rec)
                    continue
{touch}
                ss = g[2]
                if not ss or t - ss[-1][1] >= {gap}:
                    acc = {new}
{update_new}
                    ss.append([t, t, acc])
                elif t >= ss[-1][0]:
                    s = ss[-1]
                    acc = s[2]
{update_new}
                    if t > s[1]:
                        s[1] = t
                else:
                    _place(ss, rec, t)
                g[3] = ss[0][1] + {gap}
                if t > g[0]:
                    g[0] = t
                    lb = {late_bound}
                    if lb > g[1]:
                        g[1] = lb
                if g[1] >= g[3]:
                    keep = []
                    for s in ss:
                        if s[1] + {gap} <= g[1]:
                            acc = s[2]
{emit}
                        else:
                            keep.append(s)
                    g[2] = keep
                    g[3] = keep[0][1] + {gap} if keep else _NEVER
            except (RecordError, TypeError, AttributeError) as exc:
                errs.append(_failed(_step, _explain(exc, _step), rec))
"""


def _block(code: str, indent: int) -> str:
    return "\n".join(" " * indent + line if line else line for line in code.strip("\n").split("\n"))


def _compile_ingest(o: _WindowOp, cfg: WindowConfig, touching: bool = False) -> Any:
    """The generated ingest loop of a window step.

    ``touching``: the loop also puts each group it changes in ``touched`` (for
    :attr:`ShardLogic.tracks_keys`).
    """
    env: dict[str, Any] = dict(o.accs.update_env)
    extract = "\n".join(extraction_code(cfg.group_by, cfg.time_field, cfg.time_unit, env,
                                        " " * 16, margin(cfg.window)))
    env.update(
        _NEVER=_NEVER,
        _new=o.accs.new,
        _finish=o.accs.finish,
        _head=o.output.head,
        _BoolKey=BoolKey,
        _iso=o.output.iso,
        _isoc=o.output.iso_cache,
        _failed=Failed.of,
        _step=o.step_id,
        _explain=_explain,
        _place=o.place_out_of_order,
        _open=o.open_window,
        RecordError=RecordError,
    )

    tracking = touch_code(touching, 16)

    def row(start: str, end: str) -> str:
        if o.output.flat:
            return (
                f"{{{cfg.group_by[0]!r}: key if key.__class__ is not _BoolKey else key.value, "
                f"'window_start': _isoc.get({start}) or _iso({start}), "
                f"'window_end': _isoc.get({end}) or _iso({end})}}"
            )
        return f"_head(key, {start}, {end})"

    def emit(start: str, end: str, indent: int) -> str:
        """Append the output record of the window in ``acc`` to ``down``."""
        items = o.accs.finish_items
        if o.output.flat and all("." not in path for path, _ in items):
            fields = "".join(f", {path!r}: {expr}" for path, expr in items)
            code = f"down.append({row(start, end)[:-1]}{fields}}})"
        else:
            code = f"row = {row(start, end)}\n_finish(acc, row)\ndown.append(row)"
        return _block(code, indent)

    if o.pane:
        update = "\n".join(indent_code(o.accs.update_code, " " * 20))
        code = _PANES_INGEST.format(
            extract=extract,
            update_new=update,
            pane=o.pane,
            size=o.size,
            slide=o.slide,
            late_bound=f"t - {o.lateness}" if o.lateness else "t",
            new=o.accs.new_code,
            merge="\n".join(indent_code(o.accs.merge_code or "", " " * 36)),
            emit=emit("s", f"s + {o.size}", 32),
            **tracking,
        )
    elif o.session:
        update = "\n".join(indent_code(o.accs.update_code, " " * 20))
        code = _SESSIONS_INGEST.format(
            extract=extract,
            update_new=update,
            gap=o.gap,
            late_bound=f"t - {o.lateness}" if o.lateness else "t",
            emit=emit("s[0]", "s[1]", 28),
            new=o.accs.new_code,
            **tracking,
        )
    else:
        place = _PLACE.format(
            size=o.size,
            update="\n".join(indent_code(o.accs.update_code, " " * 4)),
            update_in="\n".join(indent_code(o.accs.update_code, " " * 8)),
            new=o.accs.new_code,
        )
        outer = _TUMBLING_PLACE if o.tumbling else _SLIDING_PLACE
        body = outer.format(size=o.size, slide=o.slide, place=_block(place, 0 if o.tumbling else 4))
        code = _WINDOWS_INGEST.format(
            extract=extract,
            place=_block(body, 16),
            late_bound=f"t - {o.lateness}" if o.lateness else "t",
            size=o.size,
            emit=emit("s", f"s + {o.size}", 28),
            **tracking,
        )
    exec(compile(code, f"<window {o.step_id}>", "exec"), env)  # noqa: S102
    return env["ingest"]


class _WindowOp:
    """The compiled settings of one window step, shared by its shards."""

    def __init__(
        self,
        step_id: str,
        cfg: WindowConfig,
        shards: int,
        idle_timeout: float | None,
        accs: Accumulators | None = None,
        definition: dict[str, Any] | None = None,
        in_time_order: bool = False,
    ) -> None:
        self.step_id = component_id(step_id)
        self.definition = {**_definition(cfg, shards), **(definition or {})}
        self.idle_timeout = idle_timeout
        self.key = key_getter(cfg.group_by)
        self.accs = accs or compile_aggregates(cfg.aggregations)
        self.output = _Output(tuple(cfg.group_by), self.accs)
        self.lateness = to_us(cfg.allowed_lateness)
        spec = cfg.window
        self.session = spec.type == "session"
        self.gap = to_us(spec.gap or 0) if self.session else 0
        self.size = 0 if self.session else to_us(spec.size or 0)
        self.slide = 0 if self.session else to_us(spec.slide or spec.size or 0)
        self.tumbling = not self.session and self.slide == self.size
        # Sliding windows are cut into panes of gcd(size, slide) when the aggregates merge.
        mergeable = self.accs.merge_code is not None
        sliding = not self.session and not self.tumbling
        self.pane = math.gcd(self.size, self.slide) if sliding and mergeable else 0
        if self.pane:
            self.definition["window.pane"] = self.pane
        self.ingest = _compile_ingest(self, cfg)
        self.ingest_touching = _compile_ingest(self, cfg, touching=True)
        self.time_order = _event_time(cfg) if in_time_order else None

    def pane_windows(
        self, panes: dict[int, list[Any]], after: int
    ) -> list[tuple[int, int, list[Any]]]:
        """The windows from ``after`` on over ``panes`` (start -> accumulator).

        Each as (start, end, merged accumulator); the windows before ``after`` were emitted.
        """
        size, slide, pane = self.size, self.slide, self.pane
        starts: set[int] = set()
        for p in panes:
            first = max((p - size) // slide * slide + slide, after)
            starts.update(range(first, p + 1, slide))
        out = []
        for s in sorted(starts):
            acc = self.accs.new()
            for p in range(s, s + size, pane):
                pa = panes.get(p)
                if pa is not None:
                    self.accs.merge(acc, pa)
            out.append((s, s + size, acc))
        return out

    def open_window(self, g: list[Any], start: int, acc: list[Any]) -> None:
        """Add a second (or later) open window to group ``g``: its windows become a dict."""
        wins = g[_W]
        if wins.__class__ is list:
            wins = g[_W] = {g[_NEXT] - self.size: wins}
        wins[start] = acc
        if start + self.size < g[_NEXT]:
            g[_NEXT] = start + self.size

    def place_out_of_order(self, ss: list[list[Any]], rec: Any, t: int) -> None:
        """Add a record older than the group's last session: join or bridge sessions."""
        accs, gap = self.accs, self.gap
        near = [s for s in ss if s[0] - gap < t < s[1] + gap]
        if not near:
            acc = accs.new()
            accs.update(acc, rec, t)
            ss.append([t, t, acc])
            ss.sort(key=lambda s: s[0])
            return
        head = near[0]
        accs.update(head[2], rec, t)
        for s in near[1:]:
            accs.merge(head[2], s[2])
            head[1] = max(head[1], s[1])
            ss.remove(s)
        head[0] = min(head[0], t)
        head[1] = max(head[1], t)

    def build(self, resume: Any) -> ShardLogic:
        return _WindowShard(self, resume)


@operator
def window(
    step_id: str,
    up: Stream[list[dict[str, Any]]],
    config: WindowConfig,
    idle_timeout: float | None = None,
    shards: int = SHARDS,
    accs: Accumulators | None = None,
    definition: dict[str, Any] | None = None,
    in_time_order: bool = False,
) -> WindowOut:
    """Aggregate batches of records per group and event-time window.

    :arg step_id: Unique step id (the workflow component id).
    :arg up: Stream of record batches.
    :arg config: Window, grouping, aggregates and lateness.
    :arg idle_timeout: Emit a shard's open windows after this many seconds of system time
        without records (``None``: only at the watermark and the end of input).
    :arg shards: State shards spread over the workers (part of the recovery state).
    :arg accs: What each window accumulates, instead of ``config.aggregations`` (e.g.
        :func:`~dataflare.operators.aggregates.collect_records` for ``sql``).
    :arg definition: More settings the recovery state depends on (checked on resume).
    :arg in_time_order: Take the records that reach a shard together in event-time order
        (see :func:`~dataflare.operators.keyed.rejoined_upstream`).
    :returns: Window records, late records and errors, each as batches.
    """
    wop = _WindowOp(step_id, config, shards, idle_timeout, accs, definition, in_time_order)
    keyed = route_and_merge(step_id, [(None, up)], [wop.key], shards)
    outs = stateful_shards("windows", keyed, wop.build)
    return WindowOut(down=outs[DOWN], late=outs[LATE], errs=outs[ERRS])


def window_schema(ctx: SchemaContext[WindowConfig]) -> FieldType:
    """One record per group and window: group-by fields, window bounds, aggregates."""
    cfg = ctx.config
    when = ctx.read(("time_field",), cfg.time_field, want="time").all_origins()
    bounds = {"window_start": FieldType.of("string", when),
              "window_end": FieldType.of("string", when)}
    return window_output(ctx, cfg.group_by, {**bounds, **aggregate_fields(ctx, cfg.aggregations)})


@transformation(
    "window",
    config=WindowConfig,
    description="Aggregate records per group in event-time tumbling, sliding or session windows.",
    inputs=(1, None),
    stateful=True,
    serves=True,
    named_outputs=lambda cfg: ["late"],
    schema=window_schema,
)
def build_window(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``window`` step."""
    up = ups[0]
    out = window(ctx.step_id, up, ctx.config, idle_timeout=idle_timeout_of(ctx),
                 shards=shards_of(ctx), in_time_order=rejoined_upstream(ctx))
    return Outputs(down=out.down, errs=out.errs, named={"late": out.late})
