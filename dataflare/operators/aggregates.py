"""Aggregate functions of ``window`` and ``aggregation``: config, accumulators, output.

An accumulator is a plain ``list`` of slots (cheap to update, pickle and merge). Slot 0
counts the records added. The per-record update is compiled once per step into one
Python function for the step's aggregations, so adding a record costs one call however
many aggregations the step has; merging (sliding panes, sessions that grow together)
and finishing (the output fields) run once per window, not per record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, WithJsonSchema, model_validator

from dataflare.config import Strict
from dataflare.records import (
    RecordError,
    a_or_an,
    exact_number_hint,
    getter,
    parse_duration,
    set_path,
)

Operation = Literal["count", "sum", "avg", "min", "max", "count_distinct", "first", "last"]
OPERATIONS: tuple[str, ...] = get_args(Operation)


class Aggregate(Strict):
    """One field's aggregates: ``{field, operations, as}`` or ``{type, field, as}``."""

    field: str | None = Field(
        None, description="Dotted path aggregated; without it `count` counts records."
    )
    operations: tuple[Operation, ...] = Field(
        (), description="Operations applied to the field (`count` counts non-null values)."
    )
    type: Operation | None = Field(None, description="A single operation (instead of a list).")
    as_: str | None = Field(
        None,
        alias="as",
        description="Output name: the field itself for one operation, else its prefix.",
    )

    @model_validator(mode="after")
    def _check(self) -> Aggregate:
        ops = self.ops
        if not ops:
            msg = "an aggregation needs 'operations' (or 'type')"
            raise ValueError(msg)
        if len(set(ops)) != len(ops):
            msg = f"operations {list(self.operations)} repeat an operation"
            raise ValueError(msg)
        if self.field is None and any(op != "count" for op in ops):
            msg = f"operations {list(ops)} need 'field' (only 'count' works without one)"
            raise ValueError(msg)
        return self

    @property
    def ops(self) -> tuple[str, ...]:
        """The operations, from ``operations`` and ``type`` together."""
        if self.type is not None and self.type not in self.operations:
            return (*self.operations, self.type)
        return tuple(self.operations)

    def output_names(self) -> list[str]:
        """The output field of each operation, in order."""
        ops = self.ops
        if self.as_ is not None and len(ops) == 1:
            return [self.as_]
        base = self.as_ or self.field
        return [f"{base}_{op}" if base else op for op in ops]


_TRAILING = re.compile(
    r"^last_(\d+(?:\.\d+)?)_?(ms|s|m|h|d|w|milliseconds?|seconds?|minutes?|hours?|days?|weeks?)$"
)
_UNIT_ALIAS = {"millisecond": "ms", "second": "s", "minute": "m", "hour": "h", "day": "d"}
_UNIT_ALIAS["week"] = "w"


def parse_trailing(text: str | float) -> float:
    """Seconds of a trailing range: ``last_90_days``, ``last_7d``, or a duration ``90d``."""
    if isinstance(text, str):
        m = _TRAILING.match(text.strip())
        if m:
            unit = m.group(2)
            unit = _UNIT_ALIAS.get(unit.rstrip("s") if len(unit) > 2 else unit, unit)
            return parse_duration(f"{m.group(1)}{unit}")
    try:
        return parse_duration(text)
    except ValueError:
        msg = f"invalid trailing range {text!r} (expected e.g. 'last_90_days', 'last_7d', '90d')"
        raise ValueError(msg) from None


