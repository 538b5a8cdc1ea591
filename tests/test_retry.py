"""Retries with backoff: a graceful stop ends them, saying how many attempts were made."""

from __future__ import annotations

import threading

import pytest

from dataflare import retry, stopping
from dataflare.config import Backoff, Retry


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
