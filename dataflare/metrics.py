"""Prometheus metrics of a run: records out per step, records written, errors."""

from __future__ import annotations

from prometheus_client import Counter

RECORDS_OUT = Counter(
    "dataflare_records_out", "Records a step emitted.", ["step"]
)
RECORDS_WRITTEN = Counter(
    "dataflare_records_written", "Records a destination received for writing.", ["step"]
)
ERRORS = Counter(
    "dataflare_errors", "Records a step failed on, by error strategy.", ["step", "strategy"]
)


def value(counter: Counter, **labels: str) -> float:
    """Current value of one labelled counter (0 when never incremented)."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return float(sample.value)
    return 0.0
