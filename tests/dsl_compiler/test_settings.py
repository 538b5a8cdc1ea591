"""No setting accepted without effect: blocks a type ignores, plugin settings, lateness."""

import re
from pathlib import Path

import pytest

from dataflare.dsl_compiler import validate_text
from dataflare.testing import run_case

SEEDS = Path(__file__).parent / "seeds"
FLOWS = Path(__file__).parents[2] / "flows"


def _warnings(v):
    return {(p.path, p.message) for p in v.problems if p.severity == "warning"}


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
        ("transformations.m.plugin",
         "'plugin' has no effect on a transformation of type 'mapping'"),
    }
    # A write mode the type does not carry out would be done as another (merge as an
    # overwrite of the file): refused.
    assert [(p.path, p.message) for p in v.errors()] == [
        ("destinations.fm.write_mode.type", "write_mode 'merge' is not supported by a "
         "destination of type 'file'; it supports: append, overwrite")]


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


SCHEDULED = """\
workflow:
  schedule: SCHEDULE
  sources:
    g: {type: generator, config: {preset: orders, count: 1}}
  destinations:
    o: {type: stdout, inputs: [g]}
"""


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
    flow.write_text(SCHEDULED.replace("  schedule: SCHEDULE\n", "").replace(
        "inputs: [g]}", "inputs: [g], batch: {size: 5}}"))
    compile_file(flow)
    assert (f"{flow}:5:36: destinations.o.batch: warning: 'batch' has no effect on a "
            "destination of type 'stdout'") in caplog.text


@pytest.mark.parametrize(("plugin", "error"), [
    ('{type: native, path: "m:f", config: {memory_limit: 64MB}}',
     "'memory_limit' has no effect on a native plugin"),
    ('{type: native, path: "m:f", config: {timeout: 2s}}',
     "'config.timeout' has no effect on a native plugin"),
    ('{type: wasm, path: x.wasm, url: "http://127.0.0.1/"}',
     "'url' has no effect on a wasm plugin"),
    ('{type: remote, url: "http://127.0.0.1/", path: x.wasm}',
     "'path' has no effect on a remote plugin"),
    ('{type: wasm, path: x.wasm, config: {memory_limit: 64MB, timeout: 2s}}', None),
])
def test_plugin_settings_the_plugin_type_ignores_are_refused(plugin, error):
    v = validate_text(SCHEDULED.replace("  schedule: SCHEDULE", f"  plugins:\n    p: {plugin}"))
    assert [p.message for p in v.errors()] == ([error] if error else [])


def test_settings_other_settings_make_idle_are_warned_with_their_lines():
    text = """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl, csv: {delimiter: ";"}}}
  transformations:
    agg:
      type: aggregation
      inputs: [src]
      config: {group_by: [a], aggregations: [{field: a, operations: [sum], window: 90d}]}
    dq:
      type: data_quality
      inputs: [src]
      config: {on_failure: drop, quarantine_to: bad, validations: [{field: a, rules: [not_empty]}]}
    j: {type: join, inputs: [src, dq], config: {join_key: a, time_field: ts, late_to: bad}}
    dd: {type: dedupe, inputs: [src], config: {keys: [a], time_unit: ms}}
    m: {type: mapping, inputs: [src], config: {mappings: [{source: a, destination: b}], drop: [c]}}
  destinations:
    out: {type: stdout, inputs: [agg, j, dd, m]}
    bad: {type: stdout}
"""
    v = validate_text(text, "w.yaml")
    lines = {p.render() for p in v.problems if p.severity == "warning"}
    for line in [
        "w.yaml:3:48: sources.src.config.csv: warning: 'csv' has no effect on a jsonl file",
        "w.yaml:8:31: transformations.agg.config.aggregations: warning: the trailing 'window' "
        "of 'a' is measured on the event time 'time_field', which is not set",
        "w.yaml:12:34: transformations.dq.config.quarantine_to: warning: 'quarantine_to' has "
        "no effect with on_failure: drop (failed records are dropped; 'quarantine' sends them "
        "there)",
        "w.yaml:13:62: transformations.j.config.time_field: warning: 'time_field' has no effect "
        "on a join without 'window' (it joins when an input ends, whatever the times)",
        "w.yaml:13:78: transformations.j.config.late_to: warning: 'late_to' has no effect on a "
        "join without 'window' (it joins when an input ends, whatever the times)",
        "w.yaml:14:59: transformations.dd.config.time_unit: warning: 'time_unit' has no effect "
        "without 'time_field' (times are then arrival times)",
        "w.yaml:15:89: transformations.m.config.drop: warning: 'drop' has no effect without "
        "keep_unmapped: true (only the mapped fields are kept anyway)",
    ]:
        assert line in lines, (line, lines)
    # The trailing window cannot work: a run refuses the workflow, naming it.
    assert [p.path for p in v.errors(for_run=True)] == ["transformations.agg.config.aggregations"]


