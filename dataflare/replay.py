"""Dead letters fed back into a step: ``dataflare replay PATH --to STEP WORKFLOW``.

``PATH`` holds dead letters (``{"error", "source", "record"}``, see
:meth:`dataflare.records.Failed.as_record`): a JSON lines file, a PostgreSQL table
given as ``postgresql://user@host:port/db#schema.table``, or a Kafka topic given as
``kafka://host:port/topic`` (read from its start to its end; a dead letter there is the
original value with the envelope in ``dataflare.*`` headers). Each dead letter is unwrapped:
its ``record``, with its original position as ``_meta``, goes into the step.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from dataflare.records import META


@dataclass
class DeadLetters:
    """The records to replay, and the dead letters that cannot be (with the reason)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)
    repeated: int = 0
    """Dead letters that repeat an earlier one (written again after a crash): skipped."""
    steps: set[str] = field(default_factory=set)
    """The steps that failed them (a destination's hold what it was to write)."""


def read_dead_letters(path: str) -> DeadLetters:
    """The dead letters at ``path`` (a JSON lines file or a PostgreSQL table), unwrapped."""
    out = DeadLetters()
    scheme = urlsplit(path).scheme
    if scheme in ("postgres", "postgresql"):
        letters = _from_postgres(path)
    elif scheme == "kafka":
        letters = _from_kafka(path)
    elif scheme in ("", "file"):
        letters = _from_jsonl(Path(urlsplit(path).path if scheme else path))
    else:
        msg = (f"replay: cannot read dead letters from {scheme!r} (a .jsonl file, "
               "postgresql://...#schema.table or kafka://host:port/topic)")
        raise ValueError(msg)
    seen: set[bytes] = set()
    for where, letter in letters:
        record = _unwrap(letter)
        if isinstance(record, str):
            out.unusable.append(f"{where}: {record}")
            continue
        # Dead letters are written at least once: after a crash the same one may come
        # again (the same step, source position and record), and is replayed once.
        source = letter.get("source") if isinstance(letter.get("source"), dict) else {}
        position = source.get("position")
        if isinstance(position, dict) and len(position) > 1:  # a table's name alone does
            # not tell its rows apart: identical rows are distinct dead letters
            same = orjson.dumps([letter["error"].get("step") if isinstance(
                letter["error"], dict) else None, source, letter["record"]],
                option=orjson.OPT_SORT_KEYS, default=str)
            if same in seen:
                out.repeated += 1
                continue
            seen.add(same)
        error = letter.get("error")
        if isinstance(error, dict) and isinstance(error.get("step"), str):
            out.steps.add(error["step"])
        out.records.append(record)
    return out


def _unwrap(letter: Any) -> dict[str, Any] | str:
    """The original record of a dead letter, with its position; else why it is not one."""
    if isinstance(letter, str):
        return letter
    if not isinstance(letter, dict) or "record" not in letter or "error" not in letter:
        return "not a dead letter (no 'error' and 'record')"
    record = letter["record"]
    if isinstance(record, str) and letter.get("record_encoding") == "base64":
        record = base64.b64decode(record)
    if not isinstance(record, dict):
        what = "no record" if record is None else f"undecodable input ({type(record).__name__})"
        return f"{what}: only records can be replayed"
    position = (letter.get("source") or {}).get("position")
    if isinstance(position, dict):
        return {**record, META: position}
    return dict(record)


def _from_jsonl(path: Path) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", orjson.loads(line)))
            except orjson.JSONDecodeError as exc:
                out.append((f"{path}:{n}", f"not JSON: {exc}"))
    return out


def _from_postgres(url: str) -> list[tuple[str, Any]]:
    import psycopg
    from psycopg import sql

    dsn, _, target = url.partition("#")
    schema, _, table = target.rpartition(".")
    if not table:
        msg = f"replay: name the table after '#' in {dsn.split('@')[-1]}#schema.table"
        raise ValueError(msg)
    ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(ident))
        names = [d.name for d in cur.description or []]
        rows = cur.fetchall()
    return [(f"{target} row {n}", dict(zip(names, row, strict=True)))
            for n, row in enumerate(rows, 1)]


def _from_kafka(url: str, timeout: float = 30.0) -> list[tuple[str, Any]]:
    """The dead letters of a topic, from its start to the end of each partition."""
    import time

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    parts = urlsplit(url)
    topic = parts.path.strip("/")
    consumer = Consumer({"bootstrap.servers": parts.netloc, "group.id": "dataflare-replay",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    out: list[tuple[str, Any]] = []
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            msg = f"replay: kafka topic {topic!r} not found at {parts.netloc}"
            raise KafkaException(msg)
        # The end is where each partition reports EOF (what was written before the call).
        todo = set(meta.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in todo])
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    todo.discard(msg.partition())  # _PARTITION_EOF
                    continue
                where = f"{topic}[{msg.partition()}]@{msg.offset()}"
                out.append((where, _kafka_letter(msg)))
        if todo:
            msg = f"replay: kafka topic {topic!r} not read to its end within {timeout:g}s"
            raise KafkaException(msg)
    finally:
        consumer.close()
    return out


def _kafka_letter(msg: Any) -> dict[str, Any]:
    """A Kafka dead letter (value plus ``dataflare.*`` headers) as an envelope."""
    headers = {k: v.decode("utf-8", "replace") for k, v in msg.headers() or [] if v is not None}
    error = {k.removeprefix("dataflare.error."): v for k, v in headers.items()
             if k.startswith("dataflare.error.")}
    position = orjson.loads(headers["dataflare.source.meta"]) \
        if "dataflare.source.meta" in headers else None
    value = msg.value()
    record: Any = None
    if value is not None:
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            record = value.decode("utf-8", "replace")
    return {"error": error, "source": {"component": headers.get("dataflare.source.component"),
                                       "position": position}, "record": record}
