"""Kafka source and destination (librdkafka through ``confluent_kafka``).

Source
    One bytewax partition per topic-partition (``FixedPartitionedSource``), spread over
    the workers. The next offset to read is the partition state, so a run with recovery
    resumes exactly after the last snapshot. Without state a partition starts at the
    consumer group's committed offset (when ``consumer_group`` is set) or at
    ``auto_offset_reset``. Messages are read with ``consume(num_messages, timeout=0)``
    and decoded per ``format``; an undecodable message becomes a
    :class:`~dataflare.records.Failed` carrying the original value and its position.

Destination
    JSON values (``_meta`` removed), an optional ``key_template`` and header templates,
    through an idempotent producer. Each epoch ends with a flush, so every record of a
    snapshotted epoch is acknowledged by the broker (at-least-once). With
    ``exactly_once: true`` each writer wraps an epoch in a Kafka transaction committed
    at the snapshot: ``read_committed`` consumers never see records of an epoch that a
    crash interrupted (the transaction is aborted when the writer closes or restarts).
    The one window left is a crash after the commit but before bytewax persisted that
    epoch's snapshot; the epoch is then replayed and written again. The guarantee is
    therefore **at-least-once**, with transactions making duplicates rare (one epoch,
    one narrow window) and fencing a zombie writer. Caveat: Tansu 0.6 (the test broker)
    does not report aborted transactions in fetch answers, so there even
    ``read_committed`` consumers see aborted epochs; Apache Kafka and Redpanda hide them.

Dead letters
    A record redirected by an error policy (``{"error": ..., "record": original}``) is
    written with its original bytes as the value and the error and source position in
    ``dataflare.*`` headers.
"""

from __future__ import annotations

import base64
import itertools
import logging
import threading
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from bytewax.dataflow import Stream, operator
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from pydantic import AfterValidator, Field, model_validator

from dataflare import metrics
from dataflare.config import Duration, Retry, Strict
from dataflare.connectors.schema import (
    JSON_NUMBERS,
    DecimalHandling,
    batch_loader,
    json_error,
    json_loader,
)
from dataflare.lineage import topic_datasets
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import DEAD_LETTER, META, Failed, describe_position, getter
from dataflare.registry import BuildContext, destination, source
from dataflare.retry import TransientError, call_with_retry
from dataflare.template import compile_template, placeholders

log = logging.getLogger(__name__)

PropertyValue = str | int | float | bool


def _not_servers(properties: dict[str, PropertyValue]) -> dict[str, PropertyValue]:
    """``properties`` without the brokers: they overrode ``bootstrap_servers`` silently."""
    for name in ("bootstrap.servers", "metadata.broker.list"):
        if name in properties:
            msg = f"{name!r} in properties: give the brokers as bootstrap_servers"
            raise ValueError(msg)
    return properties


Properties = Annotated[dict[str, PropertyValue], AfterValidator(_not_servers)]
"""librdkafka settings passed through, but for the brokers (``bootstrap_servers``)."""


class KafkaSourceConfig(Strict):
    """Read records from Kafka topics."""

    bootstrap_servers: str = Field(
        "localhost:9092", description="Comma-separated 'host:port' list of brokers."
    )
    topic: str | None = Field(None, description="Topic to read (or use `topics`).")
    topics: list[str] = Field(default_factory=list, description="Topics to read.")
    consumer_group: str | None = Field(
        None,
        description="Consumer group: its committed offsets are the starting point when "
        "there is no recovery state, and progress is committed to it at each snapshot, one "
        "snapshot behind (what the previous snapshot read is written by then), and at the "
        "end of a `dataflare run` that succeeded.",
    )
    offset_out_of_range: Literal["fail", "earliest", "latest"] = Field(
        "fail", description="What to do when a saved offset (recovery state or the group's) "
        "is no longer in the partition (the topic was recreated or truncated): stop with a "
        "message, or go on from the partition's first or last offset (said in a warning).")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a partition without state or committed offset starts."
    )
    format: Literal["json", "string", "bytes"] = Field(
        "json",
        description="Message value encoding: a JSON object per message, UTF-8 text "
        "(record {'value': text}) or raw bytes (record {'value': bytes}; JSON lines and CSV "
        "files write bytes as '\\x' and hex digits).",
    )
    decimal_handling: DecimalHandling = Field("number", description=JSON_NUMBERS)
    stop_at_end: bool | None = Field(
        None,
        description="Stop at the end offsets seen at start. Default: false for "
        "`mode: streaming` (tail the topic), true for `mode: full`.",
    )
    batch_size: int = Field(10_000, ge=1, description="Most messages read per poll.")
    idle_interval: Duration = Field(
        0.05, description="Wait before polling again when a poll returned nothing."
    )
    properties: Properties = Field(
        default_factory=dict,
        repr=False,  # may carry sasl.password and other credentials
        description="librdkafka consumer settings passed through as they are "
        "(security.protocol, sasl.*, ssl.*, fetch sizes...).",
    )

    @model_validator(mode="after")
    def _check(self) -> KafkaSourceConfig:
        if not self.topic and not self.topics:
            msg = "a kafka source needs 'topic' or 'topics'"
            raise ValueError(msg)
        if self.topic and self.topic in self.topics:
            msg = f"topic {self.topic!r} is listed in both 'topic' and 'topics'"
            raise ValueError(msg)
        if "decimal_handling" in self.model_fields_set and self.format != "json":
            msg = f"decimal_handling reads JSON numbers: format {self.format!r} has none"
            raise ValueError(msg)
        return self

    def topic_names(self) -> list[str]:
        """Every topic this source reads."""
        return ([self.topic] if self.topic else []) + list(self.topics)


