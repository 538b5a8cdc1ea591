"""The ``enrich`` transformation: add data from HTTP APIs and ONNX models, in order.

``http_api`` renders ``url``, ``headers`` and ``body_template`` for each record (``{{path}}``
templates), sends the requests of one batch in parallel (at most ``concurrency`` at once,
from an asyncio event loop in a thread of the worker), caches answers by the rendered
request (``cache: {ttl, max_entries}``), spaces requests by ``rate_limit`` (per second) and
retries 429 and 5xx answers and broken connections per the workflow's ``config.retry``,
honouring ``Retry-After``. ``response_mapping`` copies ``response.<path>`` into the record.
A request that still fails is an error of the record, handled by ``error_handling``.

``lookup`` copies ``fields`` (default: every column) of the row whose ``lookup_key`` equals
the record's ``key`` from a ``connection``: ``{type: postgres | mysql, table, ...}`` (as a
source's config; values as that source emits them), ``{type: redis, url, pattern}`` (the
hashes of the keys matching ``pattern``) or
``{type: file, path}`` (.jsonl or .csv). The table is loaded before the first
batch is enriched and again each ``refresh``; keys compare as text (a number as its value:
3, 3.0 and a ``numeric`` 3 are one key); an unknown key sets the fields to null. A key read
twice is warned of (the last row wins), and Redis keys that are not hashes are left out.

``ml_scoring`` runs an ONNX model (``model``: file path) once per batch: each input is an
expression over the record (``"{{orders.count}} / 90"``: the braces are optional), fed as
one float32 column; the model's first output (or ``output``) goes to ``output_field``. A
record whose inputs are not numbers is an error of the record.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal

from bytewax.dataflow import Stream
from pydantic import Field, model_validator

from dataflare import stopping
from dataflare.config import Duration, Headers, Strict
from dataflare.connectors.schema import json_value
from dataflare.expr import compile_expression
from dataflare.metrics import ENRICH_CALLS
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import Batch, Failed, RecordError, get_path, message_of, set_path
from dataflare.registry import BuildContext, Outputs, transformation
from dataflare.retry import (
    Interrupted,
    TransientError,
    delays,
    next_wait,
    retry_after_seconds,
)
from dataflare.template import compile_template

log = logging.getLogger(__name__)


class Cache(Strict):
    """Answers kept by the rendered request."""

    ttl: Duration = Field(300.0, description="How long an answer is reused.")
    max_entries: int = Field(10_000, ge=1, description="Answers kept at most (oldest evicted).")


class ResponseMapping(Strict):
    """One value copied from the answer into the record."""

    source: str = Field(description="'response.<path>' in the JSON answer ('response' for all).")
    destination: str = Field(description="Record path written.")


_FIELDS = {
    "http_api": {"url", "method", "headers", "body_template", "response_mapping", "cache",
                 "rate_limit", "concurrency", "timeout"},
    "ml_scoring": {"model", "inputs", "output_field", "output"},
    "lookup": {"connection", "key", "lookup_key", "fields", "refresh"},
}


class Enrichment(Strict):
    """One enrichment step."""

    type: Literal["ml_scoring", "http_api", "lookup"] = Field(description="Enrichment kind.")
    model: str | None = Field(None, description="ml_scoring: ONNX model file.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="ml_scoring: model input name to expression."
    )
    output_field: str | None = Field(None, description="ml_scoring: path of the score.")
    output: str | None = Field(None, description="ml_scoring: model output (default: first).")
    url: str | None = Field(None, description="http_api: endpoint ({{path}} templates, "
                            "their values URL-escaped).")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(
        "GET", description="http_api: method."
    )
    headers: Headers = Field(default_factory=dict, description="http_api: headers.")
    body_template: str | None = Field(None, description="http_api: body (a JSON template).")
    response_mapping: list[ResponseMapping] = Field(
        default_factory=list, description="http_api: response paths to record paths (a path "
        "the answer lacks leaves the record's field as it is; a null in it is written)."
    )
    cache: Cache | None = Field(None, description="http_api: answer cache.")
    rate_limit: float | None = Field(None, gt=0, description="http_api: requests per second.")
    concurrency: int = Field(10, ge=1, description="http_api: requests in flight at most.")
    timeout: Duration = Field(10.0, description="http_api: timeout of one request.")
    connection: dict[str, Any] | None = Field(None, description="lookup: source connection.")
    key: str | None = Field(None, description="lookup: record path of the key.")
    lookup_key: str | None = Field(None, description="lookup: column or field matched.")
    fields: list[str] = Field(default_factory=list, description="lookup: fields copied.")
    refresh: Duration | None = Field(
        None, description="lookup: reload interval (a failed reload is warned; the table "
        "read before stays until the next).")

    @model_validator(mode="after")
    def _fields_of_type(self) -> Enrichment:
        others = set().union(*(f for t, f in _FIELDS.items() if t != self.type))
        given = {k for k in self.model_fields_set if k in others} - _FIELDS[self.type]
        if given:
            msg = f"{', '.join(sorted(given))} not used by a {self.type} enrichment"
            raise ValueError(msg)
        if self.type == "http_api" and not self.url:
            msg = "http_api needs 'url'"
            raise ValueError(msg)
        if self.type == "ml_scoring" and not (self.model and self.inputs and self.output_field):
            msg = "ml_scoring needs 'model', 'inputs' and 'output_field'"
            raise ValueError(msg)
        if self.type == "lookup":
            if not (self.connection and self.key and self.lookup_key):
                msg = "lookup needs 'connection', 'key' and 'lookup_key'"
                raise ValueError(msg)
            _lookup_connection(self.connection)
        for m in self.response_mapping:
            if m.source != "response" and not m.source.startswith("response."):
                msg = f"response_mapping source {m.source!r} must start with 'response.'"
                raise ValueError(msg)
        return self


class EnrichConfig(Strict):
    """Settings of an ``enrich`` transformation."""

    enrichments: list[Enrichment] = Field(description="Steps, applied in order.")


# A stage enriches a batch in place: ``records[i]`` is replaced, or ``errors[i]`` set.
Stage = Callable[[list[Any], list[BaseException | None]], None]


class _Transient(TransientError):
    """A failed lookup worth retrying."""


class _Loop:
    """An asyncio event loop running in a daemon thread (one per enrichment)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class HttpStage:
    """An ``http_api`` enrichment."""

    def __init__(self, step: str, cfg: Enrichment, retry: Any) -> None:
        import aiohttp

        self.step, self.cfg, self.retry, self.waits = step, cfg, retry, delays(retry)
        self.url = compile_template(cfg.url or "", url_escape=True)  # a value: one segment
        self.headers = {k: compile_template(v) for k, v in cfg.headers.items()}
        self.body = compile_template(cfg.body_template, json_escape=True) if (
            cfg.body_template) else None
        self.mapping = [(m.source.removeprefix("response").removeprefix("."), m.destination)
                        for m in cfg.response_mapping]
        self.cache: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.loop = _Loop()
        self.client: Any = None
        self.aiohttp = aiohttp
        self.next_slot = 0.0
        self.calls = ENRICH_CALLS

    def _render(self, record: Any) -> tuple[str, dict[str, str], str | None]:
        return (self.url(record), {k: t(record) for k, t in self.headers.items()},
                self.body(record) if self.body else None)

    async def _slot(self) -> None:
        if not self.cfg.rate_limit:
            return
        now = time.monotonic()
        start = max(now, self.next_slot)
        self.next_slot = start + 1.0 / self.cfg.rate_limit
        if start > now:
            await asyncio.sleep(start - now)

    async def _once(self, req: tuple[str, dict[str, str], str | None]) -> Any:
        url, headers, body = req
        await self._slot()
        try:
            async with self.client.request(
                self.cfg.method, url, headers=headers,
                data=body.encode() if body is not None else None,
            ) as resp:
                status, retry_after = resp.status, resp.headers.get("retry-after")
                raw = await resp.read()
        except (self.aiohttp.ClientError, TimeoutError) as exc:
            msg = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _Transient(msg) from None
        if status == 429 or status >= 500:  # noqa: PLR2004
            msg = f"HTTP {status}"
            raise _Transient(msg, retry_after_seconds(retry_after))
        if status >= 400:  # noqa: PLR2004
            msg = f"HTTP {status} from {url.split('?')[0]}"
            raise RecordError(msg)
        try:
            return json.loads(raw)
        except ValueError:
            msg = f"answer of {url.split('?')[0]} is not JSON"
            raise RecordError(msg) from None

    async def _fetch(self, req: tuple[str, dict[str, str], str | None], sem: Any) -> Any:
        async with sem:
            first_failure: float | None = None
            for attempt in range(len(self.waits) + 1):
                try:
                    return await self._once(req)
                except _Transient as exc:
                    if first_failure is None:
                        first_failure = time.monotonic()
                    wait = next_wait(self.retry, self.waits, attempt, exc, first_failure)
                    if wait is None:
                        msg = f"giving up after {attempt + 1} attempt(s): {exc}"
                        raise RecordError(msg) from None
                    if await _stopped_within(wait):
                        msg = (f"step {self.step!r}: {req[0].split('?')[0]}: not retried after "
                               f"{attempt + 1} attempt(s), the run is stopping ({exc})")
                        raise Interrupted(msg, attempt + 1) from exc
        msg = "unreachable"
        raise AssertionError(msg)

    async def _batch(self, reqs: dict[str, tuple[str, dict[str, str], str | None]]) -> list[Any]:
        if self.client is None:
            # aiohttp, not httpx: httpx's pool assigns every queued request to every
            # connection on each event, ~10 ms of CPU per request at 50 in flight; 1,000
            # requests took 10 s against a 20 ms server, where aiohttp takes well under 1 s.
            self.client = self.aiohttp.ClientSession(
                connector=self.aiohttp.TCPConnector(limit=self.cfg.concurrency),
                timeout=self.aiohttp.ClientTimeout(total=self.cfg.timeout),
            )
            atexit.register(self.close)
        sem = asyncio.Semaphore(self.cfg.concurrency)
        return await asyncio.gather(
            *(self._fetch(r, sem) for r in reqs.values()), return_exceptions=True
        )

    def close(self) -> None:
        """Close the connections (at exit: the stage lives as long as its worker)."""
        client, self.client = self.client, None
        if client is not None:
            self.loop.run(client.close())

    def __call__(self, records: list[Any], errors: list[BaseException | None]) -> None:
        """Enrich the records of one batch that have no error yet."""
        now = time.monotonic()
        cache, ttl = self.cache, self.cfg.cache.ttl if self.cfg.cache else 0.0
        keys: list[str | None] = [None] * len(records)
        key: str | None
        todo: dict[str, tuple[str, dict[str, str], str | None]] = {}
        answers: dict[str, Any] = {}
        for i, rec in enumerate(records):
            if errors[i] is not None:
                continue
            try:
                req = self._render(rec)
            except RecordError as exc:  # a URL value of "..": another path
                errors[i] = exc
                continue
            key = json.dumps(req)
            keys[i] = key
            hit = cache.get(key) if self.cfg.cache else None
            if hit is not None and now - hit[0] < ttl:
                answers[key] = hit[1]
                self.calls.labels(self.step, "http_api", "cached").inc()
            else:
                todo[key] = req
        if todo:
            got = self.loop.run(self._batch(todo))
            cut = next((a for a in got if isinstance(a, Interrupted)), None)
            if cut is not None:
                raise cut  # the run is stopping: no verdict on the records
            for key, answer in zip(todo, got, strict=True):
                answers[key] = answer
                ok = not isinstance(answer, BaseException)
                self.calls.labels(self.step, "http_api", "ok" if ok else "failed").inc()
                if ok and self.cfg.cache:
                    cache[key] = (time.monotonic(), answer)
                    cache.move_to_end(key)
                    while len(cache) > self.cfg.cache.max_entries:
                        cache.popitem(last=False)
        for i, key in enumerate(keys):
            if key is None:
                continue
            answer = answers[key]
            if isinstance(answer, BaseException):
                errors[i] = answer
                continue
            out = dict(records[i])
            for src, dst in self.mapping:
                value = get_path(answer, src, _ABSENT) if src else answer
                if value is not _ABSENT:  # a path the answer lacks leaves the field as it is
                    set_path(out, dst, value)
            records[i] = out


