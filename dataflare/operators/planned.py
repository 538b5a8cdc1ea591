"""Transformation types whose configuration validates today and which cannot run yet."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dataflare.config import Duration, Strict
from dataflare.registry import planned


class MlConfig(Strict):
    """Settings of an ``ml`` transformation."""

    algorithm: Literal["kmeans", "isolation_forest", "linear_regression"] = Field(
        description="Model family."
    )
    features: list[str] = Field(description="Input field paths.")
    clusters: int | None = Field(None, ge=1, description="kmeans: number of clusters.")
    output_field: str = Field(description="Path written with the model's output.")


class Calculation(Strict):
    """An analytic computed per session."""

    type: Literal["funnel_analysis", "count", "duration"] = Field(description="Calculation.")
    steps: list[str] = Field(default_factory=list, description="Funnel steps, in order.")
    as_: str | None = Field(None, alias="as", description="Output field.")


class WindowAnalyticsConfig(Strict):
    """Settings of a ``window_analytics`` transformation."""

    group_by: list[str] = Field(default_factory=list, description="Key paths.")
    window: Literal["session", "tumbling", "sliding"] = Field(description="Window kind.")
    session_gap: Duration | None = Field(None, description="Session gap.")
    calculations: list[Calculation] = Field(default_factory=list, description="Analytics.")


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
planned("transformation", "ml", config=MlConfig, description="Apply a model.", note=_NOTE)
planned("transformation", "window_analytics", config=WindowAnalyticsConfig,
        description="Session analytics such as funnels.", note=_NOTE)
planned("transformation", "enrich", config=EnrichConfig,
        description="Add data from models and services.", note=_NOTE)
