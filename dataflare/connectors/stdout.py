"""The ``stdout`` destination: one JSON object per line on standard output."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Stream
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from pydantic import Field

from dataflare import stopping
from dataflare.config import Strict
from dataflare.connectors.schema import json_line
from dataflare.operators.records import map_records
from dataflare.records import Batch, without_meta
from dataflare.registry import BuildContext, destination

log = logging.getLogger(__name__)


class StdoutConfig(Strict):
    """Settings of a ``stdout`` destination."""

    pretty: bool = Field(False, description="Indent each record over several lines.")
    sort_keys: bool = Field(False, description="Print fields in sorted order.")


class _Printer(StatelessSinkPartition[Batch]):
    def __init__(self, option: int, step: str) -> None:
        self.option, self.step = option, step

    def write_batch(self, items: list[Batch]) -> None:
        if _CLOSED:
            return
        out = sys.stdout.buffer
        try:
            for batch in items:  # lines encoded by the destination's "encode" step
                out.write(b"".join(batch))
            out.flush()
        except BrokenPipeError:  # `dataflare run ... | head`: its reader has what it wanted
            _closed(self.step)


_CLOSED: list[bool] = []


def _closed(step: str) -> None:
    """Stdout's reader went away: the run stops as on SIGPIPE, as CLI tools end then."""
    if _CLOSED:
        return
    _CLOSED.append(True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    log.warning("step %r: stdout was closed by its reader: the run stops", step)
    stopping.SIGNAL.append(signal.SIGPIPE)
    stopping.REQUESTED.set()


class StdoutSink(DynamicSink[Batch]):
    """Print records as JSON lines from every worker."""

    def __init__(self, option: int, step: str) -> None:
        self.option, self.step = option, step

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Printer:
        """A printer for one worker."""
        return _Printer(self.option, self.step)


@destination("stdout", config=StdoutConfig, description="Print records as JSON lines.",
             blocks=())
def build_stdout(ctx: BuildContext, up: Stream[Batch]) -> Stream[Any]:
    """Build a stdout destination."""
    _CLOSED.clear()  # a new run: its stdout is open
    option = (orjson.OPT_INDENT_2 if ctx.config.pretty else 0) | (
        orjson.OPT_SORT_KEYS if ctx.config.sort_keys else 0
    )
    encoded = map_records("encode", up, lambda r: json_line(without_meta(r), option),
                          ctx.step_id)
    op.output("print", encoded.down, StdoutSink(option, ctx.step_id))
    return encoded.errs


