"""Pydantic models of the workflow DSL (everything except the per-``type`` configs).

A component's ``config:`` is validated by the model its ``type`` registers
(:mod:`dataflare.registry`); after validation ``component.config`` holds that typed model.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from dataflare.config import Auth, Duration, Open, Paths, Retry, Secret, Strict
from dataflare.config import Backoff as Backoff  # re-exported: the models of the DSL
from dataflare.expr import check_expression
from dataflare.records import parse_duration

ID_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
WORKFLOW_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_workflow_id(wid: str) -> None:
    """Refuse an id no URL path segment or directory name holds as it is (ValueError)."""
    if not WORKFLOW_ID.fullmatch(wid):
        msg = (f"invalid workflow id {wid!r}: use letters, digits, '_', '-' and '.', "
               "starting with a letter, digit or '_', at most 128")
        raise ValueError(msg)



class WorkflowConfig(Strict):
    """Workflow-wide execution settings."""

    max_concurrency: int | None = Field(None, ge=1, description="Upper bound of workers.")
    state_shards: int | None = Field(
        None, ge=1, le=1024,
        description="Shards of each stateful step's state, spread over the workers; part of "
                    "the saved state. Unset: 24, even over 1, 2, 3, 4, 6, 8, 12 or 24 workers. "
                    "16 resumes state saved by DataFlare before 2026-12-04 (uneven over "
                    "2, 3 or 6 workers).")
    timeout: Duration | None = Field(None, description="A run longer than this is stopped.")
    retry: Retry = Field(default_factory=Retry, description="Retry policy of transient errors; "
                         "a failed run is attempted max_attempts times when set, else 3 times "
                         "(server, Kubernetes Job).")

    @property
    def run_attempts(self) -> int:
        """Attempts of a whole run that fails (the server's retries, a Job's backoffLimit).

        ``retry.max_attempts`` when the workflow sets it; else :data:`RUN_ATTEMPTS`: the
        default of ``retry`` rides out a minute's outage inside a run, and a run that still
        failed is started again less eagerly.
        """
        if "max_attempts" in self.retry.model_fields_set:
            return self.retry.max_attempts
        return RUN_ATTEMPTS


RUN_ATTEMPTS = 3


class Schedule(Strict):
    """When the workflow runs (read by schedulers such as the Kubernetes CronJob in k8s/)."""

    type: Literal["cron", "interval", "once", "event"] = Field(description="Kind of schedule.")
    expression: str | None = Field(
        None, description="Cron expression: 5 fields or a nickname such as '@daily' (type "
        "cron); or the period of an interval schedule ('15m').")
    interval: Duration | None = Field(None, description="Period (for type interval).")
    event: str | None = Field(None, description="Triggering event name (for type event).")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression.")
    start_date: datetime | None = Field(
        None, description="No run before this time; a once schedule's instant (a time without "
        "a zone is UTC).")
    end_date: datetime | None = Field(None, description="No run after this time (a time "
                                      "without a zone is UTC).")
    catchup: Literal["latest", "all", "none"] = Field(
        "latest", description="Instants missed while no scheduler ran: run the latest one, "
        "every one, or none (one passed less than a minute ago still runs).")

    @field_validator("start_date", "end_date")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if self.type == "cron":
            if not self.expression:
                msg = "a cron schedule needs 'expression'"
                raise ValueError(msg)
            from croniter import croniter

            fields = len(self.expression.split())
            if fields != 5 and not self.expression.startswith("@"):
                # croniter reads a 6th field as seconds, last; Quartz's come first: "0 0 1 *
                # * *" would fire every second of a minute. A Kubernetes CronJob has 5.
                msg = (f"cron expression {self.expression!r} has {fields} fields: it needs 5 "
                       "(minute hour day-of-month month day-of-week; no seconds)")
                raise ValueError(msg)
            if not croniter.is_valid(self.expression):
                msg = f"invalid cron expression {self.expression!r}"
                raise ValueError(msg)
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            msg = f"unknown time zone {self.timezone!r} (an IANA name such as 'Europe/Paris')"
            raise ValueError(msg) from None
        if self.type == "interval" and self.interval is None:
            if self.expression:  # the seed writes an interval's period in `expression`
                try:
                    period = parse_duration(self.expression)
                except ValueError:
                    msg = (f"an interval schedule's expression {self.expression!r} is not a "
                           "duration (e.g. '15m')")
                    raise ValueError(msg) from None
                object.__setattr__(self, "interval", period)
            else:
                msg = "an interval schedule needs 'interval' (or a duration in 'expression')"
                raise ValueError(msg)
        if self.type == "once" and self.start_date is None:
            msg = "a once schedule needs 'start_date' (when it runs)"
            raise ValueError(msg)
        if self.type == "interval" and self.interval is not None and self.interval <= 0:
            msg = f"an interval schedule's period must be positive, not {self.interval:g}s"
            raise ValueError(msg)
        return self


class PluginConfig(Open):
    """Plugin settings; keys beyond these are handed to the plugin as its configuration."""

    memory_limit: str | None = Field(None, description="Memory cap, e.g. '256MB'.")
    timeout: Duration | None = Field(
        None, gt=0, description="Time limit of one call (WASM: default 10s; a timed-out batch "
        "fails as a whole)."
    )

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+\s*(B|KB|MB|GB|KiB|MiB|GiB)", v):
            msg = f"invalid size {v!r} (expected e.g. '256MB')"
            raise ValueError(msg)
        return v


class Plugin(Strict):
    """A registered plugin: a WASM module, a native Python callable or a remote service."""

    type: Literal["wasm", "native", "remote"] = Field(description="Plugin kind.")
    path: str | None = Field(None, description="Module path (wasm) or 'module:function'.")
    url: str | None = Field(None, description="Endpoint (remote).")
    auth: Auth | None = Field(None, description="Credentials of a remote plugin.")
    timeout: Duration | None = Field(
        None, gt=0, description="Time limit of one call (a remote plugin's: of one request), else "
        "config.timeout, else 10s (wasm) or 30s (remote)."
    )
    config: PluginConfig = Field(default_factory=PluginConfig, description="Plugin settings.")

    @model_validator(mode="after")
    def _check(self) -> Plugin:
        if self.type in ("wasm", "native") and not self.path:
            msg = f"a {self.type} plugin needs 'path'"
            raise ValueError(msg)
        if self.type == "remote" and not self.url:
            msg = "a remote plugin needs 'url'"
            raise ValueError(msg)
        # settings another plugin type would ignore
        ignored = {"url": self.type != "remote", "auth": self.type != "remote",
                   "path": self.type == "remote"}
        if self.type == "native":
            ignored |= {"memory_limit": self.config.memory_limit is not None,
                        "config.timeout": self.config.timeout is not None,
                        "timeout": self.timeout is not None}
        given = [k for k, v in ignored.items()
                 if v and (k in self.model_fields_set or k in ("memory_limit", "config.timeout"))]
        if given:
            msg = f"{', '.join(map(repr, given))} has no effect on a {self.type} plugin"
            raise ValueError(msg)
        if self.timeout is not None and self.config.timeout is not None:
            msg = "give one of 'timeout' and 'config.timeout'"
            raise ValueError(msg)
        return self

    def call_timeout(self, default: float) -> float:
        """The time limit of one call: ``timeout``, else ``config.timeout``, else ``default``."""
        for given in (self.timeout, self.config.timeout):
            if given is not None:
                return given
        return default


class ErrorHandling(Strict):
    """What happens to a record a step cannot handle."""

    strategy: Literal["skip", "fail", "redirect"] = Field(
        "fail", description="Drop it, stop the run, or send it to `redirect_to`."
    )
    redirect_to: str | None = Field(None, description="Destination id of failed records.")
    max_errors: int | None = Field(
        None, ge=0, description="Past this many errors (per worker) the step fails."
    )

    @model_validator(mode="after")
    def _check(self) -> ErrorHandling:
        if self.strategy == "redirect" and not self.redirect_to:
            msg = "strategy 'redirect' needs 'redirect_to'"
            raise ValueError(msg)
        return self


class Incremental(Strict):
    """Incremental extraction: only rows past the last cursor value."""

    column: str | None = Field(None, description="Column compared with the cursor.")
    cursor_field: str | None = Field(None, description="Record field holding the cursor value.")
    cursor_type: Literal["timestamp", "integer", "string"] | None = Field(
        None, description="Type of the cursor value."
    )
    start_value: Any = Field(None, description="Cursor value of the first run.")
    interval: Duration = Field(10.0, description="Polling interval.")
    lookback: Duration = Field(
        0.0, description="Each poll also re-reads this far behind the last cursor value (rows "
        "already read are not emitted again): rows that commit late, with an earlier cursor "
        "value, are still read. Ties on the last value are always re-read.")


class Cdc(Strict):
    """Change data capture settings."""

    slot_name: str | None = Field(None, description="PostgreSQL replication slot.")
    publication_name: str | None = Field(None, description="PostgreSQL publication.")
    plugin: Literal["pgoutput"] = Field("pgoutput", description="Logical decoding plugin.")
    create_publication: bool = Field(True, description="Create the publication when absent.")
    include_tables: list[str] = Field(default_factory=list, description="schema.table names.")
    exclude_tables: list[str] = Field(default_factory=list, description="schema.table names.")
    snapshot_mode: Literal["initial", "never", "always"] = Field(
        "initial", description="Read the tables before streaming changes."
    )
    binlog_position: str = Field(
        "latest", description="MySQL: 'latest', 'earliest' or 'file:position'."
    )
    server_id: int | None = Field(None, description="MySQL replica server id.")
    poll_interval: Duration = Field(1.0, description="Delay between polls of the change log.")
    heartbeat_interval: Duration | None = Field(
        10.0,
        description="PostgreSQL: while nothing is pending for the publication, move the "
        "source's position to the server's flushed WAL this often, so the slot advances "
        "(at the next snapshot) and an idle slot does not keep the WAL others write "
        "(null: only emitted changes move it).",
    )


class Streaming(Strict):
    """Settings of an unbounded source."""

    checkpoint_interval: Duration | None = Field(None, description="Snapshot interval.")
    watermark_delay: Duration | None = Field(None, description="Event-time lateness bound.")
    idle_timeout: Duration | None = Field(
        None, description="Windows fire after this much system time without records; a "
        "record for a window that fired so is late from then on, whatever its step's "
        "allowed_lateness."
    )


class Hybrid(Strict):
    """A snapshot first, then ongoing changes."""

    initial_mode: Literal["full", "incremental"] = Field(
        "full", description="First phase: the tables read whole (with ongoing_mode "
        "incremental, from incremental.start_value: the same read as 'incremental')."
    )
    ongoing_mode: Literal["cdc", "incremental"] = Field("cdc", description="Second phase.")
    transition_after: Literal["completion", "timestamp", "never"] = Field(
        "completion", description="When to switch to the second phase."
    )
    transition_timestamp: datetime | None = Field(
        None, description="Switch time, for transition_after 'timestamp'."
    )

    @model_validator(mode="after")
    def _check(self) -> Hybrid:
        if self.initial_mode == "incremental" and self.ongoing_mode == "cdc":
            msg = ("initial_mode 'incremental' is not supported before cdc: the change stream "
                   "starts from a snapshot of the whole tables (initial_mode: full)")
            raise ValueError(msg)
        if self.transition_timestamp is not None and self.transition_after != "timestamp":
            msg = (f"transition_timestamp has no effect with transition_after "
                   f"{self.transition_after!r}: set transition_after: timestamp")
            raise ValueError(msg)
        return self


class OutputSchema(Strict):
    """The shape of a source's records; violations follow the source's error policy."""

    type: Literal["json_schema"] = Field("json_schema", description="Schema language.")
    definition: dict[str, Any] = Field(description="The JSON Schema.")


class MetricSpec(Strict):
    """A metric a component exports, under this name, with the label ``step``.

    A ``counter`` is the component's records (read by a source, emitted by a
    transformation, written by a destination); a ``histogram`` the seconds each write of a
    destination took (each batch a transformation or source handled: not measured); a
    ``gauge`` the seconds since the component's last record.
    """

    name: str = Field(description="Metric name (Prometheus conventions: snake_case).")
    type: Literal["counter", "gauge", "histogram"] = Field(description="Metric kind.")
    description: str = Field("", description="Help text.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", v):
            msg = f"metric name {v!r} must be letters, digits and '_'"
            raise ValueError(msg)
        return v


class Alert(Strict):
    """An alert rule, evaluated every second while the workflow runs.

    The condition sees the component's ``records``, ``errors``, ``error_rate`` (errors per
    record), ``time_since_last_record`` (seconds) and each of its metrics by name (a
    histogram as ``<name>.p50``, ``.p95``, ``.p99``, ``.max`` over the last 5 minutes).
    """

    name: str = Field(description="Alert name.")
    condition: str = Field(description="Expression over metrics, e.g. 'load_latency.p95 > 10s'.")
    severity: Literal["info", "warning", "critical"] = Field("warning", description="Severity.")
    notify: list[dict[str, Any]] = Field(
        default_factory=list, description="Notification channels, as a post-action "
        "notification's config: {channel: webhook | slack | email, ...}.")
    repeat_interval: Duration = Field(
        3600.0, description="While firing, notify again after this long.")

    _check = field_validator("condition")(classmethod(lambda cls, v: check_expression(v)))


class Monitoring(Strict):
    """Metrics and alerts of a component."""

    metrics: list[MetricSpec] = Field(default_factory=list, description="Exported metrics.")
    alerts: list[Alert] = Field(default_factory=list, description="Alert rules.")


class WriteMode(Strict):
    """How a destination combines new records with what it holds."""

    type: Literal["append", "overwrite", "merge"] = Field("append", description="Write mode.")
    merge_key: Paths | None = Field(
        None, description="Key path(s) of a merge (upsert): a record sets the fields it "
        "has, fields it lacks keep their stored values."
    )
    deduplicate: bool = Field(False, description="Keep the last record per key in a batch.")

    @model_validator(mode="after")
    def _check(self) -> WriteMode:
        if self.type == "merge" and not self.merge_key:
            msg = "write mode 'merge' needs 'merge_key'"
            raise ValueError(msg)
        if self.merge_key and "type" not in self.model_fields_set:
            msg = ("'merge_key' without 'type' would append: set type: merge to upsert on the "
                   "key (or type: append with deduplicate to drop repeats within a batch)")
            raise ValueError(msg)
        return self


class BatchSettings(Strict):
    """Batching of a destination's writes."""

    size: int = Field(10_000, ge=1, description="Records per write.")
    flush_interval: Duration = Field(1.0, description="Longest a record waits to be written.")


