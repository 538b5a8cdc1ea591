r"""File source and destination: JSON lines, CSV, JSON and Parquet.

The source reads every file its ``path`` glob matches, one bytewax partition per file,
resuming at the byte offset (or row) of the last snapshot. A JSON lines or CSV
destination writes one file from one worker; its state is the file's length at the last
snapshot, so a resumed run truncates what was written after it and writes it again:
exactly once. A Parquet file cannot be written in pieces: it is written through parts
(the partitioned output of :mod:`dataflare.connectors.lake`, in ``.<name>.parts/``),
assembled into the file when the run ends (a temporary file, then renamed), so neither
memory nor snapshots hold its rows. ``write_mode: append`` writes the rows the file had
when the run started first (their count is in the state, so a resumed run does not
repeat them); a column only one side has is null on the other. With ``path_template``
(or a ``path`` holding ``{{...}}``), the output is partitioned rolling files.

JSON lines and CSV write bytes values (a Kafka ``format: bytes`` message, a Parquet
binary column) as ``\x`` and hex digits, the text form the database sources give binary
columns (:func:`~dataflare.connectors.schema.json_value`); Parquet keeps them binary.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from pydantic import Field, model_validator

from dataflare.config import Strict
from dataflare.connectors.batching import Once
from dataflare.connectors.lake import (
    LakeOptions,
    LakeOutput,
    LocalStorage,
    OneFile,
    PathTemplate,
    conform,
    csv_line,
    lake_output,
    lake_schema,
    template_problems,
)
from dataflare.connectors.schema import (
    JSON_INTS,
    JSON_NUMBERS,
    DecimalHandling,
    batch_loader,
    discoverer,
    exact_float,
    infer_schema,
    json_error,
    json_loader,
    record_line,
)
from dataflare.lineage import file_dataset
from dataflare.operators.records import map_records
from dataflare.records import META, Batch, Failed
from dataflare.registry import BuildContext, destination, source
from dataflare.template import placeholders

Format = Literal["jsonl", "csv", "json", "parquet"]
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json",
               ".parquet": "parquet"}

log = logging.getLogger(__name__)


class CsvOptions(Strict):
    """CSV dialect settings."""

    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator.")
    infer_types: bool = Field(
        False, description="Read numbers, true/false and empty cells (null) as typed values."
    )


def _check_format(path: str, fmt: str | None) -> None:
    unset = "${" in path  # a variable validate was not given: checked by run
    if fmt is None and not unset and _extension_format(path) is None:
        known = ", ".join(sorted(set(_EXTENSIONS.values())))
        msg = f"cannot tell the format of {path!r}: set 'format' ({known})"
        raise ValueError(msg)


class _FileConfig(Strict):
    path: str
    format: str | None

    @model_validator(mode="after")
    def _format_known(self) -> _FileConfig:
        _check_format(self.path, self.format)
        return self


class FileSourceConfig(_FileConfig):
    """Settings of a ``file`` source."""

    path: str = Field(description="File path or glob, relative to the workflow file.")
    format: Format | None = Field(None, description="File format; from the extension if absent.")
    batch_size: int = Field(5000, ge=1, description="Records read per batch.")
    csv: CsvOptions = Field(default_factory=CsvOptions, description="CSV settings.")
    records_path: str | None = Field(
        None, description="JSON: dotted path of the record array inside the document."
    )
    decimal_handling: DecimalHandling = Field(
        "number", description=f"{JSON_NUMBERS} (JSON and JSON lines files; CSV numbers "
        "always come as `number` says)")

    @model_validator(mode="after")
    def _json_numbers(self) -> FileSourceConfig:
        refuse_decimal_handling(self, self.format or _extension_format(self.path))
        return self


def refuse_decimal_handling(cfg: Strict, fmt: str | None) -> None:
    """Refuse ``decimal_handling`` given for a format without JSON numbers."""
    if "decimal_handling" in cfg.model_fields_set and fmt in ("csv", "parquet"):
        msg = f"decimal_handling reads JSON numbers: {fmt} has none"
        raise ValueError(msg)


class FileDestinationConfig(LakeOptions):
    """Settings of a ``file`` destination.

    ``path`` names one file. ``path_template`` (or a ``path`` holding ``{{...}}``), or any
    of ``partition_by``, ``max_records``, ``max_bytes``, ``flush_interval``, ``time_field``,
    makes it a partitioned output of rolling files (see :mod:`dataflare.connectors.lake`).
    """

    path: str | None = Field(None, description="Output file, relative to the workflow file.")
    path_template: str | None = Field(
        None, description="Output files: a template of their paths, relative to the workflow "
        "file ({{field}}, {{year}} {{month}} {{day}} {{hour}}, {{source}}); the files roll."
    )
    format: Literal["jsonl", "csv", "parquet"] | None = Field(
        None, description="File format; from the extension if absent."
    )

    @model_validator(mode="after")
    def _one_path(self) -> FileDestinationConfig:
        if (self.path is None) == (self.path_template is None):
            msg = "give one of 'path' (one file) or 'path_template' (partitioned files)"
            raise ValueError(msg)
        target = self.target()
        _check_format(target, self.format)
        if self.partitioned():
            problems = template_problems(target, self, self.format or _extension_format(target))
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def target(self) -> str:
        """The output path or path template."""
        return self.path_template or self.path or ""

    def partitioned(self) -> bool:
        """Whether this writes partitioned, rolling files rather than one file."""
        return self.path_template is not None or "{{" in self.target() or self.rolling()


def _extension_format(path: str) -> str | None:
    return _EXTENSIONS.get(Path(path.replace("*", "x")).suffix.lower())


def file_format(path: str, given: str | None, step: str) -> str:
    """The format of a file: the configured one, else read from its extension."""
    if given:
        return given
    fmt = _extension_format(path)
    if fmt is None:
        msg = f"step {step!r}: cannot tell the format of {path!r}; set 'format'"
        raise ValueError(msg)
    return fmt


def _infer(value: str) -> Any:
    if value == "":
        return None
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        n = int(value)
    except ValueError:
        pass
    else:
        return n if n in JSON_INTS else value  # beyond 64 bits: the exact text
    try:
        return exact_float(value)  # a float where it is exact, else the text
    except ValueError:
        return value


_BLANK = frozenset(b" \t\r\n\f\v")


class _LinesPartition(StatefulSourcePartition[Batch, tuple[int, int]]):
    """JSON lines, resumable at a byte offset."""

    def __init__(self, step: str, path: Path, shown: str, size: int, state: tuple[int, int] | None,
                 loads: Callable[[bytes], Any] = orjson.loads):
        self.step, self.shown, self.size, self.loads = step, shown, size, loads
        self.offset, self.line = state or (0, 0)
        self.f = path.open("rb")
        if self.offset == 0 and self.f.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte-order mark
            self.offset = 3
        self.f.seek(self.offset)

    def next_batch(self) -> Batch:
        out: Batch = []
        shown = self.shown
        raws = self.f.readlines(self.size * 128)
        loads = batch_loader(self.loads, raws)
        first = self.line + 1
        self.line += len(raws)
        self.offset += sum(map(len, raws))
        for line, raw in enumerate(raws, first):
            if raw[0] in _BLANK and not raw.strip():  # a JSON line starts with no blank
                continue
            meta = {"file": shown, "line": line}
            try:
                rec = loads(raw)
            except orjson.JSONDecodeError as exc:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                message = json_error(exc, "the line")
                out.append(Failed(self.step, "JSONDecodeError", message, text, meta))
                continue
            if not isinstance(rec, dict):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                what = type(rec).__name__
                out.append(Failed(self.step, "RecordError", f"expected a JSON object, got {what}",
                                  text, meta))
                continue
            rec[META] = meta
            out.append(rec)
        if not out and self.f.tell() >= os.fstat(self.f.fileno()).st_size:
            raise StopIteration
        return [out] if out else []

    def snapshot(self) -> tuple[int, int]:
        return (self.offset, self.line)

    def close(self) -> None:
        self.f.close()


class _CsvPartition(StatefulSourcePartition[Batch, int]):
    """CSV rows (the first row names the columns), resumable at a row count."""

    def __init__(self, step: str, path: Path, shown: str, size: int, opts: CsvOptions,
                 state: int | None):
        self.step, self.shown, self.size, self.opts = step, shown, size, opts
        self.f = path.open(newline="", encoding="utf-8-sig")  # a byte-order mark is dropped
        self.reader = csv.reader(self.f, delimiter=opts.delimiter)
        self.header: list[str] = next(self.reader, [])
        self.rows = 0
        for _ in range(state or 0):
            next(self.reader, None)
            self.rows += 1

    def next_batch(self) -> Batch:
        out: Batch = []
        header, width, infer = self.header, len(self.header), self.opts.infer_types
        for row in self.reader:
            self.rows += 1
            meta = {"file": self.shown, "line": self.reader.line_num}
            if not row:
                continue
            if len(row) != width:
                text = self.opts.delimiter.join(row)
                msg = f"row has {len(row)} fields, the header has {width}"
                out.append(Failed(self.step, "CsvError", msg, text, meta))
            else:
                values = [_infer(v) for v in row] if infer else row
                rec: dict[str, Any] = dict(zip(header, values, strict=True))
                rec[META] = meta
                out.append(rec)
            if len(out) >= self.size:
                return [out]
        if not out:
            raise StopIteration
        return [out]

    def snapshot(self) -> int:
        return self.rows

    def close(self) -> None:
        self.f.close()


class _ListPartition(StatefulSourcePartition[Batch, int]):
    """Records of a whole-file format (JSON, Parquet), resumable at a record index."""

    def __init__(self, step: str, rows: Iterable[Any], shown: str, size: int, state: int | None):
        self.step, self.shown, self.size = step, shown, size
        self.rows = iter(rows)
        self.index = 0
        for _ in range(state or 0):
            next(self.rows, None)
            self.index += 1

    def next_batch(self) -> Batch:
        out: Batch = []
        for rec in self.rows:
            meta = {"file": self.shown, "index": self.index}
            self.index += 1
            if isinstance(rec, Failed):
                rec.meta = meta
                out.append(rec)
            elif not isinstance(rec, dict):
                out.append(Failed(self.step, "RecordError",
                                  f"expected an object, got {type(rec).__name__}", rec, meta))
            else:
                rec = {k: (v.isoformat() if isinstance(v, datetime) else v)
                       for k, v in rec.items()}
                rec[META] = meta
                out.append(rec)
            if len(out) >= self.size:
                return [out]
        if not out:
            raise StopIteration
        return [out]

    def snapshot(self) -> int:
        return self.index

    def close(self) -> None:
        pass


def _json_rows(step: str, path: Path, records_path: str | None,
               loads: Callable[[bytes], Any]) -> list[Any]:
    text = path.read_bytes()
    try:
        doc = loads(text)
    except orjson.JSONDecodeError as exc:
        message = json_error(exc, "the document")
        return [Failed(step, "JSONDecodeError", message, text.decode("utf-8", "replace"))]
    for part in records_path.split(".") if records_path else []:
        doc = doc.get(part) if isinstance(doc, dict) else None
    if doc is None:
        msg = f"{records_path!r} not found in the document"
        return [Failed(step, "RecordError", msg, text.decode("utf-8", "replace"))]
    return doc if isinstance(doc, list) else [doc]


def _parquet_rows(path: Path, size: int) -> Iterable[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
        yield from batch.to_pylist()


class FileSource(FixedPartitionedSource[Batch, Any]):
    """Every file matching a glob, one partition per file."""

    def __init__(self, step: str, pattern: Path, base_dir: Path, config: FileSourceConfig):
        self.step, self.pattern, self.base_dir, self.config = step, pattern, base_dir, config

    def _files(self) -> dict[str, Path]:
        matches = sorted(glob.glob(str(self.pattern), recursive=True))
        if not matches:
            msg = f"step {self.step!r}: no file matches {self.config.path!r} ({self.pattern})"
            raise FileNotFoundError(msg)
        out = {}
        for m in matches:
            path = Path(m)
            try:
                out[str(path.relative_to(self.base_dir))] = path
            except ValueError:
                out[m] = path
        return out

    def list_parts(self) -> list[str]:
        """One partition per matching file."""
        return list(self._files())

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Any:
        """A reader of one file, resuming at ``resume_state``."""
        path = self._files()[for_part]
        fmt = file_format(str(path), self.config.format, self.step)
        return file_reader(self.step, path, for_part, fmt, self.config, resume_state)


def file_reader(step: str, path: Path, shown: str, fmt: str, cfg: Any,
                resume_state: Any) -> StatefulSourcePartition[Batch, Any]:
    """A resumable reader of one local file of format ``fmt``.

    Records' ``_meta.file`` is ``shown``; ``cfg`` holds ``batch_size``, ``csv``,
    ``records_path`` and ``decimal_handling`` (a file or s3 source's settings).
    """
    loads = json_loader(cfg.decimal_handling)
    if fmt == "jsonl":
        return _LinesPartition(step, path, shown, cfg.batch_size, resume_state, loads)
    if fmt == "csv":
        return _CsvPartition(step, path, shown, cfg.batch_size, cfg.csv, resume_state)
    rows: Iterable[Any]
    if fmt == "json":
        rows = _json_rows(step, path, cfg.records_path, loads)
    else:
        rows = _parquet_rows(path, cfg.batch_size)
    return _ListPartition(step, rows, shown, cfg.batch_size, resume_state)


@source("file", config=FileSourceConfig, description="Read JSON lines, CSV, JSON or Parquet files.",
        blocks=(), datasets=lambda cfg, base: file_dataset(cfg.path, base))
def build_file_source(ctx: BuildContext) -> FileSource:
    """Build a file source."""
    file_format(ctx.config.path, ctx.config.format, ctx.step_id)
    return FileSource(ctx.step_id, ctx.path(ctx.config.path), ctx.base_dir, ctx.config)


class _FilePartition(StatefulSinkPartition[Batch, Any]):
    def __init__(self, step: str, path: Path, fmt: str, columns: list[str] | None,
                 truncate: bool, state: Any):
        self.step, self.path, self.fmt, self.columns = step, path, fmt, columns
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f: Any
        if state is not None:
            offset, self.columns = state
            self.f = path.open("r+b" if path.exists() else "w+b")
            size = os.fstat(self.f.fileno()).st_size
            if size < offset:  # moved away or cut since (a consumer took it): not padded
                log.warning("step %r: %s holds %d bytes, %d at the last snapshot: it was "
                            "moved or cut since; the run writes on at its end", step, path,
                            size, offset)
                offset = size
            self.f.truncate(offset)
            self.f.seek(offset)
        else:
            self.f = path.open("wb" if truncate else "ab")
            if fmt == "csv" and self.f.tell() > 0 and self.columns is None:
                with path.open(newline="", encoding="utf-8") as existing:
                    self.columns = next(csv.reader(existing), None)

    def write_batch(self, values: list[Batch]) -> None:
        if self.fmt == "jsonl":  # lines encoded by the destination's "encode" step
            self.f.write(b"".join(line for batch in values for line in batch))
            return
        self._write_csv([
            {k: v for k, v in r.items() if k != META} if META in r else r
            for batch in values for r in batch
        ])

    def _write_csv(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self.columns is None:
            self.columns = list(dict.fromkeys(k for r in records for k in r))
        if self.f.tell() == 0:
            header = io.StringIO()
            csv.writer(header, lineterminator="\n").writerow(self.columns)
            self.f.write(header.getvalue().encode())
        # csv_line raises on what the conform step refused before: never here
        self.f.write(b"".join(csv_line(self.step, r, self.columns) for r in records))

    def snapshot(self) -> Any:
        self.f.flush()
        return (self.f.tell(), self.columns)

    def close(self) -> None:
        self.f.close()


class FileSink(FixedPartitionedSink[Batch, Any]):
    """One JSON lines or CSV file, written by the worker that owns its single partition."""

    def __init__(self, step: str, path: Path, fmt: str, columns: list[str] | None, truncate: bool):
        self.step, self.path, self.fmt = step, path, fmt
        self.columns, self.truncate = columns, truncate

    def list_parts(self) -> list[str]:
        """The single partition: the output file."""
        return [str(self.path)]

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _FilePartition:
        """The writer, truncating to the resumed length."""
        try:
            return _FilePartition(self.step, self.path, self.fmt, self.columns, self.truncate,
                                  resume_state)
        except OSError as exc:
            msg = f"step {self.step!r}: cannot write {self.path}: {exc.strerror or exc}"
            raise RuntimeError(msg) from exc


def uses_source(config: Any) -> bool:
    """Whether a file or s3 output's paths name the input (``{{source}}``)."""
    template = config.target() if hasattr(config, "target") else config.path_template
    return "source" in placeholders(template) or "source" in config.partition_by


@destination(
    "file",
    config=FileDestinationConfig,
    datasets=lambda cfg, base: file_dataset(cfg.target(), base),
    description="Write JSON lines, CSV or Parquet: one file (rewritten without write_mode), "
    "or partitioned rolling files (path_template).",
    blocks=("write_mode=append", "write_mode=overwrite"),
    blocks_for=lambda cfg: ("write_mode=append",) if cfg.partitioned() else (
        "write_mode=append", "write_mode=overwrite"),
    input_names=uses_source,
    schema=lake_schema,
)
def build_file_destination(ctx: BuildContext, up: Stream[Batch]) -> Stream[Any] | None:
    """Build a file destination (``write_mode: append`` adds to an existing file).

    JSON lines are encoded record by record first: a record that cannot be written (nested
    too deeply) is refused alone and follows the destination's ``error_handling``.
    """
    cfg = ctx.config
    fmt = file_format(cfg.target(), cfg.format, ctx.step_id)
    explicit = "write_mode" in ctx.component.model_fields_set
    if cfg.partitioned():  # only added to: validate refuses another write mode (blocks_for)
        target = cfg.target()
        resolved = str(ctx.path(target)) + ("/" if target.endswith("/") else "")
        template = PathTemplate(resolved, fmt, cfg)
        return lake_output("lake", up, LakeOutput(ctx.step_id, fmt, template, cfg,
                                                  LocalStorage))
    truncate = not explicit or ctx.component.write_mode.type != "append"
    path = ctx.path(cfg.path)
    if fmt == "parquet":  # written through parts (bounded memory), then as one file
        parts = f"{path.parent}/.{path.name}.parts/part.parquet"
        one = OneFile(path, append=not truncate)
        return lake_output("lake", up, LakeOutput(ctx.step_id, fmt, PathTemplate(parts, fmt, cfg),
                                                  cfg, LocalStorage, one))
    errs = None
    if fmt == "jsonl":
        encoded = map_records("encode", up, record_line, ctx.step_id)
        up, errs = encoded.down, encoded.errs
    else:  # what one CSV file cannot hold is refused record by record
        columns = cfg.columns
        if columns is None and not truncate and path.exists() and path.stat().st_size:
            with path.open(newline="", encoding="utf-8") as existing:
                columns = next(csv.reader(existing), None)
        conformed = conform("conform", up, ctx.step_id, columns)
        up, errs = conformed.down, conformed.errs
    if truncate:  # the file is rewritten even when no record comes
        up = op.merge("started", up, op.input("start", up.flow(), Once()))
    keyed = op.key_on("key", up, lambda _batch: str(path))
    op.output("write", keyed, FileSink(ctx.step_id, path, fmt, cfg.columns, truncate))
    return errs


@discoverer("file")
def discover_files(ctx: BuildContext, sample: int = 200) -> dict[str, Any]:
    """The matched files and a JSON Schema inferred from their first records."""
    src = build_file_source(ctx)
    files = src.list_parts()
    records: list[Any] = []
    for name in files:
        part = src.build_part(ctx.step_id, name, None)
        try:
            while len(records) < sample:
                for batch in part.next_batch():
                    records.extend(r for r in batch if isinstance(r, dict))
        except StopIteration:
            pass
        finally:
            part.close()
        if len(records) >= sample:
            break
    return {"type": "file", "files": files, "sampled": len(records[:sample]),
            "json_schema": infer_schema(records[:sample])}
