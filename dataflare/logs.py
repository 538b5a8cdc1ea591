"""Log output: text on a terminal, or one JSON object per line for log collectors.

``--log-format json`` (or ``DATAFLARE_LOG_FORMAT=json``, for containers) makes every line
DataFlare writes on stderr a JSON object with ``timestamp``, ``level``, ``workflow_id``,
``run_id``, ``component``, ``connector`` and ``message``, plus ``position``,
``records_count``, ``bytes`` and ``duration_ms`` where they apply. :func:`say` is how the
runner reports (errors, the summary, a clean stop) in either format.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from dataflare import secrets

FORMAT_ENV = "DATAFLARE_LOG_FORMAT"
CONTEXT: dict[str, Any] = {"workflow_id": None, "run_id": None}
_FIELDS = ("component", "connector", "position", "records_count", "bytes", "duration_ms",
           "steps", "status")
_log = logging.getLogger("dataflare.run")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object."""
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "workflow_id": CONTEXT["workflow_id"],
            "run_id": CONTEXT["run_id"],
            "component": None,
            "connector": None,
            "message": record.getMessage(),
            "logger": record.name,
        }
        for name in _FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _scrub_record(record: logging.LogRecord) -> bool:
    """Keep secret values out of a log record, and out of the fields given as ``extra``.

    The record factory of :func:`dataflare.secrets.install_logging` scrubs a record when it
    is made; the ``extra`` fields are set later, and secrets may be registered in between.
    """
    secrets.scrub_record(record)
    for name in ("position",):
        if isinstance(getattr(record, name, None), str):
            setattr(record, name, secrets.scrub(getattr(record, name)))
    return True


def json_mode() -> bool:
    """Whether log lines are JSON."""
    return os.environ.get(FORMAT_ENV, "text") == "json"


def setup(verbose: bool, fmt: str | None = None) -> None:
    """Configure logging for the CLI (``fmt`` overrides ``DATAFLARE_LOG_FORMAT``)."""
    if fmt is not None:
        os.environ[FORMAT_ENV] = fmt  # child processes (workers of a server) follow
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_scrub_record)
    if json_mode():
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    _log.setLevel(logging.INFO)


def say(message: str, level: str = "info", **fields: Any) -> None:
    """Report a line of the run: plain text (``error: `` before errors), or a JSON log line."""
    message = secrets.scrub(message)
    if json_mode():
        _log.log(getattr(logging, level.upper()), message, extra=fields)
        return
    print(f"error: {message}" if level == "error" else message, file=sys.stderr, flush=True)
