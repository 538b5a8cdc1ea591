"""The ``route`` transformation: content-based routing to named outputs.

A record goes to every route whose condition holds; one that matches none goes to
``_unmatched``. Consumers read ``inputs: ["<router id>.<route name>"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Stream
from pydantic import Field, field_validator

from dataflare.config import Strict
from dataflare.expr import check_expression, compile_expression
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import Batch, Failed
from dataflare.registry import BuildContext, Outputs, transformation

UNMATCHED = "_unmatched"


class Route(Strict):
    """One named output and its condition."""

    name: str = Field(
        description="Route name, read as '<router id>.<name>'.", pattern=r"^[A-Za-z][\w-]*$"
    )
    condition: str = Field(description="Expression; matching records take this route.")

    _check = field_validator("condition")(classmethod(lambda cls, v: check_expression(v)))


class RouteConfig(Strict):
    """Settings of a ``route`` transformation."""

    routes: list[Route] = Field(description="Named routes, tested in order.", min_length=1)

    @field_validator("routes")
    @classmethod
    def _unique(cls, routes: list[Route]) -> list[Route]:
        seen: set[str] = set()
        for r in routes:
            if r.name in seen:
                msg = f"route name {r.name!r} is used twice"
                raise ValueError(msg)
            seen.add(r.name)
        return routes


def route_names(config: RouteConfig) -> list[str]:
    """The outputs of a router: its routes and ``_unmatched``."""
    return [r.name for r in config.routes] + [UNMATCHED]


def _port(name: str) -> Callable[[tuple[dict[str, Batch], list[Failed]]], Batch | None]:
    return lambda pair: pair[0][name] or None


def route_schema(ctx: SchemaContext[RouteConfig]) -> FieldType:
    """Every route passes the records unchanged; the conditions' fields are read."""
    for i, r in enumerate(ctx.config.routes):
        ctx.read_expression(("routes", i, "condition"), r.condition)
    return ctx.input


@transformation(
    "route",
    config=RouteConfig,
    description="Send each record to every route whose condition holds.",
    named_outputs=route_names,
    main_output=False,
    schema=route_schema,
)
def build_route(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build a router."""
    up = ups[0]
    tests = [(r.name, compile_expression(r.condition).test) for r in ctx.config.routes]
    step = ctx.step_id

    def split(batch: Batch) -> tuple[dict[str, Batch], list[Failed]]:
        parts: dict[str, Batch] = {name: [] for name in route_names(ctx.config)}
        bad: list[Failed] = []
        unmatched = parts[UNMATCHED]
        for record in batch:
            try:
                hits = [name for name, test in tests if test(record)]
            except Exception as exc:  # noqa: BLE001 - goes to the error policy
                bad.append(Failed.of(step, exc, record))
                continue
            for name in hits:
                parts[name].append(record)
            if not hits:
                unmatched.append(record)
        return parts, bad

    pairs = op.map("split", up, split)
    named = {name: op.filter_map(f"to_{name}", pairs, _port(name))
             for name in route_names(ctx.config)}
    errs = op.filter_map("errs", pairs, lambda p: p[1] or None)
    return Outputs(errs=errs, named=named)
