"""``dataflare plugin test``: run a plugin over records from a JSON-lines file.

The plugin runs exactly as in a workflow (same loader, sandbox, limits and batch/record
fallback: :mod:`dataflare.operators.plugin`). Output records go to stdout as JSON lines;
each failed or unreadable record is one line on stderr, ``FILE:LINE: message``. The exit
code is 0 when every record went through (kept or dropped), 1 otherwise, 2 when the
plugin cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from dataflare.connectors.schema import json_loader
from dataflare.operators.plugin import (
    DEFAULT_WASM_TIMEOUT,
    PluginSetupError,
    WasmPlugin,
    native_function,
    parse_size,
    wasm_batches,
)
from dataflare.records import META, Failed, parse_duration, without_meta

_LOADS = json_loader()


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a JSON-lines file (with their line in ``_meta``) and its bad lines."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = _LOADS(line)  # numbers as a file source reads them (exact text if need be)
        except orjson.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not JSON ({exc})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{path}:{n}: a record is a JSON object, got {type(rec).__name__}")
            continue
        rec[META] = {"file": str(path), "line": n}
        records.append(rec)
    return records, problems


def _native(path: str, config: dict[str, Any]) -> Any:
    fn = native_function("plugin", path)

    def apply(batch: list[Any]) -> tuple[list[Any], list[Failed]]:
        good, bad = [], []
        for rec in batch:
            try:
                out = fn(without_meta(rec), config)
            except Exception as exc:  # noqa: BLE001 - reported like a failed record in a run
                bad.append(Failed.of("plugin", exc, rec))
                continue
            if out is not None:
                good.append(out)
        return good, bad

    return apply


def cmd_plugin_test(args: argparse.Namespace) -> int:
    """Run ``args.plugin`` over ``args.input``; see the module docstring."""
    try:
        config = orjson.loads(args.config)
    except orjson.JSONDecodeError as exc:
        print(f"--config: not JSON ({exc})", file=sys.stderr)
        return 2
    if not isinstance(config, dict):
        print("--config: expected a JSON object", file=sys.stderr)
        return 2
    records, problems = read_records(Path(args.input))
    try:
        if ":" in args.plugin and not Path(args.plugin).exists():
            apply = _native(args.plugin, config)
        else:
            path = Path(args.plugin)
            wasm = WasmPlugin(
                path.stem, path, config,
                parse_size(args.memory_limit) if args.memory_limit else None,
                parse_duration(args.timeout) if args.timeout else DEFAULT_WASM_TIMEOUT,
            )
            wasm.check()
            apply = wasm_batches("plugin", wasm)
    except (PluginSetupError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    for i in range(0, len(records), args.batch_size):
        good, bad = apply(records[i : i + args.batch_size])
        for rec in good:
            out.write(orjson.dumps(without_meta(rec), default=str) + b"\n")
        for f in bad:
            problems.append(f"{f.meta.get('file')}:{f.meta.get('line')}: {f.message}")
    out.flush()
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def add_parser(sub: Any) -> None:
    """Add ``plugin test`` to the ``dataflare`` command's subparsers."""
    p = sub.add_parser("plugin", help="Plugin SDK tools (see docs/plugin_sdk.md).")
    psub = p.add_subparsers(dest="plugin_command", required=True)
    t = psub.add_parser("test", help="Run a plugin over a JSON-lines file of records.")
    t.add_argument("plugin", help="A .wasm or .wat module, or module:function (native).")
    t.add_argument("--input", required=True, help="Records, one JSON object per line.")
    t.add_argument("--config", default="{}", help="The step's config, as a JSON object.")
    t.add_argument("--memory-limit", default=None, help="WASM memory cap, e.g. 64MB.")
    t.add_argument("--timeout", default=None,
                   help="WASM time per call, e.g. 2s (default 10s); a call that runs out fails "
                   "its whole batch: --batch-size 1 finds the record.")
    t.add_argument("--batch-size", type=int, default=500, help="Records per call.")
    t.set_defaults(fn=cmd_plugin_test)