class KafkaDestinationConfig(Strict):
    """Write records to a Kafka topic as JSON."""

    bootstrap_servers: str = Field(
        "localhost:9092", description="Comma-separated 'host:port' list of brokers."
    )
    topic: str = Field(min_length=1, description="Topic to write.")
    key_template: str | None = Field(
        None, description="Message key, e.g. '{{customer.id}}'; no key when absent."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Message headers; values may hold {{path}} templates."
    )
    exactly_once: bool = Field(
        False,
        description="Write each epoch in a Kafka transaction committed at the snapshot "
        "(read_committed consumers never see an interrupted epoch).",
    )
    transactional_id: str | None = Field(
        None,
        description="Prefix of the writers' transactional ids "
        "(default: 'dataflare-<destination id>'); must be stable across restarts.",
    )
    writers: int = Field(
        1, ge=1, description="Parallel producers; keep it fixed across restarts of a run."
    )
    flush_timeout: Duration = Field(
        60.0, gt=0, description="Longest wait for the broker to acknowledge an epoch's records."
    )
    properties: Properties = Field(
        default_factory=dict,
        repr=False,  # may carry sasl.password and other credentials
        description="librdkafka producer settings passed through as they are "
        "(compression.type, linger.ms, security.protocol, sasl.*, ssl.*...).",
    )


# ---------------------------------------------------------------------------- source


def _client_config(servers: str, properties: dict[str, PropertyValue]) -> dict[str, Any]:
    return {"bootstrap.servers": servers, **properties}


def _client(kind: Callable[[dict[str, Any]], Any], step: str, settings: dict[str, Any]) -> Any:
    """A librdkafka Consumer or Producer; a property it refuses names the step."""
    from confluent_kafka import KafkaException

    try:
        return kind(settings)
    except KafkaException as exc:  # "No such configuration property", a bad value
        err = exc.args[0] if exc.args else exc
        said = err.str() if hasattr(err, "str") else str(err)
        msg = f"step {step!r}: kafka properties: {said}"
        raise ValueError(msg) from None


def _decode_key(key: bytes | None) -> Any:
    if key is None:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return key


def _headers(raw: list[tuple[str, bytes | None]] | None) -> dict[str, Any]:
    if not raw:
        return {}
    out: dict[str, Any] = {}
    for name, value in raw:
        out[name] = _decode_key(value)
    return out