_ABSENT = object()


async def _stopped_within(seconds: float) -> bool:
    """Wait ``seconds``, or less if a graceful stop is asked meanwhile (then ``True``)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if stopping.requested():
            return True
        await asyncio.sleep(min(left, 0.2))
    return stopping.requested()


def _lookup_connection(conn: dict[str, Any]) -> Any:
    """The typed config of a lookup's connection.

    A ``postgres`` or ``mysql`` table, a ``redis`` key pattern or a ``file``.
    """
    from dataflare.connectors.mysql import MySqlSourceConfig
    from dataflare.connectors.postgres import PostgresSourceConfig

    kind = conn.get("type")
    rest = {k: v for k, v in conn.items() if k != "type"}
    if kind in ("postgres", "mysql"):
        model = PostgresSourceConfig if kind == "postgres" else MySqlSourceConfig
        cfg = model.model_validate(rest)
        if not cfg.table:
            msg = f"lookup connection of type {kind} needs 'table'"
            raise ValueError(msg)
        return cfg
    if kind == "file":
        path = rest.pop("path", None)
        if not isinstance(path, str) or not path.endswith((".jsonl", ".csv")) or rest:
            msg = "lookup connection of type file takes only 'path' (a .jsonl or .csv file)"
            raise ValueError(msg)
        return path
    if kind == "redis":
        url, pattern = rest.pop("url", None), rest.pop("pattern", None)
        if not isinstance(url, str) or not isinstance(pattern, str) or rest:
            msg = ("lookup connection of type redis takes only 'url' and 'pattern' "
                   "(the keys of the hashes read, e.g. 'customer:*')")
            raise ValueError(msg)
        return _RedisTable(url, pattern)
    msg = f"lookup connection type {kind!r} is not supported (postgres, mysql, redis, file)"
    raise ValueError(msg)


class _RedisTable:
    """The hashes of the Redis keys matching ``pattern``, one row each."""

    def __init__(self, url: str, pattern: str) -> None:
        self.url, self.pattern = url, pattern

    def rows(self) -> list[dict[str, Any]]:
        import redis

        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            keys = list(client.scan_iter(match=self.pattern, count=1000))
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            rows = pipe.execute(raise_on_error=False)
        finally:
            client.close()
        others = [k for k, row in zip(keys, rows, strict=True) if isinstance(row, Exception)]
        if others:  # a string or a list beside the hashes: not a row
            log.warning("lookup: %d key(s) matching %r are not hashes and are left out "
                        "(the first: %r)", len(others), self.pattern, others[0])
        return [dict(row) for row in rows if not isinstance(row, Exception)]


class LookupStage:
    """A ``lookup`` enrichment: a table by key, loaded before the first batch, refreshed."""

    def __init__(self, step: str, cfg: Enrichment, base: Callable[[str], Any]) -> None:
        self.step, self.cfg = step, cfg
        self.conn = _lookup_connection(cfg.connection or {})
        if isinstance(self.conn, str):
            self.conn = base(self.conn)
        self.key = cfg.key or ""
        self.table: dict[Any, dict[str, Any]] = {}
        self.loaded_at: float | None = None

    def _rows(self) -> list[dict[str, Any]]:
        from dataflare.connectors.mysql import MySqlSourceConfig
        from dataflare.connectors.postgres import PostgresSourceConfig

        if isinstance(self.conn, _RedisTable):
            return self.conn.rows()
        if isinstance(self.conn, PostgresSourceConfig | MySqlSourceConfig):
            rows = (self._postgres_rows(self.conn) if isinstance(self.conn, PostgresSourceConfig)
                    else self._mysql_rows(self.conn))
            # as the sources emit them: dates as ISO text, decimals per decimal_handling
            decimals = self.conn.decimal_handling
            return [{k: json_value(v, decimals) for k, v in row.items()} for row in rows]
        text = self.conn.read_text(encoding="utf-8-sig")
        if self.conn.suffix == ".csv":
            import csv
            import io

            return list(csv.DictReader(io.StringIO(text)))
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _columns(self) -> list[str] | None:
        return [self.cfg.lookup_key or "", *self.cfg.fields] if self.cfg.fields else None

    def _postgres_rows(self, cfg: Any) -> list[dict[str, Any]]:
        import psycopg
        from psycopg import sql
        from psycopg.rows import dict_row

        schema, table = cfg.qualified()
        cols = self._columns()
        what = sql.SQL(", ").join(map(sql.Identifier, cols)) if cols else sql.SQL("*")
        query = sql.SQL("SELECT {} FROM {}.{}").format(
            what, sql.Identifier(schema), sql.Identifier(table))
        with psycopg.connect(cfg.conninfo(), row_factory=dict_row) as conn:
            return list(conn.execute(query).fetchall())

    def _mysql_rows(self, cfg: Any) -> list[dict[str, Any]]:
        import pymysql
        from pymysql.cursors import DictCursor

        from dataflare.connectors.mysql import q

        database, table = cfg.qualified()
        cols = self._columns()
        what = ", ".join(q(c) for c in cols) if cols else "*"
        conn = pymysql.connect(**cfg.settings(), cursorclass=DictCursor)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT {what} FROM {q(database)}.{q(table)}")  # noqa: S608
                return list(cur.fetchall())
        finally:
            conn.close()

    def _shown(self) -> str:
        """What the table is read from, for messages (no credentials)."""
        from dataflare.connectors.mysql import MySqlSourceConfig
        from dataflare.connectors.postgres import PostgresSourceConfig

        if isinstance(self.conn, _RedisTable):
            return f"the redis hashes {self.conn.pattern!r}"
        if isinstance(self.conn, PostgresSourceConfig | MySqlSourceConfig):
            kind = "mysql" if isinstance(self.conn, MySqlSourceConfig) else "postgres"
            return f"{kind} table {'.'.join(self.conn.qualified())}"
        return str(self.conn)

    def _load(self) -> None:
        """Read the table; a failed refresh keeps the last one (warned), tried again later."""
        table: dict[Any, dict[str, Any]] = {}
        lk = self.cfg.lookup_key or ""
        try:
            rows = self._rows()
        except Exception as exc:
            msg = f"step {self.step!r}: lookup: cannot read {self._shown()}: {message_of(exc)}"
            if self.loaded_at is None:
                raise RuntimeError(msg) from exc
            log.warning("%s; the table read %.0f s ago is used until the next refresh", msg,
                        time.monotonic() - self.loaded_at)
            self.loaded_at = time.monotonic()
            return
        repeated = []
        for row in rows:
            fields = self.cfg.fields or [k for k in row if k != lk]
            key = _norm(row.get(lk))
            if key in table:
                repeated.append(key)
            table[key] = {f: row.get(f) for f in fields}
        if repeated and self.loaded_at is None:  # said at the first load only
            log.warning("step %r: lookup: %d row(s) of %s repeat a %s already read (the first: "
                        "%r); the last read of each is used", self.step, len(repeated),
                        self._shown(), lk, repeated[0])
        self.table, self.loaded_at = table, time.monotonic()

    def __call__(self, records: list[Any], errors: list[BaseException | None]) -> None:
        """Copy the looked-up fields into each record (``null`` when the key is unknown)."""
        refresh = self.cfg.refresh
        if self.loaded_at is None or (
            refresh is not None and time.monotonic() - self.loaded_at >= refresh
        ):
            self._load()
        empty = dict.fromkeys(self.cfg.fields)
        hits = misses = 0
        for i, rec in enumerate(records):
            if errors[i] is not None:
                continue
            row = self.table.get(_norm(get_path(rec, self.key)))
            hits, misses = (hits + 1, misses) if row is not None else (hits, misses + 1)
            out = dict(rec)
            for f, v in (row if row is not None else empty).items():
                set_path(out, f, v)
            records[i] = out
        ENRICH_CALLS.labels(self.step, "lookup", "ok").inc(hits)
        ENRICH_CALLS.labels(self.step, "lookup", "missing").inc(misses)


def _norm(key: Any) -> Any:
    """Keys compare as text, so that 7 from a record finds '7' from a CSV file.

    A number is written as JSON would write its value, so that 3, 3.0 and a ``numeric``
    3 are one key; booleans as JSON's ``true`` and ``false``.
    """
    if key is None or isinstance(key, str):
        return key
    if key.__class__ is bool:
        return "true" if key else "false"
    if isinstance(key, float | Decimal) and key == key and abs(key) != math.inf \
            and key == int(key):
        return str(int(key))
    return str(key)


_BRACES = re.compile(r"\{\{\s*(.*?)\s*\}\}")


class ScoreStage:
    """An ``ml_scoring`` enrichment: one ONNX inference per batch."""

    def __init__(self, step: str, cfg: Enrichment, path: str) -> None:
        import onnxruntime as ort

        self.step, self.cfg = step, cfg
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        unknown = set(cfg.inputs) - set(names)
        if unknown or len(cfg.inputs) != len(names):
            msg = (f"step {step!r}: model inputs are {names}, the enrichment gives "
                   f"{sorted(cfg.inputs)}")
            raise ValueError(msg)
        self.exprs = {k: compile_expression(_BRACES.sub(r"\1", v)) for k, v in cfg.inputs.items()}
        outs = [o.name for o in self.session.get_outputs()]
        if cfg.output is not None and cfg.output not in outs:
            msg = f"step {step!r}: model has no output {cfg.output!r} (outputs: {outs})"
            raise ValueError(msg)
        self.output = cfg.output or outs[0]

    def _value(self, name: str, record: Any) -> float:
        v = self.exprs[name](record)
        if isinstance(v, bool) or not isinstance(v, int | float):
            msg = f"model input {name!r} is {v!r}, not a number"
            raise RecordError(msg)
        return float(v)

    def __call__(self, records: list[Any], errors: list[BaseException | None]) -> None:
        """Score the records of one batch that have no error yet."""
        import numpy as np

        rows: list[int] = []
        cols: dict[str, list[float]] = {k: [] for k in self.exprs}
        for i, rec in enumerate(records):
            if errors[i] is not None:
                continue
            try:
                values = {k: self._value(k, rec) for k in self.exprs}
            except Exception as exc:  # noqa: BLE001 - the record's error policy decides
                errors[i] = exc
                continue
            rows.append(i)
            for k, v in values.items():
                cols[k].append(v)
        if not rows:
            return
        feed = {k: np.asarray(v, dtype=np.float32).reshape(-1, 1) for k, v in cols.items()}
        (scores,) = self.session.run([self.output], feed)
        ENRICH_CALLS.labels(self.step, "ml_scoring", "ok").inc(len(rows))
        for i, score in zip(rows, scores, strict=True):
            out = dict(records[i])
            flat = np.asarray(score).reshape(-1)
            set_path(out, self.cfg.output_field or "", float(flat[0]) if flat.size == 1 else
                     flat.tolist())
            records[i] = out


def enrich_schema(ctx: SchemaContext[EnrichConfig]) -> FieldType:
    """The input's fields plus what each enrichment writes (each reads the ones before)."""
    out = ctx.input
    for i, e in enumerate(ctx.config.enrichments):
        at = ("enrichments", i)
        if e.type == "http_api":
            for key in ("url", "body_template"):
                ctx.read_template((*at, key), getattr(e, key), schema=out)
            for name, value in e.headers.items():
                ctx.read_template((*at, "headers", name), value, schema=out)
            for m in e.response_mapping:
                out = out.with_path(m.destination, FieldType.of("any"))
        elif e.type == "lookup":
            ctx.read((*at, "key"), e.key, schema=out)
            if not e.fields:  # every column of the looked-up rows: not known here
                out = FieldType("object", out.fields, True, out.origins) if (
                    out.kind == "object") else out
            for f in e.fields:
                out = out.with_path(f, FieldType.of("any"))
        else:
            origins: set[tuple[str, str]] = set()
            for name, text in e.inputs.items():
                plain = text.replace("{{", "  ").replace("}}", "  ")  # columns kept
                t = ctx.read_expression((*at, "inputs", name), plain, schema=out)
                origins |= t.all_origins()
            out = out.with_path(e.output_field or "", FieldType.of("number", origins))
    return out


