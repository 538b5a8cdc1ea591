"""Prometheus metrics of a run: records per step, errors, late and duplicate records."""

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

LATE_RECORDS = Counter(
    "dataflare_late_records", "Records older than the watermark, per step.", ["step"]
)
DUPLICATES_DROPPED = Counter(
    "dataflare_duplicates_dropped", "Records dropped as repeats by dedupe, per step.", ["step"]
)

QUALITY_CHECKS = Counter(
    "dataflare_quality_checks",
    "Rule checks of data_quality steps, by field, rule and result (passed or failed).",
    ["step", "field", "rule", "result"],
)

ENRICH_CALLS = Counter(
    "dataflare_enrich_calls",
    "Enrichment lookups of enrich steps, by kind and result (ok, cached, failed).",
    ["step", "kind", "result"],
)


def value(counter: Counter, **labels: str) -> float:
    """Current value of one labelled counter (0 when never incremented)."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return float(sample.value)
    return 0.0


def quality_table(step: str) -> list[tuple[str, str, int, int]]:
    """``(field, rule, checked, failed)`` of one data_quality step, in first-seen order."""
    rows: dict[tuple[str, str], list[int]] = {}
    for metric in QUALITY_CHECKS.collect():
        for sample in metric.samples:
            labels = sample.labels
            if not sample.name.endswith("_total") or labels.get("step") != step:
                continue
            row = rows.setdefault((labels["field"], labels["rule"]), [0, 0])
            row[0] += int(sample.value)
            if labels["result"] == "failed":
                row[1] += int(sample.value)
    return [(f, r, checked, failed) for (f, r), (checked, failed) in rows.items()]
