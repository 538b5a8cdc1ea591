"""The ``dedupe`` transformation: drop repeats of a key within a time-to-live.

The first record of a key is kept; a later record with the same key is dropped while it
is less than ``ttl`` after the kept one (event time from ``time_field``, or arrival
time without it); after that it is kept and starts a new period. Without ``ttl`` every
repeat is dropped for as long as the step runs. Without ``keys`` the whole record
(without ``_meta``) is the key. Dropped records are counted in the metric
``dataflare_duplicates_dropped_total``.

Keys are forgotten once the shard's latest event time is ``ttl`` past their period, so
a record arriving more than ``ttl`` out of order may not be recognised as a repeat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from bytewax.dataflow import Stream, operator
from pydantic import Field

from dataflare.config import Duration, Paths, Strict
from dataflare.operators.keyed import (
    DOWN,
    ERRS,
    SHARDS,
    US,
    ShardLogic,
    component_id,
    duplicates_dropped,
    from_key,
    iso_us,
    key_getter,
    key_problem,
    route_and_merge,
    shards_of,
    stateful_shards,
    tagged,
    time_reader,
    to_us,
)
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import META, Failed, RecordError, describe_position, set_path
from dataflare.registry import BuildContext, Outputs, transformation

log = logging.getLogger(__name__)


class DedupeConfig(Strict):
    """Config of the ``dedupe`` transformation."""

    keys: Paths = Field((), description="Key path(s); without them the whole record. A "
                        "missing key is null, and nulls are one value (as SQL's DISTINCT "
                        "has them): records without the key are repeats of the first.")
    ttl: Duration | None = Field(
        None, description="A repeat is dropped while less than this after the kept record."
    )
    time_field: str | None = Field(
        None, description="Dotted path of the event time; arrival time when absent."
    )
    time_unit: Literal["s", "ms"] = Field(
        "s", description="Unit of numeric event times: epoch seconds or milliseconds."
    )


@dataclass(frozen=True)
class DedupeOut:
    """Outputs of :func:`dedupe`."""

    down: Stream[list[dict[str, Any]]]
    """Records that are not repeats, in batches."""
    errs: Stream[list[Failed]]
    """Records whose key or time could not be read."""


def _whole_record(rec: Any) -> Any:
    if isinstance(rec, dict) and META in rec:
        rec = {k: v for k, v in rec.items() if k != META}
    try:
        return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return repr(rec)


class _DedupeOp:
    def __init__(self, step_id: str, cfg: DedupeConfig, shards: int) -> None:
        self.step_id = component_id(step_id)
        self.keys = tuple(cfg.keys)
        self.key: Callable[[Any], Any] = key_getter(cfg.keys) if cfg.keys else _whole_record
        self.time = time_reader(cfg.time_field, cfg.time_unit) if cfg.time_field else None
        self.ttl = None if cfg.ttl is None else to_us(cfg.ttl)
        self.definition = {
            "keys": list(cfg.keys),
            "time_field": cfg.time_field,
            "time_unit": cfg.time_unit,
            "shards": shards,
        }

    def build(self, resume: Any) -> ShardLogic:
        return _DedupeShard(self, resume)

    warned_null = False

    def said_null(self, rec: Any) -> None:
        """Warn, once, that records without the key are dropped as repeats (a typo?)."""
        self.warned_null = True
        where = describe_position(rec.get(META) or {}) if isinstance(rec, dict) else ""
        log.warning("step %r: the record at %s has no %s (or null): records without the key "
                    "are one key, and each after the first is dropped as a repeat; is the "
                    "key's path right?", self.step_id, where or "an unknown position",
                    " / ".join(map(repr, self.keys)))


def _null(key: Any) -> bool:
    return key is None or (key.__class__ is tuple and all(k is None for k in key))


class _DedupeShard(ShardLogic):
    """key -> start of its period; pruned as the shard's latest time moves on."""

    tree_state = True
    tracks_keys = True
    keyed = "seen"

    def __init__(self, op: _DedupeOp, resume: Any) -> None:
        super().__init__(op.step_id, op.definition, resume)
        self.op = op
        if self.state is None:
            self.state = {"seen": {}, "latest": -(1 << 62), "prune_at": -(1 << 62)}

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Each key seen, with the start of its period (ISO-8601)."""
        paths = self.op.keys
        rows = []
        for k, t0 in state["seen"].items():
            row: dict[str, Any] = {}
            if not paths:  # the whole record is the key
                row["record"] = orjson.loads(k) if isinstance(k, bytes) else k
            elif len(paths) == 1:
                set_path(row, paths[0], from_key(k))
            else:
                for path, value in zip(paths, from_key(k), strict=True):
                    set_path(row, path, value)
            row["first_seen"] = iso_us(t0)
            rows.append((k, row))
        return rows

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        o = self.op
        seen: dict[Any, int] = self.state["seen"]
        latest: int = self.state["latest"]
        ttl, keyf, timef = o.ttl, o.key, o.time
        touched = self.touched
        now = round(time.time() * US)
        down: list[Any] = []
        errs: list[Failed] = []
        dropped = 0
        for batch in batches:
            for rec in batch:
                try:
                    t = now if timef is None else timef(rec)
                    key = keyf(rec)
                    t0 = seen.get(key)
                except (RecordError, TypeError) as exc:
                    errs.append(Failed.of(o.step_id, key_problem(exc), rec))
                    continue
                if t0 is not None and (ttl is None or t - t0 < ttl):
                    dropped += 1
                    if not o.warned_null and o.keys and _null(key):
                        o.said_null(rec)
                    continue
                seen[key] = t
                if touched is not None:
                    touched[key] = t
                down.append(rec)
                if t > latest:
                    latest = t
        self.state["latest"] = latest
        if ttl is not None and latest >= self.state["prune_at"]:
            horizon = latest - 2 * ttl
            self.state["seen"] = {k: t0 for k, t0 in seen.items() if t0 > horizon}
            self.state["prune_at"] = latest + ttl
            self.touched = None  # keys went: the next snapshot is whole
        if dropped:
            duplicates_dropped(o.step_id, dropped)
        return tagged(o.step_id, down, errs)

    def flush(self) -> list[tuple[str, list[Any]]]:
        return []


@operator
def dedupe(
    step_id: str,
    up: Stream[list[dict[str, Any]]],
    config: DedupeConfig,
    shards: int = SHARDS,
) -> DedupeOut:
    """Drop records whose key was seen less than ``ttl`` before.

    :arg step_id: Unique step id (the workflow component id).
    :arg up: Stream of record batches.
    :arg config: Key paths, time-to-live and event time.
    :arg shards: State shards spread over the workers (part of the recovery state).
    :returns: The records that are not repeats, and errors, as batches.
    """
    dop = _DedupeOp(step_id, config, shards)
    keyed = route_and_merge(step_id, [(None, up)], [dop.key], shards)
    outs = stateful_shards("seen", keyed, dop.build, outputs=(DOWN, ERRS))
    return DedupeOut(down=outs[DOWN], errs=outs[ERRS])


def dedupe_schema(ctx: SchemaContext[DedupeConfig]) -> FieldType:
    """The records pass unchanged; the keys and the time field are read."""
    for i, key in enumerate(ctx.config.keys):
        ctx.read(("keys", i), key)
    ctx.read(("time_field",), ctx.config.time_field, want="time")
    return ctx.input


@transformation(
    "dedupe",
    config=DedupeConfig,
    description="Drop records whose key was already seen (within a time-to-live).",
    inputs=(1, None),
    stateful=True,
    serves=True,
    schema=dedupe_schema,
)
def build_dedupe(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build the ``dedupe`` step."""
    up = ups[0]
    out = dedupe(ctx.step_id, up, ctx.config, shards=shards_of(ctx))
    return Outputs(down=out.down, errs=out.errs)
