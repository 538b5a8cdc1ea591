"""Transformation types whose configuration validates today and which cannot run yet."""

from __future__ import annotations

from typing import Literal

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


_NOTE = "planned (not available yet)"
planned("transformation", "ml", config=MlConfig, description="Apply a model.", note=_NOTE)
planned("transformation", "window_analytics", config=WindowAnalyticsConfig,
        description="Session analytics such as funnels.", note=_NOTE)
