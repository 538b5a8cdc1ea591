"""Partitioned, rolling outputs: the shared core of the ``file`` and ``s3`` destinations.

A record's output file comes from ``path_template`` (``{{field}}`` from the record,
``{{year}} {{month}} {{day}} {{hour}}`` from ``time_field`` or the processing time,
``{{source}}`` the input component it came from) and ``partition_by`` (Hive-style
``key=value/`` directories). Files roll by ``max_records``, ``max_bytes`` and
``flush_interval``, and at every snapshot: a file is complete when it rolls, and nothing
of it is kept in memory or in snapshots after that (as Flink's file sink does for bulk
formats). Parquet rows are converted to Arrow when they arrive and written in row groups,
so memory stays bounded.

Exactly once across crashes. One writer (a keyed step with a single key) numbers the files
it completes: the file ``n`` of a run is ``<stem>-<run>-<n><ext>`` in its partition's
directory. Before a file is published (renamed from its temporary name, or uploaded in one
piece), its final name is written to a journal entry ``_dataflare/<step>/<run>/<n>`` under
the template's fixed prefix. The snapshot holds the next number; a resumed run deletes
the files the journal lists from that number on (what the crashed execution published
after the snapshot) before it writes the same records again. Readers of Hive-style
layouts skip the ``_dataflare`` directory.

Records are refused one at a time (a Parquet type clash, a field CSV has no column for, a
value JSON cannot hold) and follow the destination's ``error_handling``.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import io
import os
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import StatefulBatchLogic
from pydantic import Field

from dataflare.config import Duration, Retry, Strict
from dataflare.connectors.batching import Discard, Once
from dataflare.connectors.schema import json_line, json_value, record_line
from dataflare.operators.keyed import skip_snapshots
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import (
    INPUT,
    META,
    RUN_ID_ENV,
    Batch,
    Failed,
    RecordError,
    a_or_an,
    getter,
    to_epoch_seconds,
)
from dataflare.retry import call_retrying
from dataflare.template import placeholders

EXTENSIONS = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet"}
TIME_PARTS = ("year", "month", "day", "hour")
BUILTINS = (*TIME_PARTS, "source")
DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"
"""The directory of a null partition value, as Hive and Spark name it."""
JOURNAL = "_dataflare"

_ROW_GROUP_ROWS = 16_384  # a Parquet row group is written once this many rows wait
_WAITING_BYTES = 4 << 20  # ... or the rows waiting in all open files exceed this (the most)
_MAX_OPEN = 64  # files open at once per output; past it the oldest rolls


class LakeOptions(Strict):
    """Path templates, partitions and rolling: the settings the file and s3 outputs share."""

    partition_by: list[str] = Field(
        default_factory=list,
        description="Fields (or year, month, day, hour, source) written as Hive-style "
        "'key=value/' directories, after the template's directories.",
    )
    time_field: str | None = Field(
        None, description="Record path of the event time for {{year}} {{month}} {{day}} "
        "{{hour}} (default: the processing time)."
    )
    time_unit: Literal["s", "ms"] = Field("s", description="Unit of numeric time_field values.")
    max_records: int | None = Field(None, ge=1, description="A file rolls at this many records.")
    max_bytes: int | None = Field(
        None, ge=1, description="A file rolls once it holds this many bytes (Parquet: the "
        "row groups written plus the Arrow size of the rows waiting)."
    )
    flush_interval: Duration | None = Field(
        None, gt=0, description="A file rolls once it has been open this long."
    )
    columns: list[str] | None = Field(
        None, description="CSV/Parquet columns, in order (default: the first records' "
        "fields); a record with a field not among them is refused."
    )

    def rolling(self) -> bool:
        """Whether any setting of a partitioned, rolling output is given."""
        given = self.model_fields_set
        return bool(self.partition_by) or bool(given & {"max_records", "max_bytes",
                                                        "flush_interval", "time_field"})


def template_problems(template: str, options: LakeOptions, fmt: str | None = None) -> list[str]:
    """What is wrong with a ``path_template`` and its settings (empty when they can be used).

    ``fmt``: the output format, when known.
    """
    out = []
    if "time_unit" in options.model_fields_set and options.time_field is None:
        out.append("'time_unit' is set but 'time_field' is not (the processing time is used)")
    if fmt == "jsonl" and options.columns is not None:
        out.append("'columns' applies to CSV and Parquet, not JSON lines")
    names = placeholders(template)
    if options.time_field is not None and not any(n in TIME_PARTS for n in names) and not any(
            p in TIME_PARTS for p in options.partition_by):
        out.append("'time_field' is set but neither path_template nor partition_by uses "
                   "{{year}}, {{month}}, {{day}} or {{hour}}")
    if ".." in Path(template).parts:
        out.append(f"path_template {template!r} must not contain '..'")
    return out


def lake_schema(ctx: SchemaContext[Any]) -> FieldType | None:
    """The fields a partitioned output reads: its template's, ``partition_by``, ``time_field``.

    So that ``validate`` warns of a field the records do not have (every record would go
    to the default partition), as for any other template.
    """
    cfg = ctx.config
    template = cfg.target() if hasattr(cfg, "target") else cfg.path_template
    ctx.read_template(("path_template" if "path_template" in cfg.model_fields_set else "path",),
                      template, skip=BUILTINS)
    for i, name in enumerate(cfg.partition_by):
        if name not in BUILTINS:
            ctx.read(("partition_by", i), name)
    if cfg.time_field is not None:
        ctx.read(("time_field",), cfg.time_field)
    return None


# -- paths -------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-+@ ]")


def path_value(value: Any) -> str:
    """A value as one path segment, never a directory of its own.

    Null is Hive's default partition; unsafe characters (``/``, ``=``, ``%``...) are
    percent-encoded.
    """
    if value is None or value == "":
        return DEFAULT_PARTITION
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = str(value)
    text = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)
    if set(text) == {"."}:
        text = text.replace(".", "%2E")
    return text


@dataclass(frozen=True)
class Target:
    """Where one record goes: its partition directory and the file name's stem and suffix."""

    directory: str
    stem: str
    suffix: str
    dataset: str | None = None  # the input, when the paths name it: its own columns