@transformation("enrich", config=EnrichConfig, description="Add data from models and services.",
                schema=enrich_schema)
def build_enrich(ctx: BuildContext, ups: list[Stream[Any]]) -> Outputs:
    """Build an enrich step."""
    import bytewax.operators as op

    stages: list[Stage] = []
    for e in ctx.config.enrichments:
        if e.type == "http_api":
            stages.append(HttpStage(ctx.step_id, e, ctx.workflow.config.retry))
        elif e.type == "lookup":
            stages.append(LookupStage(ctx.step_id, e, ctx.path))
        else:
            stages.append(ScoreStage(ctx.step_id, e, str(ctx.path(e.model))))
    step = ctx.step_id

    def apply(batch: Batch) -> tuple[Batch, list[Failed]]:
        records = list(batch)
        errors: list[BaseException | None] = [None] * len(records)
        for stage in stages:
            stage(records, errors)
        good = [r for r, e in zip(records, errors, strict=True) if e is None]
        bad = [Failed.of(step, e, batch[i]) for i, e in enumerate(errors) if e is not None]
        return good, bad

    pairs = op.map("enrich", ups[0], apply)
    return Outputs(
        down=op.filter_map("down", pairs, lambda p: p[0] or None),
        errs=op.filter_map("errs", pairs, lambda p: p[1] or None),
    )
