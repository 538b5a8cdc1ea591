"""HTTP destination: one request per record (webhooks, notification APIs), with retries.

The body is ``body_template`` rendered with JSON-escaped values (so
``{"email": "{{email}}"}`` stays valid JSON for any value), or the record as JSON
without ``_meta``. ``url`` may hold ``{{path}}`` placeholders too (values URL-escaped).

Answers 429 and 5xx and network failures are transient: retried with backoff per the
workflow's ``retry`` policy, honouring ``Retry-After``; when the retries run out the run
stops, naming the step and the record's position. Other 4xx answers refuse the record:
it follows the destination's ``error_handling`` (with the answer as its error). Requests
are sent again when bytewax replays after a crash, so delivery is **at-least-once**;
receivers that must not act twice can deduplicate on a key sent in the body or in a
header such as ``Idempotency-Key: {{id}}`` (header values are templates too).

Records wait in the batch buffer (recovery state) as records: the request (URL, headers,
body) is rendered when it is sent, so no credential of the configuration is written to
the recovery directory, and a resumed run sends with its own configuration (a rotated
token). A graceful stop ends the retries; the records not sent stay in the snapshot and
the resumed run sends them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any, Literal

from bytewax.dataflow import Stream
from pydantic import Field, field_validator

from dataflare import secrets
from dataflare.config import Duration, Headers, Strict
from dataflare.connectors.batching import Flush, Unwritten, buffered_output
from dataflare.connectors.schema import json_bytes
from dataflare.lineage import url_dataset
from dataflare.record_schema import FieldType, SchemaContext
from dataflare.records import META, Failed, RecordError, describe_position
from dataflare.registry import BuildContext, destination
from dataflare.retry import Interrupted, TransientError, call_with_retry, retry_after_seconds
from dataflare.template import compile_template


class HttpDestinationConfig(Strict):
    """Send each record to an HTTP endpoint."""

    url: str = Field(description="Endpoint; may hold {{path}} placeholders (URL-escaped).")
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = Field(
        "POST", description="HTTP method."
    )
    headers: Headers = Field(
        default_factory=dict,
        repr=False,  # they often carry credentials
        description="Request headers; values may hold {{path}} templates.",
    )
    body_template: str | None = Field(
        None,
        description="Body with {{path}} placeholders, values JSON-escaped; the record as "
        "JSON when absent.",
    )
    timeout: Duration = Field(30.0, gt=0, description="Timeout of one request.")
    concurrency: int = Field(1, ge=1, le=64, description="Requests in flight at once.")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0].lower() if "://" in v else ""
        if scheme not in ("http", "https") and not scheme.startswith(("{{", "${")):
            msg = f"url must start with http:// or https://, got {v.split('/', 1)[0] or v!r}"
            raise ValueError(msg)
        return v


Request = tuple[str, dict[str, str], bytes, dict[str, Any], Any]
"""``(url, headers, body, position, record)`` of one record, rendered when it is sent."""


class _Requests:
    """Renders records into requests; rejects those whose JSON body does not parse."""

    def __init__(self, step: str, cfg: HttpDestinationConfig) -> None:
        self.step = step
        self.url = compile_template(cfg.url, url_escape=True)
        self.headers = [(k, compile_template(v)) for k, v in cfg.headers.items()]
        self.body = compile_template(cfg.body_template, json_escape=True) \
            if cfg.body_template else None
        content_type = {k.lower(): v for k, v in cfg.headers.items()}.get("content-type", "")
        self.check_json = cfg.body_template is not None and (
            "json" in content_type or not content_type
        )
        self.default_json = not content_type

    def render(self, rec: Any) -> Request | Failed:
        """The request of ``rec``, or its failure when its body does not render."""
        meta = rec.get(META, {}) if isinstance(rec, dict) else {}
        try:
            if self.body is not None:
                body = self.body(rec).encode()
                if self.check_json:
                    json.loads(body)
            else:
                clean = {k: v for k, v in rec.items() if k != META}
                body = json_bytes(clean)  # bytes as hex, dates as ISO text, as files have
        except (TypeError, ValueError) as exc:
            message = f"step {self.step!r}: cannot render the request body: {exc}"
            return Failed(self.step, type(exc).__name__, message, rec, meta)
        headers: dict[str, Any] = {}
        for name, fn in self.headers:
            value = fn(rec)
            if "\r" in value or "\n" in value:
                message = (f"step {self.step!r}: cannot render the request: header {name!r} "
                           "would hold a line break (a header cannot carry one)")
                return Failed(self.step, "ValueError", message, rec, meta)
            # A value beyond ASCII ("José") goes as UTF-8: httpx sends only ASCII text.
            headers[name] = value if value.isascii() else value.encode()
        if self.default_json:
            headers.setdefault("Content-Type", "application/json")
        try:
            url = self.url(rec)
        except RecordError as exc:  # a value of "..": another path
            message = f"step {self.step!r}: cannot render the request URL: {exc}"
            return Failed(self.step, "RecordError", message, rec, meta)
        return url, headers, body, meta, rec

    def prepare(self, batch: list[Any]) -> tuple[list[Any], list[Failed]]:
        """The records whose request renders (they are buffered as records), the rest failed.

        Requests are rendered again when sent: headers and URLs often hold credentials,
        which must not reach the buffer's snapshot (and a resumed run sends its own).
        """
        out: list[Any] = []
        errs: list[Failed] = []
        for rec in batch:
            req = self.render(rec)
            if isinstance(req, Failed):
                errs.append(req)
            else:
                out.append(rec)
        return out, errs


class _Refused(Exception):
    """A request the endpoint refused (a 4xx other than 408 and 429), or that cannot be sent.

    ``kind`` names the failure: ``HTTP 404``, or the error of a request httpx refuses.
    """

    def __init__(self, message: str, status: int, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or f"HTTP {status}"


class _HttpWriter:
    """Sends the requests of each flush (see :class:`dataflare.connectors.batching.Writer`)."""

    def __init__(self, requests: _Requests, cfg: HttpDestinationConfig, retry: Any) -> None:
        self.step = requests.step
        self.requests = requests
        self.cfg = cfg
        self.retry = retry
        self.client: Any = None
        self.pool: ThreadPoolExecutor | None = None

    def _send_once(self, req: Request) -> None:
        import httpx

        url, headers, body = req[:3]
        try:
            resp = self.client.request(self.cfg.method, url, headers=headers, content=body)
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:  # no retry mends it
            msg = f"{self.cfg.method} {url} cannot be sent: {exc}"
            raise _Refused(msg, 0, type(exc).__name__) from exc
        except httpx.TransportError as exc:
            msg = f"{self.cfg.method} {url}: {type(exc).__name__}: {exc}"
            raise TransientError(msg) from exc
        status = resp.status_code
        if status < 300:
            return
        text = resp.text[:300]
        if status == 429 or status >= 500 or status == 408:
            msg = f"{self.cfg.method} {url} answered {status}: {text}"
            raise TransientError(msg, retry_after_seconds(resp.headers.get("retry-after")))
        msg = f"{self.cfg.method} {url} answered {status}: {text!r}"
        raise _Refused(msg, status)

    def _send(self, rec: Any) -> Failed | None:
        """Send the request of ``rec``; its failure if refused.

        Raises :class:`Interrupted` when a graceful stop ended its retries.
        """
        if isinstance(rec, tuple) and len(rec) == 5:  # buffered rendered by an older version
            rec = rec[4]
        req = self.requests.render(rec)
        if isinstance(req, Failed):
            return req
        what = f"step {self.step!r}: {self.cfg.method} {req[0]}"
        try:
            call_with_retry(what, partial(self._send_once, req), self.retry)
        except _Refused as exc:
            # Scrubbed: refused records wait in the write step's snapshot until emitted.
            message = secrets.scrub(str(exc))
            return Failed(self.step, exc.kind, message, req[4], req[3])
        except Interrupted:
            raise
        except TransientError as exc:
            msg = (
                f"step {self.step!r}: giving up after "
                f"{getattr(exc, 'attempts', self.retry.max_attempts)} attempt(s): "
                f"{exc} (record at {describe_position(req[3])})"
            )
            raise RuntimeError(msg) from exc
        return None

    def write_flush(self, flush: Flush) -> list[Failed]:
        """Send a flush's requests; the records the endpoint refused.

        Raises :class:`Unwritten` with the records not sent when a graceful stop ended
        the retries of one (those after it in the flush are not tried).
        """
        import httpx

        if self.client is None:
            self.client = httpx.Client(timeout=self.cfg.timeout)
        refused: list[Failed] = []
        unsent: list[Any] = []
        if self.cfg.concurrency > 1:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(self.cfg.concurrency)
            sent = [self.pool.submit(self._send, rec) for rec in flush.items]
            for rec, fut in zip(flush.items, sent, strict=True):
                try:
                    failed = fut.result()
                except Interrupted:
                    unsent.append(rec)
                    continue
                if failed is not None:
                    refused.append(failed)
        else:
            for i, rec in enumerate(flush.items):
                try:
                    failed = self._send(rec)
                except Interrupted:
                    unsent = flush.items[i:]
                    break
                if failed is not None:
                    refused.append(failed)
        if unsent:
            raise Unwritten(replace(flush, items=list(unsent)), refused)
        return refused

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.client is not None:
            self.client.close()


def http_destination_schema(ctx: SchemaContext[HttpDestinationConfig]) -> FieldType | None:
    """The fields the url, header and body templates read."""
    ctx.read_template(("url",), ctx.config.url)
    ctx.read_template(("body_template",), ctx.config.body_template)
    for name, value in ctx.config.headers.items():
        ctx.read_template(("headers", name), value)
    return None


@destination(
    "http",
    config=HttpDestinationConfig,
    datasets=lambda cfg, base: url_dataset(cfg.url),
    description="An HTTP endpoint: one templated request per record, retries on 429/5xx.",
    blocks=("batch",),
    requires=("httpx",), extra="http",
    schema=http_destination_schema,
)
def build_http_destination(ctx: BuildContext, up: Stream[list[Any]]) -> Stream[list[Failed]]:
    """The output steps of an ``http`` destination (scoped under its id)."""
    requests = _Requests(ctx.step_id, ctx.config)
    retry = ctx.workflow.config.retry
    return buffered_output("send", up, requests.prepare, ctx.component.batch,
                           lambda: _HttpWriter(requests, ctx.config, retry))
