"""The ``join`` transformation: the first input is left, the second right.

Three ways to join:

- **relational** (no ``window``): every left and right record is kept per key and the
  join is emitted when both inputs end (bounded inputs).
- **windowed** (``window``: tumbling, sliding or session, on ``time_field``): a relational
  join per key and window, emitted when the window closes. The watermark is kept per
  key over both sides (largest event time minus ``allowed_lateness``); older records
  are late and go to the ``late`` output. The records that reach a key's shard together
  are all judged against the watermark before them (each side passes on its part of a
  batch in turn), and the watermark then moves.
- **lookup** (``mode: lookup``): a stream-table join. The right input is a table holding
  the latest record per key (forgotten ``ttl`` of system time after it arrived; a CDC
  delete removes it); each left record is emitted as it arrives, joined with the current
  right record. The table is bootstrapped first: left records wait until the right input
  has ended (a bounded table read) or finished its snapshot (CDC ``read`` records followed
  by a change), at most ``bootstrap_timeout`` after the first one waited.

A null key matches nothing. The output is ``{L: left, R: right}`` with ``output_prefix``
(a missing side is ``null``), else the merged record ``{**right, **left}``. A relational or
windowed join's records carry no ``_meta`` (made of two records at a window's close, like
an aggregate, they have no one source position); a lookup's keep the left record's.

A relational or windowed join holds its records until they are joined: compactly, and
only the fields read downstream when the compiler knows them
(:mod:`dataflare.dsl_compiler.projection`: a join feeding a mapping holds the fields
the mapping reads). The fields held are part of the step's definition; a resume that
would need a field the saved records lack is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from textwrap import indent
from typing import Any, Literal

from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic
from pydantic import Field, model_validator

from dataflare import stopping
from dataflare.config import Duration, Paths, Strict
from dataflare.operators.keyed import (
    DOWN,
    ERRS,
    HELD,
    KEY_KINDS,
    LATE,
    SHARDS,
    BoolKey,
    ShardLogic,
    component_id,
    extraction_code,
    key_getter,
    not_an_object,
    route_and_merge,
    shard_names,
    shards_of,
    stateful_shards,
    tagged,
    time_reader,
    to_us,
    touch_code,
)
from dataflare.operators.window import WindowSpec, margin
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import META, Failed, RecordError, a_or_an
from dataflare.registry import UNBOUNDED, BuildContext, Outputs, transformation

log = logging.getLogger(__name__)
JoinType = Literal["inner", "left", "right", "full"]
_NEVER = 1 << 62
LEFT, RIGHT = "left", "right"


class OutputPrefix(Strict):
    """Where the two sides go in the output record."""

    left: str = Field("left", description="Field holding the left record.")
    right: str = Field("right", description="Field holding the right record.")


class JoinConfig(Strict):
    """Config of the ``join`` transformation."""

    join_type: JoinType = Field("inner", description="inner, left, right or full (outer).")
    join_key: Paths | None = Field(None, description="Key path(s), the same on both sides.")
    left_key: Paths | None = Field(None, description="Key path(s) of the left records.")
    right_key: Paths | None = Field(None, description="Key path(s) of the right records.")
    mode: Literal["relational", "lookup"] = Field(
        "relational",
        description="'relational': join all records (per window with `window`); 'lookup': "
        "each left record meets the latest right record of its key.",
    )
    window: WindowSpec | None = Field(
        None,
        description="Join per key and event-time window (a sliding `slide` defaults to `size`).",
    )
    time_field: str = Field("timestamp", description="Dotted path of the event time.")
    left_time_field: str | None = Field(None, description="Event time of left records.")
    right_time_field: str | None = Field(None, description="Event time of right records.")
    time_unit: Literal["s", "ms"] = Field(
        "s", description="Unit of numeric event times: epoch seconds or milliseconds."
    )
    allowed_lateness: Duration = Field(
        0.0, description="How far behind the key's latest event time a record may arrive."
    )
    ttl: Duration | None = Field(
        None, description="Lookup mode: forget a right record this long after it arrived."
    )
    bootstrap_timeout: Duration = Field(
        30.0,
        description="Lookup mode: left records wait until the right input is loaded (it "
        "ended, or its CDC snapshot finished), at most this long; 0s: join at once with "
        "what has arrived.",
    )
    output_prefix: OutputPrefix | None = Field(
        None, description="Nest the sides as {left: ..., right: ...} instead of merging."
    )
    late_to: str | None = Field(None, description="Destination id receiving late records.")

    @model_validator(mode="after")
    def _check(self) -> JoinConfig:
        if self.join_key is not None and (self.left_key or self.right_key):
            msg = "set either 'join_key' or 'left_key' and 'right_key', not both"
            raise ValueError(msg)
        if self.join_key is None and not (self.left_key and self.right_key):
            msg = "a join needs 'join_key', or both 'left_key' and 'right_key'"
            raise ValueError(msg)
        lk, rk = self.keys()
        if len(lk) != len(rk):
            msg = f"'left_key' has {len(lk)} paths but 'right_key' has {len(rk)}"
            raise ValueError(msg)
        if self.mode == "lookup":
            if self.join_type not in ("inner", "left"):
                msg = f"a lookup join is 'inner' or 'left' (got {self.join_type!r})"
                raise ValueError(msg)
            if self.window is not None:
                msg = "a lookup join takes 'ttl', not 'window'"
                raise ValueError(msg)
        elif self.ttl is not None or "bootstrap_timeout" in self.model_fields_set:
            msg = "'ttl' and 'bootstrap_timeout' apply to mode 'lookup' only"
            raise ValueError(msg)
        return self

    def keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Left and right key paths."""
        if self.join_key is not None:
            return self.join_key, self.join_key
        return self.left_key or (), self.right_key or ()


