"""Prometheus metrics of a run: records per step, errors, late and duplicate records."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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
ALREADY_WRITTEN = Counter(
    "dataflare_records_already_written",
    "Records a destination left out as written before a restart (a replay), per step.",
    ["step"],
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

WRITE_SECONDS = Histogram(
    "dataflare_write_seconds", "Seconds a destination took to write one batch.", ["step"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_RECORDS = Histogram(
    "dataflare_batch_records", "Records per batch a destination wrote.", ["step"],
    buckets=(1, 10, 100, 1000, 10_000, 100_000),
)
LAST_RECORD = Gauge(
    "dataflare_last_record_timestamp_seconds", "When the step last handled a record (epoch).",
    ["step"],
)
KAFKA_LAG = Gauge(
    "dataflare_kafka_consumer_lag", "Messages of a partition not read yet (high watermark - "
    "position).", ["step", "topic", "partition"],
)
RETRIES = Counter(
    "dataflare_retries", "Transient failures retried (a connection, HTTP 429/5xx), per step.",
    ["step"],
)
ERRORS_BY_TYPE = Counter(
    "dataflare_errors_by_type", "Records a step failed on, by error type.", ["step", "type"],
)
_STARTED = time.time()
_last: dict[str, float] = {}
_recent: dict[str, deque[tuple[float, float]]] = {}
_totals: dict[str, list[float]] = {}
RECENT = 300.0  # seconds of write latencies kept for alert percentiles


def touch(step: str, gauge: Any = None) -> None:
    """``step`` handled records now."""
    now = time.time()
    _last[step] = now
    (gauge or LAST_RECORD.labels(step)).set(now)


def last_record(step: str) -> float:
    """When ``step`` last handled a record (the process start when it never did)."""
    return _last.get(step, _STARTED)


def observe_write(step: str, seconds: float, records: int) -> None:
    """A destination wrote a batch of ``records`` in ``seconds``."""
    WRITE_SECONDS.labels(step).observe(seconds)
    BATCH_RECORDS.labels(step).observe(records)
    now = time.monotonic()
    recent = _recent.setdefault(step, deque())
    recent.append((now, seconds))
    while recent and recent[0][0] < now - RECENT:
        recent.popleft()
    total = _totals.setdefault(step, [0.0, 0.0])
    total[0] += 1
    total[1] += seconds


def recent_write_seconds(step: str) -> list[float]:
    """The write times of ``step`` over the last :data:`RECENT` seconds."""
    return [s for _, s in _recent.get(step, ())]


def write_seconds_totals(step: str) -> tuple[float, float]:
    """(writes, seconds) of ``step`` since the start."""
    count, total = _totals.get(step, (0.0, 0.0))
    return count, total

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