class PathTemplate:
    """Renders ``path_template`` and ``partition_by`` for records.

    The template's last segment is the file name (``part`` when the template ends with
    ``/``); its directories and the ``partition_by`` directories not already in it
    (``key=`` segments) make the record's partition.
    """

    def __init__(self, template: str, fmt: str, options: LakeOptions) -> None:
        directory, _, name = template.rpartition("/")
        self.prefix = _fixed_prefix(template)
        ext = EXTENSIONS[fmt]
        if not name:
            name = "part" + ext
        elif not name.endswith(ext):
            name += ext
        self.stem_text = name[: -len(ext)]
        self.suffix = ext
        present = {seg.split("=", 1)[0] for seg in directory.split("/") if "=" in seg}
        self.partition_keys = [k for k in options.partition_by if k not in present]
        parts = ([directory] if directory else []) + [
            f"{k}={{{{{k}}}}}" for k in self.partition_keys]
        self.dir_text = "/".join(parts)
        self.dir_render = _renderer(self.dir_text)
        self.stem_render = _renderer(self.stem_text)
        used = placeholders(self.dir_text) + placeholders(self.stem_text)
        self.fields = frozenset(used)  # what the path holds (a file's columns may not)
        self.needs_time = any(n in TIME_PARTS for n in used)
        self.needs_input = "source" in used
        self.time_of = getter(options.time_field) if options.time_field else None
        self.time_unit = options.time_unit

    def target(self, record: dict[str, Any], now: datetime) -> Target:
        """The partition and file name of ``record`` (RecordError: no usable event time)."""
        directory, stem, dataset = self.place(record, now)
        return Target(directory, stem, self.suffix, dataset)

    def place(self, record: dict[str, Any], now: datetime) -> tuple[str, str, str | None]:
        """The directory, file stem and dataset of ``record`` (:meth:`target`'s fields)."""
        values: dict[str, str] = {}
        if self.needs_time:
            when = now
            if self.time_of is not None:
                raw = self.time_of(record)
                if raw is None:
                    msg = "the record has no time_field value"
                    raise RecordError(msg)
                when = datetime.fromtimestamp(to_epoch_seconds(raw, self.time_unit), UTC)
            values.update(year=f"{when.year:04d}", month=f"{when.month:02d}",
                          day=f"{when.day:02d}", hour=f"{when.hour:02d}")
        dataset = None
        if self.needs_input:
            meta = record.get(META)
            dataset = meta.get(INPUT) if isinstance(meta, dict) else None
            values["source"] = path_value(dataset)
        directory, stem = self.dir_render(record, values), self.stem_render(record, values)
        # A segment no file system holds is the record's fault: refused alone (a failed
        # write would stop the run, and every resume, on it).
        for segment in (*directory.split("/"), stem + _NAME_ROOM):
            if len(segment) > _NAME_MAX // 4 and len(segment.encode()) > _NAME_MAX:
                shown = segment if len(segment) <= 60 else segment[:57] + "..."
                msg = (f"the path segment {shown!r} made for the record is "
                       f"{len(segment.encode())} bytes; a file name holds at most {_NAME_MAX}")
                raise RecordError(msg)
        return directory, stem, dataset


_NAME_MAX = 255  # bytes of a file name (ext4, xfs, apfs; S3 keys: 1024 in all)
_NAME_ROOM = "-000000000000-000000.parquet"  # what a file's stem gets: run, number, suffix


def _fixed_prefix(template: str) -> str:
    """The fixed directories of ``template`` (``out/`` of ``out/year={{year}}/x``).

    The journal lives there.
    """
    head = template.split("{{", 1)[0]
    if "{{" not in template:
        head = template.rpartition("/")[0] + "/" if "/" in template else ""
    return head.rpartition("/")[0] + "/" if "/" in head else ""


