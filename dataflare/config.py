"""Base classes for every configuration model of the DSL."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, WithJsonSchema

from dataflare.records import parse_duration


class Strict(BaseModel):
    """A strict, immutable config block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Open(BaseModel):
    """A block whose extra keys are passed through (an escape hatch, e.g. librdkafka settings)."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


def _duration(value: Any) -> Any:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return parse_duration(value)
    return value


DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)\s*$"},
    ],
}
"""JSON Schema of a duration as written in the DSL: seconds, or text such as '5m'."""

Duration = Annotated[
    float,
    BeforeValidator(_duration),
    WithJsonSchema(DURATION_SCHEMA),
    Field(description="A duration: '100ms', '30s', '5m', '2h', '7d' (stored as seconds)."),
]
"""A duration in seconds, written in the DSL as ``100ms``, ``30s``, ``5m``, ``2h``, ``7d``."""


def _paths(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Paths = Annotated[
    tuple[str, ...],
    BeforeValidator(_paths),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]
"""One dotted path or a list of them."""

Secret = SecretStr
"""A secret value: masked as ``**********`` whenever a model is printed or dumped."""
