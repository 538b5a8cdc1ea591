"""JSON log lines: every line on stderr is an object with the run's fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_json_log_lines_parse_and_carry_the_fields(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"n": 1}\n{oops\n{"n": 2}\n')
    flow = tmp_path / "wf.yaml"
    flow.write_text("""
workflow:
  id: logged
  sources:
    numbers: {type: file, config: {path: in.jsonl}, error_handling: {strategy: skip}}
  destinations: {out: {type: file, inputs: [numbers], config: {path: out.jsonl}}}
""")
    for args, env in (([ "--log-format", "json"], {}), ([], {"DATAFLARE_LOG_FORMAT": "json"})):
        out = subprocess.run([sys.executable, "-m", "dataflare", *args, "run", str(flow)],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stderr.splitlines()]
        assert lines, "no log lines"
        for line in lines:
            assert {"timestamp", "level", "workflow_id", "run_id", "component", "connector",
                    "message"} <= set(line)
            assert line["workflow_id"] == "logged" and len(line["run_id"]) == 32
        skipped = [x for x in lines if "skipped record" in x["message"]]
        assert skipped[0]["level"] == "warning" and skipped[0]["component"] == "numbers"
        assert skipped[0]["position"].endswith("in.jsonl:2")
        summary = [x for x in lines if x["message"] == "summary"][0]
        assert summary["records_count"] == 2 and summary["duration_ms"] >= 0
        assert summary["steps"]["numbers"] == {"records": 2, "failed": 1}
