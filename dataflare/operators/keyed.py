"""Keyed state shared by the stateful operators: shards, event time, snapshots.

Stateful operators never pay a bytewax step per record or per key. Each incoming batch
is split into ``(shard, sub_batch)`` pairs over a fixed number of shards (a stable hash
of the record's key, so a key always meets its state, in every process and after a
restart); ``op.stateful_batch`` spreads the shards over the workers, and one
:class:`ShardLogic` per shard holds all the keys of its shard in plain dicts and handles
a whole sub-batch per call.

Every shard snapshot carries the step's *definition* (window, keys, aggregates...). A
resume from a snapshot written by another definition is refused with
:class:`DefinitionChanged`, which names the step and what changed.

A step with ``serve: true`` publishes each shard's snapshot to a :class:`~dataflare.views.View`
when bytewax takes it, at the end of every epoch that changed the shard, so a
``/views/<step>`` reader sees each key as of the end of an epoch (:meth:`ShardLogic.view_rows`).
:class:`ShardBuilder` is what ``op.stateful_batch`` receives: it names the definition a fresh
shard would snapshot, which ``dataflare plan`` compares with the recovery state.

Times are integer microseconds since the Unix epoch inside the operators, so window
boundaries are exact.
"""

from __future__ import annotations

import io
import pickle
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from operator import methodcaller
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic

from dataflare import metrics, stopping
from dataflare.records import (
    EPOCH_MAX,
    EPOCH_MIN,
    Failed,
    RecordError,
    getter,
    iso_utc,
    to_epoch_seconds,
)
from dataflare.views import View

SHARDS = 24
"""Shards per stateful step: part of the step's definition (changing it breaks resume).

24 shards spread evenly over 1, 2, 3, 4, 6, 8, 12 or 24 workers (processes x workers per
process), and as evenly as 24 allows over 5 and 7 (:data:`_BALANCED_NAMES`).
"""

