"""``map_records``: apply a per-record function to a stream of batches, catching failures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Stream, operator

from dataflare.records import Batch, Failed


@dataclass(frozen=True)
class RecordsOut:
    """Records a step produced (``down``) and those it failed on (``errs``)."""

    down: Stream[Batch]
    errs: Stream[list[Failed]]


def _down(pair: tuple[Batch, list[Failed]]) -> Batch | None:
    return pair[0] or None


def _errs(pair: tuple[Batch, list[Failed]]) -> list[Failed] | None:
    return pair[1] or None


@operator
def map_records(
    step_id: str, up: Stream[Batch], fn: Callable[[Any], Any], name: str
) -> RecordsOut:
    """Apply ``fn`` to every record of every batch.

    ``fn`` returns the new record, or ``None`` to drop it. A record on which ``fn`` raises
    becomes a :class:`~dataflare.records.Failed` entry of step ``name`` in ``errs``.
    """

    def apply(batch: Batch) -> tuple[Batch, list[Failed]]:
        good: Batch = []
        bad: list[Failed] = []
        append = good.append
        for record in batch:
            try:
                out = fn(record)
            except Exception as exc:  # noqa: BLE001 - every failure goes to the error policy
                bad.append(Failed.of(name, exc, record))
                continue
            if out is not None:
                append(out)
        return good, bad

    pairs = op.map("apply", up, apply)
    return RecordsOut(op.filter_map("down", pairs, _down), op.filter_map("errs", pairs, _errs))


def split_failed(batch: Batch) -> tuple[Batch, list[Failed]]:
    """Separate a source batch into records and :class:`Failed` entries."""
    for item in batch:
        if item.__class__ is Failed:
            break
    else:
        return batch, []
    good = [r for r in batch if r.__class__ is not Failed]
    return good, [r for r in batch if r.__class__ is Failed]


@operator
def separate_failed(step_id: str, up: Stream[Batch]) -> RecordsOut:
    """Split a stream of mixed batches into records and :class:`Failed` entries."""
    pairs = op.map("split", up, split_failed)
    return RecordsOut(op.filter_map("down", pairs, _down), op.filter_map("errs", pairs, _errs))