def _raw_text(value: bytes) -> str | bytes:
    """The original value as text when it is UTF-8, else the bytes themselves."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


class _KafkaPartition(StatefulSourcePartition[list[Any], int]):
    """One topic-partition: its state is the next offset to read."""

    def __init__(
        self,
        step_id: str,
        topic: str,
        partition: int,
        cfg: KafkaSourceConfig,
        stop_at_end: bool,
        resume_offset: int | None,
    ) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.step_id = step_id
        self.topic = topic
        self.partition = partition
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.idle = timedelta(seconds=cfg.idle_interval)
        self._awake: datetime | None = None
        settings = _client_config(cfg.bootstrap_servers, cfg.properties)
        settings.setdefault("group.id", cfg.consumer_group or f"dataflare-{step_id}")
        settings["enable.auto.commit"] = False
        settings["enable.auto.offset.store"] = False
        # End-of-partition events end a bounded read, and show a resumed position that lies
        # beyond the partition's end (a recreated topic).
        settings["enable.partition.eof"] = True
        # A fetch at an offset the partition no longer has is reported, never skipped.
        settings["auto.offset.reset"] = "error"
        # One consumer per partition: librdkafka's default prefetch (100,000 messages or
        # 64 MB per consumer) would hold that much for every partition a process reads.
        settings.setdefault("queued.min.messages", max(2 * cfg.batch_size, 10_000))
        settings.setdefault("queued.max.messages.kbytes", 16_384)
        self.consumer = _client(Consumer, step_id, settings)
        tp = TopicPartition(topic, partition)
        low, high = self.consumer.get_watermark_offsets(tp, timeout=30.0, cached=False)
        if resume_offset is None:
            resume_offset = self._committed(tp)
            if resume_offset is None:
                resume_offset = low if cfg.auto_offset_reset == "earliest" else high
            else:
                resume_offset = self._in_range(resume_offset, low, None)
        else:
            resume_offset = self._in_range(resume_offset, low, None)
        self.offset = self._started = max(resume_offset, low)
        # With stop_at_end, the end is the high watermark of the first fetch answer (some
        # brokers, e.g. Tansu, answer ListOffsets with the start of the last batch, so the
        # ListOffsets value is only a lower bound).
        self.stop_at_end = stop_at_end
        self._end_hint = high
        self.end: int | None = None
        self._tp = tp
        self._to_commit: int | None = None
        self._lag = metrics.KAFKA_LAG.labels(step_id, topic, str(partition))
        if self.offset > high:  # ListOffsets may answer low (Tansu): ask a fetch
            self.offset = self._check_beyond(self.offset, low)
        self.consumer.assign([TopicPartition(topic, partition, self.offset)])
        self._loads: Callable[[bytes], Any] | None = None
        if cfg.format == "json":
            self._loads = json_loader(cfg.decimal_handling)
        self._decode = self._decoder()

    def _in_range(self, offset: int, low: int, high: int | None) -> int:
        """``offset``, or where ``offset_out_of_range`` says to go on when it is gone."""
        if offset >= low and (high is None or offset <= high):
            return offset
        return self._out_of_range(offset, low, high)

    def _out_of_range(self, offset: int, low: int, high: int | None) -> int:
        """Where to go on from a saved ``offset`` the partition does not have."""
        where = f"{self.topic}[{self.partition}]"
        span = f"{low}..{high}" if high is not None else f"from {low}"
        policy = self.cfg.offset_out_of_range
        if policy == "fail":
            msg = (f"step {self.step_id!r}: the saved offset {offset} of {where} is not in the "
                   f"partition (offsets {span}): was the topic recreated or truncated? Set "
                   "offset_out_of_range: earliest or latest to go on from there")
            raise RuntimeError(msg)
        if high is None:
            _, high = self.consumer.get_watermark_offsets(self._tp_of(), timeout=30.0,
                                                          cached=False)
        target = low if policy == "earliest" else high
        log.warning("step %r: the saved offset %d of %s is not in the partition (offsets "
                    "%s): going on from the %s offset %d", self.step_id, offset, where, span,
                    policy, target)
        return int(target)

    def _check_beyond(self, offset: int, low: int) -> int:
        """A saved ``offset`` past the listed end: a fetch there says whether it exists.

        The high watermark of a fetch answer is exact where ListOffsets may answer low.
        """
        from confluent_kafka import KafkaError

        self.consumer.assign([self._tp_of_offset(offset)])
        tp = self._tp_of()
        try:
            for _ in range(300):  # up to ~30 s for the first fetch answer
                for msg in self.consumer.consume(1, 0.1):
                    err = msg.error()
                    if err is None:
                        return offset  # a record at the saved offset: it is in the partition
                    if err.code() in (KafkaError._AUTO_OFFSET_RESET,
                                      KafkaError.OFFSET_OUT_OF_RANGE):
                        return self._out_of_range(offset, low, None)
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0:
                    return offset if offset <= high else self._out_of_range(offset, low, high)
            return offset
        finally:
            self.consumer.unassign()

    def _tp_of(self) -> Any:
        from confluent_kafka import TopicPartition

        return TopicPartition(self.topic, self.partition)

    def _tp_of_offset(self, offset: int) -> Any:
        from confluent_kafka import TopicPartition

        return TopicPartition(self.topic, self.partition, offset)

    def _committed(self, tp: Any) -> int | None:
        if not self.cfg.consumer_group:
            return None
        (committed,) = self.consumer.committed([tp], timeout=30.0)
        return committed.offset if committed.offset >= 0 else None

    def _decoder(self) -> Callable[[bytes], Any]:
        fmt = self.cfg.format
        if fmt == "bytes":
            return lambda value: {"value": value}
        if fmt == "string":
            return lambda value: {"value": value.decode()}

        loads = self._loads or json_loader(self.cfg.decimal_handling)

        def decode_json(value: bytes) -> Any:
            rec = loads(value)
            if not isinstance(rec, dict):
                kind = {type(None): "null", list: "array", str: "string", bool: "boolean"}.get(
                    type(rec), "number")
                msg = f"value is a JSON {kind}, expected an object"
                raise ValueError(msg)
            return rec

        return decode_json

    def _position(self, msg: Any) -> dict[str, Any]:
        ts_type, ts = msg.timestamp()
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": msg.offset(),
            "key": _decode_key(msg.key()),
            "headers": _headers(msg.headers()),
            "timestamp": ts if ts_type else None,
        }

    def next_batch(self) -> list[list[Any]]:
        from confluent_kafka import KafkaError, KafkaException

        if self.end is not None and self.offset >= self.end:
            raise StopIteration
        msgs = self.consumer.consume(self.batch_size, 0)
        if self.stop_at_end and self.end is None:
            _low, high = self.consumer.get_watermark_offsets(self._tp, cached=True)
            if high >= 0:
                self.end = max(high, self._end_hint)
        if not msgs:
            self._awake = datetime.now(UTC) + self.idle
            return []
        self._awake = None
        out: list[Any] = []
        append = out.append
        decode = self._decode
        loads = self._loads
        if loads is not None:
            loads = batch_loader(loads, [v for m in msgs if (v := m.value()) is not None])
        step, topic, part = self.step_id, self.topic, self.partition
        last = self.offset - 1
        end = self.end
        for msg in msgs:
            err = msg.error()
            if err is not None:
                code = err.code()
                gone = code in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE)
                if gone or (code == KafkaError._PARTITION_EOF and msg.offset() < self.offset
                            and last < self.offset):
                    # The partition ends before (or starts after) the saved position.
                    low, high = self.consumer.get_watermark_offsets(self._tp, timeout=30.0,
                                                                    cached=False)
                    if not gone:
                        high = msg.offset()
                    target = self._out_of_range(self.offset, low, high)
                    self.consumer.assign([self._tp_of_offset(target)])
                    self.offset = target
                    self.end = None
                    return [out] if out else []
                if code == KafkaError._PARTITION_EOF and not self.stop_at_end:
                    continue
                if code == KafkaError._PARTITION_EOF:
                    # The end of the readable log: past any trailing transaction markers.
                    eof = msg.offset()
                    if self.stop_at_end and self.end is None:
                        self.end = end = max(eof, self._end_hint)
                    last = max(last, (eof if end is None else min(eof, end)) - 1)
                    continue
                if err.fatal() or code in (
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    KafkaError._UNKNOWN_TOPIC,
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                    KafkaError.GROUP_AUTHORIZATION_FAILED,
                    KafkaError._AUTHENTICATION,
                    KafkaError.SASL_AUTHENTICATION_FAILED,
                ):
                    text = f"step {step!r}: kafka {topic}[{part}]: {err.str()}"
                    raise KafkaException(text)
                log.warning("step %r: kafka %s[%d]: %s (retrying)", step, topic, part, err.str())
                continue
            offset = msg.offset()
            if end is not None and offset >= end:
                break  # past the end seen at start: left for a later run
            last = offset
            value = msg.value()
            if value is None:
                meta = self._position(msg)
                append(
                    Failed(step, "Tombstone", "message has no value (tombstone)", None, meta)
                )
                continue
            try:
                if loads is not None:  # json, inlined: one call less per message
                    rec = loads(value)
                    if type(rec) is not dict:
                        rec = decode(value)  # raises the explanatory error
                else:
                    rec = decode(value)
            except ValueError as exc:
                meta = self._position(msg)
                message = (f"{type(exc).__name__}: {json_error(exc, 'the message')} at "
                           f"{describe_position(meta)}")
                append(Failed(step, "DecodeError", message, _raw_text(value), meta))
                continue
            ts_type, ts = msg.timestamp()
            key = msg.key()
            headers = msg.headers()
            rec[META] = {
                "topic": topic,
                "partition": part,
                "offset": offset,
                "key": None if key is None else _decode_key(key),
                "headers": _headers(headers) if headers else {},
                "timestamp": ts if ts_type else None,
            }
            append(rec)
        self.offset = max(self.offset, last + 1)
        _low, high = self.consumer.get_watermark_offsets(self._tp, cached=True)
        if high >= 0:
            self._lag.set(max(0, high - self.offset))
        if self.end is not None and self.offset >= self.end:
            self._awake = None
        return [out] if out else []

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        # The group commit runs one snapshot behind: the offset of the previous snapshot
        # is already processed downstream by the time this one is taken. It is a progress
        # marker for monitoring and stateless restarts; recovery state is authoritative.
        if self.cfg.consumer_group and self._to_commit is not None:
            from confluent_kafka import KafkaException, TopicPartition

            try:
                tp = TopicPartition(self.topic, self.partition, self._to_commit)
                self.consumer.commit(offsets=[tp], asynchronous=True)
            except KafkaException as exc:
                log.warning("step %r: offset commit failed: %s", self.step_id, exc)
        self._to_commit = self.offset
        return self.offset

    def close(self) -> None:
        if self.cfg.consumer_group and self.offset > self._started:
            # Committed by commit_ended() once the run has written everything (snapshot()
            # commits one snapshot behind: the last one's offset would never be).
            key = (self.cfg.bootstrap_servers, self.cfg.consumer_group,
                   tuple(sorted(self.cfg.properties.items())))
            with _ENDED_LOCK:
                _ENDED.setdefault(key, {})[(self.topic, self.partition)] = self.offset
        self.consumer.close()


_ENDED: dict[tuple[str, str, tuple[tuple[str, Any], ...]], dict[tuple[str, int], int]] = {}
_ENDED_LOCK = threading.Lock()


def commit_ended(commit: bool = True) -> None:
    """Commit to their consumer groups the offsets the partitions of a run reached.

    Called by ``dataflare run`` at its end: ``commit`` when the run succeeded (everything
    read was written); else the offsets are forgotten.
    """
    with _ENDED_LOCK:
        ended = dict(_ENDED) if commit else {}
        _ENDED.clear()
    if not ended:
        return  # (a core-only install has no Kafka client)
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    for (servers, group, props), offsets in ended.items():
        settings = {**_client_config(servers, dict(props)), "group.id": group,
                    "enable.auto.commit": False}
        consumer = Consumer(settings)
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                            asynchronous=False)
        except KafkaException as exc:
            log.warning("committing the run's offsets to consumer group %r failed: %s",
                        group, exc)
        finally:
            consumer.close()


_METADATA_TIMEOUT = 10.0
"""Seconds one attempt to read the topics' partitions waits for a broker's answer."""


class KafkaSource(FixedPartitionedSource[list[Any], int]):
    """Every topic-partition of the configured topics; one bytewax partition each."""

    def __init__(self, cfg: KafkaSourceConfig, stop_at_end: bool, step: str,
                 retry: Retry | None = None) -> None:
        self.cfg = cfg
        self.stop_at_end = stop_at_end
        self.step = step
        self.retry = retry or Retry()

    def list_parts(self) -> list[str]:
        """``topic#partition`` of every partition of the topics (fails if one is missing)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        servers = self.cfg.bootstrap_servers
        admin = AdminClient(_client_config(servers, self.cfg.properties))
        names = self.cfg.topic_names()

        def topics() -> dict[str, Any]:
            try:
                return dict(admin.list_topics(timeout=_METADATA_TIMEOUT).topics)
            except KafkaException as exc:  # no broker answered (down, wrong address, auth)
                err = exc.args[0] if exc.args else exc
                text = err.str() if hasattr(err, "str") else str(err)
                msg = f"step '{self.step}': kafka {servers}: {text}"
                raise TransientError(msg) from None

        # A broker restarting is waited for per config.retry, as a write's failure is.
        md = call_with_retry(f"step '{self.step}': listing the topics on {servers}", topics,
                             self.retry)
        parts: list[str] = []
        for name in names:
            topic = md.get(name)
            if topic is None or topic.error is not None or not topic.partitions:
                reason = topic.error.str() if topic is not None and topic.error else "not found"
                msg = f"kafka topic {name!r} on {self.cfg.bootstrap_servers}: {reason}"
                raise ValueError(msg)
            parts.extend(f"{name}#{p}" for p in sorted(topic.partitions))
        return parts

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _KafkaPartition:
        """A consumer of one topic-partition, from ``resume_state`` (the next offset)."""
        topic, _, part = for_part.rpartition("#")
        return _KafkaPartition(
            self.step, topic, int(part), self.cfg, self.stop_at_end, resume_state
        )


