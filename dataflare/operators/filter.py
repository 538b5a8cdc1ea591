"""The ``filter`` transformation: keep the records where a condition holds."""

from __future__ import annotations

from typing import Any

from bytewax.dataflow import Stream
from pydantic import Field, field_validator

from dataflare.config import Strict
from dataflare.expr import check_expression, compile_expression
from dataflare.operators.records import map_records
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.registry import BuildContext, Outputs, transformation


class FilterConfig(Strict):
    """Settings of a ``filter`` transformation."""

    condition: str = Field(description="Expression; records where it is true pass.")

    _check = field_validator("condition")(classmethod(lambda cls, v: check_expression(v)))


def filter_schema(ctx: SchemaContext[FilterConfig]) -> FieldType:
    """The records pass unchanged; the condition's fields are read."""
    ctx.read_expression(("condition",), ctx.config.condition)
    return ctx.input


@transformation("filter", config=FilterConfig, description="Keep records matching a condition.",
                schema=filter_schema)
def build_filter(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build a filter step."""
    up = ups[0]
    test = compile_expression(ctx.config.condition).test
    out = map_records("filter", up, lambda r: r if test(r) else None, ctx.step_id)
    return Outputs(down=out.down, errs=out.errs)