class Component(Strict):
    """Fields every component has."""

    type: str = Field(description="Registered component type.")
    description: str = Field("", description="What the component does.")
    config: Any = Field(default_factory=dict, description="Type-specific settings.")
    error_handling: ErrorHandling = Field(
        default_factory=ErrorHandling, description="Policy for records the step cannot handle."
    )
    monitoring: Monitoring | None = Field(None, description="Metrics and alerts.")


class Source(Component):
    """A source of records."""

    mode: Literal["full", "incremental", "cdc", "streaming", "hybrid"] | None = Field(
        None, description="Extraction mode; the connector's default when absent."
    )
    incremental: Incremental | None = Field(None, description="Incremental settings.")
    cdc: Cdc | None = Field(None, description="Change data capture settings.")
    streaming: Streaming | None = Field(None, description="Streaming settings.")
    hybrid: Hybrid | None = Field(None, description="Hybrid settings.")
    output_schema: OutputSchema | None = Field(None, description="Schema checked on records.")
    time_unit: Literal["s", "ms"] | None = Field(
        None,
        description="Unit of numeric event times in this source's records (epoch seconds or "
        "milliseconds), for the windows, joins and dedupes downstream that do not set theirs.",
    )

    def runs_as(self) -> str:
        """Its mode: as written, else incremental with incremental settings, else its default.

        The default is streaming for Kafka, full for the other connectors.
        """
        if self.mode is not None:
            return self.mode
        if self.incremental is not None or getattr(self.config, "incremental_column", None):
            return "incremental"
        return "streaming" if self.type == "kafka" else "full"

    def ends(self) -> bool:
        """Whether its input ends by itself: a full read, or any mode with ``stop_at_end``."""
        stop = getattr(self.config, "stop_at_end", None)
        if self.runs_as() == "full":
            return not (self.type == "kafka" and stop is False)  # Kafka can tail in any mode
        return stop is True


