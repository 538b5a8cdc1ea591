"""REST API source (``type: rest_api``): paginated JSON endpoints, once or polled.

One *walk* reads every page of the endpoint (``pagination``: ``page_number``, ``offset``,
``cursor`` or ``link_header``); each page's records are found at ``records_path`` and
emitted as one batch. ``mode: full`` makes one walk; ``mode: incremental`` walks again
every ``incremental.interval``, sending the largest ``incremental.cursor_field`` value
seen so far as the ``incremental_param`` query parameter, and drops records it already
emitted (older than the cursor, or equal to it and seen before).

The walk position (next page, offset, cursor token or URL) and the cursor live in the
partition state, so a resumed run continues where the last snapshot left it. Requests
are spaced by a token bucket (``rate_limit``) through ``next_awake``; HTTP 429 and 5xx
and broken connections are transient (retried per the workflow's retry policy, honouring
``Retry-After``), other 4xx answers are terminal. A page whose body is not JSON, or
lacks ``records_path``, becomes a ``Failed`` entry and ends the walk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, model_validator

from dataflare.config import Auth, Duration, Strict
from dataflare.connectors.schema import discoverer, infer_schema
from dataflare.lineage import url_dataset
from dataflare.records import META, Failed, get_path
from dataflare.registry import BuildContext, source
from dataflare.retry import TransientError, call_with_retry, retry_after_seconds

log = logging.getLogger(__name__)


class Pagination(Strict):
    """How the pages of an endpoint are walked."""

    type: Literal["none", "page_number", "offset", "cursor", "link_header"] = Field(
        "none", description="Pagination style."
    )
    page_param: str = Field("page", description="page_number: query parameter of the page.")
    start_page: int = Field(1, ge=0, description="page_number: number of the first page.")
    size_param: str | None = Field(
        None, description="page_number: query parameter of the page size."
    )
    size: int | None = Field(None, ge=1, description="Records per page requested.")
    offset_param: str = Field("offset", description="offset: query parameter of the offset.")
    limit_param: str = Field("limit", description="offset/cursor: query parameter of the size.")
    cursor_param: str = Field("cursor", description="cursor: query parameter of the token.")
    cursor_path: str = Field(
        "next_cursor", description="cursor: dotted path of the next token in the response."
    )
    max_pages: int | None = Field(None, ge=1, description="Stop a walk after this many pages.")


class RateLimit(Strict):
    """A token bucket spacing the requests."""

    requests_per_second: float = Field(gt=0, description="Sustained request rate.")
    burst: int = Field(1, ge=1, description="Requests allowed at once.")


class RestApiSourceConfig(Strict):
    """Settings of a REST API source."""

    url: str = Field(description="Endpoint URL.")
    method: Literal["GET", "POST"] = Field("GET", description="HTTP method.")
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers.")
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Query parameters of every request."
    )
    body: Any = Field(None, description="JSON body of a POST request.")
    auth: Auth | None = Field(None, description="Credentials: bearer, basic or api_key.")
    pagination: Pagination = Field(default_factory=Pagination, description="Pagination.")
    records_path: str | None = Field(
        None,
        description="Dotted path of the record list in a response (default: the body, "
        "a list; an object body is one record).",
    )
    incremental_param: str | None = Field(
        None,
        description="Query parameter carrying the cursor in mode incremental "
        "(default: incremental.column).",
    )
    rate_limit: RateLimit | None = Field(None, description="Request rate limit.")
    timeout: Duration = Field(30.0, description="Timeout of one request.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    stop_at_end: bool = Field(
        False,
        description="Incremental: end after the first walk that finds nothing new "
        "(a catch-up run) instead of polling forever.",
    )

    @model_validator(mode="after")
    def _check(self) -> RestApiSourceConfig:
        if not self.url.startswith(("http://", "https://")):
            msg = f"url {self.url!r} must start with http:// or https://"
            raise ValueError(msg)
        if self.pagination.type == "offset" and self.pagination.size is None:
            msg = "pagination type 'offset' needs 'size'"
            raise ValueError(msg)
        return self


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.stamp = datetime.now(UTC)

    def take(self, now: datetime) -> datetime | None:
        """Take a token: ``None`` when granted, else the time one will be available."""
        elapsed = (now - self.stamp).total_seconds()
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return now + timedelta(seconds=(1.0 - self.tokens) / self.rate)


def _fingerprint(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != META}
    text = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class ApiPartition(StatefulSourcePartition[list[Any], dict[str, Any]]):
    """Walks the endpoint's pages; state: the walk position and the incremental cursor."""

    def __init__(self, src: RestApiSource, state: dict[str, Any] | None) -> None:
        self.src = src
        self.cfg = src.cfg
        state = state or {}
        self.cursor: Any = state.get("cursor", src.start_value)
        self.boundary: set[str] = set(state.get("boundary", []))
        self.walk: dict[str, Any] | None = state.get("walk")
        self.walk_max: Any = state.get("walk_max")
        self.walk_boundary: set[str] = set(state.get("walk_boundary", []))
        self.walk_new = bool(state.get("walk_new", False))
        self.done = bool(state.get("done", False))
        self.client: Any = None
        self.awake: datetime | None = None
        self.bucket = (
            TokenBucket(self.cfg.rate_limit.requests_per_second, self.cfg.rate_limit.burst)
            if self.cfg.rate_limit
            else None
        )

    # http

    def _client(self) -> Any:
        if self.client is None:
            try:
                import httpx
            except ModuleNotFoundError as exc:  # pragma: no cover - httpx is a dependency
                msg = "the rest_api source needs httpx: pip install httpx"
                raise ModuleNotFoundError(msg) from exc
            self.client = httpx.Client(
                timeout=self.cfg.timeout, verify=self.cfg.verify_tls, follow_redirects=True
            )
        return self.client

    def _request(self, url: str, params: dict[str, Any]) -> Any:
        import httpx

        cfg = self.cfg
        headers = dict(cfg.headers)
        params = dict(params)
        auth = None
        if cfg.auth is not None:
            a = cfg.auth
            if a.type == "bearer" and a.token is not None:
                headers["Authorization"] = f"Bearer {a.token.get_secret_value()}"
            elif a.type == "basic":
                password = a.password.get_secret_value() if a.password else ""
                auth = httpx.BasicAuth(a.username or "", password)
            elif a.type == "api_key" and a.key is not None:
                if a.query_param:
                    params[a.query_param] = a.key.get_secret_value()
                else:
                    headers[a.header] = a.key.get_secret_value()
        what = f"{cfg.method} {url}"

        def attempt() -> Any:
            try:
                resp = self._client().request(
                    cfg.method,
                    url,
                    params=params or None,  # an empty mapping would drop the URL's query
                    headers=headers,
                    auth=auth,
                    json=cfg.body if cfg.method == "POST" else None,
                )
            except httpx.TransportError as exc:
                msg = f"{what}: {type(exc).__name__}: {exc}"
                raise TransientError(msg) from exc
            if resp.status_code == 429 or resp.status_code >= 500:
                msg = f"{what} returned {resp.status_code}"
                raise TransientError(msg, retry_after_seconds(resp.headers.get("Retry-After")))
            if resp.status_code >= 400:
                msg = (
                    f"step '{self.src.step_id}': {what} returned {resp.status_code}: "
                    f"{resp.text[:200]!r}"
                )
                raise RuntimeError(msg)
            return resp

        return call_with_retry(f"step '{self.src.step_id}': {what}", attempt, self.src.retry)

    # walking

    def _start_walk(self) -> dict[str, Any]:
        p = self.cfg.pagination
        walk: dict[str, Any] = {"url": self.cfg.url, "pages": 0, "since": self.cursor}
        if p.type == "page_number":
            walk["page"] = p.start_page
        elif p.type == "offset":
            walk["offset"] = 0
        elif p.type == "cursor":
            walk["token"] = None
        self.walk_max, self.walk_boundary, self.walk_new = self.cursor, set(self.boundary), False
        return walk

    def _params(self, walk: dict[str, Any]) -> dict[str, Any]:
        p = self.cfg.pagination
        params: dict[str, Any] = dict(self.cfg.params)
        if walk["url"] != self.cfg.url:  # a next link carries its own query
            return {}
        if p.type == "page_number":
            params[p.page_param] = walk["page"]
            if p.size_param and p.size:
                params[p.size_param] = p.size
        elif p.type == "offset":
            params[p.offset_param] = walk["offset"]
            params[p.limit_param] = p.size
        elif p.type == "cursor":
            if walk["token"] is not None:
                params[p.cursor_param] = walk["token"]
            if p.size:
                params[p.limit_param] = p.size
        if self.src.incremental and walk["since"] is not None:
            params[self.src.cursor_param] = walk["since"]
        return params

    def _page(self, walk: dict[str, Any]) -> tuple[list[Any], bool]:
        """One page's items and whether the walk goes on."""
        url = walk["url"]
        resp = self._request(url, self._params(walk))
        meta = {"url": str(resp.url), "page": walk["pages"]}
        walk["pages"] += 1
        try:
            body = resp.json()
        except ValueError as exc:
            msg = f"source '{self.src.step_id}': response of {url} is not JSON: {exc}"
            return [Failed(self.src.step_id, "JSONDecodeError", msg, resp.text, meta)], False
        raw = body if self.cfg.records_path is None else get_path(body, self.cfg.records_path)
        if raw is None and self.cfg.records_path is not None:
            msg = (
                f"source '{self.src.step_id}': response of {url} has no "
                f"'{self.cfg.records_path}' (records_path)"
            )
            return [Failed(self.src.step_id, "MissingRecords", msg, resp.text, meta)], False
        items = raw if isinstance(raw, list) else [raw]
        records = [
            {**(it if isinstance(it, dict) else {"value": it}), META: dict(meta)} for it in items
        ]
        p = self.cfg.pagination
        more = bool(records)
        if p.max_pages is not None and walk["pages"] >= p.max_pages:
            more = False
        if p.type == "none":
            more = False
        elif p.type == "page_number":
            walk["page"] += 1
            if p.size and len(records) < p.size:
                more = False
        elif p.type == "offset":
            walk["offset"] += len(records)
            if p.size and len(records) < p.size:
                more = False
        elif p.type == "cursor":
            token = get_path(body, p.cursor_path)
            walk["token"] = token
            if token in (None, ""):
                more = False
        elif p.type == "link_header":
            nxt = resp.links.get("next", {}).get("url")
            if nxt:
                walk["url"] = str(resp.url.join(nxt))
            else:
                more = False
        return records, more

    def _keep_new(self, records: list[Any]) -> list[Any]:
        if not self.src.incremental:
            return records
        field = self.src.cursor_field
        out = []
        for rec in records:
            if isinstance(rec, Failed):
                out.append(rec)
                continue
            value = get_path(rec, field)
            if value is None:
                out.append(rec)
                continue
            fp = _fingerprint(rec)
            if self.cursor is not None:
                try:
                    if value < self.cursor or (value == self.cursor and fp in self.boundary):
                        continue
                except TypeError:
                    msg = (
                        f"source '{self.src.step_id}': cursor field '{field}' is a "
                        f"{type(value).__name__} ({value!r}), not comparable with the cursor "
                        f"{self.cursor!r}"
                    )
                    out.append(Failed(self.src.step_id, "CursorError", msg, rec, rec[META]))
                    continue
            if self.walk_max is None or value > self.walk_max:
                self.walk_max, self.walk_boundary = value, {fp}
            elif value == self.walk_max:
                self.walk_boundary.add(fp)
            out.append(rec)
        return out

    def next_batch(self) -> list[list[Any]]:
        """The next page's records."""
        if self.done:
            raise StopIteration
        now = datetime.now(UTC)
        if self.bucket is not None:
            wait = self.bucket.take(now)
            if wait is not None:
                self.awake = wait
                return []
        if self.walk is None:
            self.walk = self._start_walk()
        records, more = self._page(self.walk)
        fresh = self._keep_new(records)
        self.walk_new = self.walk_new or bool(fresh)
        self.awake = None
        if not more:
            self.walk = None
            if self.src.incremental:
                self.cursor, self.boundary = self.walk_max, set(self.walk_boundary)
                if self.cfg.stop_at_end and not self.walk_new:
                    self.done = True
                self.awake = now + timedelta(seconds=self.src.interval)
            else:
                self.done = True
        return [fresh] if fresh else []

    def next_awake(self) -> datetime | None:
        """When the next request may go."""
        return self.awake

    def snapshot(self) -> dict[str, Any]:
        """Walk position and cursor."""
        return {
            "cursor": self.cursor,
            "boundary": sorted(self.boundary),
            "walk": None if self.walk is None else dict(self.walk),
            "walk_max": self.walk_max,
            "walk_boundary": sorted(self.walk_boundary),
            "walk_new": self.walk_new,
            # A finished incremental catch-up run polls again when rerun.
            "done": self.done and not self.src.incremental,
        }

    def close(self) -> None:
        """Close the HTTP client."""
        if self.client is not None:
            self.client.close()
            self.client = None


