"""Connector types whose configuration validates today and which cannot run yet."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dataflare.config import Strict
from dataflare.registry import planned


class S3Config(Strict):
    """Settings of an ``s3`` destination."""

    bucket: str = Field(description="Bucket name.")
    path_template: str = Field(description="Object key template, e.g. 'year={{year}}/x.parquet'.")
    format: Literal["parquet", "jsonl", "csv"] = Field("parquet", description="Object format.")
    partition_by: list[str] = Field(default_factory=list, description="Partition fields.")
    region: str | None = Field(None, description="Region.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint.")


planned("destination", "s3", config=S3Config,
        description="Objects in S3-compatible storage.", note="planned (not available yet)")
