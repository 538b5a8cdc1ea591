"""Remote plugins: a ``plugin`` / ``custom`` step calling an HTTP service once per batch.

    plugins:
      churn: {type: remote, url: "http://127.0.0.1:8000/predict", timeout: 5s,
              auth: {type: bearer, token: "${CHURN_TOKEN}"}}

Each batch is POSTed as ``{"config": <step settings>, "records": [...]}`` (records without
``_meta``). The service answers ``{"records": [...]}``, one per record in the same order
(``null`` drops a record, ``{"$error": message}`` fails it), and may add ``{"errors":
[{"index", "message"}]}`` for records that failed. Broken connections, timeouts, 429 and
5xx answers are retried per the workflow's ``config.retry`` (honouring ``Retry-After``);
then, like an answer that is not JSON or has the wrong number of records, every record of
the batch fails and follows the step's ``error_handling``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream

from dataflare.connectors.schema import json_bytes, json_loader
from dataflare.dsl_compiler.models import Auth, Plugin
from dataflare.records import META, Batch, Failed, RecordError, without_meta
from dataflare.registry import BuildContext, Outputs
from dataflare.retry import Interrupted, TransientError, call_with_retry, retry_after_seconds

DEFAULT_TIMEOUT = 30.0
_LOADS = json_loader()


class RemoteError(RuntimeError):
    """A call whose answer cannot be used: every record of the batch fails."""


def auth_settings(auth: Auth | None) -> tuple[dict[str, str], dict[str, str], Any]:
    """``(headers, query params, httpx auth)`` of ``auth``."""
    if auth is None:
        return {}, {}, None
    if auth.type == "bearer":
        token = auth.token.get_secret_value() if auth.token else ""
        return {"Authorization": f"Bearer {token}"}, {}, None
    if auth.type == "basic":
        password = auth.password.get_secret_value() if auth.password else ""
        return {}, {}, (auth.username or "", password)
    key = auth.key.get_secret_value() if auth.key else ""
    if auth.query_param:
        return {}, {auth.query_param: key}, None
    return {auth.header: key}, {}, None


class RemotePlugin:
    """The HTTP client of one remote plugin."""

    def __init__(self, name: str, plugin: Plugin, settings: dict[str, Any], retry: Any) -> None:
        import httpx

        self.name, self.url, self.settings, self.retry = name, plugin.url or "", settings, retry
        headers, params, auth = auth_settings(plugin.auth)
        timeout = plugin.call_timeout(DEFAULT_TIMEOUT)
        self.httpx = httpx
        self.client = httpx.Client(timeout=timeout, headers={
            **headers, "Content-Type": "application/json"}, params=params, auth=auth)

    def _once(self, body: bytes) -> Any:
        try:
            resp = self.client.post(self.url, content=body)
        except self.httpx.TransportError as exc:
            msg = f"plugin {self.name!r}: {type(exc).__name__}: {exc}"
            raise TransientError(msg) from None
        if resp.status_code == 429 or resp.status_code >= 500:  # noqa: PLR2004
            msg = f"plugin {self.name!r}: HTTP {resp.status_code}"
            raise TransientError(msg, retry_after_seconds(resp.headers.get("retry-after")))
        if resp.status_code >= 400:  # noqa: PLR2004
            msg = f"plugin {self.name!r}: HTTP {resp.status_code}"
            raise RemoteError(msg)
        try:
            return _LOADS(resp.content)  # a number a float would round: its text
        except orjson.JSONDecodeError:
            msg = f"plugin {self.name!r}: the answer is not JSON"
            raise RemoteError(msg) from None

    def call(self, records: list[Any]) -> tuple[list[Any], dict[int, str]]:
        """Outputs for ``records`` (same order) and the messages of failed indexes."""
        body = json_bytes({"config": self.settings, "records": records})
        try:
            answer = call_with_retry(f"plugin {self.name!r}", lambda: self._once(body),
                                     self.retry)
        except Interrupted:
            raise  # the run is stopping: not a verdict on the records
        except TransientError as exc:
            msg = f"{exc} (after {getattr(exc, 'attempts', self.retry.max_attempts)} attempt(s))"
            raise RemoteError(msg) from None
        if not isinstance(answer, dict):
            msg = f"plugin {self.name!r}: the answer is not an object"
            raise RemoteError(msg)
        errors: dict[int, str] = {}
        for e in answer.get("errors") or []:
            if not isinstance(e, dict) or not isinstance(e.get("index"), int):
                msg = f"plugin {self.name!r}: an error without an integer 'index': {e!r}"
                raise RemoteError(msg)
            if not 0 <= e["index"] < len(records):
                msg = (f"plugin {self.name!r}: an error for index {e['index']}, not in the "
                       f"batch of {len(records)} records")
                raise RemoteError(msg)
            errors[e["index"]] = str(e.get("message", "failed"))
        out = answer.get("records")
        if out is None and len(errors) == len(records):
            out = [None] * len(records)
        if not isinstance(out, list) or len(out) != len(records):
            got = len(out) if isinstance(out, list) else "no"
            msg = f"plugin {self.name!r} answered {got} records for {len(records)}"
            raise RemoteError(msg)
        return out, errors


def remote_batches(step: str, plugin: RemotePlugin,
                   result: Callable[[str, str, Any, Any], Any]
                   ) -> Callable[[Batch], tuple[Batch, list[Failed]]]:
    """The per-batch function: one POST per batch."""

    def apply(batch: Batch) -> tuple[Batch, list[Failed]]:
        good: Batch = []
        bad: list[Failed] = []
        try:
            outs, errors = plugin.call([without_meta(r) for r in batch])
        except RecordError:  # a record nested too deeply for JSON: it fails, the rest go
            bad, sendable = _encodable(step, batch)
            if not sendable:
                return [], bad
            more_good, more_bad = apply(sendable)
            return more_good, bad + more_bad
        except RemoteError as exc:
            return [], [Failed.of(step, exc, r) for r in batch]
        for i, (record, out) in enumerate(zip(batch, outs, strict=True)):
            if i in errors:
                meta = record.get(META, {}) if isinstance(record, dict) else {}
                bad.append(Failed(step, "PluginError",
                                  f"plugin {plugin.name!r}: {errors[i]}", record, meta))
                continue
            res = result(step, plugin.name, record, out)
            if isinstance(res, Failed):
                bad.append(res)
            elif res is not None:
                good.append(res)
        return good, bad

    return apply


def _encodable(step: str, batch: Batch) -> tuple[list[Failed], Batch]:
    """The records of ``batch`` JSON cannot carry, as failures, and the others."""
    bad: list[Failed] = []
    good: Batch = []
    for record in batch:
        try:
            json_bytes({"records": [without_meta(record)]})  # as deep as it is sent
        except RecordError as exc:
            bad.append(Failed.of(step, exc, record))
        else:
            good.append(record)
    return bad, good


def build_remote_step(ctx: BuildContext, ups: list[Stream[Any]], name: str, plugin: Plugin,
                      settings: dict[str, Any],
                      result: Callable[[str, str, Any, Any], Any]) -> Outputs:
    """The operators of a step using remote plugin ``name``."""
    remote = RemotePlugin(name, plugin, settings, ctx.workflow.config.retry)
    pairs = op.map("call", ups[0], remote_batches(ctx.step_id, remote, result))
    return Outputs(down=op.filter_map("down", pairs, lambda p: p[0] or None),
                   errs=op.filter_map("errs", pairs, lambda p: p[1] or None))
