"""No setting accepted without effect: implemented, or warned at validate and run (--strict)."""

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from dataflare.cli import main
from dataflare.dsl_compiler import validate_file, validate_text
from dataflare.testing import run_case
from tests.fixtures.workflows import run_cli

SEEDS = Path(__file__).parent / "seeds"
FLOWS = Path(__file__).parents[2] / "flows"


def _warnings(v):
    return {(p.path, p.message) for p in v.problems if p.severity == "warning"}


def test_seed_settings_without_effect_are_warned_by_path_and_refused_by_strict(capsys):
    path = SEEDS / "dsl_reference.yaml"
    v = validate_file(path)
    assert not v.errors()
    paths = {p for p, m in _warnings(v) if "no effect yet" in m}
    assert paths == {
        "schedule",
        "post_actions",
        "sources.main_db.monitoring.metrics",
        "sources.main_db.monitoring.alerts",
        "destinations.analytics_db.monitoring.metrics",
        "destinations.analytics_db.monitoring.alerts",
    }
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}:21:3: schedule: warning: the schedule has no effect yet" in err
    assert main(["validate", "--strict", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:21:3: schedule: the schedule has no effect yet" in err
    assert ": warning: " not in err


def test_roles_are_warned_and_strict_passes_a_clean_flow(capsys):
    roles = yaml.safe_load((SEEDS / "roles.yaml").read_text())["roles"]
    wf = {
        "sources": {"g": {"type": "generator", "config": {"preset": "orders", "count": 1}}},
        "destinations": {"o": {"type": "stdout", "inputs": ["g"]}},
        "roles": roles,
    }
    v = validate_text(yaml.safe_dump({"workflow": wf}))
    assert ("roles", "roles have no effect yet: no server enforces them") in _warnings(v)
    assert main(["validate", "--strict", str(FLOWS / "quickstart.yaml")]) == 0


def test_blocks_a_type_does_not_act_on_are_warned():
    v = validate_text("""\
workflow:
  sources:
    f:
      type: file
      mode: cdc
      config: {path: in.jsonl, format: jsonl}
      incremental: {column: id}
    pg:
      type: postgres
      mode: cdc
      config: {dsn: "postgresql://localhost/test", table: t}
      cdc: {slot_name: s}
  transformations:
    m:
      type: mapping
      inputs: [f]
      plugin: shout
      config: {mappings: [{source: id, destination: id}]}
  destinations:
    o:
      type: stdout
      inputs: [m, pg]
      write_mode: {type: merge, merge_key: id}
      batch: {size: 10}
    fm:
      type: file
      inputs: [f]
      config: {path: out.jsonl}
      write_mode: {type: merge, merge_key: id}
    fa:
      type: file
      inputs: [f]
      config: {path: out2.jsonl}
      write_mode: {type: append}
    d:
      type: duckdb
      inputs: [f]
      config: {path: x.duckdb, table: t}
      write_mode: {type: merge, merge_key: id}
      batch: {size: 10}
""")
    found = {(p.path, p.message) for p in v.problems if "has no effect on" in p.message}
    assert found == {
        ("sources.f.mode", "'mode' has no effect on a source of type 'file'"),
        ("sources.f.incremental", "'incremental' has no effect on a source of type 'file'"),
        ("destinations.o.write_mode",
         "'write_mode' has no effect on a destination of type 'stdout'"),
        ("destinations.o.batch", "'batch' has no effect on a destination of type 'stdout'"),
        ("destinations.fm.write_mode", "write_mode 'merge' has no effect on a destination "
         "of type 'file' (it acts on: append, overwrite)"),
        ("transformations.m.plugin",
         "'plugin' has no effect on a transformation of type 'mapping'"),
    }


def test_run_warns_about_settings_without_effect_and_still_runs(tmp_path):
    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  schedule: {type: interval, interval: 15m}
  sources:
    g:
      type: generator
      config: {preset: orders, count: 3}
      monitoring:
        alerts: [{name: slow, condition: "lag > 10"}]
  destinations:
    o: {type: file, inputs: [g], config: {path: out.jsonl}}
  post_actions:
    - {type: webhook, config: {url: "http://127.0.0.1:9/"}}
""")
    result = run_cli("run", str(flow), "-q")
    assert result.code == 0, result.stderr
    assert f"{flow}:2:3: schedule: warning: the schedule has no effect yet" in result.stderr
    assert (f"{flow}:8:9: sources.g.monitoring.alerts: warning: monitoring alerts have no "
            "effect yet") in result.stderr
    assert f"{flow}:11:3: post_actions: warning: post actions have no effect yet" in result.stderr
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 3


WINDOWED = """\
workflow:
  sources:
    events:
      type: file
      config: {path: events.jsonl, format: jsonl}
      STREAMING
  transformations:
    per_minute:
      type: window
      inputs: [events]
      config:
        window: {type: tumbling, size: 1m}
        time_field: ts
        aggregations: [{field: ts, operations: [count], as: n}]
        LATENESS
  destinations:
    out: {type: stdout, inputs: [per_minute]}
tests:
  - name: late
    inputs:
      events: [{ts: 0}, {ts: 130}, {ts: 20}]
"""


@pytest.mark.parametrize(("streaming", "lateness", "first_window"), [
    ("", "", 1),  # no lateness: the record at 20 s is behind the watermark (130 s)
    ('streaming: {watermark_delay: "2m"}', "", 2),  # the source's delay is the default
    ('streaming: {watermark_delay: "2m"}', "allowed_lateness: 0s", 1),  # the step's own wins
])
def test_watermark_delay_is_the_default_allowed_lateness_downstream(streaming, lateness,
                                                                     first_window):
    v = validate_text(WINDOWED.replace("STREAMING", streaming).replace("LATENESS", lateness))
    assert not v.errors(), [str(p) for p in v.errors()]
    out = run_case(v, v.tests[0])["out"]
    counts = {r["window_start"]: r["n"] for r in out}
    assert counts == {"1970-01-01T00:00:00Z": first_window, "1970-01-01T00:02:00Z": 1}


@pytest.mark.parametrize(("args", "expected"), [
    ([], 2.0),  # the smallest checkpoint_interval of the sources
    (["-s", "7"], 7.0),  # -s wins
])
def test_checkpoint_interval_is_the_default_snapshot_interval(tmp_path, monkeypatch, args,
                                                              expected):
    import bytewax.run

    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    a: {type: generator, config: {preset: orders, count: 1}, streaming: {checkpoint_interval: 3s}}
    b: {type: generator, config: {preset: orders, count: 1}, streaming: {checkpoint_interval: 2s}}
  destinations:
    o: {type: file, inputs: [a, b], config: {path: out.jsonl}}
""")
    seen = {}
    real = bytewax.run.cli_main

    def spy(flow, **kwargs):
        seen.update(kwargs)
        return real(flow, **kwargs)

    monkeypatch.setattr(bytewax.run, "cli_main", spy)
    assert main(["run", str(flow), "-q", *args]) == 0
    assert seen["epoch_interval"] == timedelta(seconds=expected)
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 2


SCHEDULED = """\
workflow:
  schedule: SCHEDULE
  sources:
    g: {type: generator, config: {preset: orders, count: 1}}
  destinations:
    o: {type: stdout, inputs: [g]}
"""


def _schedule_errors(schedule):
    v = validate_text(SCHEDULED.replace("SCHEDULE", schedule))
    return v, [f"{p.path}: {p.message}" for p in v.errors()]


@pytest.mark.parametrize(("schedule", "error"), [
    ('{type: cron, expression: "61 * * * *"}',
     "schedule.expression: invalid cron expression '61 * * * *': its minute field '61' is not "
     "valid"),
    ('{type: cron, expression: "0 0 * 13 *"}',
     "schedule.expression: invalid cron expression '0 0 * 13 *': its month field '13' is not "
     "valid"),
    ('{type: cron, expression: "0 0 * * mon-xyz"}',
     "schedule.expression: invalid cron expression '0 0 * * mon-xyz': its day of week field "
     "'mon-xyz' is not valid"),
    ('{type: cron, expression: "0 0 30 2 *"}',
     "schedule.expression: cron expression '0 0 30 2 *' never fires (e.g. February 30th)"),
    ('{type: cron, expression: "0 0 * *"}',
     "schedule.expression: cron expression '0 0 * *' has 4 fields, expected 5 (minute hour "
     "day-of-month month day-of-week) or 6 (seconds last)"),
    ('{type: cron, expression: "0 0 * * *", timezone: Europe/Pari}',
     "schedule.timezone: unknown time zone 'Europe/Pari': not in the IANA database (did you "
     "mean 'Europe/Paris'?)"),
    ('{type: cron, expression: "0 0 * * *", timezone: "+08:00"}',
     "schedule.timezone: unknown time zone '+08:00': not in the IANA database"),
    ('{type: interval, expression: often}',
     "schedule: interval expression 'often' is not a duration (e.g. '15m', '2h')"),
    ('{type: interval, expression: 15m, interval: 15m}',
     "schedule: an interval schedule gives its period once: 'interval' or 'expression'"),
    ("{type: interval}",
     "schedule: an interval schedule needs 'interval' (or 'expression', e.g. '15m')"),
    ("{type: once}", "schedule: a once schedule needs 'start_date'"),
    ('{type: once, start_date: "2024-02-01T00:00:00Z", end_date: "2024-01-01T00:00:00Z"}',
     "schedule: 'end_date' must be after 'start_date'"),
])
def test_bad_schedules_are_refused_with_their_location(schedule, error):
    _, errors = _schedule_errors(schedule)
    assert errors == [error]


@pytest.mark.parametrize("schedule", [
    '{type: cron, expression: "*/15 9-17 * * mon-fri", timezone: Asia/Shanghai}',
    '{type: cron, expression: "0 0 1 * *", timezone: America/Argentina/Buenos_Aires}',
    '{type: cron, expression: "0 0 29 2 *"}',  # fires in leap years
    '{type: cron, expression: "0 0 * * * 30"}',  # six fields: seconds last
    '{type: once, start_date: "2024-01-01T00:00:00Z", catchup: none}',
    "{type: event, event: orders_loaded}",
])
def test_good_schedules_validate(schedule):
    v, errors = _schedule_errors(schedule)
    assert errors == []
    assert v.workflow is not None and v.workflow.schedule is not None


def test_an_interval_schedule_takes_its_period_as_expression_or_interval():
    periods = []
    for schedule in ('{type: interval, expression: "15m"}', "{type: interval, interval: 15m}"):
        v, errors = _schedule_errors(schedule)
        assert errors == []
        periods.append(v.workflow.schedule.interval)
    assert periods == [900.0, 900.0]


def test_a_windowed_join_under_a_watermark_delay_gets_no_lateness_advice():
    flow = """\
workflow:
  sources:
    a: {type: file, config: {path: a.jsonl}, STREAMING}
    b: {type: file, config: {path: b.jsonl}, STREAMING}
  transformations:
    j:
      type: join
      inputs: [a, b]
      config: {join_key: k, time_field: ts, window: {type: tumbling, size: 1m}}
  destinations:
    o: {type: stdout, inputs: [j]}
"""
    advice = "a windowed join reads its two inputs side by side"
    bare = validate_text(flow.replace(", STREAMING", ""))
    assert any(advice in m for _, m in _warnings(bare))
    delayed = validate_text(flow.replace("STREAMING", 'streaming: {watermark_delay: "10m"}'))
    assert not any(advice in m for _, m in _warnings(delayed))


def test_compile_file_logs_the_warnings_for_bytewax_run(tmp_path, caplog):
    from dataflare.dsl_compiler import compile_file

    flow = tmp_path / "f.yaml"
    flow.write_text(SCHEDULED.replace("SCHEDULE", "{type: interval, interval: 1h}"))
    compile_file(flow)
    assert f"{flow}:2:3: schedule: warning: the schedule has no effect yet" in caplog.text


@pytest.mark.parametrize(("plugin", "error"), [
    ('{type: native, path: "m:f", config: {memory_limit: 64MB}}',
     "'memory_limit' has no effect on a native plugin"),
    ('{type: native, path: "m:f", config: {timeout: 2s}}',
     "'timeout' has no effect on a native plugin"),
    ('{type: wasm, path: x.wasm, url: "http://127.0.0.1/"}',
     "'url' has no effect on a wasm plugin"),
    ('{type: remote, url: "http://127.0.0.1/", path: x.wasm}',
     "'path' has no effect on a remote plugin"),
    ('{type: wasm, path: x.wasm, config: {memory_limit: 64MB, timeout: 2s}}', None),
])
def test_plugin_settings_the_plugin_type_ignores_are_refused(plugin, error):
    v = validate_text(SCHEDULED.replace("  schedule: SCHEDULE", f"  plugins:\n    p: {plugin}"))
    assert [p.message for p in v.errors()] == ([error] if error else [])