@dataclass(frozen=True)
class JoinOut:
    """Outputs of :func:`join`."""

    down: Stream[list[dict[str, Any]]]
    """Joined records, in batches."""
    late: Stream[list[dict[str, Any]]]
    """Late records (windowed joins), unchanged, in batches."""
    errs: Stream[list[Failed]]
    """Records that could not be joined (bad key or time)."""


def _combiner(cfg: JoinConfig) -> Callable[[Any, Any], dict[str, Any]]:
    prefix = cfg.output_prefix
    if prefix is None:

        def merged(left: Any, right: Any) -> dict[str, Any]:
            if right is None:
                return dict(left)
            if left is None:
                return dict(right)
            return {**right, **left}

        return merged
    lp, rp = prefix.left, prefix.right

    def strip(rec: Any) -> Any:
        if isinstance(rec, dict) and META in rec:
            return {k: v for k, v in rec.items() if k != META}
        return rec

    def nested(left: Any, right: Any) -> dict[str, Any]:
        out: dict[str, Any] = {lp: strip(left), rp: strip(right)}
        side = left if left is not None else right
        if isinstance(side, dict) and META in side:
            out[META] = side[META]
        return out

    return nested


class _Packer:
    """Compact copies of the records a join holds until its window closes.

    A held record is a tuple: its shape (the field names it keeps, shared by the records
    of that shape), then those values. The fields kept are the record's own, less
    ``_meta`` (a joined record has no single source position), and only those read
    downstream when the compiler knows them (``fields``). A record of five fields and a
    Kafka ``_meta`` takes about 400 bytes less than as two dicts, for a fraction of a
    microsecond; :meth:`unpack` gives back an equal dict. Anything but a dict is kept as
    it is.
    """

    def __init__(self, fields: frozenset[str] | None = None) -> None:
        self.fields = fields
        self.shapes: dict[tuple[str, ...], Shape] = {}

    def pack(self, rec: Any) -> Any:
        """The compact copy of ``rec``."""
        if rec.__class__ is not dict:
            return rec
        keys = tuple(rec)
        shape = self.shapes.get(keys)
        if shape is None:
            shape = self.shape(keys)
        if shape.n == 1:
            return (shape, shape.take(rec))
        return (shape, *shape.take(rec))

    def shape(self, keys: tuple[str, ...]) -> Shape:
        """The shape of the records with fields ``keys``."""
        if len(self.shapes) > 10_000:
            self.shapes.clear()
        names = tuple(k for k in keys if k != META and (self.fields is None or k in self.fields))
        shape = self.shapes[keys] = Shape(names)
        return shape

    @staticmethod
    def unpack(held: Any) -> Any:
        """The record of a compact copy."""
        if held.__class__ is not tuple:
            if held.__class__ is dict:  # held whole by an older release: a copy, no _meta
                return {k: v for k, v in held.items() if k != META}
            return held
        shape = held[0]
        if shape.__class__ is Shape:
            return shape.make(held)
        # An older release's shape: (names, take), or (keys, _meta's place).
        rec = dict(zip(shape[0], held[1:], strict=False))
        how = shape[1]
        if how.__class__ is int and how:
            del rec[META]
        return rec


def _records(held: list[Any]) -> list[Any]:
    """The records of a list of held ones (:meth:`_Packer.unpack`, this release's inline)."""
    unpack = _Packer.unpack
    return [h[0].make(h) if h.__class__ is tuple and h[0].__class__ is Shape else unpack(h)
            for h in held]


class Shape:
    """What held records of the same fields share.

    The names kept, a C function taking their values from a record (one value, or a
    tuple of several), how many, and ``make``, which makes the record of a held tuple
    again (a dict display compiled per shape). Pickled as its names.
    """

    __slots__ = ("make", "n", "names", "take")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.n = len(names)
        self.take: Callable[[Any], Any] = itemgetter(*names) if names else _nothing
        self.make = _maker(names)

    def __reduce__(self) -> tuple[type[Shape], tuple[tuple[str, ...]]]:
        return (Shape, (self.names,))


@lru_cache(maxsize=4096)
def _maker(names: tuple[Any, ...]) -> Callable[[tuple[Any, ...]], dict[Any, Any]]:
    """The function making a record of a held tuple of ``names`` (:class:`Shape`)."""
    if all(k.__class__ is str for k in names):
        items = ", ".join(f"{k!r}: h[{i}]" for i, k in enumerate(names, 1))
        return eval(f"lambda h: {{{items}}}")  # noqa: S307 (literals)
    return lambda h: dict(zip(names, h[1:], strict=False))


def _one(name: str, rec: dict[str, Any]) -> tuple[Any]:
    """An older snapshot's ``take`` of one field (unpickled by name: keep)."""
    return (rec[name],)


def _nothing(_rec: dict[str, Any]) -> tuple[()]:
    return ()


def _null_key(key: Any) -> bool:
    return key is None or (key.__class__ is tuple and None in key)


