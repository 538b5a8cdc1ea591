"""Built-in formula steps: ``custom`` with ``config.formula`` and ``config.output_field``.

    customer_value:
      type: custom
      config:
        formula: "sum(orders.total) * 0.7 + click_count * 0.3"
        output_field: user.customerValue

The formula is an expression (see :mod:`dataflare.expr`) that may also call the aggregate
functions ``sum``, ``avg``, ``min``, ``max`` and ``count`` on one field path. The path goes
through lists: ``orders.total`` over ``{"orders": [{"total": 3}, {"total": 4}]}`` is
``[3, 4]``. Null values are skipped (``count`` counts the others). As the expression
language's functions of a null argument (``sum(null)``, ``len(null)``), every aggregate of
a path that is null or missing before any list is null; of an empty list, ``sum`` and
``count`` are 0, ``avg``, ``min`` and ``max`` null. A value that is not a number fails the
record (the step's ``error_handling`` applies), and so does a result that is not a number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from bytewax.dataflow import Stream
from pydantic import Field, ValidationError, field_validator

from dataflare.config import Strict
from dataflare.expr import Expression, compile_expression
from dataflare.operators.records import map_records
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import RecordError, set_path
from dataflare.registry import BuildContext, Outputs

_AGG = re.compile(r"\b(sum|avg|min|max|count)\(\s*([A-Za-z_][\w]*(?:\.[\w]+)*)\s*\)")
_PREFIX = "__agg"


class FormulaConfig(Strict):
    """Settings of a built-in formula step."""

    formula: str = Field(description="Expression; may call sum/avg/min/max/count on a path.")
    output_field: str = Field(description="Path written with the result.")

    @field_validator("formula")
    @classmethod
    def _compiles(cls, v: str) -> str:
        compile_formula(v)
        return v


def _collect(value: Any, parts: list[str], out: list[Any]) -> bool:
    """Add the values at ``parts`` under ``value`` (through lists, nulls left out) to ``out``.

    False when the path is null or missing before any list.
    """
    if isinstance(value, list):
        for item in value:
            _collect(item, parts, out)
        return True
    if not parts:
        if value is not None:
            out.append(value)
        return value is not None
    return isinstance(value, dict) and _collect(value.get(parts[0]), parts[1:], out)


def _numbers(fn: str, path: str, values: list[Any]) -> list[float]:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            msg = f"{fn}({path}): {v!r} is not a number"
            raise RecordError(msg)
    return values


def _aggregate(fn: str, path: str) -> Callable[[Any], Any]:
    parts = path.split(".")

    def compute(record: Any) -> Any:
        values: list[Any] = []
        if not _collect(record, parts, values):
            return None
        if fn == "count":
            return len(values)
        nums = _numbers(fn, path, values)
        if fn == "sum":
            return sum(nums)
        if not nums:
            return None
        if fn == "avg":
            return sum(nums) / len(nums)
        return min(nums) if fn == "min" else max(nums)

    return compute


def compile_formula(text: str) -> Callable[[Any], Any]:
    """A function computing ``text`` for a record; raises ``ValueError`` on a bad formula."""
    aggs: list[tuple[str, Callable[[Any], Any]]] = []

    def replace(m: re.Match[str]) -> str:
        name = f"{_PREFIX}{len(aggs)}"
        aggs.append((name, _aggregate(m.group(1), m.group(2))))
        return name

    expr: Expression = compile_expression(_AGG.sub(replace, text))
    if not aggs:
        return expr

    def evaluate(record: Any) -> Any:
        scope = dict(record) if isinstance(record, dict) else {}
        for name, agg in aggs:
            scope[name] = agg(record)
        return expr(scope)

    return evaluate


def formula_schema(ctx: SchemaContext[Any], config: dict[str, Any]) -> FieldType | None:
    """The input's fields plus ``output_field`` (a number); the formula's paths are read."""
    try:
        cfg = FormulaConfig.model_validate(config)
    except ValidationError as exc:  # the config of a plugin step without a plugin
        for e in exc.errors():  # worded as validate words a config's own problems
            key = str(e["loc"][-1]) if e["loc"] else ""
            if e["type"] == "missing":
                ctx.error((), f"missing required key {key!r}")
            elif e["type"] == "extra_forbidden":
                ctx.error((key,), f"unknown key {key!r}; known: formula, output_field")
            else:
                ctx.error((key,), str(e["msg"]).removeprefix("Value error, "))
        return None
    origins: set[tuple[str, str]] = set()
    for m in _AGG.finditer(cfg.formula):  # paths through lists: sum(orders.total)
        want = None if m.group(1) == "count" else "number"
        origins |= ctx.read(("formula",), m.group(2), want=want).all_origins()
    numbers = _AGG.sub(lambda m: "0".ljust(len(m.group(0))), cfg.formula)  # columns kept
    rest = ctx.read_expression(("formula",), numbers)
    origins |= rest.all_origins()
    return ctx.input.with_path(cfg.output_field, FieldType.of("number", origins))


def build_formula_step(ctx: BuildContext, ups: list[Stream[Any]], config: dict[str, Any]
                       ) -> Outputs:
    """The operators of a formula step (``config`` holds ``formula`` and ``output_field``)."""
    cfg = FormulaConfig.model_validate(config)
    compute = compile_formula(cfg.formula)
    out_path = cfg.output_field

    def apply(record: Any) -> Any:
        value = compute(record)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            msg = f"formula result {value!r} is not a number"
            raise RecordError(msg)
        if isinstance(value, float) and not math.isfinite(value):  # JSON would write null
            msg = f"formula result is {value!r}: a value is too large for a float"
            raise RecordError(msg)
        out = dict(record)
        set_path(out, out_path, value)
        return out

    res = map_records("formula", ups[0], apply, ctx.step_id)
    return Outputs(down=res.down, errs=res.errs)
