"""S3 (and S3-compatible) objects: a partitioned destination and a source, with boto3.

The destination is the shared partitioned output of :mod:`dataflare.connectors.lake`:
objects named by ``path_template`` and ``partition_by``, rolled by ``max_records``,
``max_bytes``, ``flush_interval`` and at every snapshot, each written to a local file
first and uploaded in one piece (a multipart upload completes or leaves nothing), exactly
once across crashes. The source reads the objects under a prefix in key order, in the
formats of the file source, and resumes at an object key and the position inside it.

Credentials are ``access_key_id`` / ``secret_access_key`` (secrets), else boto3's usual
chain (environment, shared config, instance role).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bytewax.dataflow import Stream
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, model_validator

from dataflare.config import Secret, Strict
from dataflare.connectors.file import (
    CsvOptions,
    file_format,
    file_reader,
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
from dataflare.lineage import Dataset
from dataflare.records import Batch
from dataflare.registry import BuildContext, destination, source


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


class S3Storage:
    """Objects of one bucket; files are uploaded from a local scratch directory."""

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
        """A new local directory for the files being written."""
        return Path(tempfile.mkdtemp(prefix="dataflare-s3-"))

    def show(self, key: str) -> str:
        """The ``s3://`` URL of ``key``."""
        return f"s3://{self.bucket}/{key}"


def list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` in ``bucket``, in key order."""
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(o["Key"] for o in page.get("Contents", ()))
    return sorted(out)


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
    return lake_output("lake", up, LakeOutput(ctx.step_id, cfg.format, template, cfg,
                                              lambda: S3Storage(cfg)))


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


@dataclass(frozen=True)
class S3Position:
    """Where an s3 source is: the object being read (or last read) and the position in it."""

    key: str
    position: Any = None
    done: bool = False


class _ObjectsPartition(StatefulSourcePartition[Batch, S3Position | None]):
    """The objects under a prefix, in key order, each read through a local copy."""

    def __init__(self, step: str, config: S3SourceConfig, state: S3Position | None) -> None:
        self.step, self.config = step, config
        self.client = config.client()
        where = f"s3://{config.bucket}/{config.prefix}"
        try:
            listed = list_keys(self.client, config.bucket, config.prefix)
        except Exception as exc:
            msg = f"step {step!r}: cannot list {where}: {exc}"
            raise RuntimeError(msg) from exc
        keys = [k for k in listed if f"/{JOURNAL}/" not in f"/{k}" and not k.endswith("/")]
        self.state = state
        if state is not None:  # resume: the key read then, unless it was done, and later ones
            keys = [k for k in keys if k > state.key or (k == state.key and not state.done)]
        self.keys = keys
        self.reader: StatefulSourcePartition[Batch, Any] | None = None
        self.local: Path | None = None

    def _open(self, key: str, position: Any) -> None:
        fmt = file_format(key, self.config.format, self.step)
        fd, name = tempfile.mkstemp(prefix="dataflare-s3-", suffix=Path(key).suffix)
        os.close(fd)
        self.local = Path(name)
        shown = f"s3://{self.config.bucket}/{key}"
        try:
            self.client.download_file(self.config.bucket, key, name)
        except Exception as exc:
            msg = f"step {self.step!r}: cannot read {shown}: {exc}"
            raise RuntimeError(msg) from exc
        self.reader = file_reader(self.step, self.local, shown, fmt, self.config, position)
        self.state = S3Position(key, position)

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.local is not None:
            self.local.unlink(missing_ok=True)
            self.local = None

    def next_batch(self) -> Batch:
        if self.reader is None:
            if not self.keys:
                raise StopIteration
            key = self.keys.pop(0)
            resumed = self.state is not None and self.state.key == key and not self.state.done
            self._open(key, self.state.position if resumed and self.state else None)
        assert self.reader is not None and self.state is not None
        try:
            return list(self.reader.next_batch())
        except StopIteration:
            self._close_reader()
            self.state = S3Position(self.state.key, None, done=True)
            return []

    def snapshot(self) -> S3Position | None:
        if self.reader is not None and self.state is not None:
            return S3Position(self.state.key, self.reader.snapshot())
        return self.state

    def close(self) -> None:
        self._close_reader()


class S3Source(FixedPartitionedSource[Batch, S3Position | None]):
    """One partition reading every object under the prefix, in key order."""

    def __init__(self, step: str, config: S3SourceConfig) -> None:
        self.step, self.config = step, config

    def list_parts(self) -> list[str]:
        """The single partition: the bucket and prefix."""
        return [f"s3://{self.config.bucket}/{self.config.prefix}"]

    def build_part(self, step_id: str, for_part: str,
                   resume_state: S3Position | None) -> _ObjectsPartition:
        """The reader, resuming at an object key and the position inside it."""
        return _ObjectsPartition(self.step, self.config, resume_state)


@source("s3", config=S3SourceConfig,
        description="Read the objects under a prefix (JSON lines, CSV, JSON, Parquet).",
        requires=("boto3",), extra="s3", blocks=(),
        datasets=lambda cfg, base: [Dataset(f"s3://{cfg.bucket}", cfg.prefix or "/")])
def build_s3_source(ctx: BuildContext[S3SourceConfig]) -> S3Source:
    """Build an s3 source."""
    return S3Source(ctx.step_id, ctx.config)
