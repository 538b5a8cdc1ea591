"""``dataflare.run``: the runner as a Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dataflare
from tests.fixtures.workflows import ROOT


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


def test_a_window_counts_what_it_emitted_and_its_late_records_apart(tmp_path: Path) -> None:
    # Six windows of two keys from 60 events, and 6 events 20 minutes behind: late.
    base, events = 1704067200, []
    for i in range(60):
        events.append({"c": "fr" if i % 2 else "de", "n": i, "ts": base + i * 30})
        if i % 10 == 9:
            events.append({"c": "fr", "n": -1, "ts": base + i * 30 - 1200})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    flow = tmp_path / "wf.yaml"
    flow.write_text("""
workflow:
  sources: {src: {type: file, config: {path: in.jsonl}}}
  transformations:
    win:
      type: window
      inputs: [src]
      config: {window: {type: tumbling, size: 5m}, time_field: ts, group_by: [c],
               aggregations: [{field: n, operations: [count]}]}
  destinations: {out: {type: file, inputs: [win], config: {path: out.jsonl}}}
""")
    windows = {"records": 12, "failed": 0, "late": 6}
    result = dataflare.run(flow, quiet=True)
    assert result.summary is not None and result.summary["steps"]["win"] == windows
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 12
    # ... and so says the summary log line with --log-format json (it had no late count)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    text = subprocess.run([sys.executable, "-m", "dataflare", "--log-format", "json", "run",
                           str(flow)], env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    [summary] = [line for line in (json.loads(x) for x in text.stderr.splitlines()
                                   if x.startswith("{")) if line["message"] == "summary"]
    assert summary["steps"]["win"] == windows and summary["records_count"] == 12


def test_a_bounded_run_with_recovery_warns_that_its_open_windows_are_emitted(
        tmp_path: Path) -> None:
    # A scheduled catch-up (stop_at_end, -r) emitted its open windows at its end, and the
    # next run a second part of each: a merge kept the second part alone, silently.
    from tests.fixtures.workflows import run_cli

    (tmp_path / "in.jsonl").write_text('{"k": "a", "ts": 0}\n')
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    per_min:
      type: window
      inputs: [src]
      config:
        window: {type: tumbling, size: 1m}
        time_field: ts
        group_by: [k]
        aggregations: [{field: ts, operations: [count], as: n}]
  destinations:
    out: {type: file, inputs: [per_min], config: {path: out.jsonl}}
""")
    said = "'per_min' emit their open windows and groups when this run's input ends"
    assert said not in run_cli("run", str(tmp_path / "flow.yaml")).stderr
    again = run_cli("run", str(tmp_path / "flow.yaml"), "-r", str(tmp_path / "rec"))
    assert again.code == 0 and said in again.stderr


def test_the_progress_file_ends_with_the_runs_status(tmp_path: Path) -> None:
    # It was left saying "running", with the counts of the last second, after the run ended.
    from tests.fixtures.workflows import run_cli

    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(3)))
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  sources: {src: {type: file, config: {path: in.jsonl}}}
  destinations: {out: {type: file, inputs: [src], config: {path: out.jsonl}}}
""")
    progress = tmp_path / "progress.json"
    result = run_cli("run", str(tmp_path / "flow.yaml"), "--progress-json", str(progress))
    assert result.code == 0, result.stderr
    said = json.loads(progress.read_text())
    assert said["status"] == "succeeded"
    assert said["total"] == 3


def test_a_run_piped_into_head_stops_as_on_sigpipe(tmp_path: Path) -> None:
    # `dataflare run ... | head` failed the run with "[Errno 32] Broken pipe", naming no step.
    (tmp_path / "flow.yaml").write_text("""\
workflow:
  sources: {gen: {type: generator, config: {count: 200000, fields: {n: {type: sequence}}}}}
  destinations: {so: {type: stdout, inputs: [gen]}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", "flow.yaml"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = [proc.stdout.readline() for _ in range(2)]
    proc.stdout.close()  # what head does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + 13, err  # SIGPIPE, as CLI tools end
    assert all(json.loads(line)["n"] is not None for line in first)
    assert "step 'so': stdout was closed by its reader: the run stops" in err
    assert "Broken pipe" not in err and "Traceback" not in err
