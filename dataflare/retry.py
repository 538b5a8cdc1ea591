"""Retries with exponential backoff for transient failures (broken connections, HTTP 5xx)."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from time import monotonic
from typing import TypeVar

from dataflare import metrics, stopping
from dataflare.config import Retry

T = TypeVar("T")
log = logging.getLogger(__name__)
_STEP = re.compile(r"step '([^']+)'")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class TransientError(Exception):
    """A failure worth retrying; ``retry_after`` (seconds) overrides the backoff delay."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        if retry_after is not None:
            message += f" (Retry-After: {retry_after:.0f} s)"
        super().__init__(message)
        self.retry_after = retry_after


class Interrupted(TransientError):
    """A transient failure not retried because the run is stopping (SIGTERM, SIGINT).

    Not a verdict on the record: with recovery on, the next run tries it again.
    ``attempts`` is how many attempts were made; the failure of the last is the cause.
    """

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


def interrupted(exc: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` ``exc`` is or was raised from (causes and contexts), if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Interrupted):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def delays(policy: Retry) -> list[float]:
    """The waits between the attempts of ``policy`` (one fewer than its attempts)."""
    out, delay = [], policy.backoff.initial
    for _ in range(policy.max_attempts - 1):
        out.append(min(delay, policy.backoff.max))
        delay *= policy.backoff.multiplier
    return out


def next_wait(policy: Retry, waits: list[float], attempt: int, exc: BaseException,
              first_failure: float) -> float | None:
    """Seconds to wait before retrying after failed attempt ``attempt`` (0-based).

    ``waits`` is ``delays(policy)``; ``first_failure`` the ``monotonic()`` of the first
    failure. None when the failure stands: the attempts are used up or ``max_elapsed``
    has passed. A ``retry_after`` on ``exc`` (seconds: the server's ``Retry-After``) is
    the least wait, above ``backoff.max`` too: asking earlier is refused again, and some
    APIs count it against the client. One that ends beyond ``max_elapsed`` stands.
    """
    if attempt >= len(waits):
        return None
    wait = waits[attempt]
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        wait = max(wait, float(retry_after))
    else:  # jitter: workers that failed together do not retry in lockstep
        wait *= random.uniform(0.8, 1.2)  # noqa: S311 - not cryptography
    if policy.max_elapsed is not None:
        left = first_failure + policy.max_elapsed - monotonic()
        if left <= 0 or (retry_after is not None and retry_after > left):
            return None
        wait = min(wait, left)  # the last attempt lands on the deadline
    return wait


def call_with_retry(
    what: str,
    fn: Callable[[], T],
    policy: Retry,
    transient: tuple[type[BaseException], ...] = (TransientError,),
    on_retry: Callable[[BaseException], None] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn``; on a ``transient`` exception wait and retry per ``policy``.

    ``on_retry`` runs before each new attempt (e.g. to reconnect). The last exception is
    raised, with the attempts made as its ``attempts``, when every attempt failed or
    ``policy.max_elapsed`` has passed since the first failure; any other exception is
    raised at once. A graceful stop (SIGTERM, SIGINT)
    ends the wait and raises :class:`Interrupted` (from the last exception), with the
    attempts made so far: a run asked to stop does not wait a minute for a service to
    come back, and the caller keeps what it could not do for the next run (recovery).
    """
    waits = delays(policy)
    first_failure: float | None = None
    for attempt in range(policy.max_attempts):
        try:
            return fn()
        except transient as exc:
            if first_failure is None:
                first_failure = monotonic()
            wait = next_wait(policy, waits, attempt, exc, first_failure)
            if wait is None:
                with suppress(AttributeError):  # what the caller reports: the attempts made
                    exc.attempts = attempt + 1  # type: ignore[attr-defined]
                raise
            step = _STEP.search(what)
            metrics.RETRIES.labels(step.group(1) if step else "").inc()
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what, type(exc).__name__, exc, attempt + 1, len(waits), wait,
            )
            if sleep is not None:
                sleep(wait)
            elif stopping.REQUESTED.wait(wait):
                msg = (f"{what}: not retried after {attempt + 1} attempt(s), the run is "
                       f"stopping ({type(exc).__name__}: {exc})")
                log.warning("%s", msg)
                raise Interrupted(msg, attempt + 1) from exc
            if on_retry is not None:
                on_retry(exc)
    msg = "unreachable"
    raise AssertionError(msg)


def call_retrying(what: str, fn: Callable[[], T], policy: Retry,
                  transient: Callable[[BaseException], bool], failed: str) -> T:
    """:func:`call_with_retry` of a call whose failures ``transient`` tells apart.

    For a client raising its own exceptions (boto3): those ``transient`` accepts are
    retried per ``policy``. The failure that ends it is a ``RuntimeError`` saying
    ``failed`` (what could not be done), the attempts made and why; a graceful stop's
    :class:`Interrupted` passes as it is.
    """
    def attempt() -> T:
        try:
            return fn()
        except Exception as exc:
            if transient(exc):
                raise TransientError(str(exc)) from exc
            raise

    try:
        return call_with_retry(what, attempt, policy)
    except Interrupted:
        raise
    except Exception as exc:
        tried = getattr(exc, "attempts", None)
        after = f" (after {tried} attempts)" if tried and tried > 1 else ""
        msg = f"{failed}{after}: {exc}"
        raise RuntimeError(msg) from exc