@source(
    "kafka",
    config=KafkaSourceConfig,
    datasets=lambda cfg, base: topic_datasets(cfg.bootstrap_servers, cfg.topic_names()),
    description="Kafka topics: one partition per topic-partition, offsets in recovery state.",
    blocks=("mode",),
    requires=("confluent_kafka",), extra="kafka",
)
def build_kafka_source(ctx: BuildContext) -> KafkaSource:
    """The bytewax source of a ``kafka`` source component."""
    cfg: KafkaSourceConfig = ctx.config
    stop = cfg.stop_at_end
    if stop is None:
        mode = getattr(ctx.component, "mode", None)
        stop = mode not in (None, "streaming", "cdc", "hybrid")
    return KafkaSource(cfg, stop, ctx.step_id, ctx.workflow.config.retry)


# ---------------------------------------------------------------------- destination


def is_dead_letter(record: Any) -> bool:
    """Whether ``record`` is a dead letter (``error``, ``source``, ``record``) sent here.

    Told by its mark, not its shape: a record of the same shape from ``inputs`` (a
    business event ``{"error": ..., "record": ...}``) is a record.
    """
    meta = record.get(META) if isinstance(record, dict) else None
    return isinstance(meta, dict) and meta.get(DEAD_LETTER) is True

Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


# librdkafka's default ``message.max.bytes`` and an upper bound of what a message adds to
# its key, value and headers on the wire (record framing, varints, the batch header).
_DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
_MESSAGE_OVERHEAD = 128
_HEADER_OVERHEAD = 12


