"""Base classes and shared blocks of every configuration model of the DSL.

Components import what they need from here (or from :mod:`dataflare.components`), never
from the compiler: retry policies and HTTP credentials are shared by many connectors.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
    model_validator,
)

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


_DURATION_SCHEMA = {"anyOf": [
    {"type": "number", "minimum": 0},
    {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*$"},
]}

Duration = Annotated[
    float,
    BeforeValidator(_duration),
    WithJsonSchema(_DURATION_SCHEMA),
    Field(description="A duration: '100ms', '30s', '5m', '2h', '7d' (stored as seconds)."),
]
"""A duration in seconds, written in the DSL as ``100ms``, ``30s``, ``5m``, ``2h``, ``7d``."""


def _paths(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Paths = Annotated[
    tuple[str, ...], BeforeValidator(_paths),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]
"""One dotted path or a list of them."""

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _header_names(value: Any) -> Any:
    if isinstance(value, dict):
        for name in value:
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                msg = (f"header name {name!r} is not a valid HTTP header name (letters, digits "
                       "and !#$%&'*+-.^_`|~; no spaces)")
                raise ValueError(msg)
    return value


Headers = Annotated[dict[str, str], AfterValidator(_header_names)]
"""HTTP request headers: values may be templates, names are fixed tokens (RFC 9110)."""

Secret = SecretStr
"""A secret value: masked as ``**********`` whenever a model is printed or dumped."""


def _libpq(value: SecretStr) -> SecretStr:
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # the component's missing extra is reported on its own
        return value
    text = value.get_secret_value()
    if "${" in text:
        return value  # an unset variable, said on its own; the run reads the value
    try:
        conninfo_to_dict(text)
    except Exception as exc:  # noqa: BLE001 - psycopg's ProgrammingError, said as it is
        hint = "" if "://" in text else " (a value holding spaces goes in single quotes: " \
            "password='...')"
        msg = f"libpq cannot read this connection string: {str(exc).strip()}{hint}"
        raise ValueError(msg) from None
    return value


LibpqDsn = Annotated[SecretStr, AfterValidator(_libpq)]
"""A libpq connection string or URL (a :data:`Secret`), refused at validate if libpq cannot
read it: its message quotes the string, so it is scrubbed as any secret is."""


class Backoff(Strict):
    """Exponential backoff between retries (each delay varies by +-20% as jitter)."""

    initial: Duration = Field(1.0, description="Delay before the first retry.")
    multiplier: float = Field(2.0, ge=1.0, description="Factor applied to the delay each retry.")
    max: Duration = Field(15.0, description="Upper bound of the delay.")


class Retry(Strict):
    """How transient failures (a broken connection, HTTP 5xx) are retried.

    The defaults ride out a restart of a database, broker or service of about a minute:
    attempts at about 0, 1, 3, 7, 15, 30, 45 and 60 seconds, then the failure stands.
    """

    max_attempts: int = Field(10, ge=1, description="Attempts in all, the first included.")
    max_elapsed: Duration | None = Field(
        60.0,
        description="Longest time from the first failure to the last attempt; no retry "
        "starts later (null: only max_attempts bounds the retries).",
    )
    backoff: Backoff = Field(default_factory=Backoff, description="Delay between attempts.")


class Auth(Strict):
    """Credentials for an HTTP service."""

    type: Literal["bearer", "basic", "api_key"] = Field(description="Authentication scheme.")
    token: Secret | None = Field(None, description="Bearer token.")
    username: str | None = Field(None, description="Basic auth user.")
    password: Secret | None = Field(None, description="Basic auth password.")
    key: Secret | None = Field(None, description="API key value.")
    header: str = Field("X-API-Key", description="Header carrying the API key.")
    query_param: str | None = Field(None, description="Send the API key as this query parameter.")

    @model_validator(mode="after")
    def _check(self) -> Auth:
        needs = {"bearer": ("token",), "basic": ("username",), "api_key": ("key",)}[self.type]
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:  # it was sent empty, and refused by the service after every retry
            msg = f"auth type {self.type!r} needs {', '.join(map(repr, missing))}"
            raise ValueError(msg)
        own = {"bearer": {"token"}, "basic": {"username", "password"},
               "api_key": {"key", "header", "query_param"}}[self.type]
        idle = sorted(self.model_fields_set - own - {"type"})
        if idle:
            msg = f"{', '.join(map(repr, idle))} has no effect with auth type {self.type!r}"
            raise ValueError(msg)
        return self