def test_a_sources_mode_and_blocks_are_checked_by_validate_with_their_lines():
    """Each source type's own checks of its settings come at validate, not at run alone."""
    v = validate_text("""\
workflow:
  sources:
    api:
      type: rest_api
      mode: incremental
      config: {url: "http://127.0.0.1:9/items"}
    back:
      type: rest_api
      incremental: {cursor_field: ts, lookback: 10}
      config: {url: "http://127.0.0.1:9/items"}
    pg:
      type: postgres
      mode: incremental
      config: {dsn: "postgresql://127.0.0.1/test", table: t}
    files:
      type: s3
      config: {bucket: b, stop_at_end: true}
    mirror:
      type: postgres
      mode: hybrid
      config: {dsn: "postgresql://127.0.0.1/test", table: t}
      hybrid: {transition_after: timestamp}
    ok: {type: rest_api, config: {url: "http://127.0.0.1:9/items"}}
  destinations:
    out: {type: stdout, inputs: [api, back, pg, files, mirror, ok]}
""", "w.yaml")
    assert [p.render() for p in v.errors()] == [
        "w.yaml:5:7: sources.api.mode: mode incremental needs incremental.cursor_field: the "
        "field of the records that orders them",
        "w.yaml:9:7: sources.back.incremental: incremental.lookback needs "
        "incremental.cursor_type timestamp, got none",
        "w.yaml:13:7: sources.pg.mode: mode incremental needs incremental.column (or "
        "config.incremental_column)",
        "w.yaml:17:27: sources.files.config.stop_at_end: config.stop_at_end has no effect in "
        "mode full, which reads the objects once; remove it or set mode: incremental",
        "w.yaml:22:7: sources.mirror.hybrid: hybrid.transition_after 'timestamp' needs "
        "hybrid.transition_timestamp",
    ]
    assert v.workflow is None
    assert validate_text("workflow: {transformations: {}, destinations: {}}\n").workflow


def test_hybrid_settings_the_source_cannot_act_on_are_refused():
    v = validate_text("""\
workflow:
  sources:
    a:
      type: postgres
      mode: hybrid
      config: {dsn: "postgresql://127.0.0.1/test", table: t}
      hybrid: {initial_mode: incremental}
    b:
      type: postgres
      mode: hybrid
      config: {dsn: "postgresql://127.0.0.1/test", table: t}
      hybrid: {transition_timestamp: "2026-01-01T00:00:00Z"}
    c:
      type: postgres
      mode: hybrid
      config: {dsn: "postgresql://127.0.0.1/test", table: t, incremental_column: id}
      hybrid: {initial_mode: incremental, ongoing_mode: incremental}
  destinations:
    out: {type: stdout, inputs: [a, b, c]}
""", "w.yaml")
    assert [p.render() for p in v.errors()] == [
        "w.yaml:7:15: sources.a.hybrid: initial_mode 'incremental' is not supported before "
        "cdc: the change stream starts from a snapshot of the whole tables (initial_mode: full)",
        "w.yaml:12:15: sources.b.hybrid: transition_timestamp has no effect with "
        "transition_after 'completion': set transition_after: timestamp",
    ]


def test_a_transformation_may_not_write_under_meta():
    # A formula's output_field _meta.line rewrote positions: dead letters named wrong lines.
    v = validate_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    f: {type: custom, inputs: [src], config: {formula: "a * 2", output_field: _meta.line}}
    m:
      type: mapping
      inputs: [f]
      config: {mappings: [{source: a, destination: _meta}, {source: a, destination: meta}]}
  destinations:
    out: {type: stdout, inputs: [m]}
""", "w.yaml")
    assert [p.render() for p in v.errors()] == [
        "w.yaml:5:79: transformations.f.config.output_field: output_field '_meta.line' is "
        "under '_meta', which holds where a record came from: write elsewhere",
        "w.yaml:9:52: transformations.m.config.mappings[0].destination: destination '_meta' "
        "is under '_meta', which holds where a record came from: write elsewhere"]


@pytest.mark.parametrize(("model", "config", "message"), [
    ("auth", {"type": "bearer"}, "auth type 'bearer' needs 'token'"),
    ("auth", {"type": "api_key", "token": "t", "key": "k"},
     "'token' has no effect with auth type 'api_key'"),
    ("quality", {"validations": [], "default_region": "XX"}, "unknown phone region 'XX'"),
    ("aggregation", {"time_unit": "ms"}, "'time_unit' has no effect without 'time_field'"),
])
def test_settings_that_did_nothing_or_broke_every_record_are_refused(model, config, message):
    # A bearer auth without a token was sent empty and retried a minute; region "XX"
    # failed every phone number; time_unit without time_field did nothing.
    from dataflare.config import Auth
    from dataflare.operators.aggregation import AggregationConfig
    from dataflare.operators.quality import DataQualityConfig

    cls = {"auth": Auth, "quality": DataQualityConfig, "aggregation": AggregationConfig}[model]
    with pytest.raises(ValueError, match=re.escape(message)):
        cls.model_validate(config)
    assert DataQualityConfig.model_validate(
        {"validations": [], "default_region": "gb"}).default_region == "GB"


def test_a_sources_blocks_its_mode_does_not_read_are_warned():
    # `mode: full` with `incremental:` and `cdc:` blocks read the table whole, silently.
    v = validate_text("""\
workflow:
  sources:
    src:
      type: mysql
      mode: full
      incremental: {column: updated_at}
      cdc: {server_id: 99}
      config: {host: 127.0.0.1, database: d, table: t}
  destinations:
    out: {type: stdout, inputs: [src]}
""", "w.yaml")
    assert [p.render() for p in v.problems if "in mode" in p.message] == [
        "w.yaml:6:7: sources.src.incremental: warning: 'incremental' has no effect in mode "
        "'full'",
        "w.yaml:7:7: sources.src.cdc: warning: 'cdc' has no effect in mode 'full'"]