def _message_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
                  ) -> int:
    """The bytes ``(key, value, headers)`` takes on the wire, overhead included."""
    size = _MESSAGE_OVERHEAD + len(key or b"") + len(value or b"")
    for name, data in headers:
        size += _HEADER_OVERHEAD + len(name) + len(data or b"")
    return size


def _topic_max_message_bytes(cfg: KafkaDestinationConfig) -> int | None:
    """The topic's ``max.message.bytes`` as the broker reports it (None: not reported)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(_client_config(cfg.bootstrap_servers, _admin_properties(cfg)))
    resource = ConfigResource(ConfigResource.Type.TOPIC, cfg.topic)
    try:
        entries = admin.describe_configs([resource], request_timeout=10)[resource].result(15)
    except (KafkaException, ValueError, TypeError) as exc:
        log.debug("kafka topic %r: max.message.bytes not reported: %s", cfg.topic, exc)
        return None
    entry = entries.get("max.message.bytes")
    try:
        return int(entry.value) if entry is not None and entry.value else None
    except ValueError:
        return None


def _admin_properties(cfg: KafkaDestinationConfig) -> dict[str, PropertyValue]:
    """The connection settings of ``cfg.properties`` (security, SASL, SSL), not the producer's."""
    return {k: v for k, v in cfg.properties.items()
            if k.startswith(("security.", "sasl.", "ssl.", "client.", "socket."))}