def _renderer(text: str) -> Callable[[dict[str, Any], dict[str, str]], str]:
    parts = re.split(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}", text)
    literals, names = parts[0::2], parts[1::2]
    getters = [None if n in BUILTINS else getter(n) for n in names]
    if not names:
        return lambda record, values: text

    def render(record: dict[str, Any], values: dict[str, str]) -> str:
        out = [literals[0]]
        for name, get, lit in zip(names, getters, literals[1:], strict=True):
            if get is None:
                out.append(values[name])
            else:
                value = get(record)
                try:
                    out.append(_segment(value))
                except TypeError:  # unhashable (a list, a dict)
                    out.append(path_value(value))
            out.append(lit)
        return "".join(out)

    return render


_segment = functools.lru_cache(maxsize=4096, typed=True)(path_value)
""":func:`path_value` of the values seen last (partition values repeat)."""


# -- storage -----------------------------------------------------------------------------

class Storage(Protocol):
    """Where complete files go: a directory tree or an object store."""

    def publish(self, local: Path, key: str) -> None:
        """Make ``local`` the object ``key`` in one step (rename, or a completed upload)."""

    def put_text(self, key: str, text: str) -> None:
        """Write a small object."""

    def get_text(self, key: str) -> str | None:
        """A small object's text, ``None`` when absent."""

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""

    def list(self, prefix: str) -> list[str]:
        """The keys under ``prefix``."""

    def scratch(self, prefix: str) -> Path:
        """An empty local directory for files being written under ``prefix``."""

    def show(self, key: str) -> str:
        """``key`` as users know it (a path, an ``s3://`` URL)."""

    def transient(self, exc: BaseException) -> bool:
        """Whether a call's failure is worth retrying (a lost connection)."""


