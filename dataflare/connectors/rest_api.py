"""REST API source (``type: rest_api``): paginated JSON endpoints, once or polled.

One *walk* reads every page of the endpoint (``pagination``: ``page_number``, ``offset``,
``cursor`` or ``link_header``; page numbers and offsets walk until an empty page, as an
API may return fewer records than ``size`` asks); each page's records are found at
``records_path`` and emitted as one batch. ``mode: full`` makes one walk (an ``incremental`` block,
``incremental_param`` or ``stop_at_end`` there is refused, as is a ``body`` with ``GET``);
``mode: incremental`` walks again every ``incremental.interval``, sending the largest
``incremental.cursor_field`` value read so far, as it was read, as the ``incremental_param``
query parameter (an API without one is walked whole each time), and drops the records
it already emitted (older than the cursor, or emitted before).

``incremental.cursor_type`` says how cursor values compare: ``timestamp`` as instants
(ISO-8601 text with an offset or ``Z``, naive meaning UTC, or epoch numbers in the
source's ``time_unit``), ``integer`` as integers (or their text), ``string`` as text;
unset, as the JSON values are. ``incremental.lookback`` (timestamp cursors only) sends
the cursor that much earlier (a number stays a number, text becomes ISO-8601 UTC) and
re-reads that window, as the SQL sources do: a record arriving late with an earlier
cursor value is emitted, one emitted before is not. A record whose cursor field is
missing, null or not of the ``cursor_type`` becomes a ``CursorError`` ``Failed`` entry
for the step's error policy, once (the state remembers it); it does not count as new
for ``stop_at_end``, under which walks follow each other without waiting for the interval
and the input ends after the first walk that finds nothing new.

The walk position (next page, offset, cursor token or URL) and the cursor live in the
partition state, so a resumed run continues where the last snapshot left it. Requests
are spaced by a token bucket (``rate_limit``) through ``next_awake``; HTTP 429 and 5xx
and broken connections are transient (retried per the workflow's retry policy, honouring
``Retry-After``; when the attempts run out the step fails), other 4xx answers are
terminal. A page whose body is not JSON, or
lacks ``records_path``, becomes a ``Failed`` entry and ends the walk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import Field, ValidationInfo, field_validator, model_validator

from dataflare import secrets
from dataflare.config import Auth, Duration, Headers, Strict
from dataflare.connectors.schema import (
    JSON_NUMBERS,
    DecimalHandling,
    discoverer,
    infer_schema,
    json_error,
    json_loader,
)
from dataflare.lineage import url_dataset
from dataflare.records import META, Failed, a_or_an, get_path, iso_utc, to_epoch_seconds
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
    size: int | None = Field(
        None, ge=1, description="Records per page requested. page_number/offset: a page "
        "with fewer does not end the walk (APIs cap the size they are asked for); an "
        "empty page does.",
    )
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
    headers: Headers = Field(default_factory=dict, description="Request headers.")
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
        "(default: incremental.column). Without one, each walk reads the whole endpoint "
        "and keeps the records past the cursor.",
    )
    primary_key: list[str] | None = Field(
        None, description="Incremental: the fields identifying a record. A record read again "
        "(at the cursor, within lookback) is dropped when one of its key and cursor value "
        "was emitted; default: when an identical record was (a field the API changes at "
        "each answer, as a signed link, then makes it new each time).")
    rate_limit: RateLimit | None = Field(None, description="Request rate limit.")
    decimal_handling: DecimalHandling = Field("number", description=JSON_NUMBERS)
    timeout: Duration = Field(30.0, description="Timeout of one request.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    stop_at_end: bool = Field(
        False,
        description="Incremental: walk again at once until a walk finds nothing new, "
        "then end (a catch-up run), instead of polling every incremental.interval.",
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

    @field_validator("body")
    @classmethod
    def _body_with_post(cls, body: Any, info: ValidationInfo) -> Any:
        if body is not None and info.data.get("method") == "GET":
            msg = "body is sent with method POST only, the method is GET"
            raise ValueError(msg)
        return body


_ABSENT = object()  # a records_path the response lacks

_BAD_PAGES = 3
"""Numbered pages in a row without records to read (not JSON...) after which a walk stops."""


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


def secret_query(cfg: RestApiSourceConfig) -> dict[str, Any]:
    """The query parameters of ``url`` and ``params`` that are credentials.

    Named like secrets (``access_token``) or holding a secret's value (``key=${API_KEY}``).
    """
    import httpx

    known = secrets.values()
    pairs = [*httpx.URL(cfg.url).params.multi_items(), *cfg.params.items()]
    return {name: value for name, value in pairs
            if secrets.SECRET_KEY.search(name) or str(value) in known}


def public_url(cfg: RestApiSourceConfig, url: Any,
               hidden: dict[str, Any] | None = None) -> Any:
    """``url`` (an ``httpx.URL``) without the credentials its query carries.

    Those are the API key of ``auth`` and :func:`secret_query` (``hidden``, when known):
    records' ``_meta.url`` and a walk's state (the recovery directory) hold the rest; each
    request adds them again.
    """
    a = cfg.auth
    keyed = [a.query_param] if a is not None and a.type == "api_key" and a.query_param else []
    for name in [*keyed, *(secret_query(cfg) if hidden is None else hidden)]:
        url = url.copy_remove_param(name)
    return url


def _at_least(key: Any, lower: Any) -> bool:
    """Whether cursor key ``key`` is at least ``lower`` (keys Python cannot compare: no)."""
    try:
        return lower is None or bool(key >= lower)
    except TypeError:
        return False


class ApiPartition(StatefulSourcePartition[list[Any], dict[str, Any]]):
    """Walks the endpoint's pages; state: the walk position and the incremental cursor.

    The cursor is the largest cursor value read (as read); ``seen`` holds the records
    emitted at or after the cursor less the lookback (fingerprint -> cursor key), the
    ones the next walk reads again; ``reported`` the records sent to the error policy.
    """

    def __init__(self, src: RestApiSource, state: dict[str, Any] | None) -> None:
        self.src = src
        self.cfg = src.cfg
        state = state or {}
        self.cursor: Any = state.get("cursor")
        self.walk: dict[str, Any] | None = state.get("walk")
        self.walk_max: Any = state.get("walk_max")
        # A state written before the lookback window kept the records at the cursor only.
        self.seen: dict[str, Any] = state.get("seen") or {
            fp: src.key(self.cursor) for fp in state.get("boundary", [])}
        self.walk_seen: dict[str, Any] = state.get("walk_seen") or {
            fp: src.key(self.walk_max) for fp in state.get("walk_boundary", [])}
        self.reported: set[str] = set(state.get("reported", []))
        self.walk_new = bool(state.get("walk_new", False))
        self.done = bool(state.get("done", False))
        self.client: Any = None
        self.warned: set[str] = set()  # hosts told of: credentials are not sent there
        self.loads = json_loader(self.cfg.decimal_handling)
        self.start_url = src.list_parts()[0]
        self.hidden = secret_query(self.cfg)  # left out of the walk's URLs: requests add them
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
                timeout=self.cfg.timeout, verify=self.cfg.verify_tls, follow_redirects=True,
                event_hooks={"request": [self._credentials_stay_home]},
            )
        return self.client

    def _credentials_stay_home(self, request: Any) -> None:
        """Send credentials to the configured API's origin only.

        A next link or a redirect to another host gets no ``Authorization``, no header
        named like a secret (``X-API-Key``) and no credential in its query: the API's
        key would go to whoever that host is.
        """
        import httpx

        url, home = request.url, httpx.URL(self.cfg.url)
        upgrade = (home.scheme, url.scheme) == ("http", "https") and url.port in (None, 443) \
            and home.port in (None, 80)  # to the same host over TLS, as httpx allows
        if url.host == home.host and (upgrade or (url.scheme, url.port) == (home.scheme,
                                                                          home.port)):
            return
        a = self.cfg.auth
        named = {a.header.lower()} if a is not None and a.type == "api_key" else set()
        dropped = [n for n in request.headers if n.lower() == "authorization"
                   or n.lower() in named or secrets.SECRET_KEY.search(n)]
        for name in dropped:
            del request.headers[name]
        public = public_url(self.cfg, url, self.hidden)
        if public != url:
            request.url = public
        if (dropped or public != url) and url.host not in self.warned:
            self.warned.add(url.host)
            log.warning("step '%s': %s is not the API's host: its credentials are not sent "
                        "there", self.src.step_id, url.host)

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
        target = httpx.URL(url).copy_merge_params(params)  # a next link keeps its query
        what = f"{cfg.method} {public_url(cfg, target, self.hidden)}"  # the page, no credential

        def attempt() -> Any:
            try:
                resp = self._client().request(
                    cfg.method,
                    target,
                    headers=headers,
                    auth=auth,
                    json=cfg.body if cfg.method == "POST" else None,
                )
            except httpx.TransportError as exc:
                msg = f"{what}: {type(exc).__name__}: {exc}"
                raise TransientError(msg) from exc
            if resp.status_code == 429 or resp.status_code >= 500:
                msg = f"{what} returned {resp.status_code}: {resp.text[:200]!r}"
                raise TransientError(msg, retry_after_seconds(resp.headers.get("Retry-After")))
            if resp.status_code >= 400:
                msg = (
                    f"step '{self.src.step_id}': {what} returned {resp.status_code}: "
                    f"{resp.text[:200]!r}"
                )
                raise RuntimeError(msg)
            return resp

        try:
            return call_with_retry(f"step '{self.src.step_id}': {what}", attempt, self.src.retry)
        except TransientError as exc:  # the attempts ran out
            tried = getattr(exc, "attempts", None)
            after = f"giving up after {tried} attempt(s): " if tried else ""
            msg = f"step '{self.src.step_id}': {after}{exc}"
            raise RuntimeError(msg) from exc

    # walking

    def _start_walk(self) -> dict[str, Any]:
        p = self.cfg.pagination
        walk: dict[str, Any] = {"url": self.start_url, "pages": 0, "since": self._since()}
        if p.type == "page_number":
            walk["page"] = p.start_page
        elif p.type == "offset":
            walk["offset"] = 0
        elif p.type == "cursor":
            walk["token"] = None
        self.walk_max, self.walk_seen, self.walk_new = self.cursor, dict(self.seen), False
        return walk

    def _since(self) -> Any:
        """The cursor a walk sends: the largest value read, less the lookback."""
        src = self.src
        if self.cursor is None:  # YAML reads an unquoted timestamp as a datetime: sent ISO
            start = src.start_value
            return iso_utc(src.key(start)) if isinstance(start, datetime | date) else start
        if not src.lookback:
            return self.cursor
        if isinstance(self.cursor, int | float):
            step = src.lookback * (1000 if src.time_unit == "ms" else 1)
            return self.cursor - (int(step) if step.is_integer() else step)
        return iso_utc(src.key(self.cursor) - src.lookback)

    def _lower(self, cursor: Any) -> Any:
        """The smallest cursor key a walk after ``cursor`` reads (None: no bound)."""
        src = self.src
        if cursor is None:
            return None if src.start_value is None else src.key(src.start_value)
        return src.key(cursor) - src.lookback if src.lookback else src.key(cursor)

    def _params(self, walk: dict[str, Any]) -> dict[str, Any]:
        p = self.cfg.pagination
        if walk["url"] not in (self.start_url, self.cfg.url):  # a next link has its own query
            return dict(self.hidden)
        params: dict[str, Any] = {**self.hidden, **self.cfg.params}
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
        if self.src.cursor_param and walk["since"] is not None:
            params[self.src.cursor_param] = walk["since"]
        return params

    def _page(self, walk: dict[str, Any]) -> tuple[list[Any], bool]:
        """One page's items and whether the walk goes on."""
        url = walk["url"]
        resp = self._request(url, self._params(walk))
        meta = {"url": str(public_url(self.cfg, resp.url, self.hidden)), "page": walk["pages"]}
        walk["pages"] += 1
        try:  # no content (204, an empty body) is a page of no records: the walk's end
            body = self.loads(resp.content) if resp.content.strip() else []
        except ValueError as exc:
            msg = (f"source '{self.src.step_id}': response of {url} is not JSON: "
                   f"{json_error(exc, 'the response')}")
            return self._bad_page(walk, Failed(self.src.step_id, "JSONDecodeError", msg,
                                               resp.text, meta))
        path = self.cfg.records_path
        raw = body if path is None else get_path(body, path, _ABSENT) if body != [] else []
        if raw is None:  # {"data": null}: how some APIs write an empty list
            raw = []
        if raw is _ABSENT:
            msg = (
                f"source '{self.src.step_id}': response of {url} has no "
                f"'{self.cfg.records_path}' (records_path)"
            )
            return self._bad_page(walk, Failed(self.src.step_id, "MissingRecords", msg,
                                               resp.text, meta))
        items = raw if isinstance(raw, list) else [raw]
        records = [
            {**(it if isinstance(it, dict) else {"value": it}), META: dict(meta)} for it in items
        ]
        p = self.cfg.pagination
        more = bool(records) and self._below_max_pages(walk)
        if p.type == "none":
            more = False
        elif p.type in ("page_number", "offset"):
            # A short page does not end the walk (APIs cap the page size they are asked
            # for, GitHub at 100): an empty page does, or one repeating the page before.
            self._turn_page(walk, len(records))
            walk["bad"] = 0
            if records:
                digest = _fingerprint({"page": items})
                if digest == walk.get("previous"):
                    log.warning("step '%s': page %d of %s repeats the page before: the API "
                                "ignores '%s'; the walk ends there", self.src.step_id,
                                walk["pages"], self.cfg.url,
                                p.page_param if p.type == "page_number" else p.offset_param)
                    return [], False
                walk["previous"] = digest
        elif p.type == "cursor":
            token = get_path(body, p.cursor_path)
            walk["token"] = token
            if token in (None, ""):
                more = False
        elif p.type == "link_header":
            nxt = resp.links.get("next", {}).get("url")
            if nxt:  # kept in the state, so without the key (each request adds it)
                walk["url"] = str(public_url(self.cfg, resp.url.join(nxt), self.hidden))
            else:
                more = False
        return records, more

    def _below_max_pages(self, walk: dict[str, Any]) -> bool:
        top = self.cfg.pagination.max_pages
        return top is None or walk["pages"] < top

    def _turn_page(self, walk: dict[str, Any], read: int) -> None:
        """Past the page just read (``read`` records) to the next page number or offset."""
        if self.cfg.pagination.type == "page_number":
            walk["page"] += 1
        else:
            walk["offset"] += read

    def _bad_page(self, walk: dict[str, Any], failed: Failed) -> tuple[list[Any], bool]:
        """A page without records to read: it follows ``error_handling``, the walk goes on.

        Pages numbered or offset are walked past it. A cursor or next link is in the page:
        then the run stops, and a resume asks for the page again (the pages after it would
        be lost in silence).
        """
        p = self.cfg.pagination
        if p.type in ("cursor", "link_header"):
            msg = (f"{failed.message}; the next page is named in this response ({p.type} "
                   "pagination), so the walk cannot go on past it")
            raise RuntimeError(msg)
        if p.type == "none":
            return [failed], False
        walk["bad"] = walk.get("bad", 0) + 1
        if "skipped_at" not in walk:  # an incremental walk's cursor stops here (next_batch)
            walk["skipped_at"] = self.walk_max
        if walk["bad"] >= _BAD_PAGES:
            msg = f"{failed.message}; {_BAD_PAGES} pages in a row had no records to read"
            raise RuntimeError(msg)
        self._turn_page(walk, p.size or 0)
        return [failed], self._below_max_pages(walk)

    def _past(self, value: Any, cursor: Any) -> bool:
        """Whether cursor ``value`` is beyond ``cursor`` (any value is beyond none)."""
        if value is None:
            return False
        return cursor is None or not _at_least(self.src.key(cursor), self.src.key(value))

    def _keep_new(self, records: list[Any]) -> list[Any]:
        """The records not emitted before; a ``Failed`` entry for a bad cursor value."""
        if not self.src.incremental:
            return records
        src = self.src
        lower = self._lower(self.cursor)
        top = None if self.walk_max is None else src.key(self.walk_max)
        out = []
        for rec in records:
            if isinstance(rec, Failed):
                out.append(rec)
                continue
            value = get_path(rec, src.cursor_field)
            names = self.cfg.primary_key or []
            ident = [get_path(rec, k) for k in names]
            missing = [k for k, v in zip(names, ident, strict=True) if v is None]
            fp = _fingerprint({"key": ident, "cursor": value} if names and not missing
                              else rec)
            if fp in self.seen or fp in self.walk_seen or fp in self.reported:
                continue  # emitted by a walk before, or on a page before (pages shifted)
            if missing:  # records without a key would all be one record
                self.reported.add(fp)
                msg = (f"source '{src.step_id}': primary_key field {missing[0]!r} is missing "
                       "or null")
                out.append(Failed(src.step_id, "KeyError", msg, rec, rec[META]))
                continue
            try:
                key = src.key(value)
                if lower is not None and key < lower:
                    continue
                if top is None or key > top:
                    top, self.walk_max = key, value
            except TypeError:
                reason = (f"is {a_or_an(type(value).__name__)} ({value!r}), not comparable "
                          f"with the cursor {self.walk_max!r}")
            except ValueError as exc:
                reason = str(exc)
            else:
                self.walk_seen[fp] = key
                out.append(rec)
                continue
            self.reported.add(fp)
            msg = f"source '{src.step_id}': cursor field '{src.cursor_field}' {reason}"
            out.append(Failed(src.step_id, "CursorError", msg, rec, rec[META]))
        walk = self.walk or {}
        window = self._lower(walk["skipped_at"] if "skipped_at" in walk else self.walk_max)
        self.walk_seen = {fp: k for fp, k in self.walk_seen.items() if _at_least(k, window)}
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
        # A walk finding records past the cursor (its largest emitted is) is followed by
        # another (stop_at_end) at once; records new at the cursor's own value are not.
        self.walk_new = self.walk_new or self.src.incremental and self._past(self.walk_max,
                                                                             self.cursor)
        self.awake = None
        if not more:
            walk, self.walk = self.walk, None
            if self.src.incremental:
                # A walk past a page it could not read keeps the cursor it had there: the
                # next walk reads that page again (and not what this one emitted after it).
                self.cursor = walk.get("skipped_at", self.walk_max)
                self.seen = dict(self.walk_seen)
                if self.cfg.stop_at_end:  # a catch-up run: walk again at once, or end
                    self.done = not self.walk_new
                else:
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
            "seen": dict(self.seen),
            "walk": None if self.walk is None else dict(self.walk),
            "walk_max": self.walk_max,
            "walk_seen": dict(self.walk_seen),
            "walk_new": self.walk_new,
            "reported": sorted(self.reported),
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
        self.cursor_type: str | None = None
        self.start_value: Any = None
        self.interval = 10.0
        self.lookback = 0.0
        self.time_unit = getattr(ctx.component, "time_unit", None) or "s"
        if not self.incremental:
            given = [name for name, set_ in (
                ("incremental", inc is not None),
                ("config.incremental_param", self.cfg.incremental_param is not None),
                ("config.stop_at_end", "stop_at_end" in self.cfg.model_fields_set),
                ("config.primary_key", self.cfg.primary_key is not None),
            ) if set_]
            if given:
                msg = (f"source '{ctx.step_id}': {', '.join(given)} has no effect in mode full, "
                       "which reads the endpoint once; remove it or set mode: incremental")
                raise ValueError(msg)
        else:
            field = inc and (inc.cursor_field or inc.column)
            param = self.cfg.incremental_param or (inc and inc.column) or ""
            if not field:
                msg = (f"source '{ctx.step_id}': mode incremental needs "
                       "incremental.cursor_field: the field of the records that orders them")
                raise ValueError(msg)
            self.cursor_field, self.cursor_param = field, param
            self.cursor_type = inc.cursor_type if inc else None
            self.start_value = inc.start_value if inc else None
            self.interval = float(inc.interval) if inc else 10.0
            self.lookback = float(inc.lookback) if inc else 0.0
            if self.lookback and self.cursor_type != "timestamp":
                msg = (f"source '{ctx.step_id}': incremental.lookback needs incremental."
                       f"cursor_type timestamp, got {self.cursor_type or 'none'}")
                raise ValueError(msg)
            if self.start_value is not None:
                try:
                    self.key(self.start_value)
                except ValueError as exc:
                    msg = f"source '{ctx.step_id}': incremental.start_value {exc}"
                    raise ValueError(msg) from None

    def key(self, value: Any) -> Any:
        """How the cursor compares ``value`` (per ``cursor_type``); a ValueError saying why not."""
        kind = self.cursor_type
        if value is None:
            msg = "is missing or null"
            raise ValueError(msg)
        if kind is None or (kind == "string" and isinstance(value, str)):
            return value
        if kind == "timestamp":
            try:
                return to_epoch_seconds(value, self.time_unit)
            except ValueError as exc:
                msg = f"is not a timestamp: {exc}"
                raise ValueError(msg) from None
        if kind == "integer" and isinstance(value, int | str) and not isinstance(value, bool):
            try:
                return int(value)
            except ValueError:
                pass
        expected = "an integer" if kind == "integer" else "text"
        msg = f"is {a_or_an(type(value).__name__)} ({value!r}), expected {expected}"
        raise ValueError(msg)

    def list_parts(self) -> list[str]:
        """One partition: the endpoint (without credentials: its name is in the state)."""
        import httpx

        url = httpx.URL(self.cfg.url)
        public = public_url(self.cfg, url)
        return [self.cfg.url if public == url else str(public)]  # as before when it has none

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