class _JoinOp:
    """The compiled settings of one join step, shared by its shards."""

    def __init__(self, step_id: str, cfg: JoinConfig, shards: int,
                 fields: frozenset[str] | None = None, inputs: tuple[str, ...] = ()) -> None:
        self.step_id = component_id(step_id)
        if cfg.output_prefix is not None or cfg.mode == "lookup":
            fields = None  # held whole: a nested side, or a lookup's table
        lk, rk = cfg.keys()
        self.keys = {LEFT: key_getter(lk), RIGHT: key_getter(rk)}
        self.combine = _combiner(cfg)
        self.prefix = cfg.output_prefix
        jt = cfg.join_type
        self.keep_left = jt in ("left", "full")
        self.keep_right = jt in ("right", "full")
        self.mode = cfg.mode
        self.window = cfg.window
        times = (cfg.left_time_field or cfg.time_field, cfg.right_time_field or cfg.time_field)
        self.margin = margin(cfg.window) if cfg.window is not None else 0
        self.times = {
            LEFT: time_reader(times[0], cfg.time_unit, self.margin),
            RIGHT: time_reader(times[1], cfg.time_unit, self.margin),
        }
        self.lateness = to_us(cfg.allowed_lateness)
        self.ttl = cfg.ttl
        self.bootstrap_timeout = cfg.bootstrap_timeout
        packer = _Packer(fields)
        self.pack = packer.pack
        w = cfg.window
        self.size = to_us(w.size or 0) if w is not None and w.type != "session" else 0
        self.slide = to_us(w.slide or w.size or 0) if w is not None and self.size else 0
        self.gap = to_us(w.gap or 0) if w is not None and w.type == "session" else 0
        self.definition: dict[str, Any] = {
            "left_key": list(lk),
            "right_key": list(rk),
            "join_type": jt,
            "mode": cfg.mode,
            "shards": shards,
        }
        if inputs:  # which input is left: its records are held on the left side
            self.definition["inputs"] = list(inputs)
        if fields is not None:
            self.definition[HELD] = sorted(fields - {META})
        if w is not None:
            self.definition.update(w.definition())
            self.definition["time_field"] = list(times)
            self.definition["time_unit"] = cfg.time_unit
        if self.size:
            sides = ((LEFT, lk, times[0]), (RIGHT, rk, times[1]))
            self.ingest = {
                side: _compile_ingest(self, packer, side, paths, time_path, cfg.time_unit)
                for side, paths, time_path in sides
            }
            self.ingest_touching = {
                side: _compile_ingest(self, packer, side, paths, time_path, cfg.time_unit,
                                      touching=True)
                for side, paths, time_path in sides
            }

    def pairs(self, lefts: list[Any], rights: list[Any], out: list[dict[str, Any]]) -> None:
        """The relational join of one key's records (as held: see :class:`_Packer`)."""
        if self.prefix is not None:
            self._nested_pairs(lefts, rights, out)
            return
        if lefts and rights:
            lefts = _records(lefts)
            for r in _records(rights):
                out.extend([{**r, **left} for left in lefts])  # combine(left, r), inline
        elif lefts and self.keep_left:
            out.extend(_records(lefts))
        elif rights and self.keep_right:
            out.extend(_records(rights))

    def _nested_pairs(self, lefts: list[Any], rights: list[Any], out: list[dict[str, Any]]) -> None:
        """:meth:`pairs` with ``output_prefix``: a side met by several pairs is copied per pair."""
        assert self.prefix is not None
        lp, rp = self.prefix.left, self.prefix.right
        unpack = _Packer.unpack
        if lefts and rights:
            ls = _records(lefts)
            copy_left, copy_right = len(rights) > 1, len(ls) > 1
            for r in _records(rights):
                for left in ls:
                    out.append({lp: dict(left) if copy_left and left.__class__ is dict else left,
                                rp: dict(r) if copy_right and r.__class__ is dict else r})
        elif lefts and self.keep_left:
            out.extend({lp: unpack(held), rp: None} for held in lefts)
        elif rights and self.keep_right:
            out.extend({lp: None, rp: unpack(held)} for held in rights)

    def probe(self, side: str, rec: Any, held: list[Any], out: list[dict[str, Any]]) -> None:
        """:meth:`pairs` of ``rec`` (of input ``side``, not held) and ``held``.

        ``held`` is the other input's records of the key, opened (as :meth:`_Packer.unpack`
        gives them) and met again by later records: each output row gets its own copies.
        """
        r = _Packer.unpack(self.pack(rec))  # what holding it would have given back
        if self.prefix is None:  # the merged record is a new dict
            combine = self.combine
            out.extend(combine(r, h) if side == LEFT else combine(h, r) for h in held)
            return
        lp, rp = self.prefix.left, self.prefix.right
        copy = len(held) > 1 and r.__class__ is dict
        for h in held:
            mine = dict(r) if copy else r
            other = dict(h) if h.__class__ is dict else h
            out.append({lp: mine, rp: other} if side == LEFT else {lp: other, rp: mine})

    def unmatched(self, side: str, rec: Any, out: list[dict[str, Any]]) -> None:
        """A record that can match nothing (a null key), emitted at once without ``_meta``."""
        rec = _Packer.unpack(rec)
        if side == LEFT and self.keep_left:
            out.append(self.combine(rec, None))
        elif side == RIGHT and self.keep_right:
            out.append(self.combine(None, rec))
    def build(self, resume: Any) -> ShardLogic:
        if self.mode == "lookup":
            return _LookupShard(self, resume)
        if self.window is None:
            return _RelationalShard(self, resume)
        if self.gap:
            return _SessionJoinShard(self, resume)
        return _WindowJoinShard(self, resume)


ENDED = {LEFT: "left_ended", RIGHT: "right_ended"}
"""The tags of the markers telling every relational shard that an input has ended."""


