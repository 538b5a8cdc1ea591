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
    assert ("transformations.clean_customer_data.error_handling.redirect_to: warning: "
            "'redirect_to' has no effect with strategy 'skip'") in out.stderr, out.stderr
    strict = dataflare("validate", "--strict", seed)
    assert strict.returncode == 1 and "valid" not in strict.stdout
    protection = tmp_path / "protected.yaml"
    protection.write_text("workflow:\n  sources: {g: {type: generator, config: {preset: orders, "
                          "count: 3}}}"
                          "\n  destinations: {o: {type: stdout, inputs: [g]}}\n" +
                          "\n".join("  " + line for line in
                                    (SEEDS / "data_protection.yaml").read_text().splitlines()))
    out = dataflare("validate", str(protection))
    assert "data_protection.encryption.key_management: warning: key service 'aws_kms' is " \
           "not available" in out.stderr, out.stderr
    run = dataflare("run", str(protection))  # what cannot hold stops the run
    assert run.returncode == 1 and "key service 'aws_kms'" in run.stderr


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


def test_late_records_that_nothing_reads_are_counted_and_warned(tmp_path: Path) -> None:
    # The second event is 10 minutes behind the first (ms read as such): late, and with no
    # late_to and no reader of 'win.late' it is dropped; the run says so instead of
    # counting it among the window's output only.
    events = [{"c": "fr", "amount": 1, "ts": 1704067200000}, {"c": "fr", "amount": 4,
                                                             "ts": 1704066600000}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    template = """
workflow:
  sources: {{src: {{type: file, config: {{path: in.jsonl}}}}}}
  transformations:
    win:
      inputs: [src]
      type: window
      config: {{window: {{type: tumbling, size: 1m}}, time_field: ts, time_unit: ms,
               group_by: [c], aggregations: [{{field: amount, operations: [count, sum]}}]{late}}}
  destinations:
    out: {{type: file, inputs: [win], config: {{path: out.jsonl}}}}
{late_out}"""
    late_out = "    late_out: {type: file, config: {path: late.jsonl}}\n"
    flow = tmp_path / "wf.yaml"
    for late_to in (False, True):
        flow.write_text(template.format(late=", late_to: late_out" if late_to else "",
                                        late_out=late_out if late_to else ""))
        summary = tmp_path / "summary.json"
        run = dataflare("run", str(flow), "--summary-json", str(summary))
        assert run.returncode == 0, run.stderr
        got = json.loads(summary.read_text())
        assert got["steps"]["win"]["late"] == 1
        assert got["steps"]["win"]["records"] == 1  # the window's record; late ones apart
        if late_to:
            assert got["late_dropped"] == {} and "dropped" not in run.stderr
            assert len((tmp_path / "late.jsonl").read_text().splitlines()) == 1
        else:
            assert got["late_dropped"] == {"win": 1}
            assert "step 'win': 1 late record(s) dropped" in run.stderr, run.stderr
            assert "win: 1, 1 late (dropped)" in run.stderr, run.stderr


def test_error_and_write_mode_fields_without_effect_are_warned(tmp_path: Path) -> None:
    flow = tmp_path / "wf.yaml"
    flow.write_text("""\
workflow:
  sources: {src: {type: file, config: {path: in.jsonl}}}
  transformations:
    m:
      inputs: [src]
      type: mapping
      config: {keep_unmapped: true, mappings: [{source: id, destination: id}]}
      error_handling: {strategy: skip, redirect_to: dlq}
  destinations:
    dlq: {type: file, config: {path: dlq.jsonl}}
    f: {type: file, inputs: [m], write_mode: {type: append, merge_key: [id], deduplicate: true},
        config: {path: o.jsonl}}
    d: {type: duckdb, inputs: [m], write_mode: {type: append, deduplicate: true},
        config: {path: x.duckdb, table: t}}
    kept: {type: duckdb, inputs: [m], write_mode: {type: append, merge_key: [id],
           deduplicate: true}, config: {path: x.duckdb, table: t2}}
    unkeyed: {type: duckdb, inputs: [m], write_mode: {type: overwrite, merge_key: [id]},
              config: {path: x.duckdb, table: t3}}
""")
    out = dataflare("validate", str(flow))
    assert out.returncode == 0, out.stderr
    warned = [ln.split(": ", 1)[1] for ln in out.stderr.splitlines() if ": warning: " in ln]
    assert warned == [
        "transformations.m.error_handling.redirect_to: warning: 'redirect_to' has no effect "
        "with strategy 'skip' (failed records go there with strategy 'redirect')",
        "destinations.f.write_mode.merge_key: warning: 'merge_key' has no effect on a "
        "destination of type 'file'",
        "destinations.f.write_mode.deduplicate: warning: 'deduplicate' has no effect on a "
        "destination of type 'file'",
        "destinations.d.write_mode.deduplicate: warning: 'deduplicate' has no effect without "
        "'merge_key' (the key whose last record a batch keeps)",
        "destinations.unkeyed.write_mode.merge_key: warning: 'merge_key' has no effect on an "
        "overwrite without deduplicate (type: merge upserts on it)"], out.stderr
    # merge_key without a type: meant as an upsert, it appended every run again
    flow.write_text(flow.read_text().replace("type: overwrite, merge_key", "merge_key"))
    out = dataflare("validate", str(flow))
    assert out.returncode == 1
    assert "destinations.unkeyed.write_mode: 'merge_key' without 'type' would append: set " \
        "type: merge to upsert on the key" in out.stderr