class Transformation(Component):
    """A transformation of one or more input streams."""

    inputs: list[str] = Field(description="Ids of the components feeding this one.")
    plugin: str | None = Field(None, description="Plugin id (types custom, plugin).")
    serve: bool = Field(
        False, description="Stateful steps (aggregation, window, join, dedupe): while the run "
        "is up, its current state is readable at `GET /views/<id>` on the run's "
        "`--http-port` (query `key`, `where`, `limit`), as of the end of the last epoch, "
        "masked by `data_protection.masking_rules`.")


class Destination(Component):
    """A destination of records."""

    inputs: list[str] = Field(default_factory=list, description="Ids feeding this destination.")
    write_mode: WriteMode = Field(default_factory=WriteMode, description="Write mode.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Write batching.")
    filter: str | None = Field(None, description="Only records where this expression holds.")

    _check = field_validator("filter")(classmethod(lambda cls, v: check_expression(v)))


class PostAction(Strict):
    """An action after the run: a notification, or triggering another workflow."""

    type: Literal["notification", "trigger", "webhook"] = Field(description="Action kind.")
    condition: str | None = Field(None, description="Expression over `workflow.status`.")
    config: dict[str, Any] = Field(default_factory=dict, description="Action settings.")

    _check = field_validator("condition")(classmethod(lambda cls, v: check_expression(v)))


