"""A workflow's ``monitoring``: its metrics under the names it gives, and live alerts.

Each component's ``monitoring.metrics`` exports DataFlare's measurements of that component
under the workflow's names (see :class:`~dataflare.dsl_compiler.models.MetricSpec`); its
``monitoring.alerts`` are evaluated every second on the same measurements. An alert fires
when its condition becomes true and resolves when it becomes false: each change is logged,
counted in the ``dataflare_alerts_firing`` gauge and delivered to the alert's ``notify``
channels (:mod:`dataflare.notify`, as post-action notifications), repeated every
``repeat_interval`` while it fires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from dataflare import metrics, notify
from dataflare.expr import compile_expression

log = logging.getLogger("dataflare.run.alerts")  # shown at info level, like the summary
FIRING = Gauge("dataflare_alerts_firing", "Alerts firing (1) or not (0).",
               ["step", "alert", "severity"])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Monitor:
    """The metrics and alerts of one workflow run."""

    def __init__(self, workflow: Any) -> None:
        self.components = {cid: comp for section in (workflow.sources,
                                                     workflow.transformations,
                                                     workflow.destinations)
                           for cid, comp in section.items() if comp.monitoring is not None}
        self.destinations = set(workflow.destinations)
        self.state: dict[tuple[str, str], tuple[bool, float]] = {}  # firing, last notified
        self.conditions = {(cid, a.name): compile_expression(a.condition)
                           for cid, comp in self.components.items()
                           for a in comp.monitoring.alerts}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.registered = False

    def measurements(self, step: str) -> dict[str, Any]:
        """What an alert condition of ``step`` sees."""
        records = metrics.value(metrics.RECORDS_OUT, step=step) + metrics.value(
            metrics.RECORDS_WRITTEN, step=step)
        errors = sum(metrics.value(metrics.ERRORS, step=step, strategy=s)
                     for s in ("skip", "fail", "redirect"))
        since = time.time() - metrics.last_record(step)
        out: dict[str, Any] = {"records": records, "errors": errors,
                               "error_rate": errors / records if records else 0.0,
                               "time_since_last_record": since}
        latencies = metrics.recent_write_seconds(step)
        for spec in self.components[step].monitoring.metrics:
            if spec.type == "counter":
                out[spec.name] = records
            elif spec.type == "gauge":
                out[spec.name] = since
            else:
                out[spec.name] = {"p50": _percentile(latencies, 0.5),
                                  "p95": _percentile(latencies, 0.95),
                                  "p99": _percentile(latencies, 0.99),
                                  "max": max(latencies, default=0.0),
                                  "count": len(latencies)}
        return out

    def collect(self) -> Iterator[Any]:
        """Prometheus collector: the workflow's metrics under its names."""
        families: dict[str, Any] = {}
        for step, comp in self.components.items():
            m = self.measurements(step)
            for spec in comp.monitoring.metrics:
                help_text = spec.description or f"{spec.type} of {step}"
                if spec.type == "counter":
                    fam = families.setdefault(spec.name, CounterMetricFamily(
                        spec.name, help_text, labels=["step"]))
                    fam.add_metric([step], m[spec.name])
                elif spec.type == "gauge":
                    fam = families.setdefault(spec.name, GaugeMetricFamily(
                        spec.name, help_text, labels=["step"]))
                    fam.add_metric([step], m[spec.name])
                else:
                    fam = families.setdefault(spec.name, SummaryMetricFamily(
                        spec.name, help_text, labels=["step"]))
                    count, total = metrics.write_seconds_totals(step)
                    fam.add_metric([step], count_value=count, sum_value=total)
        yield from families.values()

    def evaluate(self) -> list[dict[str, Any]]:
        """Check every alert once; the changes (fired, resolved, repeated)."""
        changes = []
        now = time.monotonic()
        for step, comp in self.components.items():
            if not comp.monitoring.alerts:
                continue
            m = self.measurements(step)
            for alert in comp.monitoring.alerts:
                key = (step, alert.name)
                try:
                    holds = bool(self.conditions[key](m))
                except Exception as exc:  # noqa: BLE001 - a bad comparison is not a crash
                    log.warning("alert %r of %r cannot be evaluated: %s", alert.name, step, exc)
                    continue
                firing, notified = self.state.get(key, (False, 0.0))
                event = None
                if holds and not firing:
                    event = "fired"
                elif holds and now - notified >= alert.repeat_interval:
                    event = "repeated"
                elif firing and not holds:
                    event = "resolved"
                if event is None:
                    continue
                self.state[key] = (holds, now if event != "resolved" else 0.0)
                FIRING.labels(step, alert.name, alert.severity).set(1 if holds else 0)
                change = {"alert": alert.name, "step": step, "severity": alert.severity,
                          "event": event, "condition": alert.condition}
                text = (f"alert {alert.name!r} ({alert.severity}) of step {step!r} {event}: "
                        f"{alert.condition}")
                (log.warning if holds else log.info)(text, extra={"component": step})
                for channel in alert.notify:
                    d = notify.send(channel, f"DataFlare alert {alert.name} {event}", text,
                                    change)
                    change.setdefault("deliveries", []).append(d.as_json())
                changes.append(change)
        return changes

    def start(self, interval: float = 1.0) -> None:
        """Export the metrics and evaluate the alerts until :meth:`close`."""
        if not self.components:
            return
        REGISTRY.register(self)
        self.registered = True
        if self.conditions:
            def loop() -> None:
                while not self.stop.wait(interval):
                    self.evaluate()

            self.thread = threading.Thread(target=loop, name="dataflare-alerts", daemon=True)
            self.thread.start()

    def close(self) -> None:
        """Stop evaluating and exporting."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.registered:
            REGISTRY.unregister(self)
            self.registered = False
