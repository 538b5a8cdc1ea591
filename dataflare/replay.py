"""``dataflare replay``: dead letters, unwrapped, fed back into a step of the workflow.

After the cause of a failure is fixed (a constraint relaxed, a mapping corrected), the
records in a dead-letter file go back into step STEP: STEP and everything downstream of it
run as in a normal run (with recovery, error handling and dead letters of their own), and
nothing upstream of it does. A dead letter's ``record`` is replayed as it was; one kept as
raw text (undecodable input) is replayed when it now parses as a JSON object.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from bytewax.testing import TestingSource

from dataflare.records import META


def read_dead_letters(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a JSON-lines dead-letter file, and why others cannot be replayed."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                letter = json.loads(line)
            except ValueError:
                problems.append(f"{where}: not JSON")
                continue
            if not isinstance(letter, dict) or "record" not in letter or "error" not in letter:
                problems.append(f"{where}: not a dead letter (no 'error' and 'record')")
                continue
            record = letter["record"]
            if isinstance(record, dict) and set(record) == {"base64"}:
                record = base64.b64decode(record["base64"]).decode("utf-8", "replace")
            if isinstance(record, str):  # raw input: replayable once it parses
                try:
                    record = json.loads(record)
                except ValueError:
                    problems.append(f"{where}: the record is raw text that is not JSON")
                    continue
            if not isinstance(record, dict):
                problems.append(f"{where}: the record is not a JSON object")
                continue
            # Where it first came from, and which dead letter brought it back.
            source = (letter.get("source") or {}).get("position") or {"file": path.name,
                                                                      "line": n}
            record[META] = {**source, "replay": where}
            records.append(record)
    return records, problems


def replay_source(records: list[dict[str, Any]]) -> TestingSource[list[dict[str, Any]]]:
    """A source of the replayed records, in batches."""
    batches = [records[i:i + 1000] for i in range(0, len(records), 1000)]
    return TestingSource(batches)