class TrailingAggregate(Aggregate):
    """An aggregate of the ``aggregation`` step, optionally over a trailing time range."""

    window: Annotated[float | None, WithJsonSchema({"anyOf": [
        {"type": "number"}, {"type": "string"}, {"type": "null"}]})] = Field(
        None,
        description="Only records within this range before the group's latest event time "
        "('last_90_days', 'last_7d', '90d'); needs `time_field`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _trailing(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("window"), str | int | float):
            data = {**data, "window": parse_trailing(data["window"])}
        return data


def check_names(aggs: Sequence[Aggregate], reserved: Sequence[str]) -> None:
    """Refuse two aggregates writing the same output field (or a reserved one)."""
    seen: set[str] = set(reserved)
    for agg in aggs:
        for name in agg.output_names():
            if name in seen:
                msg = f"output field {name!r} is written twice; set a distinct 'as'"
                raise ValueError(msg)
            seen.add(name)


class BadValue(RecordError):
    """A value an aggregate cannot take (a string summed, a dict counted distinct)."""


def _bad(path: str, value: Any, op: str, expected: str) -> None:
    kind = type(value).__name__
    msg = f"field {path!r} is {a_or_an(kind)} ({value!r}), {op} needs {expected}"
    if expected == "a number":
        msg += exact_number_hint(value)
    raise BadValue(msg)


# Slot kinds. An accumulator is [records, <slots...>].
_N, _SUM, _MIN, _MAX, _SET, _FIRST, _LAST, _ALL = range(8)


@dataclass(frozen=True)
class _Output:
    path: str
    op: str
    slots: tuple[int, ...]


@dataclass(frozen=True)
class Accumulators:
    """The compiled aggregates of a step.

    ``new()`` makes an empty accumulator, ``update(acc, record, t)`` adds a record whose
    event time (or arrival number) is ``t`` and raises :class:`BadValue` before changing
    anything when a value does not fit; ``merge(into, other)`` combines two accumulators;
    ``finish(acc, out)`` writes the output fields into the dict ``out``.
    """

    kinds: tuple[int, ...]
    outputs: tuple[_Output, ...]
    update: Callable[[list[Any], Any, int], None]
    new: Callable[[], list[Any]]
    finish: Callable[[list[Any], dict[str, Any]], None]
    update_code: str
    """The body of ``update`` (4-space indented; names ``acc``, ``rec``, ``t``), to inline."""
    update_env: dict[str, Any]
    """The globals ``update_code`` needs."""
    new_code: str
    """An expression making an empty accumulator, to inline."""
    finish_items: tuple[tuple[str, str], ...]
    """(output path, expression over ``acc``) of each aggregate, to inline."""
    collects: bool = False
    """Whether the accumulator keeps the records themselves (in arrival order)."""

    def merge(self, into: list[Any], other: list[Any]) -> None:
        """Add ``other`` into ``into``."""
        for i, kind in enumerate(self.kinds):
            b = other[i]
            if kind in (_N, _SUM, _ALL):
                into[i] += b
            elif b is None:
                continue
            elif kind == _SET:
                into[i] |= b
            else:
                a = into[i]
                if a is None:
                    into[i] = b
                elif kind == _MIN:
                    into[i] = b if b < a else a
                elif kind == _MAX:
                    into[i] = b if b > a else a
                elif kind == _FIRST:
                    into[i] = b if b[0] < a[0] else a
                elif kind == _LAST:
                    into[i] = b if b[0] >= a[0] else a

    @property
    def merge_code(self) -> str | None:
        """Code adding accumulator ``pa`` into ``acc`` (4-space indented), to inline.

        ``None`` when merging cannot stand for adding the records one by one: ``min`` and
        ``max`` refuse a record of another type than the window's earlier ones (a merge
        would meet the clash after the record was accepted), and collected records
        keep their arrival order.
        """
        if self.collects or _MIN in self.kinds or _MAX in self.kinds:
            return None
        lines = []
        for i, kind in enumerate(self.kinds):
            if kind in (_N, _SUM, _ALL):
                lines.append(f"    acc[{i}] += pa[{i}]")
            elif kind == _SET:
                lines.append(f"    acc[{i}] |= pa[{i}]")
            else:
                cmp = "<" if kind == _FIRST else ">="
                lines.append(
                    f"    if pa[{i}] is not None and (acc[{i}] is None or "
                    f"pa[{i}][0] {cmp} acc[{i}][0]): acc[{i}] = pa[{i}]"
                )
        return "\n".join(lines)

    def copy(self, acc: list[Any]) -> list[Any]:
        """A copy of ``acc`` that can be merged into without changing ``acc``."""
        return [set(v) if k == _SET else v for k, v in zip(self.kinds, acc, strict=True)]


_EMPTY_CODE = {_N: "0", _SUM: "0", _ALL: "0", _SET: "set()"}
for _k in (_MIN, _MAX, _FIRST, _LAST):
    _EMPTY_CODE[_k] = "None"


def compile_aggregates(aggs: Sequence[Aggregate]) -> Accumulators:
    """Compile ``aggs`` into :class:`Accumulators` (one update function for all of them)."""
    kinds: list[int] = [_ALL]
    outputs: list[_Output] = []
    env: dict[str, Any] = {"_bad": _bad}
    checks: list[str] = []
    updates: list[str] = []
    by_field: dict[str, dict[str, int]] = {}
    var_of: dict[str, str] = {}

    def slot(fld: str, kind: int) -> int:
        table = by_field.setdefault(fld, {})
        key = str(kind)
        if key not in table:
            table[key] = len(kinds)
            kinds.append(kind)
        return table[key]

    for agg in aggs:
        for name, op in zip(agg.output_names(), agg.ops, strict=True):
            if agg.field is None:
                outputs.append(_Output(name, op, (0,)))
                continue
            fld = agg.field
            if fld not in var_of:
                var_of[fld] = f"v{len(var_of)}"
            n = slot(fld, _N)
            if op == "count":
                slots: tuple[int, ...] = (n,)
            elif op in ("sum", "avg"):
                slots = (n, slot(fld, _SUM))
            elif op == "min":
                slots = (slot(fld, _MIN),)
            elif op == "max":
                slots = (slot(fld, _MAX),)
            elif op == "count_distinct":
                slots = (slot(fld, _SET),)
            elif op == "first":
                slots = (slot(fld, _FIRST),)
            else:
                slots = (slot(fld, _LAST),)
            outputs.append(_Output(name, op, slots))

    lines = ["def update(acc, rec, t):", "    acc[0] += 1"]
    for fld, var in var_of.items():
        if "." in fld:
            g = f"g_{var}"
            env[g] = getter(fld)
            lines.append(f"    {var} = {g}(rec)")
        else:
            lines.append(f"    {var} = rec.get({fld!r})")
        table = by_field[fld]
        p = repr(fld)
        if str(_SUM) in table:
            checks.append(
                f"    if {var} is not None and {var}.__class__ is not int "
                f"and {var}.__class__ is not float: _bad({p}, {var}, 'sum/avg', 'a number')"
            )
        for kind in (_MIN, _MAX):
            if str(kind) in table:
                i = table[str(kind)]
                checks.append(
                    f"    if {var} is not None:\n"
                    f"        c = {var}.__class__\n"
                    f"        if c is not int and c is not float and c is not str: "
                    f"_bad({p}, {var}, 'min/max', 'a number or a string')\n"
                    f"        m = acc[{i}]\n"
                    f"        if m is not None and (m.__class__ is str) != (c is str): "
                    f"_bad({p}, {var}, 'min/max', 'values of one type')"
                )
        if str(_SET) in table:
            checks.append(
                f"    if {var} is not None and ({var}.__class__ is dict or "
                f"{var}.__class__ is list): _bad({p}, {var}, 'count_distinct', 'a scalar')"
            )
        body = [f"        acc[{table[str(_N)]}] += 1"]
        if str(_SUM) in table:
            body.append(f"        acc[{table[str(_SUM)]}] += {var}")
        if str(_MIN) in table:
            i = table[str(_MIN)]
            body.append(f"        if acc[{i}] is None or {var} < acc[{i}]: acc[{i}] = {var}")
        if str(_MAX) in table:
            i = table[str(_MAX)]
            body.append(f"        if acc[{i}] is None or {var} > acc[{i}]: acc[{i}] = {var}")
        if str(_SET) in table:  # true and 1 are two values (Python's sets take them as one)
            body.append(f"        acc[{table[str(_SET)]}].add(({var},) if {var}.__class__ "
                        f"is bool else {var})")
        if str(_FIRST) in table:
            i = table[str(_FIRST)]
            body.append(f"        if acc[{i}] is None or t < acc[{i}][0]: acc[{i}] = (t, {var})")
        if str(_LAST) in table:
            i = table[str(_LAST)]
            body.append(f"        if acc[{i}] is None or t >= acc[{i}][0]: acc[{i}] = (t, {var})")
        updates.append(f"    if {var} is not None:\n" + "\n".join(body))
    # Checks first: a record that does not fit changes nothing but the record count,
    # which is incremented last.
    body = [*lines[2:], *checks, *updates, "    acc[0] += 1"]
    lines = [lines[0], *body]
    new_code = "[" + ", ".join(_EMPTY_CODE[k] for k in kinds) + "]"
    lines.append("def new():")
    lines.append(f"    return {new_code}")
    lines.append("def finish(acc, out):")
    lines.append("    pass")
    items: list[tuple[str, str]] = []
    for o in outputs:
        s0 = o.slots[0]
        if o.op == "sum":
            expr = f"acc[{o.slots[1]}] if acc[{s0}] else None"
        elif o.op == "avg":
            expr = f"acc[{o.slots[1]}] / acc[{s0}] if acc[{s0}] else None"
        elif o.op == "count_distinct":
            expr = f"len(acc[{s0}])"
        elif o.op in ("first", "last"):
            expr = f"None if acc[{s0}] is None else acc[{s0}][1]"
        else:
            expr = f"acc[{s0}]"
        items.append((o.path, expr))
        if "." in o.path:
            lines.append(f"    _set_path(out, {o.path!r}, {expr})")
        else:
            lines.append(f"    out[{o.path!r}] = {expr}")
    env["_set_path"] = set_path
    code = "\n".join(lines)
    exec(compile(code, "<dataflare aggregates>", "exec"), env)  # noqa: S102
    return Accumulators(
        tuple(kinds),
        tuple(outputs),
        env["update"],
        env["new"],
        env["finish"],
        "\n".join(body),
        {k: v for k, v in env.items() if k in ("_bad", "_set_path") or k.startswith("g_")},
        new_code,
        tuple(items),
    )


def collect_records() -> Accumulators:
    """An accumulator keeping a window's records themselves, in arrival order.

    For steps that compute over all the records of a window at once (``sql``): the
    window operator's assignment, watermark and late rules apply unchanged, and the
    output field ``_records`` holds the window's records.
    """
    env: dict[str, Any] = {}
    code = (
        "def update(acc, rec, t):\n    acc[1].append(rec)\n    acc[0] += 1\n"
        "def new():\n    return [0, []]\n"
        "def finish(acc, out):\n    out['_records'] = acc[1]\n"
    )
    exec(compile(code, "<dataflare collect>", "exec"), env)  # noqa: S102
    return Accumulators(
        (_ALL, _SUM),  # merging adds the slots: lists of records concatenate
        (),
        env["update"],
        env["new"],
        env["finish"],
        "    acc[1].append(rec)\n    acc[0] += 1",
        {},
        "[0, []]",
        (("_records", "acc[1]"),),
        collects=True,
    )
