"""Base classes for every configuration model of the DSL."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

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


Duration = Annotated[
    float,
    BeforeValidator(_duration),
    Field(description="A duration: '100ms', '30s', '5m', '2h', '7d' (stored as seconds)."),
]
"""A duration in seconds, written in the DSL as ``100ms``, ``30s``, ``5m``, ``2h``, ``7d``."""


def _paths(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Paths = Annotated[tuple[str, ...], BeforeValidator(_paths)]
"""One dotted path or a list of them."""

Secret = SecretStr
"""A secret value: masked as ``**********`` whenever a model is printed or dumped."""
