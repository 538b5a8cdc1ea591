"""What the PostgreSQL and MySQL sources share: a retrying connection and row records."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from dataflare.connectors.schema import json_value
from dataflare.records import META
from dataflare.retry import TransientError, call_with_retry

T = TypeVar("T")
log = logging.getLogger(__name__)


class Connection:
    """A lazily opened database connection; operations retried per the workflow's policy.

    A driver error that ``transient`` accepts (a lost connection, a deadlock) drops the
    connection and retries the operation on a new one; ``on_reconnect`` callbacks run
    first. Other errors (bad SQL, a missing table, permissions) are terminal and raised as
    a ``RuntimeError`` naming the step and the operation.
    """

    def __init__(
        self,
        step_id: str,
        retry: Any,
        open_connection: Callable[[], Any],
        errors: type[BaseException],
        transient: Callable[[BaseException], bool],
        is_closed: Callable[[Any], bool] = lambda conn: False,
    ) -> None:
        self.step_id, self.retry = step_id, retry
        self._open, self._errors = open_connection, errors
        self._transient, self._is_closed = transient, is_closed
        self.conn: Any = None
        self.on_reconnect: list[Callable[[], None]] = []

    def connection(self) -> Any:
        """The open connection (opened on first use)."""
        if self.conn is None or self._is_closed(self.conn):
            self.conn = self._open()
        return self.conn

    def run(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(connection)``, retried on transient failures."""

        def attempt() -> T:
            try:
                return fn(self.connection())
            except self._errors as exc:
                if self._transient(exc):
                    msg = f"{what}: {type(exc).__name__}: {exc}".rstrip()
                    raise TransientError(msg) from exc
                raise

        def reset(_exc: BaseException) -> None:
            self.close()
            for cb in self.on_reconnect:
                cb()

        try:
            return call_with_retry(
                f"step '{self.step_id}': {what}", attempt, self.retry, on_retry=reset
            )
        except (self._errors, TransientError) as exc:
            reset(exc)
            cause = exc.__cause__ if isinstance(exc, TransientError) and exc.__cause__ else exc
            msg = f"step '{self.step_id}': {what} failed: {type(cause).__name__}: {cause}"
            raise RuntimeError(msg.rstrip()) from exc

    def close(self) -> None:
        """Close the connection (if open)."""
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail
                log.debug("closing connection failed", exc_info=True)
        self.conn = None


def row_records(
    names: Sequence[str], rows: Iterable[Sequence[Any]], meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """Records of database rows, each with its own copy of ``meta`` as ``_meta``."""
    out = []
    for row in rows:
        rec = {n: json_value(v) for n, v in zip(names, row, strict=True)}
        rec[META] = dict(meta)
        out.append(rec)
    return out


def now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


def selected_tables(
    include: list[str], exclude: list[str], default: str | None, qualify: Callable[[str], str]
) -> list[str]:
    """The qualified tables whose changes are read.

    ``include`` (or else the source's own ``default`` table) without ``exclude``;
    ``qualify`` adds the default schema or database to a bare name.
    """
    tables = list(include) or ([default] if default else [])
    tables = [t if "." in t else qualify(t) for t in tables]
    excluded = {t if "." in t else qualify(t) for t in exclude}
    return [t for t in tables if t not in excluded]


def cdc_block(component: Any) -> Any:
    """A source component's ``cdc`` block, with the defaults when absent."""
    from dataflare.dsl_compiler.models import Cdc

    return component.cdc or Cdc()

