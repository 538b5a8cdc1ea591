"""``dataflare.run``: the runner as a Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dataflare


def test_run_returns_the_result_with_its_summary(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(f'{{"n": {i}}}\n' for i in range(6)) + "{bad\n")
    flow = tmp_path / "wf.yaml"
    flow.write_text("""
workflow:
  sources:
    numbers: {type: file, config: {path: in.jsonl}, error_handling: {strategy: skip}}
  transformations:
    odd: {type: filter, inputs: [numbers], config: {condition: "n % 2 == 1"}}
  destinations: {out: {type: file, inputs: [odd], config: {path: out.jsonl}}}
""")
    result = dataflare.run(flow, recovery_dir=tmp_path / "rec", quiet=True)
    assert result.ok and result.exit_code == 0 and result.error is None
    assert result.summary is not None
    assert (result.summary["total"], result.summary["succeeded"], result.summary["failed"]) == (
        6, 3, 1)
    assert result.summary["steps"]["odd"] == {"records": 3, "failed": 0}
    assert (tmp_path / "rec" / "dataflare-run-id").exists()
    got = [json.loads(x)["n"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(got) == [1, 3, 5]


def test_run_of_an_invalid_workflow_fails_without_raising(tmp_path: Path) -> None:
    flow = tmp_path / "wf.yaml"
    flow.write_text("workflow:\n  sources: {a: {type: nope}}\n")
    result = dataflare.run(flow, quiet=True)
    assert (result.status, result.exit_code, result.summary) == ("failed", 1, None)
    with pytest.raises(TypeError, match="unknown run options: colour"):
        dataflare.run(flow, colour="red")


def test_the_package_exports_its_api() -> None:
    assert set(dataflare.__all__) >= {"run", "RunResult", "compile_file", "validate_file",
                                      "__version__"}
    assert dataflare.__version__
    assert (Path(dataflare.__file__).parent / "py.typed").exists()
