"""Connector types whose configuration validates today and which cannot run yet."""

from __future__ import annotations

from pydantic import Field

from dataflare.config import Secret, Strict
from dataflare.registry import planned


class SnowflakeConfig(Strict):
    """Settings of a ``snowflake`` destination."""

    account: str | None = Field(None, description="Account identifier.")
    warehouse: str | None = Field(None, description="Virtual warehouse.")
    database: str | None = Field(None, description="Database.")
    schema_: str | None = Field(None, alias="schema", description="Schema.")
    table: str = Field(description="Table.")
    role: str | None = Field(None, description="Role.")
    username: str | None = Field(None, description="User.")
    password: Secret | None = Field(None, description="Password.")


planned("destination", "snowflake", config=SnowflakeConfig,
        description="Snowflake warehouse tables.", note="planned (not available yet)")
