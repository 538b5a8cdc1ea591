"""Retries with backoff: a graceful stop ends them, saying how many attempts were made."""

from __future__ import annotations

import threading
from time import monotonic

import pytest

from dataflare import retry, stopping
from dataflare.config import Backoff, Retry
from dataflare.retry import TransientError, delays, next_wait


def test_a_graceful_stop_raises_interrupted_with_the_attempts_made() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        if len(calls) == 2:
            threading.Timer(0.2, stopping.REQUESTED.set).start()  # during the 2nd wait (30 s)
        raise retry.TransientError("answered 503")

    policy = Retry(max_attempts=10, backoff=Backoff(initial=0.01, multiplier=3000, max=30.0))
    try:
        with pytest.raises(retry.Interrupted) as info:
            retry.call_with_retry("step 'api': POST /x", down, policy)
    finally:
        stopping.REQUESTED.clear()
    assert len(calls) == 2 and info.value.attempts == 2
    assert str(info.value) == ("step 'api': POST /x: not retried after 2 attempt(s), the run "
                               "is stopping (TransientError: answered 503)")
    assert isinstance(info.value.__cause__, retry.TransientError)


def test_retry_after_is_the_least_wait_and_one_beyond_the_deadline_stands() -> None:
    # Retry-After: 40 was cut to backoff.max (15 s): the API was asked again too early,
    # three times, each refused (some APIs count that against the key).


    policy = Retry.model_validate({"max_attempts": 5, "backoff": {"max": "15s"},
                                   "max_elapsed": "60s"})
    exc = TransientError("GET /x returned 429", 40.0)
    assert str(exc) == "GET /x returned 429 (Retry-After: 40 s)"
    assert next_wait(policy, delays(policy), 0, exc, monotonic()) == 40.0
    assert next_wait(policy, delays(policy), 0, TransientError("429", 90.0), monotonic()) is None
    unbounded = Retry.model_validate({"max_attempts": 3, "max_elapsed": None})
    later = TransientError("429", 600.0)
    assert next_wait(unbounded, delays(unbounded), 0, later, monotonic()) == 600.0
