"""Every setting works or is warned: validate --strict, watermark_delay, checkpoint_interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "tests/dsl_compiler/seeds"


def dataflare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataflare", *args], capture_output=True,
                          text=True, timeout=120)


def test_settings_without_effect_are_warned_and_strict_refuses_them(tmp_path: Path) -> None:
    seed = str(SEEDS / "dsl_reference.yaml")
    out = dataflare("validate", seed)
    assert out.returncode == 0
    assert "monitoring" not in out.stderr and "post_actions" not in out.stderr  # carried out
    strict = dataflare("validate", "--strict", seed)
    assert strict.returncode == 1 and "valid" not in strict.stdout
    protection = tmp_path / "protected.yaml"
    protection.write_text("workflow:\n  sources: {g: {type: generator, config: {preset: orders, "
                          "count: 3}}}"
                          "\n  destinations: {o: {type: stdout, inputs: [g]}}\n" +
                          "\n".join("  " + line for line in
                                    (SEEDS / "data_protection.yaml").read_text().splitlines()))
    out = dataflare("validate", str(protection))
    assert "data_protection.encryption: warning" in out.stderr, out.stderr
    run = dataflare("run", str(protection))  # run shows validate's warnings too
    assert run.returncode == 0 and "data_protection.encryption: warning" in run.stderr


def test_watermark_delay_is_the_default_lateness_of_windows_downstream(tmp_path: Path) -> None:
    events = [{"u": "a", "ts": 600}, {"u": "a", "ts": 700}, {"u": "a", "ts": 590}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    flow = tmp_path / "wf.yaml"
    template = """
workflow:
  sources:
    events:
      type: file
      config: {{path: in.jsonl}}
      {streaming}
  transformations:
    per_minute:
      type: window
      inputs: [events]
      config:
        window: {{type: tumbling, size: 60s}}
        time_field: ts
        group_by: [u]
        aggregations: [{{field: u, operations: [count], as: n}}]
        late_to: late
  destinations:
    out: {{type: file, inputs: [per_minute], config: {{path: out.jsonl}}}}
    late: {{type: file, config: {{path: late.jsonl}}}}
"""
    for streaming, late in (("", 1), ("streaming: {watermark_delay: 5m}", 0)):
        for f in ("out.jsonl", "late.jsonl"):
            (tmp_path / f).unlink(missing_ok=True)
        flow.write_text(template.format(streaming=streaming))
        out = dataflare("run", str(flow))
        assert out.returncode == 0, out.stderr
        lates = (tmp_path / "late.jsonl").read_text().splitlines() \
            if (tmp_path / "late.jsonl").exists() else []
        assert len(lates) == late, streaming