class Role(Strict):
    """A role of the access-control model."""

    permissions: list[str] = Field(description="'resource:action' grants; '*' is a wildcard.")

    @field_validator("permissions")
    @classmethod
    def _perm(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[a-z_*]+:[a-z_*]+", p):
                msg = f"permission {p!r} is not 'resource:action'"
                raise ValueError(msg)
        return v


class Encryption(Strict):
    """Encryption requirements."""

    in_transit: bool = Field(False, description="Require TLS to services.")
    at_rest: bool = Field(False, description="Require encrypted storage.")
    key_management: str | None = Field(None, description="Key service, e.g. 'aws_kms'.")
    fields: list[str] = Field(
        default_factory=list,
        description="With at_rest: fields encrypted (AES-GCM) before every destination.",
    )
    key: Secret | None = Field(
        None, description="With at_rest: AES key, base64 of 32 bytes ('${file:/run/secrets/k}')."
    )


class MaskingRule(Strict):
    """Masking applied to a field before any destination writes it."""

    field: str = Field(description="Dotted path of the field.")
    method: Literal["partial", "full", "hash"] = Field(
        description="partial: the first show_chars characters and the replacement; full: the "
        "replacement; hash: the HMAC-SHA256 (hex) under data_protection.hash_key.")
    show_chars: int = Field(0, ge=0, description="Leading characters kept by 'partial'.")
    replacement: str = Field("****", description="Replacement text.")


class DataProtection(Strict):
    """Data protection settings."""

    encryption: Encryption | None = Field(None, description="Encryption requirements.")
    masking_rules: list[MaskingRule] = Field(default_factory=list, description="Field masking.")
    hash_key: Secret | None = Field(
        None, description="Key of masking method 'hash' (HMAC-SHA256), e.g. '${MASK_KEY}'."
    )

    @model_validator(mode="after")
    def _hash_needs_key(self) -> DataProtection:
        if self.hash_key is None and any(r.method == "hash" for r in self.masking_rules):
            msg = ("masking method 'hash' needs data_protection.hash_key: a bare sha-256 of "
                   "a known value is reversed by a dictionary")
            raise ValueError(msg)
        return self


class TestCase(Strict):
    """A workflow test: records in place of sources, expected records per destination."""

    name: str = Field(description="Test name.")
    inputs: dict[str, list[Any]] = Field(default_factory=dict, description="Records per source.")
    expect: dict[str, list[Any]] = Field(
        default_factory=dict, description="Expected records per destination (a multiset)."
    )


class Workflow(Strict):
    """A workflow: sources, transformations and destinations forming a DAG."""

    id: str | None = Field(None, description="Unique workflow id: letters, digits, '_', "
                           "'-' and '.', at most 128 (it names files, URLs and run records).")
    name: str | None = Field(None, max_length=400, description="Workflow name.")
    description: str = Field("", description="What the workflow does.")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is not None:
            check_workflow_id(value)
        return value
    version: str | None = Field(None, description="Workflow version.")
    owner: str | None = Field(None, description="Owning team or person.")
    tags: list[str] = Field(default_factory=list, description="Labels.")
    config: WorkflowConfig = Field(default_factory=WorkflowConfig, description="Run settings.")
    schedule: Schedule | None = Field(None, description="When the workflow runs.")
    environment: dict[str, str] = Field(
        default_factory=dict, description="Variables for ${VAR} interpolation."
    )
    plugins: dict[str, Plugin] = Field(default_factory=dict, description="Plugins by id.")
    sources: dict[str, Source] = Field(default_factory=dict, description="Sources by id.")
    transformations: dict[str, Transformation] = Field(
        default_factory=dict, description="Transformations by id."
    )
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="Destinations by id."
    )
    post_actions: list[PostAction] = Field(default_factory=list, description="After-run actions.")
    roles: dict[str, Role] = Field(default_factory=dict, description="Access-control roles.")
    data_protection: DataProtection | None = Field(None, description="Masking and encryption.")
    tests: list[TestCase] = Field(default_factory=list, description="Workflow tests.")

    def upstream_sources(self, inputs: list[str]) -> list[str]:
        """Ids of the sources feeding ``inputs``, directly or through transformations."""
        found: list[str] = []
        seen: set[str] = set()
        todo = list(inputs)
        while todo:
            ref = todo.pop().split(".", 1)[0]
            if ref in seen:
                continue
            seen.add(ref)
            if ref in self.sources:
                found.append(ref)
            elif ref in self.transformations:
                todo.extend(self.transformations[ref].inputs)
        return found


class WorkflowFile(Strict):
    """A workflow file: the ``workflow:`` block and optional ``tests:``."""

    workflow: Workflow = Field(description="The workflow.")
    tests: list[TestCase] = Field(default_factory=list, description="Workflow tests.")