class _Encoder:
    """Turns records into (key, value, headers) and Failed entries.

    A message larger than the producer's ``message.max.bytes`` or the topic's
    ``max.message.bytes`` is refused here, as a ``Failed`` of its own record, so the
    step's error policy applies to it instead of the whole epoch failing at the broker.
    """

    def __init__(self, step_id: str, cfg: KafkaDestinationConfig) -> None:
        import orjson

        self.step_id = step_id
        self.cfg = cfg
        self.dumps = orjson.dumps
        self.key = compile_template(cfg.key_template) if cfg.key_template else None
        self.key_parts = [(p, getter(p)) for p in placeholders(cfg.key_template or "")]
        self.headers = [(name, compile_template(text)) for name, text in cfg.headers.items()]
        self.max_bytes: int | None = None  # known at the first batch (asks the broker)

    def _limit(self) -> int:
        if self.max_bytes is None:
            producer = int(self.cfg.properties.get("message.max.bytes",
                                                   _DEFAULT_MAX_MESSAGE_BYTES))
            topic = _topic_max_message_bytes(self.cfg)
            self.max_bytes = min(producer, topic) if topic else producer
        return self.max_bytes

    def _too_large(self, rec: Any, size: int, limit: int) -> Failed:
        text = (f"step {self.step_id!r}: message of {size} bytes exceeds the limit of "
                f"{limit} bytes of kafka topic {self.cfg.topic!r} (producer message.max.bytes"
                " / topic max.message.bytes)")
        meta = rec.get(META, {}) if isinstance(rec, dict) else {}
        return Failed(self.step_id, "MessageTooLarge", text, rec, meta)

    def dead_letter(self, rec: dict[str, Any]) -> Message:
        """A dead letter as a message: the original, its key, the envelope in headers.

        The value is the original bytes, text or JSON (a tombstone stays one); the rest of
        the envelope travels in ``dataflare.error.*`` and ``dataflare.source.*`` headers.
        """
        original = rec["record"]
        source = rec.get("source") or {}
        meta = source.get("position") or rec.get(META) or {}
        value: bytes | None
        if rec.get("record_encoding") == "base64" and isinstance(original, str):
            value = base64.b64decode(original)
        elif isinstance(original, bytes):
            value = original
        elif isinstance(original, str):
            value = original.encode()
        elif original is None:
            value = None
        else:
            value = self.dumps(original, default=str)
        err = rec["error"]
        headers = [
            (f"dataflare.error.{name}", str(err[name]).encode())
            for name in ("step", "type", "message", "at", "run_id")
            if err.get(name) is not None
        ]
        if source.get("component"):
            headers.append(("dataflare.source.component", str(source["component"]).encode()))
        for name in ("topic", "partition", "offset", "file", "line", "index", "table", "lsn"):
            if name in meta:
                headers.append((f"dataflare.source.{name}", str(meta[name]).encode()))
        if meta:
            headers.append(("dataflare.source.position", describe_position(meta).encode()))
            headers.append(("dataflare.source.meta", self.dumps(meta, default=str)))
        key = meta.get("key")
        if isinstance(key, str):
            key = key.encode()
        return (key if isinstance(key, bytes) else None, value, headers)

    def _key(self, rec: Any) -> bytes:
        """The message key; a record lacking a field of it is refused (one key for all)."""
        for path, get in self.key_parts:
            if get(rec) in (None, ""):
                msg = (f"step {self.step_id!r}: key_template {self.cfg.key_template!r} needs "
                       f"'{path}', which the record lacks")
                raise ValueError(msg)
        assert self.key is not None  # noqa: S101 - called only with a key template
        return self.key(rec).encode()

    def encode(self, batch: list[Any]) -> tuple[list[Message], list[Failed]]:
        out: list[Message] = []
        errs: list[Failed] = []
        dumps = self.dumps
        key_of = self.key
        header_fns = self.headers
        append = out.append
        limit = self._limit()
        for rec in batch:
            try:
                if META in rec and is_dead_letter(rec):
                    message = self.dead_letter(rec)
                else:
                    if META in rec:
                        body = dict(rec)
                        del body[META]
                    else:
                        body = rec
                    key = self._key(rec) if key_of is not None else None
                    headers = ([(n, fn(rec).encode()) for n, fn in header_fns]
                               if header_fns else [])
                    message = (key, dumps(body), headers)
            except (TypeError, ValueError) as exc:
                text = (str(exc) if str(exc).startswith(f"step {self.step_id!r}") else
                        f"step {self.step_id!r}: cannot encode record as JSON: {exc}")
                errs.append(Failed(self.step_id, type(exc).__name__, text, rec,
                                   rec.get(META, {}) if isinstance(rec, dict) else {}))
                continue
            size = _message_size(*message)
            if size > limit:
                errs.append(self._too_large(rec, size, limit))
                continue
            append(message)
        return out, errs


