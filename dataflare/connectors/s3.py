"""S3 (and S3-compatible) objects: a partitioned destination and a source, with boto3.

The destination is the shared partitioned output of :mod:`dataflare.connectors.lake`:
objects named by ``path_template`` and ``partition_by``, rolled by ``max_records``,
``max_bytes``, ``flush_interval`` and at every snapshot, each written to a local file
first and uploaded in one piece (a multipart upload completes or leaves nothing), exactly
once across crashes. The source reads the objects under a prefix in key order, in the
formats of the file source, and resumes at an object key and the position inside it.

With ``mode: incremental`` the source lists the prefix every ``incremental.interval`` and
reads the objects it has not read, oldest ``LastModified`` first: its cursor is the latest
``LastModified`` read, and it keeps the keys and ETags read at or after the cursor less
``incremental.lookback``, so an object is read once, a replaced one (a new ETag) again,
and one that appears late with an earlier ``LastModified`` (a multipart upload is dated
when it began) is still read within the lookback. ``incremental.start_value`` (a
timestamp) skips older objects on the first run; ``stop_at_end`` ends the input after a
listing that finds nothing new (a catch-up run).

Credentials are ``access_key_id`` / ``secret_access_key`` (secrets), else boto3's usual
chain (environment, shared config, instance role).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

from bytewax.dataflow import Stream
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, model_validator

from dataflare.config import Retry, Secret, Strict
from dataflare.connectors.file import (
    CsvOptions,
    file_format,
    file_reader,
    refuse_decimal_handling,
    uses_source,
)
from dataflare.connectors.lake import (
    JOURNAL,
    LakeOptions,
    LakeOutput,
    PathTemplate,
    lake_output,
    lake_schema,
    template_problems,
)
from dataflare.connectors.schema import JSON_NUMBERS, DecimalHandling
from dataflare.lineage import Dataset
from dataflare.records import Batch, RecordError, to_epoch_seconds
from dataflare.registry import BuildContext, destination, source
from dataflare.retry import call_retrying


class S3Connection(Strict):
    """Where the bucket is and how to sign in."""

    bucket: str = Field(description="Bucket name.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto...); default: AWS."
    )
    region: str | None = Field(None, description="Region (default: from the AWS config chain).")
    access_key_id: Secret | None = Field(
        None, description="Access key id (default: the AWS environment/config chain)."
    )
    secret_access_key: Secret | None = Field(None, description="Secret access key.")

    @model_validator(mode="after")
    def _both_keys(self) -> S3Connection:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            msg = "give both 'access_key_id' and 'secret_access_key', or neither"
            raise ValueError(msg)
        return self

    def client(self) -> Any:
        """A boto3 S3 client for this connection."""
        try:
            import boto3
        except ModuleNotFoundError as exc:  # pragma: no cover - the registry checks first
            msg = "the s3 connector needs boto3: pip install 'dataflare[s3]'"
            raise ModuleNotFoundError(msg) from exc
        keys: dict[str, Any] = {}
        if self.access_key_id is not None and self.secret_access_key is not None:
            keys = {"aws_access_key_id": self.access_key_id.get_secret_value(),
                    "aws_secret_access_key": self.secret_access_key.get_secret_value()}
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, **keys)


class S3DestinationConfig(S3Connection, LakeOptions):
    """Settings of an ``s3`` destination."""

    path_template: str = Field(
        description="Object key template, e.g. 'year={{year}}/{{source}}_data.parquet' "
        "({{field}}, {{year}} {{month}} {{day}} {{hour}}, {{source}})."
    )
    format: Literal["parquet", "jsonl", "csv"] = Field("parquet", description="Object format.")

    @model_validator(mode="after")
    def _template(self) -> S3DestinationConfig:
        problems = template_problems(self.path_template, self, self.format)
        if self.path_template.startswith("/"):
            problems.append("path_template is an object key: it must not start with '/'")
        if problems:
            raise ValueError("; ".join(problems))
        return self


_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}


def s3_transient(exc: BaseException) -> bool:
    """Whether an S3 call's failure is worth retrying: the connection, a 5xx, throttling.

    boto3's ``upload_file`` wraps the failure of a part: its cause is looked at.
    """
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError | HTTPClientError):
            return True
        if isinstance(seen, ClientError):
            err = seen.response.get("Error", {})
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return err.get("Code") in _TRANSIENT_CODES or int(status) >= 500
        seen = seen.__cause__ or seen.__context__
    return False


class S3Storage:
    """Objects of one bucket; files are uploaded from a local scratch directory."""

    transient = staticmethod(s3_transient)

    def __init__(self, connection: S3Connection) -> None:
        self.bucket = connection.bucket
        self.client = connection.client()

    def publish(self, local: Path, key: str) -> None:
        """Upload ``local`` as ``key`` (a multipart upload for a large file) and remove it."""
        self.client.upload_file(str(local), self.bucket, key)
        local.unlink()

    def put_text(self, key: str, text: str) -> None:
        """Write a small object."""
        self.client.put_object(Bucket=self.bucket, Key=key, Body=text.encode())

    def get_text(self, key: str) -> str | None:
        """A small object's text, ``None`` when absent."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return str(body.read().decode())

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine)."""
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix``, in order."""
        return list_keys(self.client, self.bucket, prefix)

    def scratch(self, prefix: str) -> Path:
        """A new local directory for the files being written, removed when the process ends.

        Also after a failed run: what it held is written again by the resume.
        """
        path = tempfile.mkdtemp(prefix="dataflare-s3-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return Path(path)

    def show(self, key: str) -> str:
        """The ``s3://`` URL of ``key``."""
        return f"s3://{self.bucket}/{key}"


def _objects(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under ``prefix`` in ``bucket`` (key, ``LastModified``, ETag...)."""
    out: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(page.get("Contents", ()))
    return out


def list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` in ``bucket``, in key order."""
    return sorted(o["Key"] for o in _objects(client, bucket, prefix))


@destination(
    "s3",
    config=S3DestinationConfig,
    description="Objects in S3-compatible storage: partitioned by path_template and "
    "partition_by, rolling, exactly once.",
    requires=("boto3",),
    extra="s3",
    blocks=("write_mode=append",),
    input_names=uses_source,
    schema=lake_schema,
    datasets=lambda cfg, base: [Dataset(f"s3://{cfg.bucket}", cfg.path_template)],
)
def build_s3_destination(ctx: BuildContext[S3DestinationConfig],
                         up: Stream[Batch]) -> Stream[Any]:
    """Build an s3 destination: objects are only added (``write_mode: append``)."""
    cfg = ctx.config
    template = PathTemplate(cfg.path_template, cfg.format, cfg)
    out = LakeOutput(ctx.step_id, cfg.format, template, cfg, lambda: S3Storage(cfg),
                     retry=ctx.workflow.config.retry)
    return lake_output("lake", up, out)


class S3SourceConfig(S3Connection):
    """Settings of an ``s3`` source."""

    prefix: str = Field("", description="Read the objects whose keys start with this.")
    format: Literal["jsonl", "csv", "json", "parquet"] | None = Field(
        None, description="Object format; from each key's extension if absent."
    )
    batch_size: int = Field(5000, ge=1, description="Records read per batch.")
    csv: CsvOptions = Field(default_factory=CsvOptions, description="CSV settings.")
    records_path: str | None = Field(
        None, description="JSON: dotted path of the record array inside the document."
    )
    decimal_handling: DecimalHandling = Field(
        "number", description=f"{JSON_NUMBERS} (JSON and JSON lines objects)")
    stop_at_end: bool = Field(
        False, description="Incremental: end after a listing that finds no new object (a "
        "catch-up run) instead of listing again every incremental.interval.")

    @model_validator(mode="after")
    def _json_numbers(self) -> S3SourceConfig:
        refuse_decimal_handling(self, self.format)
        return self


@dataclass(frozen=True)
class S3Position:
    """Where an s3 source is: the object being read (or last read) and the position in it."""

    key: str
    position: Any = None
    done: bool = False


class _ObjectReader:
    """One object, read through a local copy by the file source's reader of its format."""

    def __init__(self, step: str, config: S3SourceConfig, client: Any, key: str,
                 position: Any, retry: Retry) -> None:
        self.key = key
        fmt = file_format(key, config.format, step)
        fd, name = tempfile.mkstemp(prefix="dataflare-s3-", suffix=Path(key).suffix)
        os.close(fd)
        self.local = Path(name)
        shown = f"s3://{config.bucket}/{key}"
        try:
            call_retrying(f"step {step!r}: reading {shown}",
                          partial(client.download_file, config.bucket, key, name), retry,
                          s3_transient, f"step {step!r}: cannot read {shown}")
        except BaseException:
            self.local.unlink(missing_ok=True)
            raise
        self.reader = file_reader(step, self.local, shown, fmt, config, position)

    def next_batch(self) -> Batch:
        """The next records; StopIteration at the end of the object."""
        return list(self.reader.next_batch())

    def position(self) -> Any:
        """Where the reader is in the object."""
        return self.reader.snapshot()

    def close(self) -> None:
        """Close the reader and remove the local copy."""
        self.reader.close()
        self.local.unlink(missing_ok=True)


def _listing(step: str, config: S3SourceConfig, client: Any, retry: Retry
             ) -> list[dict[str, Any]]:
    """The data objects under the prefix (no journals, no directory markers), in key order."""
    shown = f"s3://{config.bucket}/{config.prefix}"
    out = call_retrying(f"step {step!r}: listing {shown}",
                        partial(_objects, client, config.bucket, config.prefix), retry,
                        s3_transient, f"step {step!r}: cannot list {shown}")
    out = [o for o in out if f"/{JOURNAL}/" not in f"/{o['Key']}" and not o["Key"].endswith("/")]
    return sorted(out, key=lambda o: o["Key"])


class _ObjectsPartition(StatefulSourcePartition[Batch, S3Position | None]):
    """The objects under a prefix, in key order, each read through a local copy."""

    def __init__(self, step: str, config: S3SourceConfig, state: S3Position | None,
                 retry: Retry) -> None:
        self.step, self.config, self.retry = step, config, retry
        self.client = config.client()
        keys = [o["Key"] for o in _listing(step, config, self.client, retry)]
        self.state = state
        if state is not None:  # resume: the key read then, unless it was done, and later ones
            keys = [k for k in keys if k > state.key or (k == state.key and not state.done)]
        self.keys = keys
        self.reader: _ObjectReader | None = None

    def next_batch(self) -> Batch:
        if self.reader is None:
            if not self.keys:
                raise StopIteration
            key = self.keys.pop(0)
            resumed = self.state is not None and self.state.key == key and not self.state.done
            position = self.state.position if resumed and self.state else None
            self.reader = _ObjectReader(self.step, self.config, self.client, key, position,
                                        self.retry)
            self.state = S3Position(key, position)
        try:
            return self.reader.next_batch()
        except StopIteration:
            self.state = S3Position(self.reader.key, None, done=True)
            self.close()
            return []

    def snapshot(self) -> S3Position | None:
        if self.reader is not None:
            return S3Position(self.reader.key, self.reader.position())
        return self.state

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


@dataclass
class S3Polled:
    """An incremental s3 source's state (see the module docs)."""

    cursor: float | None = None
    """The latest ``LastModified`` read, in epoch seconds."""
    seen: dict[str, tuple[float, str]] = field(default_factory=dict)
    """Key -> (``LastModified``, ETag) of the objects read since the cursor less lookback."""
    reading: tuple[str, float, str, Any] | None = None
    """The object being read: key, ``LastModified``, ETag and the position in it."""


class _PolledPartition(StatefulSourcePartition[Batch, S3Polled]):
    """The objects under a prefix not read yet, listed again every interval."""

    def __init__(self, source: S3Source, state: S3Polled | None) -> None:
        self.source, self.config = source, source.config
        self.client = self.config.client()
        self.state = state or S3Polled()
        self.pending: list[tuple[str, float, str]] = []
        self.reader: _ObjectReader | None = None
        self.current: tuple[str, float, str] | None = None
        self.awake: datetime | None = None
        if self.state.reading is not None:  # resume inside the object
            key, modified, etag, position = self.state.reading
            self._open((key, modified, etag), position)

    def _open(self, obj: tuple[str, float, str], position: Any) -> None:
        self.reader = _ObjectReader(self.source.step, self.config, self.client, obj[0], position,
                                    self.source.retry)
        self.current = obj

    def _poll(self) -> list[tuple[str, float, str]]:
        """The objects not read yet, oldest first."""
        st, src = self.state, self.source
        since = src.start if st.cursor is None else st.cursor - src.lookback
        new = []
        for o in _listing(src.step, self.config, self.client, src.retry):
            modified, etag = o["LastModified"].timestamp(), str(o.get("ETag", ""))
            seen = st.seen.get(o["Key"])
            if (since is None or modified >= since) and (seen is None or seen[1] != etag):
                new.append((o["Key"], modified, etag))
        return sorted(new, key=lambda n: (n[1], n[0]))

    def _done(self, obj: tuple[str, float, str]) -> None:
        """Count ``obj`` as read: the cursor moves, entries older than the lookback go."""
        st = self.state
        key, modified, etag = obj
        st.cursor = modified if st.cursor is None else max(st.cursor, modified)
        st.seen[key] = (modified, etag)
        oldest = st.cursor - self.source.lookback
        st.seen = {k: v for k, v in st.seen.items() if v[0] >= oldest}

    def next_batch(self) -> Batch:
        if self.reader is None:
            if not self.pending:
                self.pending = self._poll()
                if not self.pending:
                    if self.config.stop_at_end:
                        raise StopIteration
                    self.awake = datetime.now(UTC) + timedelta(seconds=self.source.interval)
                    return []
            self.awake = None
            self._open(self.pending.pop(0), None)
        assert self.reader is not None and self.current is not None
        try:
            return self.reader.next_batch()
        except StopIteration:
            self.close()
            self._done(self.current)
            return []

    def next_awake(self) -> datetime | None:
        """When to list the prefix again."""
        return self.awake

    def snapshot(self) -> S3Polled:
        reading = None
        if self.reader is not None and self.current is not None:
            reading = (*self.current, self.reader.position())
        return S3Polled(self.state.cursor, dict(self.state.seen), reading)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class S3Source(FixedPartitionedSource[Batch, Any]):
    """One partition reading the objects under the prefix: once in key order, or as polled."""

    def __init__(self, step: str, config: S3SourceConfig, component: Any = None,
                 retry: Retry | None = None) -> None:
        self.step, self.config = step, config
        self.retry = retry or Retry()  # of the listings and downloads
        mode = "full" if component is None else component.runs_as()
        inc = getattr(component, "incremental", None)
        self.incremental = mode == "incremental"
        if mode not in ("full", "incremental"):
            msg = f"source {step!r}: type 's3' supports modes full and incremental, got {mode!r}"
            raise ValueError(msg)
        if not self.incremental and config.stop_at_end:
            msg = (f"source {step!r}: config.stop_at_end has no effect in mode full, which "
                   "reads the objects once; remove it or set mode: incremental")
            raise ValueError(msg)
        given = [f"incremental.{n}" for n in ("column", "cursor_field", "cursor_type")
                 if inc is not None and getattr(inc, n) is not None]
        if given:
            msg = (f"source {step!r}: {', '.join(given)} has no effect on an s3 source, whose "
                   "cursor is each object's LastModified")
            raise ValueError(msg)
        self.interval = float(inc.interval) if inc is not None else 10.0
        self.lookback = float(inc.lookback) if inc is not None else 0.0
        self.start: float | None = None
        if inc is not None and inc.start_value is not None:
            try:
                self.start = to_epoch_seconds(inc.start_value)
            except RecordError as exc:
                msg = f"source {step!r}: incremental.start_value: {exc}"
                raise ValueError(msg) from None

    def list_parts(self) -> list[str]:
        """The single partition: the bucket and prefix."""
        return [f"s3://{self.config.bucket}/{self.config.prefix}"]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: Any) -> StatefulSourcePartition[Batch, Any]:
        """The reader, resuming at an object key (or the cursor) and the position inside it."""
        if self.incremental:
            return _PolledPartition(self, resume_state)
        return _ObjectsPartition(self.step, self.config, resume_state, self.retry)


@source("s3", config=S3SourceConfig,
        description="Read the objects under a prefix (JSON lines, CSV, JSON, Parquet): once, "
        "or incrementally, the objects not read yet at every listing.",
        requires=("boto3",), extra="s3", blocks=("mode", "incremental"),
        datasets=lambda cfg, base: [Dataset(f"s3://{cfg.bucket}", cfg.prefix or "/")])
def build_s3_source(ctx: BuildContext[S3SourceConfig]) -> S3Source:
    """Build an s3 source."""
    return S3Source(ctx.step_id, ctx.config, ctx.component, ctx.workflow.config.retry)
