"""What the PostgreSQL and MySQL sources share: a retrying connection and row records."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from dataflare.connectors.schema import DecimalHandling, UnconvertibleValue, json_value
from dataflare.records import META, Failed
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


_WARNED_KEYS: set[tuple[str, str]] = set()


def read_key(step: str, table: str, configured: Sequence[str], primary: list[str],
             unique: Callable[[list[str]], bool]) -> list[str]:
    """The columns a table read orders by and resumes after: unique, or said not to be.

    ``configured`` key columns that no unique index covers (``unique``) are followed by
    the primary key's other columns: a resume after ``(g)`` alone would skip the rest of
    the rows of that ``g``. A table with no key at all is read again from its start by a
    resume, which is warned of (once per step and table).
    """
    wanted = list(configured) or list(primary)
    problem = None
    if configured and not unique(wanted):
        wanted += [c for c in primary if c not in wanted]
        if not primary:
            problem = (f"key_columns {wanted} of {table} are not known to be unique (no unique "
                       "index holds them, and it has no primary key): a resume skips the "
                       "rows that share the last value read")
    if not wanted:
        problem = (f"{table} has no primary key and no key_columns are set: a resumed read "
                   "starts the table again, so the rows read before the snapshot are read "
                   "twice; set key_columns to resume exactly")
    if problem and (step, table) not in _WARNED_KEYS:
        _WARNED_KEYS.add((step, table))
        log.warning("step %r: %s", step, problem)
    return wanted


def say_changed_columns(step: str, table: str, old: Sequence[str], new: Sequence[str]) -> None:
    """Warn of columns a CDC source's table dropped or renamed: a mirror cannot follow them."""
    gone = [n for n in old if n not in new]
    if gone:
        added = [n for n in new if n not in old]
        log.warning("step '%s': table %s no longer has column(s) %s%s: a mirror keeps the "
                    "column(s) it made, with the values they had, and a renamed column is a "
                    "new one, NULL in the rows not changed since; alter the mirror table to "
                    "match, or take a new snapshot", step, table,
                    ", ".join(gone), f" (new: {', '.join(added)})" if added else "")


def row_records(
    step_id: str,
    names: Sequence[str],
    rows: Iterable[Sequence[Any]],
    meta: dict[str, Any],
    decimals: DecimalHandling = "number",
    first_row: int = 1,
) -> list[Any]:
    """Records of database rows, each with its own copy of ``meta`` as ``_meta``.

    A row holding an :class:`UnconvertibleValue` becomes a :class:`Failed` entry instead
    (see :func:`failed_row`), its position ``_meta.row`` (``first_row`` is the position of
    the first of ``rows`` in the read), so the source's error policy applies to it alone.
    """
    out: list[Any] = []
    for n, row in enumerate(rows, first_row):
        try:
            rec = {c: json_value(v, decimals) for c, v in zip(names, row, strict=True)}
        except UnconvertibleValue:
            values = dict(zip(names, row, strict=True))
            out.append(failed_row(step_id, values, {**meta, "row": n}, f"row {n}", decimals))
            continue
        rec[META] = dict(meta)
        out.append(rec)
    return out


def change_record(
    step_id: str,
    values: dict[str, Any],
    old: dict[str, Any] | None,
    meta: dict[str, Any],
    where: str,
    decimals: DecimalHandling = "number",
) -> Any:
    """The record of a changed row (``old``: its previous values, kept as ``_meta.old``).

    A :class:`Failed` entry instead when a value cannot be converted (see
    :func:`failed_row`; ``where``: the change).
    """
    try:
        rec = {c: json_value(v, decimals) for c, v in values.items()}
        if old is not None:
            meta["old"] = {c: json_value(v, decimals) for c, v in old.items()}
    except UnconvertibleValue:
        new_ok = not any(isinstance(v, UnconvertibleValue) for v in values.values())
        return failed_row(step_id, old if new_ok and old else values, meta, where, decimals)
    rec[META] = meta
    return rec


def failed_row(
    step_id: str,
    values: dict[str, Any],
    meta: dict[str, Any],
    where: str,
    decimals: DecimalHandling = "number",
) -> Failed:
    """The failure of a row holding an :class:`UnconvertibleValue` (``where``: the row).

    The message names the step, the table, the column and the row; the failed record
    holds the row, each unconvertible value as the text the server sent.
    """
    column, bad = next((c, v) for c, v in values.items() if isinstance(v, UnconvertibleValue))
    raw = {
        c: v.text if isinstance(v, UnconvertibleValue) else json_value(v, decimals)
        for c, v in values.items()
    }
    msg = (
        f"source '{step_id}': cannot convert column '{column}' of {meta.get('table')} "
        f"({where}): {bad}"
    )
    return Failed(step_id, type(bad.cause).__name__, msg, raw, meta)


def query_value(value: Any) -> Any:
    """A value read back as a query parameter (a resume key): unconvertible ones as text."""
    return value.text if isinstance(value, UnconvertibleValue) else value


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