@dataclass
class _RelationalState:
    """A relational shard's held records, and which inputs have ended.

    ``keys`` maps a key to ``[lefts, rights]`` (held records, see :class:`_Packer`). Once
    an input has ended (``complete``), the other side's held records are joined and
    dropped, its later records are joined as they arrive, and only the ended side's
    records are kept; ``met`` is then the keys whose kept records met the other side (so
    an outer join does not emit them again, unmatched, at the end).
    """

    keys: dict[Any, list[list[Any]]]
    complete: str | None = None
    met: set[Any] = field(default_factory=set)


class _RelationalShard(ShardLogic):
    """Every record per key; the join as soon as one input has ended, else at the end."""

    def __init__(self, op: _JoinOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume)
        self.op = op
        if self.state is None:
            self.state = _RelationalState({})
        elif not isinstance(self.state, _RelationalState):  # a snapshot of the keys alone
            self.state = _RelationalState(self.state)

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        s: _RelationalState = self.state
        keys = s.keys
        down: list[dict[str, Any]] = []
        errs: list[Failed] = []
        ended: list[str] = []
        for side, batch in batches:
            if side not in o.keys:
                ended.append(side)
                continue
            keyf = o.keys[side]
            if s.complete is not None:  # the other input has ended: join at once
                self._probe(side, batch, down, errs)
                continue
            i = 0 if side == LEFT else 1
            for rec in batch:
                key = keyf(rec)
                if _null_key(key):
                    o.unmatched(side, rec, down)
                    continue
                try:
                    entry = keys.get(key)
                except TypeError as exc:
                    errs.append(Failed.of(o.step_id, _unhashable(exc), rec))
                    continue
                if entry is None:
                    entry = keys[key] = [[], []]
                entry[i].append(o.pack(rec))
        # The markers come last: an input's records reach the shard no later than (in the
        # same batches as) the marker saying that it has ended.
        for tag in ended:
            if s.complete is None:
                self._complete(LEFT if tag == ENDED[LEFT] else RIGHT, down)
        return tagged(o.step_id, down, errs)

    def _complete(self, side: str, down: list[dict[str, Any]]) -> None:
        """Input ``side`` has ended: join what the other side holds, keep ``side``'s records."""
        o = self.op
        s: _RelationalState = self.state
        i = 0 if side == LEFT else 1
        keep_ended = o.keep_left if side == LEFT else o.keep_right
        alone = []  # keys of the other side's records only
        for key, entry in s.keys.items():
            if entry[1 - i]:
                o.pairs(entry[0], entry[1], down)
                entry[1 - i] = []
                if not entry[i]:
                    alone.append(key)
                elif keep_ended:
                    s.met.add(key)
        for key in alone:
            del s.keys[key]
        s.complete = side

    def _probe(self, side: str, batch: list[Any], down: list[dict[str, Any]],
               errs: list[Failed]) -> None:
        """Join records of ``side`` with the ended input's records as they arrive."""
        o = self.op
        s: _RelationalState = self.state
        keyf, keys, met = o.keys[side], s.keys, s.met
        i = 1 if side == LEFT else 0  # the ended input's records
        track = o.keep_right if side == LEFT else o.keep_left
        for rec in batch:
            key = keyf(rec)
            try:
                entry = None if _null_key(key) else keys.get(key)
            except TypeError as exc:
                errs.append(Failed.of(o.step_id, _unhashable(exc), rec))
                continue
            if entry is None:
                o.unmatched(side, rec, down)
                continue
            held = entry[i]
            if held[0].__class__ is tuple:  # met for the first time: unpacked once, for good
                held = entry[i] = [_Packer.unpack(h) for h in held]
            o.probe(side, rec, held, down)
            if track:
                met.add(key)

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Per key, the joined records its held records so far give."""
        rows: list[tuple[Any, dict[str, Any]]] = []
        keys = state.keys if isinstance(state, _RelationalState) else state
        for key, (lefts, rights) in keys.items():
            joined: list[dict[str, Any]] = []
            self.op.pairs(lefts, rights, joined)
            rows.extend((key, r) for r in joined)
        return rows

    def flush(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        s: _RelationalState = self.state
        keys, met = s.keys, s.met
        self.state = _RelationalState({})
        if s.complete is not None and not (self.op.keep_left if s.complete == LEFT
                                           else self.op.keep_right):
            return []  # only the ended side's records are left, and none of them is emitted
        while keys:  # each key's records are freed as its output is made
            key, (lefts, rights) = keys.popitem()
            if key not in met:
                self.op.pairs(lefts, rights, down)
        return [(DOWN, down)] if down else []


def _unhashable(exc: BaseException) -> RecordError:
    return RecordError(f"join key: {KEY_KINDS} ({exc})")


# The windowed join's loop over one side's records, generated per step and side (like a
# window's): key and time extraction and the packing of held records are inlined, and a
# tumbling window is placed without a loop. Key state: [max_t, late_before, windows,
# next_end]; a window is [lefts, rights].
_WINDOW_JOIN_INGEST = """
def ingest(keys, batch, down, late, errs, due{touched}):
    for rec in batch:
        try:
{extract}
            if key is None or (key.__class__ is tuple and None in key):
                _unmatched({side!r}, rec, down)
                continue
            g = keys.get(key)
        except TypeError as exc:
            errs.append(_failed(_step, _unhashable(exc), rec))
            continue
        except RecordError as exc:
            errs.append(_failed(_step, exc, rec))
            continue
        except AttributeError as exc:
            errs.append(_failed(_step, _not_an_object(exc), rec))
            continue
        if g is None:
            g = keys[key] = [t, -_NEVER, {{}}, _NEVER]
            due.add(key)
        elif t < g[1]:
            late.append(rec)
            continue
{touch}
        wins = g[2]
        if rec.__class__ is dict:
            ks = tuple(rec)
            shape = _shapes.get(ks)
            if shape is None:
                shape = _shape(ks)
            held = (shape, shape.take(rec)) if shape.n == 1 else (shape, *shape.take(rec))
        else:
            held = rec
{place}
        if t > g[0]:
            g[0] = t
            if t - {lateness} > g[1]:
                due.add(key)
