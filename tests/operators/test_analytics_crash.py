"""`ml` and `sql` per window under `dataflare run --recovery-dir`: SIGKILL, rerun, same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.fixtures.workflows import ROOT, run_cli

FLOW = """\
workflow:
  sources:
    gen:
      type: generator
      config: {{preset: orders, count: 12000, batch_size: 100, seed: 9{rate}}}
  transformations:
    seg:
      inputs: [gen]
      type: ml
      config:
        algorithm: kmeans
        features: [total, items]
        clusters: 3
        partition_by: items
        output_field: cluster
    per_minute:
      inputs: [gen]
      type: sql
      config:
        query: "select count(*) as n, round(sum(total), 2) as s, max(order_id) as last_id
                from input"
        window: {{type: tumbling, size: 1m}}
        time_field: ts
        time_unit: ms
  destinations:
    ml_out: {{type: file, inputs: [seg], config: {{path: ml.jsonl}}}}
    sql_out: {{type: file, inputs: [per_minute], config: {{path: sql.jsonl}}}}
"""


def outputs(d: Path) -> dict[str, Counter[str]]:
    return {
        name: Counter(
            json.dumps({k: v for k, v in json.loads(x).items() if k != "_meta"}, sort_keys=True)
            for x in (d / name).read_text().splitlines()
        )
        for name in ("ml.jsonl", "sql.jsonl")
    }


def test_sigkill_and_resume_gives_the_uninterrupted_models_and_windows(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "f.yaml").write_text(FLOW.format(rate=""))
    result = run_cli("run", str(whole / "f.yaml"), timeout=300)
    assert result.code == 0, result.stderr
    expected = outputs(whole)
    assert sum(expected["ml.jsonl"].values()) == 12000
    assert sum(expected["sql.jsonl"].values()) == 10

    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "f.yaml").write_text(FLOW.format(rate=", rate: 1500"))
    cmd = [sys.executable, "-m", "dataflare", "run", str(crash / "f.yaml"), "--quiet",
           "--recovery-dir", str(crash / "recovery"), "-s", "0.2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
    proc = subprocess.Popen(cmd, env=env, cwd=crash, stderr=subprocess.PIPE, text=True)
    # Kill once a few snapshots exist (the run takes about 8 s at 1,500 records/s).
    deadline = time.monotonic() + 60
    started = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if started is None and any((crash / "recovery").glob("*")):
            started = time.monotonic()
        if started is not None and time.monotonic() - started > 2.5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = crash / "ml.jsonl"
    done = len(partial.read_text().splitlines()) if partial.exists() else 0
    assert done < 12000, "the run ended before it was killed"
    again = subprocess.run(cmd, env=env, cwd=crash, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert outputs(crash) == expected
    print(f"killed after {done} of 12000 ml records")
