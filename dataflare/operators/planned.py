"""Transformation types whose configuration validates today and which cannot run yet."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dataflare.config import Strict
from dataflare.registry import planned


class Validation(Strict):
    """Rules checked on one field."""

    field: str = Field(description="Field path.")
    rules: list[Literal["not_null", "not_empty", "is_email", "is_phone_number",
                        "standardize_format", "is_number", "is_date"]] = Field(
        description="Rules, checked in order."
    )


class DataQualityConfig(Strict):
    """Settings of a ``data_quality`` transformation."""

    validations: list[Validation] = Field(description="Checks per field.")


class Enrichment(Strict):
    """One enrichment step."""

    type: Literal["ml_scoring", "http_api", "lookup"] = Field(description="Enrichment kind.")
    model: str | None = Field(None, description="ml_scoring: model name.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Model inputs.")
    output_field: str | None = Field(None, description="Path of the result.")
    url: str | None = Field(None, description="http_api: endpoint.")
    method: str = Field("GET", description="http_api: method.")
    body_template: str | None = Field(None, description="http_api: body.")
    response_mapping: list[dict[str, str]] = Field(
        default_factory=list, description="http_api: response paths to record paths."
    )


class EnrichConfig(Strict):
    """Settings of an ``enrich`` transformation."""

    enrichments: list[Enrichment] = Field(description="Steps, applied in order.")


_NOTE = "planned (not available yet)"
planned("transformation", "data_quality", config=DataQualityConfig,
        description="Validate and standardize fields.", note=_NOTE)
planned("transformation", "enrich", config=EnrichConfig,
        description="Add data from models and services.", note=_NOTE)