class _KafkaWriter(StatefulSinkPartition[list[Message], None]):
    """One producer; flushes (and commits its transaction) at every snapshot."""

    def __init__(self, step_id: str, cfg: KafkaDestinationConfig, part: str) -> None:
        from confluent_kafka import Producer

        self.step_id = step_id
        self.topic = cfg.topic
        self.servers = cfg.bootstrap_servers
        self.flush_timeout = cfg.flush_timeout
        self.transactional = cfg.exactly_once
        self.errors: list[str] = []
        self.last_warning: str | None = None
        settings = _client_config(cfg.bootstrap_servers, cfg.properties)
        settings.setdefault("enable.idempotence", True)
        settings.setdefault("linger.ms", 5)
        settings["error_cb"] = self._on_error
        if self.transactional:
            prefix = cfg.transactional_id or f"dataflare-{step_id}"
            settings["transactional.id"] = f"{prefix}-{part}"
        self.producer = _client(Producer, step_id, settings)
        self.in_txn = False
        if self.transactional:
            # Fences an older instance and aborts the transaction a crash left open.
            self.producer.init_transactions(self.flush_timeout)

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.fatal():
            self.errors.append(err.str())
            return
        if err.code() != KafkaError._ALL_BROKERS_DOWN:  # "n/m brokers are down" says less
            self.last_warning = err.str()
        log.warning("step %r: kafka producer: %s", self.step_id, err.str())

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(f"{err.str()} ({msg.topic()}[{msg.partition()}])")

    def _check(self) -> None:
        if self.errors:
            first = self.errors[0]
            count = len(self.errors)
            self.errors.clear()
            msg = (
                f"step {self.step_id!r}: {count} message(s) to kafka topic "
                f"{self.topic!r} failed: {first}"
            )
            raise RuntimeError(msg)

    def write_batch(self, values: list[list[Message]]) -> None:
        producer = self.producer
        if self.transactional and not self.in_txn:
            producer.begin_transaction()
            self.in_txn = True
        produce = producer.produce
        topic = self.topic
        callback = self._on_delivery
        for batch in values:
            for key, value, headers in batch:
                while True:
                    try:
                        produce(topic, value, key, headers=headers or None, on_delivery=callback)
                        break
                    except BufferError:
                        producer.poll(0.1)
        producer.poll(0)
        self._check()

    def snapshot(self) -> None:
        if self.transactional:
            if self.in_txn:
                self.producer.commit_transaction(self.flush_timeout)
                self.in_txn = False
        else:
            remaining = self.producer.flush(self.flush_timeout)
            if remaining:
                last = f" (last error: {self.last_warning})" if self.last_warning else ""
                msg = (
                    f"step {self.step_id!r}: {remaining} message(s) to kafka topic "
                    f"{self.topic!r} not acknowledged by {self.servers} within "
                    f"{self.flush_timeout:g}s{last}"
                )
                raise RuntimeError(msg)
        self._check()

    def close(self) -> None:
        # Bytewax calls this when it drops the partition: after the last snapshot of a run
        # that ends, or while unwinding a failure, where an exception aborts the process.
        # What is still pending belongs to an epoch that was never snapshotted (replayed on
        # recovery), so it is not committed here: an open transaction is aborted.
        if not self.in_txn:
            return
        from confluent_kafka import KafkaException

        try:
            self.producer.abort_transaction(self.flush_timeout)
        except KafkaException as exc:
            log.warning("step %r: aborting the open transaction failed: %s", self.step_id, exc)
        self.in_txn = False