"""

# A record goes into the window starting at ``start``: a tumbling window's one, or each
# of a sliding window's (the same lines in a loop).
_JOIN_PLACE = """
w = wins.get(start)
if w is None:
    w = wins[start] = [[], []]
    if start + {size} < g[3]:
        g[3] = start + {size}
w[{i}].append(held)
"""
_TUMBLING_START = "start = t - t % {size}"
_SLIDING_STARTS = """
for k in range((t - {size}) // {slide} + 1, t // {slide} + 1):
    start = k * {slide}
"""


def _compile_ingest(o: _JoinOp, packer: _Packer, side: str, key_paths: tuple[str, ...],
                    time_path: str | None, time_unit: str, touching: bool = False
                    ) -> Callable[..., None]:
    """The generated loop of a tumbling or sliding join over one side's records.

    ``touching``: the loop also puts each key it changes in ``touched`` (for
    :attr:`ShardLogic.tracks_keys`).
    """
    env: dict[str, Any] = {
        "_NEVER": _NEVER, "_unmatched": o.unmatched, "_failed": Failed.of, "_step": o.step_id,
        "_unhashable": _unhashable, "RecordError": RecordError, "_not_an_object": not_an_object,
        "_shapes": packer.shapes, "_shape": packer.shape,
    }
    extract = "\n".join(extraction_code(key_paths, time_path, time_unit, env, " " * 12,
                                        o.margin))
    body = _JOIN_PLACE.strip("\n")
    if o.slide == o.size:
        place = f"{_TUMBLING_START}\n{body}"
    else:
        place = _SLIDING_STARTS.strip("\n") + "\n" + indent(body, " " * 4)
    place = place.format(size=o.size, slide=o.slide, i=0 if side == LEFT else 1)
    code = _WINDOW_JOIN_INGEST.format(
        extract=extract, side=side, lateness=o.lateness, place=indent(place, " " * 8),
        **touch_code(touching, 8))
    exec(compile(code, f"<join {o.step_id} {side}>", "exec"), env)  # noqa: S102
    return env["ingest"]


class _WindowJoinShard(ShardLogic):
    """Tumbling and sliding windowed joins: per key, window start -> [lefts, rights]."""

    tracks_keys = True  # a key's windows close only when a record of the key arrives

    def __init__(self, op: _JoinOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume)
        self.op = op
        if self.state is None:
            self.state = {}

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        keys: dict[Any, list[Any]] = self.state
        size = o.size
        down: list[dict[str, Any]] = []
        late: list[Any] = []
        errs: list[Failed] = []
        due: set[Any] = set()
        touched = self.touched
        for side, batch in batches:
            if touched is None:
                o.ingest[side](keys, batch, down, late, errs, due)
            else:  # the keys changed go to the next snapshot
                o.ingest_touching[side](keys, batch, down, late, errs, due, touched)
        for key in due:  # the watermark moves once the records that came together are in
            g = keys[key]
            g[1] = max(g[1], g[0] - o.lateness)
            if g[1] < g[3]:
                continue
            wins = g[2]
            for start in [s for s in wins if s + size <= g[1]]:
                lefts, rights = wins.pop(start)
                o.pairs(lefts, rights, down)
            g[3] = min(wins, default=_NEVER - size) + size
        return tagged(o.step_id, down, errs, late)

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Per key, the joined records of its open windows so far."""
        rows: list[tuple[Any, dict[str, Any]]] = []
        for key, g in state.items():
            for lefts, rights in g[2].values():
                joined: list[dict[str, Any]] = []
                self.op.pairs(lefts, rights, joined)
                rows.extend((key, r) for r in joined)
        return rows

    def flush(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        state, self.state = self.state, {}
        self.touched = None
        while state:  # each key's records are freed as its output is made
            for lefts, rights in state.popitem()[1][2].values():
                self.op.pairs(lefts, rights, down)
        return [(DOWN, down)] if down else []


class _SessionJoinShard(ShardLogic):
    """Session joins: per key a list of [start, last, lefts, rights], by start."""

    tracks_keys = True  # a key's sessions close only when a record of the key arrives

    def __init__(self, op: _JoinOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume)
        self.op = op
        if self.state is None:
            self.state = {}

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        keys: dict[Any, list[Any]] = self.state
        gap, lateness = o.gap, o.lateness
        down: list[dict[str, Any]] = []
        late: list[Any] = []
        errs: list[Failed] = []
        due: set[Any] = set()
        touched = self.touched
        for side, batch in batches:
            keyf, timef = o.keys[side], o.times[side]
            i = 2 if side == LEFT else 3
            for rec in batch:
                try:
                    t = timef(rec)
                    key = keyf(rec)
                    if _null_key(key):
                        o.unmatched(side, rec, down)
                        continue
                    try:
                        g = keys.get(key)
                    except TypeError as exc:
                        raise _unhashable(exc) from None
                except RecordError as exc:
                    errs.append(Failed.of(o.step_id, exc, rec))
                    continue
                if g is None:
                    g = keys[key] = [t, -_NEVER, [], _NEVER]
                    due.add(key)
                elif t < g[1]:
                    late.append(rec)
                    continue
                if touched is not None:
                    touched[key] = g
                ss: list[list[Any]] = g[2]
                near = [s for s in ss if s[0] - gap < t < s[1] + gap]
                s: list[Any]
                if not near:
                    s = [t, t, [], []]
                    ss.append(s)
                    ss.sort(key=lambda s: s[0])
                else:
                    s = near[0]
                    for other in near[1:]:
                        s[1] = max(s[1], other[1])
                        s[2].extend(other[2])
                        s[3].extend(other[3])
                        ss.remove(other)
                    s[0] = min(s[0], t)
                    s[1] = max(s[1], t)
                s[i].append(o.pack(rec))
                g[3] = ss[0][1] + gap
                if t > g[0]:
                    g[0] = t
                    if t - lateness > g[1]:
                        due.add(key)
        for key in due:  # the watermark moves once the records that came together are in
            g = keys[key]
            g[1] = max(g[1], g[0] - lateness)
            if g[1] < g[3]:
                continue
            keep = []
            for s in g[2]:
                if s[1] + gap <= g[1]:
                    o.pairs(s[2], s[3], down)
                else:
                    keep.append(s)
            g[2] = keep
            g[3] = keep[0][1] + gap if keep else _NEVER
        return tagged(o.step_id, down, errs, late)

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Per key, the joined records of its open sessions so far."""
        rows: list[tuple[Any, dict[str, Any]]] = []
        for key, g in state.items():
            for s in g[2]:
                joined: list[dict[str, Any]] = []
                self.op.pairs(s[2], s[3], joined)
                rows.extend((key, r) for r in joined)
        return rows

    def flush(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        state, self.state = self.state, {}
        self.touched = None
        while state:  # each key's records are freed as its output is made
            for s in state.popitem()[1][2]:
                self.op.pairs(s[2], s[3], down)
        return [(DOWN, down)] if down else []


LOADED = "loaded"
"""The tag of the marker telling every lookup shard that the right input is loaded."""


@dataclass
class _LookupState:
    """A lookup shard's table and the left records waiting for it to be loaded."""

    table: dict[Any, tuple[Any, float]]
    loaded: bool = False
    waiting: list[Any] | None = None
    since: float | None = None  # when the first waiting record arrived (wall clock)


class _LookupShard(ShardLogic):
    """Stream-table join: key -> (latest right record, arrival time)."""

    def __init__(self, op: _JoinOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume)
        self.op = op
        self.clock: Callable[[], float] = time.time
        if self.state is None:
            self.state = _LookupState({}, loaded=not op.bootstrap_timeout)
        elif not isinstance(self.state, _LookupState):  # a snapshot of the table alone
            self.state = _LookupState(self.state, loaded=True)

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        s: _LookupState = self.state
        table = s.table
        now = self.clock()
        down: list[dict[str, Any]] = []
        errs: list[Failed] = []
        for side, batch in batches:
            if side == LOADED:
                self._release(down, errs)
                continue
            keyf = o.keys[side]
            if side == LEFT and not s.loaded:
                if s.waiting is None:
                    s.waiting, s.since = [], now
                s.waiting.extend(batch)
                continue
            for rec in batch:
                key = keyf(rec)
                try:
                    if side == RIGHT:
                        if _null_key(key):
                            continue
                        meta = rec.get(META)
                        if isinstance(meta, dict) and meta.get("op") == "delete":
                            table.pop(key, None)
                        else:
                            table[key] = (rec, now)
                        continue
                    self._match(rec, key, now, down)
                except TypeError as exc:
                    errs.append(Failed.of(o.step_id, _unhashable(exc), rec))
        return tagged(o.step_id, down, errs)

    def _match(self, rec: Any, key: Any, now: float, down: list[dict[str, Any]]) -> None:
        o = self.op
        table = self.state.table
        hit = None if _null_key(key) else table.get(key)
        if hit is not None and o.ttl is not None and now - hit[1] >= o.ttl:
            del table[key]
            hit = None
        if hit is not None:
            down.append(o.combine(rec, hit[0]))
        elif o.keep_left:
            down.append(o.combine(rec, None))

    def _release(self, down: list[dict[str, Any]], errs: list[Failed]) -> None:
        """The table is loaded: join the records that waited for it, in arrival order."""
        s: _LookupState = self.state
        s.loaded = True
        waiting, s.waiting, s.since = s.waiting or [], None, None
        keyf, now = self.op.keys[LEFT], self.clock()
        for rec in waiting:
            try:
                self._match(rec, keyf(rec), now, down)
            except TypeError as exc:
                errs.append(Failed.of(self.op.step_id, _unhashable(exc), rec))

    def notify_at(self) -> datetime | None:
        """Bytewax entry: when waiting records stop waiting for the table."""
        s: _LookupState = self.state
        if s.loaded or s.since is None:
            return None
        return datetime.fromtimestamp(s.since + self.op.bootstrap_timeout, UTC)

    def on_notify(self) -> tuple[list[tuple[str, list[Any]]], bool]:
        """Bytewax entry: the bootstrap timeout passed; join with what has arrived."""
        s: _LookupState = self.state
        if s.loaded or s.since is None:
            return [], False
        log.warning(
            "step %r: the lookup table was not loaded within %gs; %d waiting record(s) are "
            "joined with what has arrived", self.op.step_id, self.op.bootstrap_timeout,
            len(s.waiting or []))
        down: list[dict[str, Any]] = []
        errs: list[Failed] = []
        self._release(down, errs)
        return tagged(self.op.step_id, down, errs), False

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """The table: per key, its latest right record."""
        table = state.table if isinstance(state, _LookupState) else state
        return [(key, rec) for key, (rec, _) in table.items()]

    def flush(self) -> list[tuple[str, list[Any]]]:
        down: list[dict[str, Any]] = []
        errs: list[Failed] = []
        if not self.state.loaded:
            self._release(down, errs)
        self.state = _LookupState({}, loaded=not self.op.bootstrap_timeout)
        return tagged(self.op.step_id, down, errs)


class _RightLoaded(StatefulBatchLogic[list[Any], str, dict[str, bool]]):
    """Watches a lookup's right input (one instance): says once when it is loaded.

    Loaded means the input ended (a bounded read of the table), or it sent snapshot
    records (``_meta.op: read``) and then a change: its snapshot is complete.
    """

    def __init__(self, resume: dict[str, bool] | None) -> None:
        self.state = dict(resume) if resume else {"snapshot": False, "loaded": False}

    def on_batch(self, values: list[list[Any]]) -> tuple[list[str], bool]:
        if self.state["loaded"]:
            return [], False
        for batch in values:
            for rec in batch:
                meta = rec.get(META) if isinstance(rec, dict) else None
                op_ = meta.get("op") if isinstance(meta, dict) else None
                if op_ == "read":
                    self.state["snapshot"] = True
                elif op_ is not None and self.state["snapshot"]:
                    self.state["loaded"] = True
                    return [LOADED], False
        return [], False

    def on_eof(self) -> tuple[list[str], bool]:
        if stopping.requested():
            return [], False
        return ([] if self.state["loaded"] else [LOADED]), True

    def snapshot(self) -> dict[str, bool]:
        return dict(self.state)


class _InputEnded(StatefulBatchLogic[list[Any], str, None]):
    """Watches one input of a relational join (one instance): says when it has ended."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def on_batch(self, values: list[list[Any]]) -> tuple[list[str], bool]:
        return [], False

    def on_eof(self) -> tuple[list[str], bool]:
        if stopping.requested():  # a graceful stop: the input has not ended
            return [], False
        return [self.tag], True

    def snapshot(self) -> None:
        return None

    @staticmethod
    def builder(tag: str) -> Callable[[Any], _InputEnded]:
        """What ``op.stateful_batch`` calls (with a resume state it does not need)."""
        return lambda _resume: _InputEnded(tag)


def _shard_markers(name: str, up: Stream[list[Any]], logic: Callable[[Any], Any],
                   shards: int) -> Stream[tuple[str, Any]]:
    """One ``(shard, (marker, []))`` item per shard for each marker ``logic`` emits.

    ``logic`` watches the whole of ``up`` in one instance (on one worker).
    """
    import bytewax.operators as op

    keyed = op.key_on(f"{name}_key", up, lambda _batch: name)
    marks = op.key_rm(f"{name}_unkey", op.stateful_batch(name, keyed, logic))
    names = shard_names(shards)
    return op.flat_map(f"{name}_shards", marks,
                       lambda mark: [(shard, (mark, [])) for shard in names])


def _kind(key: Any) -> Any:
    """What a key is, as far as matching goes: text, a number, a boolean (tuples per part)."""
    if key.__class__ is tuple:
        return tuple(map(_kind, key))
    if isinstance(key, str):
        return "text"
    if isinstance(key, bool | BoolKey):
        return "a boolean"
    if isinstance(key, int | float):
        return "a number"
    return None


class _KeyKinds:
    """Says once when the two sides' keys are of different kinds: they never match.

    Text "1" and the number 1 are different keys, and a join of them is silently empty
    (a CSV column is text unless ``csv.infer_types``). Only the first record of each batch
    is looked at.
    """

    def __init__(self, step_id: str, keys: dict[str, Callable[[Any], Any]],
                 paths: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
        self.step_id, self.keys = step_id, keys
        self.paths = {LEFT: paths[0], RIGHT: paths[1]}
        self.kinds: dict[str, Any] = {}
        self.said = False

    def see(self, side: str) -> Callable[[str, list[Any]], None]:
        """An ``op.inspect`` function noting the kind of ``side``'s keys."""
        other = RIGHT if side == LEFT else LEFT

        def inspect(_step: str, batch: list[Any]) -> None:
            if self.said or not batch:
                return
            try:
                kind = _kind(self.keys[side](batch[0]))
            except Exception:  # noqa: BLE001 - the join reports the record itself
                return
            if kind is None or (kind.__class__ is tuple and None in kind):
                return
            self.kinds[side] = kind
            theirs = self.kinds.get(other)
            if theirs is not None and theirs != kind:
                self.said = True
                log.warning(
                    "step %r: the left key (%s) is %s, the right key (%s) %s: they never "
                    "match. A CSV column is text unless csv: {infer_types: true}; or convert "
                    "one side in a mapping", self.step_id, ", ".join(self.paths[LEFT]),
                    _said(self.kinds[LEFT]), ", ".join(self.paths[RIGHT]),
                    _said(self.kinds[RIGHT]))

        return inspect


def _said(kind: Any) -> str:
    return kind if isinstance(kind, str) else "(" + ", ".join(map(_said, kind)) + ")"


@operator
def join(
    step_id: str,
    left: Stream[list[dict[str, Any]]],
    right: Stream[list[dict[str, Any]]],
    config: JoinConfig,
    shards: int = SHARDS,
    fields: frozenset[str] | None = None,
    inputs: tuple[str, ...] = (),
) -> JoinOut:
    """Join batches of left and right records by key.

    :arg step_id: Unique step id (the workflow component id).
    :arg left: Stream of left record batches.
    :arg right: Stream of right record batches.
    :arg config: Keys, join type, window or lookup mode, output shape.
    :arg shards: State shards spread over the workers (part of the recovery state).
    :arg fields: The only fields of the joined records read downstream (``None``: all):
        a windowed or relational join holds only these of its records.
    :arg inputs: The names of the left and right inputs (part of the recovery state: held
        records belong to a side).
    :returns: Joined records, late records and errors, each as batches.
    """
    import bytewax.operators as op

    jop = _JoinOp(step_id, config, shards, fields, inputs)
    kinds = _KeyKinds(jop.step_id, jop.keys, config.keys())
    left = op.inspect("left_keys", left, kinds.see(LEFT))
    right = op.inspect("right_keys", right, kinds.see(RIGHT))
    keyed = route_and_merge(
        step_id, [(LEFT, left), (RIGHT, right)], [jop.keys[LEFT], jop.keys[RIGHT]], shards
    )
    if config.mode == "lookup" and config.bootstrap_timeout:
        loaded = _shard_markers("bootstrap", right, _RightLoaded, shards)
        keyed = op.merge("with_loaded", keyed, loaded)
    elif config.mode == "relational" and config.window is None:
        ends = [_shard_markers(f"{side}_end", up, _InputEnded.builder(ENDED[side]), shards)
                for side, up in ((LEFT, left), (RIGHT, right))]
        keyed = op.merge("with_ends", keyed, *ends)
    outs = stateful_shards("joins", keyed, jop.build)
    return JoinOut(down=outs[DOWN], late=outs[LATE], errs=outs[ERRS])


def _advice(cfg: JoinConfig, modes: list[set[str]]) -> list[str]:
    """Warnings for ``validate`` about a join's settings and its inputs."""
    if cfg.mode != "relational":
        return []
    if cfg.window is None:
        if len(modes) == 2 and all(m & UNBOUNDED for m in modes):
            return ["a join without 'window' joins when one of its inputs ends, and both "
                    "inputs here are unbounded (streaming, cdc or hybrid): add a window or "
                    "use mode: lookup"]
        return []
    if not cfg.allowed_lateness:
        return ["a windowed join reads its two inputs side by side, each at its own pace, "
                "and a record older than its key's newest record on either input is late "
                "(dropped unless 'late_to' is set): set 'allowed_lateness' to how far one "
                "input may run ahead of the other (for bounded inputs, their time span), or "
                "join bounded inputs without 'window'"]
    return []


def join_schema(ctx: SchemaContext[JoinConfig]) -> FieldType:
    """``{left prefix: left, right prefix: right}``, else the merged ``{**right, **left}``.

    The left key is read from the first input, the right key from the second; keys of two
    different known kinds never match (an error).
    """
    cfg = ctx.config
    lk, rk = cfg.keys()
    lname, rname = ("join_key", "join_key") if cfg.join_key is not None else (
        "left_key", "right_key")
    for i, (lpath, rpath) in enumerate(zip(lk, rk, strict=True)):
        lt = ctx.read((lname, i), lpath, input=0)
        rt = ctx.read((rname, i), rpath, input=1)
        kinds = {lt.kind, rt.kind}
        if lt.known and rt.known and len(kinds) == 2 and kinds != {"integer", "number"} and (
                "null" not in kinds):
            ctx.error((rname, i), f"join keys never match: left {lpath!r} is {a_or_an(lt.kind)}, "
                      f"right {rpath!r} is {a_or_an(rt.kind)}")
    if cfg.window is not None:
        ctx.read(("left_time_field",) if cfg.left_time_field else ("time_field",),
                 cfg.left_time_field or cfg.time_field, input=0, want="time")
        ctx.read(("right_time_field",) if cfg.right_time_field else ("time_field",),
                 cfg.right_time_field or cfg.time_field, input=1, want="time")
    left, right = ctx.at(0), ctx.at(1)
    if cfg.output_prefix is not None:
        return FieldType.record({cfg.output_prefix.left: left, cfg.output_prefix.right: right})
    if left.kind != "object" or right.kind != "object":
        listed = {**(right.fields or {}), **(left.fields or {})}
        return FieldType("object", listed, True, left.origins | right.origins)
    fields = {**(right.fields or {}), **(left.fields or {})}
    return FieldType("object", fields, left.open or right.open or left.fields is None
                     or right.fields is None, left.origins | right.origins)


@transformation(
    "join",
    config=JoinConfig,
    description="Join two inputs by key: relational, per event-time window, or as a lookup.",
    inputs=(2, 2),
    stateful=True,
    serves=True,
    named_outputs=lambda cfg: ["late"],
    schema=join_schema,
    merge_inputs=False,
    advise=_advice,
)
def build_join(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``join`` step."""
    out = join(ctx.step_id, ups[0], ups[1], ctx.config, shards=shards_of(ctx),
               fields=ctx.read_downstream, inputs=tuple(ctx.component.inputs))
    return Outputs(down=out.down, errs=out.errs, named={"late": out.late})