class LocalStorage:
    """Files on the local file system; keys are paths."""

    @staticmethod
    def transient(exc: BaseException) -> bool:
        """No failure of a local file system mends by waiting (a full disk is an error)."""
        return False

    def publish(self, local: Path, key: str) -> None:
        """Rename ``local`` to ``key`` (atomic on one file system)."""
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, key)

    def put_text(self, key: str, text: str) -> None:
        """Write ``text`` to ``key`` through a temporary file and a rename."""
        path = Path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def get_text(self, key: str) -> str | None:
        """The text of ``key``, ``None`` when absent."""
        try:
            return Path(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        Path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        """The files directly in the directory ``prefix``."""
        try:
            return sorted(str(p) for p in Path(prefix).iterdir() if p.is_file()
                          and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def scratch(self, prefix: str) -> Path:
        """``<prefix>tmp/``, emptied: beside the output, so a rename publishes a file."""
        path = Path(prefix + "tmp")
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def show(self, key: str) -> str:
        """The path."""
        return key


# -- formats -----------------------------------------------------------------------------

class _Open(ABC):
    """One file being written: its target, temporary path, records and bytes so far."""

    def __init__(self, target: Target, tmp: Path, opened: float) -> None:
        self.target, self.tmp, self.opened = target, tmp, opened
        self.records = 0
        self.bytes = 0

    @abstractmethod
    def add(self, records: list[dict[str, Any]], max_bytes: int | None) -> tuple[int, list[Failed]]:
        """Write the leading ``records`` until the file holds ``max_bytes``.

        Returns how many it took (the refused ones included) and the refused ones.
        """

    @abstractmethod
    def finish(self) -> None:
        """Complete the temporary file."""


class _Lines(_Open):
    """JSON lines: one line per record."""

    def __init__(self, target: Target, tmp: Path, opened: float, step: str) -> None:
        super().__init__(target, tmp, opened)
        self.step = step
        self.f = tmp.open("wb")

    def line(self, record: dict[str, Any]) -> bytes:
        """``record`` as its line; RecordError when the format cannot hold it."""
        return record_line(record)

    def add(self, records: list[dict[str, Any]], max_bytes: int | None) -> tuple[int, list[Failed]]:
        refused: list[Failed] = []
        lines = []
        limit = max_bytes or 1 << 62
        used = 0
        for r in records:
            used += 1
            try:
                line = self.line(r)
            except RecordError as exc:
                refused.append(Failed.of(self.step, exc, r))
                continue
            lines.append(line)
            self.bytes += len(line)
            self.records += 1
            if self.bytes >= limit:
                break
        self.f.write(b"".join(lines))
        return used, refused

    def finish(self) -> None:
        self.f.close()


def csv_value(value: Any) -> Any:
    """A value as CSV writes it: nested values as JSON, booleans as true/false, bytes as hex."""
    value = json_value(value)
    if isinstance(value, dict | list):
        return json_line(value)[:-1].decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def column_problem(step: str, record: dict[str, Any], columns: list[str],
                   fmt: str = "CSV", known: frozenset[str] | None = None) -> str | None:
    """Why ``record`` has no row under ``columns`` (a field without a column).

    ``known``: the fields that need no column (``columns`` and any other), when known.
    """
    known = frozenset(columns) if known is None else known
    extra = [k for k in record if k not in known and k != META]
    if not extra:
        return None
    return (f"step {step!r}: field(s) {', '.join(extra)} are not among the {fmt} columns "
            f"({', '.join(columns)}); list every column in 'columns'")


def csv_line(step: str, record: dict[str, Any], columns: list[str]) -> bytes:
    """``record`` as one CSV line under ``columns``; RecordError when CSV cannot hold it."""
    problem = column_problem(step, record, columns)
    if problem is not None:
        raise RecordError(problem)
    buf = io.StringIO()
    try:
        csv.writer(buf, lineterminator="\n").writerow([csv_value(record.get(c)) for c in columns])
        return buf.getvalue().encode()
    except (csv.Error, UnicodeEncodeError) as exc:
        msg = f"step {step!r}: the record cannot be written as CSV: {exc}"
        raise RecordError(msg) from None


class _Csv(_Lines):
    """CSV under fixed columns, after a header line."""

    def __init__(self, target: Target, tmp: Path, opened: float, step: str,
                 columns: list[str]) -> None:
        super().__init__(target, tmp, opened, step)
        self.columns = columns
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(columns)
        self.f.write(header.getvalue().encode())

    def line(self, record: dict[str, Any]) -> bytes:
        """``record`` as its CSV line; RecordError when CSV cannot hold it."""
        return csv_line(self.step, record, self.columns)


class ParquetSchema:
    """The Arrow schema records are written with.

    It is learned from the first records (the first non-null value of a field sets its
    type), ordered and limited by ``columns`` when given.

    A field seen for the first time, the first value of a field so far always null, or a
    fraction in an integer field widens the schema (the file rolls: a Parquet file has one
    schema); a value that does not convert to its field's type refuses its record.
    """

    def __init__(self, step: str, columns: list[str] | None, schema: Any = None,
                 in_path: frozenset[str] = frozenset()) -> None:
        self.step, self.columns, self.schema = step, columns, schema
        self.in_path = in_path  # fields the path holds: not refused for want of a column

    def widen(self, rows: list[dict[str, Any]]) -> bool:
        """Learn the fields of ``rows`` not known yet; whether the schema changed."""
        import pyarrow as pa

        known = {} if self.schema is None else {f.name: f.type for f in self.schema}
        names = self.columns or [k for k in dict.fromkeys(k for r in rows for k in r)
                                 if k != META]
        changed = self.schema is None
        for name in names:
            have = known.get(name)
            if have is not None and pa.types.is_integer(have):
                if _fraction(r.get(name) for r in rows):  # integers become doubles
                    known[name], changed = pa.float64(), True
                continue
            if have is not None and not pa.types.is_null(have):
                continue
            typ = _type_of([r.get(name) for r in rows])
            if name not in known or not pa.types.is_null(typ):
                changed = changed or known.get(name) != typ
                known[name] = typ
        if changed:
            order = self.columns or list(known)
            self.schema = pa.schema([(n, known[n]) for n in order])
        return changed

    def table(self, rows: list[dict[str, Any]], schema: Any) -> tuple[Any, list[int]]:
        """``rows`` as an Arrow table of ``schema``, and the indexes of the rows refused."""
        import pyarrow as pa

        try:
            return pa.Table.from_pylist(rows, schema=schema), []
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        good, bad = [], []
        for i, r in enumerate(rows):
            try:
                pa.Table.from_pylist([r], schema=schema)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                bad.append(i)
            else:
                good.append(r)
        return pa.Table.from_pylist(good, schema=schema), bad

    def problem(self, record: dict[str, Any], schema: Any) -> str:
        """Which field of ``record`` does not convert to ``schema``, and why."""
        import pyarrow as pa

        for f in schema:
            value = record.get(f.name)
            try:
                pa.array([value], type=f.type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                shown = repr(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                return (f"step {self.step!r}: field {f.name!r} is {a_or_an(type(value).__name__)} "
                        f"({shown}), the Parquet column is {f.type}")
        return f"step {self.step!r}: the record does not fit the Parquet schema"


def _fraction(values: Iterable[Any]) -> bool:
    """Whether a value is a float: Arrow would cut it to an integer column without a word."""
    return any(isinstance(v, float) for v in values)


def _type_of(values: list[Any]) -> Any:
    """The Arrow type of a field's values (of the first non-null one when they differ).

    An integer type becomes a double when a value is a fraction, as in :meth:`widen`.
    """
    import pyarrow as pa

    present = [v for v in values if v is not None]
    for sample in (present, present[:1]):
        try:
            typ = pa.array(sample).type
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            continue
        return pa.float64() if pa.types.is_integer(typ) and _fraction(present) else typ
    return pa.string()


class _Parquet(_Open):
    def __init__(self, target: Target, tmp: Path, opened: float, schema: ParquetSchema) -> None:
        import pyarrow.parquet as pq

        super().__init__(target, tmp, opened)
        self.schema = schema
        self.file_schema = schema.schema
        self.writer = pq.ParquetWriter(tmp, self.file_schema)
        self.waiting: list[Any] = []
        self.waiting_rows = 0
        self.waiting_bytes = 0
        self.written = 0

    def current(self) -> bool:
        """Whether the file's schema is still the output's (it did not widen since)."""
        return bool(self.file_schema.equals(self.schema.schema))

    def add(self, records: list[dict[str, Any]], max_bytes: int | None) -> tuple[int, list[Failed]]:
        taken, refused = len(records), []
        columns = self.schema.columns
        if columns:  # a field without a column is refused, as in CSV (not dropped)
            fits = []
            known = frozenset(columns) | self.schema.in_path  # the path holds those
            for r in records:
                problem = column_problem(self.schema.step, r, columns, "Parquet", known)
                if problem is None:
                    fits.append(r)
                else:
                    refused.append(Failed(self.schema.step, "RecordError", problem, r,
                                          r.get(META) or {}))
            records = fits
        table, bad = self.schema.table(records, self.file_schema)  # without _meta
        refused += [Failed(self.schema.step, "ParquetTypeError", self.schema.problem(records[i],
                                                                           self.file_schema),
                           records[i], records[i].get(META) or {}) for i in bad]
        if table.num_rows:
            self.waiting.append(table)
            self.waiting_rows += table.num_rows
            self.waiting_bytes += table.nbytes
            self.records += table.num_rows
            if self.waiting_rows >= _ROW_GROUP_ROWS:
                self.write_row_group()
        self.bytes = self.written + self.waiting_bytes
        return taken, refused

    def write_row_group(self) -> None:
        """Write the rows waiting as one row group."""
        import pyarrow as pa

        if self.waiting:
            self.writer.write_table(pa.concat_tables(self.waiting))
            self.waiting, self.waiting_rows, self.waiting_bytes = [], 0, 0
            self.written = os.path.getsize(self.tmp)

    def finish(self) -> None:
        self.write_row_group()
        self.writer.close()


# -- the writer --------------------------------------------------------------------------

@dataclass
class LakeState:
    """The snapshot of a partitioned output.

    Its run, the number of the next file, and what fixes the files' layout (CSV columns,
    the Parquet schema). Nothing is open when it is taken: every file rolls at a snapshot.
    """

    run: str
    next_file: int = 0
    columns: dict[str | None, list[str]] = field(default_factory=dict)
    schemas: dict[str | None, Any] = field(default_factory=dict)
    kept: int = 0  # one file appended to: its rows kept from before the run
    rows: int = 0  # one file: the rows of the parts published so far
    journal: str | None = None  # where the run notes what it publishes (under its template)


def _cast(table: Any, schema: Any) -> Any:
    """``table`` with the columns of ``schema`` (missing ones null, types widened)."""
    import pyarrow as pa

    names = table.schema.names
    arrays = [table.column(f.name).cast(f.type) if f.name in names
              else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class LakeOutput:
    """What a partitioned output needs: its step, format, paths, settings and storage."""

    step: str
    fmt: str
    template: PathTemplate
    options: LakeOptions
    storage: Callable[[], Storage]
    one_file: OneFile | None = None
    retry: Retry = field(default_factory=Retry)
    """How the storage's transient failures are retried (the workflow's ``config.retry``)."""


@dataclass(frozen=True)
class OneFile:
    """A one-file Parquet output, written through parts.

    The file, and whether a run adds to it (``write_mode: append``) or rewrites it.
    """

    path: Path
    append: bool


# What the outputs that reached the end of their input leave for a resume, by run id: the
# parts directories of one-file outputs and the journals of partitioned ones, needed by a
# resume from an earlier snapshot until the run has committed its last one, when the runner
# calls :func:`remove_one_file_parts`.
_AFTER_RUN: dict[str, dict[str, Callable[[], None]]] = {}
_WRITTEN_LOCK = threading.Lock()


_JOURNAL_KEEP: list[float | None] = []  # the runs under way, each its retention (below)


@contextlib.contextmanager
def journal_retention(seconds: float | None) -> Iterator[None]:
    """Runs in this block need journal entries ``seconds`` after a snapshot (``None``: all).

    A partitioned output journals each file it publishes, and a resume undoes what was
    published after the snapshot it resumes from, which the runner knows to be at most its
    backup interval (and a few epochs) old. Older entries are deleted at each snapshot, so
    a streaming output's journal stays small. Under ``python -m bytewax.run`` the backup
    interval is not known: the journal is kept for the whole run there.
    """
    with _WRITTEN_LOCK:
        _JOURNAL_KEEP.append(seconds)
    try:
        yield
    finally:
        with _WRITTEN_LOCK:
            _JOURNAL_KEEP.remove(seconds)


def _journal_keep() -> float | None:
    with _WRITTEN_LOCK:
        if not _JOURNAL_KEEP or None in _JOURNAL_KEEP:
            return None
        return max(k for k in _JOURNAL_KEEP if k is not None)


def remove_one_file_parts(run: str, completed: bool) -> None:
    """After run ``run``: remove what its outputs kept for a resume (parts, journals).

    Only a ``completed`` run's: a stopped or failed one keeps them for its resume (the
    journal says which files a crashed execution published after the last snapshot, and
    the rows an appended file held before the run).
    """
    with _WRITTEN_LOCK:
        kept = _AFTER_RUN.pop(run, {})
    for remove in kept.values() if completed else ():
        remove()


def _after_run(run: str, what: str, remove: Callable[[], None]) -> None:
    with _WRITTEN_LOCK:
        _AFTER_RUN.setdefault(run, {})[what] = remove


class _LakeLogic(StatefulBatchLogic[Batch, list[Failed], LakeState]):
    def __init__(self, out: LakeOutput, state: LakeState | None) -> None:
        self.out = out
        self.storage = out.storage()
        fresh = state is None
        self.state = state or LakeState(os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex)
        self.journal = f"{out.template.prefix}{JOURNAL}/{out.step}/{self.state.run[:12]}/"
        self.scratch = self.storage.scratch(self.journal)
        if fresh and out.one_file is not None:
            self._start_one_file(out.one_file)
        if not fresh or os.environ.get(RUN_ID_ENV):
            # The journal of the snapshot's run, also when the template has changed since:
            # what the crashed execution published under the old one is found and undone.
            noted = self.state.journal or self.journal
            self._storage_call(noted, self._undo_after, self.state.next_file, noted)
        self.state.journal = self.journal
        # Journal entries below ``forgotten`` are gone (undone above, or pruned); the
        # snapshots taken since, as (time, next file), until they are older than needed.
        self.forgotten = self.state.next_file if not fresh else 0
        self.taken: collections.deque[tuple[float, int]] = collections.deque()
        self.open: dict[Target, _Open] = {}
        self.schemas = {k: ParquetSchema(out.step, out.options.columns, v, out.template.fields)
                        for k, v in self.state.schemas.items()}
        self.refused: list[Failed] = []

    def _start_one_file(self, one: OneFile) -> None:
        """Start a new run of a one-file output.

        Other runs' parts are removed; an appended file's rows and schema are kept.
        """
        import pyarrow.parquet as pq

        parts = Path(self.out.template.prefix)
        mine = f"-{self.state.run[:12]}-"
        for p in parts.iterdir() if parts.is_dir() else ():
            if p.name == JOURNAL:
                for run in (p / self.out.step).glob("*"):
                    if run.name != self.state.run[:12]:
                        shutil.rmtree(run, ignore_errors=True)
            elif p.is_file() and mine not in p.name:
                p.unlink()
        if not one.append or not one.path.exists() or not one.path.stat().st_size:
            return
        # The count is journaled: a restart of this run before its first snapshot keeps
        # the same rows, even if the crashed execution had written the file already.
        kept = self.storage.get_text(f"{self.journal}kept")
        if kept is None:
            kept = str(pq.read_metadata(one.path).num_rows)
            self.storage.put_text(f"{self.journal}kept", kept)
        self.state.kept = int(kept)
        self.state.schemas[None] = pq.read_schema(one.path)

    def _one_file(self, one: OneFile) -> None:
        """Write the one file: the rows kept, then the parts in order; remove the parts.

        A crashed execution may have written the file and removed (in order) parts that
        the snapshot resumed from counts: their rows are then the file's first rows after
        the kept ones, and are taken from it.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        mine = f"-{self.state.run[:12]}-"
        parts = sorted(p for p in Path(self.out.template.prefix).glob(f"*{mine}*")
                       if p.is_file() and p.name.endswith(self.out.template.suffix))
        missing = self.state.rows - sum(pq.read_metadata(p).num_rows for p in parts)
        head_rows = self.state.kept + missing
        head = pq.ParquetFile(one.path) if head_rows and one.path.exists() else None
        schemas = ([head.schema_arrow] if head else []) + [pq.read_schema(p) for p in parts]
        final = (pa.unify_schemas(schemas, promote_options="permissive") if schemas
                 else pa.schema([]))
        columns = self.out.options.columns
        if columns:
            final = pa.schema([final.field(c) if c in final.names else pa.field(c, pa.null())
                               for c in columns])
        if head is None and len(parts) == 1 and pq.read_schema(parts[0]).equals(final):
            os.replace(parts[0], one.path)  # the whole run in one part (no snapshot came)
            return
        tmp = one.path.with_name(f".{one.path.name}.tmp")
        with pq.ParquetWriter(tmp, final) as writer:  # a row group at a time: the least memory
            left = head_rows
            for i in range(head.num_row_groups if head is not None else 0):
                if left <= 0 or head is None:
                    break
                group = head.read_row_group(i)
                writer.write_table(_cast(group.slice(0, left), final))
                left -= group.num_rows
            for p in parts:
                part = pq.ParquetFile(p)
                for i in range(part.num_row_groups):
                    writer.write_table(_cast(part.read_row_group(i), final))
                part.close()
        if head is not None:
            head.close()
        os.replace(tmp, one.path)
        for p in parts:  # in order: what a crash leaves is a suffix (see above)
            p.unlink()

    def _undo_after(self, number: int, journal: str) -> None:
        """Delete what a crashed execution published from file ``number`` on (``journal``).

        The journal entries before it are forgotten: the snapshot resumed from has them.
        """
        for key in self.storage.list(journal):
            name = key.rsplit("/", 1)[-1]
            if not name.isdigit():
                continue
            if int(name) >= number:
                published = self.storage.get_text(key)
                if published:
                    self.storage.delete(published.strip())
            self.storage.delete(key)

    def _forget(self, journal: str) -> None:
        """Delete the journal of a run whose every file is its output (it completed)."""
        for key in self.storage.list(journal):
            if key.rsplit("/", 1)[-1].isdigit():
                self.storage.delete(key)
        if isinstance(self.storage, LocalStorage):  # its directories too, when empty
            path = Path(journal)
            for directory in (path, path.parent, path.parent.parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    def _file(self, target: Target, rows: list[dict[str, Any]]) -> _Open:
        f = self.open.get(target)
        schema = None
        if self.out.fmt == "parquet":
            schema = self.schemas.get(target.dataset)
            if schema is None:
                schema = ParquetSchema(self.out.step, self.out.options.columns,
                                       in_path=self.out.template.fields)
                self.schemas[target.dataset] = schema
            schema.widen(rows)
            if isinstance(f, _Parquet) and not f.current():
                self._roll(f)
                f = None
        if f is None:
            if len(self.open) >= _MAX_OPEN:  # bounded: the file open longest completes
                self._roll(min(self.open.values(), key=lambda o: o.opened))
            tmp = self.scratch / f"{self.state.next_file:08d}.part"
            now = time.time()
            if self.out.fmt == "jsonl":
                f = _Lines(target, tmp, now, self.out.step)
            elif self.out.fmt == "csv":
                columns = self.state.columns.get(target.dataset)
                if columns is None:
                    columns = self.out.options.columns or list(
                        dict.fromkeys(k for r in rows for k in r if k != META))
                    self.state.columns[target.dataset] = columns
                f = _Csv(target, tmp, now, self.out.step, columns)
            else:
                assert schema is not None
                f = _Parquet(target, tmp, now, schema)
            self.open[target] = f
            self.state.next_file += 1
        return f

    def _roll(self, f: _Open) -> None:
        """Complete ``f``: journal its final name, then publish it under that name."""
        del self.open[f.target]
        f.finish()
        number = int(f.tmp.name.split(".", 1)[0])
        if f.records == 0:
            f.tmp.unlink(missing_ok=True)
            return
        t = f.target
        name = f"{t.stem}-{self.state.run[:12]}-{number:06d}{t.suffix}"
        key = f"{t.directory}/{name}" if t.directory else name
        self._storage_call(key, self.storage.put_text, f"{self.journal}{number:08d}", key)
        self._storage_call(key, self.storage.publish, f.tmp, key)
        self.state.rows += f.records

    def _storage_call(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, transient failures retried; a failure names the step and the key."""
        shown, step = self.storage.show(key), self.out.step  # a graceful stop passes:
        return call_retrying(f"step {step!r}: writing {shown}",  # the resume writes it
                             functools.partial(fn, *args), self.out.retry,
                             self.storage.transient, f"step {step!r}: cannot write {shown}")

    def on_batch(self, values: list[Batch]) -> tuple[list[list[Failed]], bool]:
        now = datetime.now(UTC)
        groups: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
        template = self.out.template
        place = template.place
        for batch in values:
            for r in batch:
                try:
                    where = place(r, now)
                except RecordError as exc:
                    self.refused.append(Failed.of(self.out.step, exc, r))
                    continue
                rows = groups.get(where)
                if rows is None:
                    groups[where] = [r]
                else:
                    rows.append(r)
        for (directory, stem, dataset), rows in groups.items():
            self._add(Target(directory, stem, template.suffix, dataset), rows)
        return self._emit(), False

    def _add(self, target: Target, rows: list[dict[str, Any]]) -> None:
        opts = self.out.options
        while rows:
            f = self._file(target, rows)
            chunk = rows if opts.max_records is None else rows[: opts.max_records - f.records]
            used, refused = f.add(chunk, opts.max_bytes)
            self.refused.extend(refused)
            rows = rows[used:]
            if isinstance(f, _Parquet):
                self._bound_waiting()
            full = opts.max_records is not None and f.records >= opts.max_records
            if full or (opts.max_bytes is not None and f.bytes >= opts.max_bytes):
                self._roll(f)

    def _bound_waiting(self) -> None:
        """Write row groups, the largest first, until the rows waiting fit the budget."""
        waiting = [f for f in self.open.values() if isinstance(f, _Parquet) and f.waiting]
        total = sum(f.waiting_bytes for f in waiting)
        for f in sorted(waiting, key=lambda f: -f.waiting_bytes):
            if total <= _WAITING_BYTES:
                break
            total -= f.waiting_bytes
            f.write_row_group()

    def _emit(self) -> list[list[Failed]]:
        out, self.refused = self.refused, []
        return [out] if out else []

    def notify_at(self) -> datetime | None:
        interval = self.out.options.flush_interval
        if interval is None or not self.open:
            return None
        first = min(f.opened for f in self.open.values())
        return datetime.fromtimestamp(first, UTC) + timedelta(seconds=interval)

    def on_notify(self) -> tuple[list[list[Failed]], bool]:
        interval = self.out.options.flush_interval or 0.0
        now = time.time()
        for f in [f for f in self.open.values() if now - f.opened >= interval]:
            self._roll(f)
        return self._emit(), False

    def on_eof(self) -> tuple[list[list[Failed]], bool]:
        self._roll_all()
        shutil.rmtree(self.scratch, ignore_errors=True)  # empty: every file was published
        if self.out.one_file is not None:
            self._storage_call(str(self.out.one_file.path), self._one_file, self.out.one_file)
            prefix = self.out.template.prefix
            remove = functools.partial(shutil.rmtree, prefix, ignore_errors=True)
        else:  # the journal: one entry per file published, in the output's directory
            prefix = self.journal
            remove = functools.partial(self._forget, self.journal)
        if skip_snapshots():  # no resume will read it: nothing is left beside
            remove()
        else:  # kept until the last snapshot is committed (remove_one_file_parts)
            _after_run(self.state.run, prefix, remove)
        return self._emit(), False

    def _roll_all(self) -> None:
        for f in list(self.open.values()):
            self._roll(f)

    def _prune_journal(self) -> None:
        """Delete the journal entries no resume can need.

        Those of files before a snapshot older than the retention (:func:`journal_retention`):
        every resume starts from that snapshot or a later one.
        """
        keep = _journal_keep()
        if keep is None:
            return
        now = time.monotonic()
        self.taken.append((now, self.state.next_file))
        floor = self.forgotten
        while self.taken and self.taken[0][0] <= now - keep:
            floor = self.taken.popleft()[1]
        for number in range(self.forgotten, floor):
            key = f"{self.journal}{number:08d}"
            self._storage_call(key, self.storage.delete, key)
        self.forgotten = max(floor, self.forgotten)

    def snapshot(self) -> LakeState:
        self._roll_all()
        self._prune_journal()
        st = self.state
        return LakeState(st.run, st.next_file, dict(st.columns),
                         {k: v.schema for k, v in self.schemas.items()}, st.kept, st.rows,
                         st.journal)


class _ConformLogic(StatefulBatchLogic[Batch, tuple[Batch, list[Failed]], Any]):
    """Refuses, one at a time, the records one CSV file cannot hold."""

    def __init__(self, step: str, columns: list[str] | None) -> None:
        self.step, self.columns = step, columns

    def on_batch(self, values: list[Batch]) -> tuple[list[tuple[Batch, list[Failed]]], bool]:
        good: Batch = []
        bad: list[Failed] = []
        for batch in values:
            if self.columns is None and batch:  # the sink takes the same columns
                self.columns = list(dict.fromkeys(k for r in batch for k in r if k != META))
            for r in batch:
                try:
                    csv_line(self.step, r, self.columns or [])
                except RecordError as exc:
                    bad.append(Failed.of(self.step, exc, r))
                else:
                    good.append(r)
        return [(good, bad)], False

    def snapshot(self) -> Any:
        return self.columns


@dataclass(frozen=True)
class ConformOut:
    """The records a file can hold, and the others (refused)."""

    down: Stream[Batch]
    errs: Stream[list[Failed]]


@operator
def conform(step_id: str, up: Stream[Batch], step: str, columns: list[str] | None) -> ConformOut:
    """Refuse the records one CSV file cannot hold, so the rest is written.

    Refused: a field without a column, text UTF-8 cannot encode.

    ``columns``: the file's columns when known (configured, or the header of a file
    appended to); else the first records' fields.
    """
    keyed = op.key_on("key", up, lambda _batch: "0")
    checked = op.stateful_batch(
        "check", keyed, lambda state: _ConformLogic(step, state or columns))
    pairs = op.map("unkey", checked, lambda kv: kv[1])
    return ConformOut(op.filter_map("down", pairs, lambda p: p[0] or None),
                      op.filter_map("errs", pairs, lambda p: p[1] or None))


@operator
def lake_output(step_id: str, up: Stream[Batch], out: LakeOutput) -> Stream[list[Failed]]:
    """Write ``up`` as partitioned, rolling files; returns the records refused.

    One writer (a single key) numbers the files, so their names, and the journal that
    lets a resumed run undo a crashed one, are deterministic.
    """
    if out.one_file is not None:  # the file is written even when no record comes
        up = op.merge("started", up, op.input("start", up.flow(), Once()))
    keyed = op.key_on("writer", up, lambda _batch: "0")
    written = op.stateful_batch("write", keyed, lambda state: _LakeLogic(out, state))
    refused = op.map("refused", written, lambda kv: kv[1])
    op.output("done", refused, Discard())
    return refused