class KafkaSink(FixedPartitionedSink[list[Message], None]):
    """``writers`` producers; the key of an item is the index of its writer."""

    def __init__(self, cfg: KafkaDestinationConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name

    def list_parts(self) -> list[str]:
        """One partition per writer."""
        return [str(i) for i in range(self.cfg.writers)]

    def part_fn(self, item_key: str) -> int:
        """Items are keyed by their writer's index."""
        return int(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _KafkaWriter:
        """The producer of one writer."""
        return _KafkaWriter(self.name, self.cfg, for_part)


@operator
def kafka_output(
    step_id: str, up: Stream[list[Any]], name: str, cfg: KafkaDestinationConfig
) -> Stream[list[Failed]]:
    """Encode batches, write them with ``cfg.writers`` producers, return the unencodable.

    ``name`` is the destination id used in messages and transactional ids.
    """
    import bytewax.operators as op

    encoder = _Encoder(name, cfg)
    counter = itertools.count()
    writers = cfg.writers

    def encode(batch: list[Any]) -> tuple[list[tuple[str, list[Message]]], list[Failed]]:
        """The messages by writer: a key's always to one, so its order holds."""
        msgs, errs = encoder.encode(batch)
        if writers == 1 or not msgs:
            return ([("0", msgs)] if msgs else []), errs
        parts: list[list[Message]] = [[] for _ in range(writers)]
        for m in msgs:
            parts[(zlib.crc32(m[0]) if m[0] is not None else next(counter)) % writers].append(m)
        return [(str(i), part) for i, part in enumerate(parts) if part], errs

    encoded = op.map("encode", up, encode)
    msgs = op.flat_map("messages", encoded, lambda kv: kv[0])
    op.output("write", msgs, KafkaSink(cfg, name))
    return op.filter_map("errors", encoded, lambda kv: kv[1] or None)


def kafka_destination_schema(ctx: SchemaContext[KafkaDestinationConfig]) -> FieldType | None:
    """The fields the key and header templates read."""
    ctx.read_template(("key_template",), ctx.config.key_template)
    for name, value in ctx.config.headers.items():
        ctx.read_template(("headers", name), value)
    return None


@destination(
    "kafka",
    config=KafkaDestinationConfig,
    datasets=lambda cfg, base: topic_datasets(cfg.bootstrap_servers, [cfg.topic]),
    description="A Kafka topic: JSON values, templated keys and headers, optional transactions.",
    blocks=(),
    requires=("confluent_kafka",), extra="kafka",
    schema=kafka_destination_schema,
)
def build_kafka_destination(ctx: BuildContext, up: Stream[list[Any]]) -> Stream[list[Failed]]:
    """The output steps of a ``kafka`` destination component (scoped under its id)."""
    return kafka_output(ctx.step_id, up, ctx.step_id, ctx.config)


def produce_records(
    bootstrap_servers: str,
    topic: str,
    values: Iterable[bytes | str | dict[str, Any]],
    partitions: int | None = None,
    key: Callable[[int], bytes | None] | None = None,
) -> int:
    """Write ``values`` to ``topic`` (round-robin over ``partitions`` if given); for demos."""
    import orjson
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 20})
    n = 0
    for i, value in enumerate(values):
        data = value if isinstance(value, bytes) else (
            value.encode() if isinstance(value, str) else orjson.dumps(value)
        )
        kw: dict[str, Any] = {}
        if partitions:
            kw["partition"] = i % partitions
        while True:
            try:
                producer.produce(topic, data, key(i) if key else None, **kw)
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
    remaining = producer.flush(60)
    if remaining:
        msg = f"{remaining} message(s) to {topic!r} not acknowledged"
        raise RuntimeError(msg)
    return n
