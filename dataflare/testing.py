"""``dataflare test``: run a workflow's ``tests:`` blocks and compare outputs as multisets."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson
from bytewax.testing import run_main

from dataflare.dsl_compiler import compile_validated, validate_file
from dataflare.dsl_compiler.models import TestCase
from dataflare.dsl_compiler.validate import Validated
from dataflare.records import without_meta


def canonical(value: Any) -> Any:
    """A comparable form of a record: no ``_meta``, whole floats as ints, floats rounded."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in without_meta(value).items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, float):
        return int(value) if value.is_integer() else round(value, 9)
    return value


def _key(record: Any) -> str:
    return orjson.dumps(canonical(record), option=orjson.OPT_SORT_KEYS, default=str).decode()


def run_case(validated: Validated, case: TestCase) -> dict[str, list[Any]]:
    """Run one test case; the records each destination received."""
    captured: dict[str, list[Any]] = {}
    flow = compile_validated(validated, test_inputs=case.inputs, captured=captured)
    run_main(flow)
    return {dest: [r for batch in batches for r in batch] for dest, batches in captured.items()}


def diff(expected: Iterable[Any], actual: Iterable[Any]) -> list[str]:
    """Lines describing how two multisets of records differ (empty when equal).

    A missing record and an unexpected one that agree on most of the expected fields are
    shown as one pair, with the fields that differ.
    """
    want, got = Counter(map(_key, expected)), Counter(map(_key, actual))
    missing, unexpected = want - got, got - want
    lines = []
    for rec in sorted(missing):
        while missing[rec] and (near := _nearest(rec, unexpected)) is not None:
            missing[rec] -= 1
            unexpected[near] -= 1
            lines += [f"    ~ expected: {rec}", f"      got:      {near}",
                      f"      ({_differences(orjson.loads(rec), orjson.loads(near))})"]
    for rec, n in sorted((+missing).items()):
        lines.append(f"    - missing{f' x{n}' if n > 1 else ''}: {rec}")
    for rec, n in sorted((+unexpected).items()):
        lines.append(f"    + unexpected{f' x{n}' if n > 1 else ''}: {rec}")
    return lines


def _nearest(key: str, candidates: Counter[str]) -> str | None:
    """The candidate record agreeing with ``key``'s on the most fields (at least half)."""
    want = orjson.loads(key)
    if not isinstance(want, dict) or not want:
        return None
    best, score = None, (len(want) + 1) // 2 - 1
    for cand, n in sorted(candidates.items()):
        rec = orjson.loads(cand)
        if n and isinstance(rec, dict):
            same = sum(1 for k, v in want.items() if k in rec and rec[k] == v)
            if same > score:
                best, score = cand, same
    return best


def _differences(want: dict[str, Any], got: dict[str, Any]) -> str:
    """How ``got`` differs from ``want``, field by field."""
    out = [f"{k}: {orjson.dumps(got[k]).decode()}, expected {orjson.dumps(v).decode()}"
           for k, v in want.items() if k in got and got[k] != v]
    if absent := [k for k in want if k not in got]:
        out.append(f"no {', '.join(absent)}")
    if extra := [k for k in got if k not in want]:
        out.append(f"not expected: {', '.join(extra)}")
    return "; ".join(out)


def _is_dead_letter(record: Any) -> bool:
    return (isinstance(record, dict) and "record" in record
            and isinstance(record.get("error"), dict) and "at" in record["error"])


def as_expected(expected: list[Any], actual: list[Any]) -> list[Any]:
    """``actual`` as ``expected`` describes it: dead letters by the fields expected only.

    A dead letter holds the time it was made (``error.at``) and the run's id: an expected
    one gives its ``record`` and what of ``error`` (``type``, ``message``, ``step``) and
    ``source`` matters, and the others are compared on those.
    """
    if not actual or not all(_is_dead_letter(r) for r in actual):
        return actual
    fields: dict[str, set[str] | None] = {}  # compared: whole (None) or these sub-fields
    for want in expected:
        for k, v in (want.items() if isinstance(want, dict) else ()):
            parts = fields.get(k, set())
            nested = k in ("error", "source") and isinstance(v, dict)
            fields[k] = parts | set(v) if nested and parts is not None else None
    return [{k: r[k] if parts is None or not isinstance(r[k], dict)
             else {p: r[k][p] for p in parts if p in r[k]}
             for k, parts in fields.items() if k in r} for r in actual]


def run_workflow_tests(paths: Iterable[str]) -> int:
    """Run every test of every file; prints PASS/FAIL per test, returns the exit code."""
    failures = passes = 0
    for path in paths:
        v = validate_file(path)
        if v.errors():
            for p in v.errors():
                print(p.render(), file=sys.stderr)
            failures += 1
            continue
        if not v.tests:
            print(f"{path}: no tests")
            continue
        for case in v.tests:
            try:
                outputs = run_case(v, case)
            except Exception as exc:  # noqa: BLE001 - a failing test, reported
                from dataflare.runner import error_text

                print(f"FAIL {path}: {case.name}: the run failed: {error_text(exc)}")
                failures += 1
                continue
            problems = []
            for dest, expected in case.expect.items():
                lines = diff(expected, as_expected(expected, outputs.get(dest, [])))
                if lines:
                    problems.append(f"  {dest}:")
                    problems.extend(lines)
            if problems:
                failures += 1
                print(f"FAIL {path}: {case.name}")
                print("\n".join(problems))
            else:
                passes += 1
                print(f"PASS {path}: {case.name}")
    print(f"{passes} passed, {failures} failed")
    return 1 if failures else 0
