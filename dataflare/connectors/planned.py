"""Connector types whose configuration validates today and which cannot run yet."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dataflare.config import Secret, Strict
from dataflare.lineage import Dataset, table_dataset
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


class S3Config(Strict):
    """Settings of an ``s3`` destination."""

    bucket: str = Field(description="Bucket name.")
    path_template: str = Field(description="Object key template, e.g. 'year={{year}}/x.parquet'.")
    format: Literal["parquet", "jsonl", "csv"] = Field("parquet", description="Object format.")
    partition_by: list[str] = Field(default_factory=list, description="Partition fields.")
    region: str | None = Field(None, description="Region.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint.")


def _snowflake(cfg: SnowflakeConfig, base: Any) -> list[Dataset]:
    return [Dataset(f"snowflake://{cfg.account or 'account'}", d.name)
            for d in table_dataset("snowflake", cfg)]


planned("destination", "snowflake", config=SnowflakeConfig,
        description="Snowflake warehouse tables.", note="planned (not available yet)",
        datasets=_snowflake)
planned("destination", "s3", config=S3Config,
        description="Objects in S3-compatible storage.", note="planned (not available yet)",
        datasets=lambda cfg, base: [Dataset(f"s3://{cfg.bucket}", cfg.path_template)])