# bytewax routes a state key to worker ``siphash(key) % workers``. Shard i's name is
# "i.salt", the salt chosen (by running bytewax with 5, 7 and 24 workers) so that the name
# lands on worker i % 24, hence on worker i % n for every n dividing 24, and so that 5 and
# 7 workers get 4-5 and 3-4 shards each. Sequential names ("000".."015", the 16 shards of
# DataFlare before 2026-12-04) went 9:7 over 2 workers. tests/operators/test_keyed.py checks
# the routing against bytewax itself.
_BALANCED_NAMES = (
    "00.24", "01.24", "02.23", "03.4", "04.13", "05.116", "06.69", "07.3",
    "08.100", "09.61", "10.42", "11.30", "12.68", "13.13", "14.19", "15.40",
    "16.2", "17.49", "18.100", "19.24", "20.0", "21.12", "22.64", "23.89",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
US = 1_000_000
"""Microseconds per second."""

DOWN, LATE, ERRS = "down", "late", "errs"
HELD = "held"
"""A definition's fields held per record (a projection), when not all of them."""

_RUNS = {"recovered": 0, "unrecovered": 0}
_RUNS_LOCK = threading.Lock()


def skip_snapshots() -> bool:
    """Whether stateful steps may skip pickling their state at an epoch's end.

    Only while runs without recovery are under way and none with it (bytewax asks for
    snapshots with recovery off too, and discards them): by default they are taken.
    """
    return _RUNS["unrecovered"] > 0 and _RUNS["recovered"] == 0


@contextmanager
def run_recovery(recovered: bool) -> Iterator[None]:
    """A run in this block keeps recovery state (``recovered``) or not."""
    kind = "recovered" if recovered else "unrecovered"
    with _RUNS_LOCK:
        _RUNS[kind] += 1
    try:
        yield
    finally:
        with _RUNS_LOCK:
            _RUNS[kind] -= 1


def late_records(step_id: str, count: int) -> None:
    """Count ``count`` late records of ``step_id`` (metric ``dataflare_late_records_total``)."""
    metrics.LATE_RECORDS.labels(step_id).inc(count)


def tagged(step_id: str, down: list[Any], errs: list[Failed],
           late: list[Any] | None = None) -> list[tuple[str, list[Any]]]:
    """A shard's outputs: the records, the late ones (counted) and the failed ones."""
    out: list[tuple[str, list[Any]]] = []
    if down:
        out.append((DOWN, down))
    if late:
        late_records(step_id, len(late))
        out.append((LATE, late))
    if errs:
        out.append((ERRS, errs))
    return out


def duplicates_dropped(step_id: str, count: int) -> None:
    """Count ``count`` repeats dropped by ``step_id``."""
    metrics.DUPLICATES_DROPPED.labels(step_id).inc(count)


class DefinitionChanged(RuntimeError):
    """A resume from state written by a different definition of the step."""


def component_id(step_id: str) -> str:
    """The workflow component id of a (possibly scoped) bytewax step id."""
    return step_id.rsplit(".", 1)[-1]


class BoolKey:
    """A boolean in a grouping key: unequal to 1 and 0, as JSON tells them apart.

    Python holds ``True == 1``, so a dict of groups merged ``true`` with ``1`` (and a
    dedupe dropped one as a repeat of the other). :func:`as_key` makes one of a value,
    :func:`from_key` the value again for the output.
    """

    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return other.__class__ is BoolKey and other.value is self.value

    def __hash__(self) -> int:
        return hash(("json boolean", self.value))

    def __repr__(self) -> str:
        return f"BoolKey({self.value})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BoolKey, (self.value,))


TRUE_KEY, FALSE_KEY = BoolKey(True), BoolKey(False)


def as_key(value: Any) -> Any:
    """``value`` as a grouping key (a boolean as a :class:`BoolKey`)."""
    if value.__class__ is bool:
        return TRUE_KEY if value else FALSE_KEY
    if value.__class__ is tuple and (True in value or False in value):  # 1 and 0 too
        return tuple(map(as_key, value))
    return value


def from_key(key: Any) -> Any:
    """The value of a grouping key (:func:`as_key` undone)."""
    if key.__class__ is BoolKey:
        return key.value
    if key.__class__ is tuple:
        return tuple(map(from_key, key))
    return key


KEY_KINDS = "a key must be text, a number, a boolean or null, not an object or a list"


def key_problem(exc: BaseException) -> BaseException:
    """An unhashable key's TypeError as the record's error (saying why); others as they are."""
    if isinstance(exc, TypeError) and str(exc).startswith("unhashable type"):
        return RecordError(f"{KEY_KINDS} ({exc})")
    return exc


def key_getter(paths: Sequence[str]) -> Callable[[Any], Any]:
    """The grouping key of a record: the value at one path, or a tuple for several.

    Records are dicts; a top-level field is read by ``methodcaller`` (no Python frame).
    Booleans are :class:`BoolKey` (see :func:`as_key`).
    """
    if not paths:
        return lambda record: None
    if len(paths) == 1:
        read = methodcaller("get", paths[0]) if "." not in paths[0] else getter(paths[0])

        def single(record: Any) -> Any:
            v = read(record)
            return v if v.__class__ is not bool else (TRUE_KEY if v else FALSE_KEY)

        return single
    if all("." not in p for p in paths):  # a tuple of top-level fields, built in C
        return _fields_getter(tuple(paths))
    gets = tuple(getter(p) for p in paths)
    return lambda record: as_key(tuple(g(record) for g in gets))


def _fields_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    """The tuple of the values of top-level fields ``names`` (``None`` when missing)."""
    env: dict[str, Any] = {f"g{i}": methodcaller("get", name) for i, name in enumerate(names)}
    body = ", ".join(f"{g}(record)" for g in env)
    env["_as_key"] = as_key
    return eval(f"lambda record: _as_key(({body},))", env)  # noqa: S307 - our own code


def shard_of(key: Any, shards: int) -> int:
    """The shard of ``key``: a hash that is the same in every process and run.

    Keys Python holds equal share a shard: ``1`` and ``1.0`` meet in one (a boolean is a
    :class:`BoolKey`, apart).
    """
    return zlib.crc32(repr(_equal_form(key)).encode()) % shards


def _equal_form(key: Any) -> Any:
    c = key.__class__
    if c is float and key.is_integer() or c is bool:
        return int(key)
    if c is tuple:
        return tuple(map(_equal_form, key))
    return key


def shard_names(shards: int) -> tuple[str, ...]:
    """The state keys of the ``shards`` shards of a stateful step.

    The balanced names for :data:`SHARDS` shards, "000", "001"... for any other count.
    """
    if shards == SHARDS:
        return _BALANCED_NAMES
    return tuple(f"{i:03d}" for i in range(shards))


def shards_of(ctx: Any) -> int:
    """The shards of ``ctx``'s stateful step: the workflow's ``config.state_shards``."""
    config = getattr(getattr(ctx, "workflow", None), "config", None)
    return getattr(config, "state_shards", None) or SHARDS


def shard_router(
    keys: Callable[[Any], Any], shards: int, tag: str | None = None
) -> Callable[[list[Any]], list[tuple[str, Any]]]:
    """A ``flat_map`` function splitting a batch into ``(shard, sub_batch)`` pairs.

    With ``tag`` (a join's side) each sub-batch is sent as ``(tag, sub_batch)``.
    Records whose key cannot be hashed go to shard 0, where the logic reports them.
    """
    cache: dict[Any, int] = {}
    cached = cache.get
    names = shard_names(shards)

    def route(batch: list[Any]) -> list[tuple[str, Any]]:
        parts: list[list[Any]] = [[] for _ in range(shards)]
        for rec in batch:
            try:
                key = keys(rec)
                s = cached(key)
                if s is None:
                    if len(cache) > 100_000:  # many keys: a bounded cache, not a copy
                        cache.clear()
                    s = cache[key] = shard_of(key, shards)
            except (TypeError, AttributeError):
                s = 0
            parts[s].append(rec)
        if tag is None:
            return [(names[s], sub) for s, sub in enumerate(parts) if sub]
        return [(names[s], (tag, sub)) for s, sub in enumerate(parts) if sub]

    return route


def epoch_bounds(time_unit: str, margin: int = 0) -> tuple[int, int]:
    """The epoch numbers (in ``time_unit``) of the years 1 to 9999: a date can hold them.

    ``margin`` (whole seconds) is left on both sides: a window of that size around any
    time inside can be dated too.
    """
    factor = 1000 if time_unit == "ms" else 1
    return (EPOCH_MIN + margin) * factor, (EPOCH_MAX - margin) * factor


def time_reader(path: str, time_unit: str = "s", margin: int = 0) -> Callable[[Any], int]:
    """Read a record's event time at ``path`` as integer epoch microseconds.

    ISO-8601 strings (naive means UTC) or epoch numbers (seconds, or milliseconds with
    ``time_unit='ms'``); anything else raises :class:`RecordError`, as does a time within
    ``margin`` seconds of the years 1 and 9999 (its window could not be dated).
    """
    get = getter(path)
    flat = "." not in path  # read here: a call less per record
    scale = 1000 if time_unit == "ms" else US
    lo, hi = epoch_bounds(time_unit, margin)
    lo_us, hi_us = (EPOCH_MIN + margin) * US, (EPOCH_MAX - margin) * US

    def dated(us: int) -> int:
        if lo_us <= us <= hi_us:
            return us
        msg = (f"time field {path!r}: {iso_us(us)} is within {margin}s of the years 1 and "
               "9999: its window cannot be dated")
        raise RecordError(msg)

    def read(record: Any) -> int:
        v: Any
        if flat:
            v = record.get(path) if isinstance(record, dict) else None
        else:
            v = get(record)
        c = v.__class__
        if (c is int or c is float) and lo <= v <= hi:
            return v * scale if c is int else round(v * scale)
        if c is str:
            try:
                dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                return read_other(v)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            us = (dt - _EPOCH) // _US
            return dated(us) if margin else us
        if v is None:
            msg = f"time field {path!r} is missing or null"
            raise RecordError(msg)
        return read_other(v)

    def read_other(v: Any) -> int:
        try:
            us = round(to_epoch_seconds(v, time_unit) * US)
        except RecordError as exc:
            msg = f"time field {path!r}: {exc}"
            raise RecordError(msg) from None
        return dated(us) if margin else us

    return read


def extraction_code(
    key_paths: Sequence[str],
    time_path: str | None,
    time_unit: str,
    env: dict[str, Any],
    indent: str,
    margin: int = 0,
) -> list[str]:
    """Source lines setting ``key`` (and ``t``, epoch microseconds) from ``rec``.

    For code generated per step: flat paths become ``rec.get(...)`` and integer times
    are scaled inline; anything else calls :func:`key_getter` / :func:`time_reader`
    (``margin``: see there).
    """
    lines = []
    if time_path is not None:
        env["_time"] = time_reader(time_path, time_unit, margin)
        scale = 1000 if time_unit == "ms" else US
        lo, hi = epoch_bounds(time_unit, margin)
        if "." in time_path:
            lines.append("t = _time(rec)")
        else:
            lines += [
                f"t = rec.get({time_path!r})",
                f"t = t * {scale} if t.__class__ is int and {lo} <= t <= {hi} else _time(rec)",
            ]
    if not key_paths:
        lines.append("key = None")
    elif all("." not in k for k in key_paths):
        gets = [f"rec.get({k!r})" for k in key_paths]
        env["_as_key"] = as_key
        if len(gets) == 1:  # a boolean is a BoolKey (see as_key)
            lines += [f"key = {gets[0]}", "if key.__class__ is bool: key = _as_key(key)"]
        else:
            lines.append(f"key = _as_key(({', '.join(gets)},))")
    else:
        env["_key"] = key_getter(key_paths)
        lines.append("key = _key(rec)")
    return [indent + line for line in lines]


def not_an_object(exc: AttributeError) -> RecordError:
    """The error of a record that is not an object where generated code reads its fields."""
    return RecordError(f"the record is not an object ({exc})")


def indent_code(code: str, indent: str) -> list[str]:
    """The lines of generated ``code`` (4-space indented) re-indented by ``indent``."""
    return [indent + line[4:] for line in code.split("\n")]


def iso_us(us: int) -> str:
    """ISO-8601 UTC text of epoch microseconds."""
    if us % US == 0:
        return iso_utc(us // US)
    dt = _EPOCH + timedelta(microseconds=us)
    text = dt.isoformat(timespec="milliseconds" if us % 1000 == 0 else "microseconds")
    return text.replace("+00:00", "Z")


def to_us(seconds: float) -> int:
    """A duration in seconds as integer microseconds."""
    return round(seconds * US)


_ADDED_LATER = ("inputs",)
"""Definition fields a step's snapshots have held since 2026-12-05: absent from an older
snapshot, they are not compared (its state resumes as before)."""


def resumable(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether state written under definition ``old`` can be resumed under ``new``.

    Equal definitions, or equal but for the fields held per record, where the new step
    holds no field the old one did not (records held whole hold every field).
    """
    if old == new:
        return True
    later = {k for k in _ADDED_LATER if k not in old}  # state written before they were kept
    if ({k: v for k, v in old.items() if k != HELD}
            != {k: v for k, v in new.items() if k != HELD and k not in later}):
        return False
    return HELD not in old or (HELD in new and set(new[HELD]) <= set(old[HELD]))


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two step definitions (``window.size: 60 -> 120``)."""
    parts = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            parts.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return "; ".join(parts) or "unknown change"


def resume_advice(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What to do when state written under ``old`` cannot resume under ``new``."""
    shards = old.get("shards")
    if shards is not None and shards != new.get("shards"):
        return (f"the state is kept in {shards} shards: set config.state_shards: {shards} in "
                "the workflow to resume it (DataFlare before 2026-12-04 kept 16), or start "
                "with a fresh recovery directory")
    return "restore the previous definition or start with a fresh recovery directory"


_ZSTD_FRAME = b"\x28\xb5\x2f\xfd"
CHAIN_MIN_KEYS = 10_000
"""Keys of a shard from which its snapshots add the changed keys to the last whole one."""
_codecs = threading.local()


def dump_state(state: Any, tree: bool = False) -> bytes:
    """A shard's state as snapshot bytes: pickled, then compressed with zstd (level 1).

    ``tree``: pickled by :func:`pickle_tree`. Compression costs less than it saves:
    bytewax copies the bytes and writes them to its SQLite store at every epoch's end,
    and pickled window state shrinks about 6x.
    """
    blob = pickle_tree(state) if tree else pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    compressor = getattr(_codecs, "compressor", None)
    if compressor is None:  # one per thread: a compressor is not shared between threads
        import zstandard

        compressor = _codecs.compressor = zstandard.ZstdCompressor(level=1)
    return bytes(compressor.compress(blob))


def load_state(blob: bytes, keyed: str | None = None) -> Any:
    """The state of a snapshot (:func:`dump_state`; a plain pickle before 2026-12-04).

    A snapshot of several zstd frames is a chain (:meth:`ShardLogic._chained`): the first
    holds the state, each next one the keys changed since. ``keyed`` names the state's
    dict of keys (``None``: the state is that dict); then a change is ``(the state's
    other fields, the keys changed)``.
    """
    if blob[:4] != _ZSTD_FRAME:  # a pickle starts with its protocol, b"\x80"
        return pickle.loads(blob)  # noqa: S301 - the run's own snapshot
    import zstandard

    state: Any = None
    while blob:
        frame = zstandard.ZstdDecompressor().decompressobj()
        part = pickle.loads(frame.decompress(blob))  # noqa: S301 - the run's own snapshot
        blob = frame.unused_data
        if state is None:
            state = part
        elif keyed is None:
            state.update(part)
        else:
            fields, changed = part
            state.update(fields)
            state[keyed].update(changed)
    return state


def touch_code(touching: bool, indent: int) -> dict[str, str]:
    """The ``{touched}`` and ``{touch}`` placeholders of a generated ingest loop.

    ``touching``: a parameter ``touched`` and a line, at ``indent``, putting the record's
    key with its value ``g`` in it (for :attr:`ShardLogic.tracks_keys`); else nothing.
    """
    if not touching:
        return {"touched": "", "touch": ""}
    return {"touched": ", touched", "touch": " " * indent + "touched[key] = g"}


def pickle_tree(obj: Any) -> bytes:
    """``obj`` pickled without pickle's memo: for state that holds no object twice.

    The memo records every object pickled, to write a second reference to one as a
    reference; on millions of small lists and dicts that bookkeeping is most of the time
    (1,000,000 window groups: 2.0 s with it, 0.4 s without). Without it an object reached
    twice would be written, and restored, twice; a cycle raises ``ValueError``, and is
    then pickled with the memo.
    """
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True  # no memo (the attribute is deprecated, not removed: CPython 3.11-3.13)
    try:
        pickler.dump(obj)
    except ValueError:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return out.getvalue()


class ShardLogic(StatefulBatchLogic[Any, tuple[str, list[Any]], tuple[dict[str, Any], bytes]]):
    """One shard of a stateful step: all its keys in plain dicts.

    Subclasses set ``self.state`` (any picklable object) and implement
    :meth:`process` (a list of sub-batches), :meth:`flush` (end of input) and optionally
    :meth:`idle` (no records for ``idle_timeout`` of system time). Each returns a list
    of ``(tag, batch)`` items, ``tag`` one of ``down``, ``late``, ``errs`` (or another
    output name).

    A subclass whose state is a tree (no object in it reached twice: numbers, strings,
    and containers each held in one place) sets ``tree_state``, and its snapshots are
    pickled without the memo (:func:`pickle_tree`), several times faster. Snapshots are
    compressed (:func:`dump_state`).
    """

    tree_state = False
    """Whether ``state`` holds no object twice (see :func:`pickle_tree`)."""
    tracks_keys = False
    """Whether :meth:`process` puts each key it changes, with its value, in ``touched``
    while that is a dict (see :meth:`_chained`)."""
    keyed: str | None = None
    """The field of the state (a dict) holding its dict of keys; ``None``: the state is it."""

    def __init__(
        self,
        step_id: str,
        definition: dict[str, Any],
        resume: tuple[dict[str, Any], bytes] | None,
        idle_timeout: float | None = None,
    ) -> None:
        self.step_id = step_id
        self.component = component_id(step_id)
        self.definition = definition
        self.idle_timeout = None if idle_timeout is None else timedelta(seconds=idle_timeout)
        self._idle_at: datetime | None = None
        self.state: Any = None
        self.view: View | None = None
        self.touched: dict[Any, Any] | None = None
        """The keys changed since the last snapshot; ``None``: the next one is whole."""
        self._chain: list[bytes] = []  # the last whole snapshot, then the changes since
        self._chained_keys = 0  # keys the chain holds: the whole one's, then each change's
        if resume is not None:
            old, blob = resume
            if not resumable(old, definition):
                msg = (
                    f"step {self.component!r}: cannot resume from recovery state written by a "
                    f"different definition of the step ({describe_change(old, definition)}); "
                    f"{resume_advice(old, definition)}"
                )
                raise DefinitionChanged(msg)
            self.state = load_state(blob, self.keyed)

    def process(self, batches: list[Any]) -> list[tuple[str, list[Any]]]:
        """Handle the sub-batches that arrived for this shard."""
        raise NotImplementedError

    def flush(self) -> list[tuple[str, list[Any]]]:
        """Emit everything still open: the input has ended."""
        return []

    def idle(self) -> list[tuple[str, list[Any]]]:
        """Emit what should not wait any longer: no input for ``idle_timeout``."""
        return self.flush()

    def has_state(self) -> bool:
        """Whether anything is held that :meth:`idle` would emit."""
        return True

    def view_rows(self, state: Any) -> list[tuple[Any, dict[str, Any]]]:
        """A shard ``state`` as ``(key, row)`` pairs for ``serve: true`` (keys may repeat).

        A row looks like what the step emits for the key (its current aggregates). Called
        when a view is read, on a copy of the state of an epoch's end; steps that cannot be
        served do not override this.
        """
        msg = f"step {self.component!r} cannot serve its state"
        raise NotImplementedError(msg)

    def _chained(self) -> bytes:
        """The snapshot's bytes: the whole state, or the last whole one and the changes.

        A large state of a step that :attr:`tracks_keys` is written whole once, then only
        the keys changed since are added to it at each snapshot (compressed frames one
        after the other, which :func:`load_state` applies in order). It is written whole
        again once the chain holds more than twice as many keys as the state: a key
        changed at every epoch is then not kept many times over, while a state that grows
        by new keys (windows opening) is pickled once, not again at each doubling. In the
        store each snapshot still holds all of it, so a resume needs nothing else.
        """
        touched, state, keyed = self.touched, self.state, self.keyed
        if not self.tracks_keys:
            return dump_state(state, self.tree_state)
        keys = state if keyed is None else state[keyed]
        if touched is None or not self._chain \
                or self._chained_keys + len(touched) > 2 * len(keys):
            self._chain = [dump_state(state, self.tree_state)]
            self._chained_keys = len(keys)
        else:
            change = touched if keyed is None else (
                {k: v for k, v in state.items() if k != keyed}, touched)
            self._chain.append(dump_state(change, self.tree_state))
            self._chained_keys += len(touched)
        self.touched = {} if len(keys) >= CHAIN_MIN_KEYS else None
        return self._chain[0] if len(self._chain) == 1 else b"".join(self._chain)

    def snapshot_rows(self, blob: bytes) -> list[tuple[Any, dict[str, Any]]]:
        """:meth:`view_rows` of the state a snapshot holds."""
        return self.view_rows(load_state(blob, self.keyed))

    def on_batch(self, values: list[Any]) -> tuple[Iterable[tuple[str, list[Any]]], bool]:
        """Bytewax entry: a list of sub-batches."""
        out = self.process(values)
        if self.idle_timeout is not None:
            self._idle_at = datetime.now(UTC) + self.idle_timeout
        return out, False

    def on_notify(self) -> tuple[Iterable[tuple[str, list[Any]]], bool]:
        """Bytewax entry: the idle timeout passed."""
        self._idle_at = None
        return self.idle(), False

    def on_eof(self) -> tuple[Iterable[tuple[str, list[Any]]], bool]:
        """Bytewax entry: the input ended; on a graceful stop, open state is kept instead."""
        if stopping.requested():
            return [], False
        out = self.flush()
        if self.view is not None:  # the shard is discarded: no snapshot follows
            self.view.publish(id(self), None, self.snapshot_rows)
        return out, True

    def notify_at(self) -> datetime | None:
        """Bytewax entry: when the idle timeout fires."""
        if self._idle_at is not None and self.has_state():
            return self._idle_at
        return None

    def snapshot(self) -> tuple[dict[str, Any], bytes]:
        """The state with the step's definition; pickled, so it is an immutable copy.

        Bytewax asks at the end of each epoch that touched the shard: a served step's view
        receives the same copy, so it shows the state as of that epoch's end (its rows are
        made from it only when the view is read). In a run without recovery
        (:func:`skip_snapshots`) nothing is kept, so an unserved step pickles nothing: the
        state may be large, and bytewax asks at every epoch's end.
        """
        if self.view is None and skip_snapshots():
            return (self.definition, b"")
        blob = self._chained()
        if self.view is not None:
            self.view.publish(id(self), blob, self.snapshot_rows)
        return (self.definition, blob)


class ShardBuilder:
    """The builder ``op.stateful_batch`` calls per shard, with what plans and views need.

    :meth:`definition` is the definition a shard of this step snapshots (what a resume is
    checked against); :attr:`view` is set by the compiler on a step with ``serve: true``.
    """

    def __init__(self, build: Callable[[tuple[dict[str, Any], bytes] | None], ShardLogic]
                 ) -> None:
        self.build = build
        self.view: View | None = None

    def __call__(self, resume: tuple[dict[str, Any], bytes] | None) -> ShardLogic:
        """A shard's logic (resumed from ``resume``), publishing to the view if served."""
        logic = self.build(resume)
        logic.view = self.view
        return logic

    def definition(self) -> dict[str, Any]:
        """The step's definition, as its snapshots carry it."""
        return self.build(None).definition


def shard_builders(flow: Dataflow, prefix: str = "") -> dict[str, ShardBuilder]:
    """The shard builders of a compiled dataflow by full step id (under ``prefix``).

    Walks bytewax's public operator tree: each ``stateful_batch`` step keeps its builder.
    """
    found: dict[str, ShardBuilder] = {}
    todo: list[Any] = list(flow.substeps)
    while todo:
        step = todo.pop()
        builder = getattr(step, "builder", None)
        if isinstance(builder, ShardBuilder) and step.step_id.startswith(prefix):
            found[step.step_id] = builder
        todo.extend(step.substeps)
    return found


def stateful_shards(
    step_id: str,
    keyed: Stream[tuple[str, Any]],
    build: Callable[[tuple[dict[str, Any], bytes] | None], ShardLogic],
    outputs: Sequence[str] = (DOWN, LATE, ERRS),
) -> dict[str, Stream[list[Any]]]:
    """Run the shard logic and split its ``(tag, batch)`` items into one stream per tag."""
    tagged = op.stateful_batch(step_id, keyed, ShardBuilder(build))
    items = op.key_rm("unkey", tagged)

    def pick(tag: str) -> Callable[[tuple[str, list[Any]]], list[Any] | None]:
        def select(item: tuple[str, list[Any]]) -> list[Any] | None:
            return item[1] if item[0] == tag else None

        return select

    return {tag: op.filter_map(tag, items, pick(tag)) for tag in outputs}


def route_and_merge(
    step_id: str,
    ups: Sequence[tuple[str | None, Stream[list[Any]]]],
    keys: Sequence[Callable[[Any], Any]],
    shards: int,
) -> Stream[tuple[str, Any]]:
    """Split each input's batches into shards (tagged per input when named) and merge."""
    routed = [
        op.flat_map(
            "shard" if len(ups) == 1 else f"shard_{tag}",
            up,
            shard_router(k, shards, tag),
        )
        for (tag, up), k in zip(ups, keys, strict=True)
    ]
    if len(routed) == 1:
        return routed[0]
    return op.merge("merge_sides", *routed)


def upstream_sources(ctx: Any) -> list[Any]:
    """The source components feeding ``ctx``'s step, directly or through transformations."""
    wf = getattr(ctx, "workflow", None)
    if wf is None:
        return []
    inputs = list(getattr(ctx.component, "inputs", []) or [])
    return [wf.sources[s] for s in wf.upstream_sources(inputs)]


def rejoined_upstream(ctx: Any) -> bool:
    """Whether ``ctx``'s step, or a transformation upstream of it, has several inputs.

    Branches of one source (two filters, a route's outputs) then meet again: each branch
    passes on its part of a source batch in turn, so a key's records reach the step out
    of the order they were read, by up to a batch's time span. Event-time steps take the
    records that reach them together in event-time order instead (a record is late only
    when older than the watermark before them).
    """
    wf = getattr(ctx, "workflow", None)
    if wf is None:
        return False
    seen: set[str] = set()
    todo = [ctx.step_id.split(".", 1)[0]]
    while todo:
        ref = todo.pop().split(".", 1)[0]
        if ref in seen or ref not in wf.transformations:
            continue
        seen.add(ref)
        inputs = wf.transformations[ref].inputs
        if len(inputs) > 1:
            return True
        todo.extend(inputs)
    return False


def idle_timeout_of(ctx: Any) -> float | None:
    """The smallest ``streaming.idle_timeout`` of the sources upstream of ``ctx``'s step."""
    timeouts = [
        src.streaming.idle_timeout
        for src in upstream_sources(ctx)
        if src.streaming is not None and src.streaming.idle_timeout is not None
    ]
    return min(timeouts) if timeouts else None


def unbounded_upstream(ctx: Any) -> bool:
    """Whether a source upstream of ``ctx``'s step is unbounded (streaming, cdc, hybrid)."""
    return any(
        src.mode in ("streaming", "cdc", "hybrid") or src.streaming is not None
        for src in upstream_sources(ctx)
    )