class RestApiSource(FixedPartitionedSource[list[Any], dict[str, Any]]):
    """A bytewax source walking a REST endpoint (see the module docs)."""

    def __init__(self, ctx: BuildContext) -> None:
        self.step_id = ctx.step_id
        self.cfg: RestApiSourceConfig = ctx.config
        self.component = ctx.component
        self.retry = ctx.workflow.config.retry
        mode = getattr(ctx.component, "mode", None)
        inc = getattr(ctx.component, "incremental", None)
        if mode is None:
            mode = "incremental" if inc is not None else "full"
        if mode not in ("full", "incremental"):
            msg = (
                f"source '{ctx.step_id}': type 'rest_api' supports modes full and "
                f"incremental, got {mode!r}"
            )
            raise ValueError(msg)
        self.incremental = mode == "incremental"
        self.cursor_field = ""
        self.cursor_param = ""
        self.start_value: Any = None
        self.interval = 10.0
        if self.incremental:
            field = inc and (inc.cursor_field or inc.column)
            param = self.cfg.incremental_param or (inc and inc.column)
            if not field or not param:
                msg = (
                    f"source '{ctx.step_id}': mode incremental needs incremental.cursor_field "
                    "and config.incremental_param (or incremental.column)"
                )
                raise ValueError(msg)
            self.cursor_field, self.cursor_param = field, param
            self.start_value = inc.start_value if inc else None
            self.interval = float(inc.interval) if inc else 10.0

    def list_parts(self) -> list[str]:
        """One partition: the endpoint."""
        return [self.cfg.url]

    def build_part(
        self, step_id: str, for_part: str, resume_state: dict[str, Any] | None
    ) -> ApiPartition:
        """Build (or resume) the partition."""
        return ApiPartition(self, resume_state)


@source(
    "rest_api",
    config=RestApiSourceConfig,
    datasets=lambda cfg, base: url_dataset(cfg.url),
    description="REST API: paginated JSON pages, once (full) or polled by a cursor.",
    blocks=("mode", "incremental"),
    requires=("httpx",), extra="http",
)
def build_rest_api_source(ctx: BuildContext) -> RestApiSource:
    """Build the REST API source of ``ctx``."""
    return RestApiSource(ctx)


@discoverer("rest_api")
def discover_rest_api(ctx: BuildContext) -> dict[str, Any]:
    """The JSON Schema inferred from the records of the endpoint's first page."""
    part = ApiPartition(RestApiSource(ctx), None)
    try:
        walk = part._start_walk()
        records, _more = part._page(walk)
    finally:
        part.close()
    failed = [r for r in records if isinstance(r, Failed)]
    if failed:
        raise ValueError(failed[0].message)
    return {
        "type": "rest_api",
        "url": ctx.config.url,
        "sampled": len(records),
        "json_schema": infer_schema(records),
    }
