"""Graph checks: all problems of a workflow reported together."""

from dataflare.dsl_compiler import validate_text

BASE = """\
workflow:
  sources:
    a: {type: generator, config: {preset: orders, count: 1}}
    unused: {type: generator, config: {preset: orders, count: 1}}
  transformations:
    f1: {type: filter, inputs: [f2], config: {condition: "total > 1"}}
    f2: {type: filter, inputs: [f1, a], config: {condition: "total > 2"}}
    r: {type: route, inputs: [a], config: {routes: [{name: big, condition: "total > 100"}]}}
    m: {type: mapping, inputs: [r.bog, nowhere], config: {mappings: [{source: x, destination: y}]}}
    j: {type: join, inputs: [a], config: {join_key: user_id}}
  destinations:
    a: {type: stdout, inputs: [m]}
    lonely: {type: stdout}
    d: {type: stdout, inputs: [f2, r._unmatched, r]}
"""


def test_all_graph_problems_at_once():
    v = validate_text(BASE, "g.yaml")
    msgs = {(p.path, p.message) for p in v.errors()}
    assert ("destinations.a", "duplicate id 'a': already used in sources") in msgs
    assert ("transformations.m.inputs[0]",
            "input 'r.bog': 'r' has no output 'bog' (did you mean 'big'?) "
            "(outputs: big, _unmatched)") in msgs
    assert ("transformations.m.inputs[1]", "input 'nowhere' names nothing") in msgs
    assert ("transformations.j.inputs", "a join takes exactly 2 input(s), got 1") in msgs
    assert ("destinations.lonely", "destination 'lonely' has no inputs") in msgs
    assert ("destinations.d.inputs[2]",
            "input 'r' is a route; read one of its outputs: r.big, r._unmatched") in msgs
    cycles = [m for p, m in msgs if m.startswith("cycle:")]
    assert cycles in (["cycle: f1 -> f2 -> f1"], ["cycle: f2 -> f1 -> f2"])
    warnings = {p.message for p in v.problems if p.severity == "warning"}
    assert "source 'unused' feeds nothing" in warnings


def test_destination_as_input_and_redirect_targets():
    text = """\
workflow:
  sources:
    s:
      type: generator
      config: {preset: orders, count: 1}
      error_handling: {strategy: redirect, redirect_to: dead}
  transformations:
    t: {type: filter, inputs: [out], config: {condition: "true"},
        error_handling: {strategy: redirect, redirect_to: s}}
  destinations:
    out: {type: stdout, inputs: [s]}
    dead: {type: stdout}
"""
    v = validate_text(text)
    msgs = {(p.path, p.message) for p in v.errors()}
    assert ("transformations.t.inputs[0]",
            "input 'out' is a destination; inputs are sources or transformations") in msgs
    assert ("transformations.t.error_handling.redirect_to",
            "redirect_to 's' is not a destination") in msgs
    assert not any(p.path == "destinations.dead" for p in v.errors())


def test_a_join_without_window_on_two_unbounded_inputs_is_a_warning():
    text = """\
workflow:
  sources:
    events: {type: kafka, mode: streaming, config: {topic: e}}
    clicks: {type: kafka, mode: streaming, config: {topic: c}}
    users: {type: file, config: {path: users.jsonl}}
  transformations:
    j: {type: join, inputs: [events, clicks], config: {join_key: user_id}}
    table: {type: join, inputs: [events, users], config: {join_key: user_id}}
    w: {type: join, inputs: [events, users],
        config: {join_key: user_id, window: {type: tumbling, size: 1m}}}
    bounded: {type: join, inputs: [users, users], config: {join_key: user_id}}
  destinations:
    out: {type: stdout, inputs: [j, table, w, bounded]}
"""
    v = validate_text(text)
    assert not v.errors()
    advice = [p.path for p in v.problems if "join without 'window'" in p.message]
    assert advice == ["transformations.j.config"]


def test_tests_name_sources_and_destinations_and_files_have_a_format():
    text = """\
workflow:
  sources:
    src: {type: file, config: {path: in.txt}}
  destinations:
    out: {type: stdout, inputs: [src]}
tests:
  - name: t
    inputs: {srcx: []}
    expect: {out: [], o9: []}
"""
    got = {(p.line, p.path, p.message) for p in validate_text(text, "t.yaml").errors()}
    assert got == {
        (3, "sources.src.config",
         "cannot tell the format of 'in.txt': set 'format' (csv, json, jsonl, parquet)"),
        (8, "tests[0].inputs.srcx", "no source named 'srcx' (did you mean 'src'?)"),
        (9, "tests[0].expect.o9", "no destination named 'o9'"),
    }


def test_a_key_without_a_value_says_what_it_expects():
    text = """\
workflow:
  sources:
    src: {type: generator, config: {preset: orders, count: 1}}
  transformations:
    w:
      inputs: [src]
      type: window
      config: {window: {type: tumbling, size: 1m}, time_field: ts, aggregations: }
  destinations:
    out: {type: stdout, inputs: [w]}
"""
    [p] = validate_text(text).errors()
    assert (p.path, p.message) == ("transformations.w.config.aggregations",
                                   "no value given: expected a list")


def test_a_transformation_and_a_destination_of_one_id_are_reported_not_crashed_on():
    # The sql step's advice read the destination's config ('no attribute over').
    v = validate_text("""\
workflow:
  sources:
    src: {type: generator, config: {preset: orders, count: 1}}
  transformations:
    q: {type: sql, inputs: [src], config: {query: "select * from input"}}
    w: {type: window, inputs: [src], config: {window: {type: tumbling, size: 1m},
        time_field: ts, aggregations: [{field: total, operations: [sum], as: s}]}}
  destinations:
    q: {type: stdout, inputs: [q]}
    w: {type: stdout, inputs: [w]}
""", "g.yaml")
    msgs = {(p.path, p.message) for p in v.errors()}
    assert ("destinations.q", "duplicate id 'q': already used in transformations") in msgs
    assert ("destinations.w", "duplicate id 'w': already used in transformations") in msgs


def test_a_duplicate_id_keeps_the_first_components_config_for_every_check():
    # A step reading the route's bare id asked the destination's config for its routes.
    v = validate_text("""\
workflow:
  sources:
    src: {type: generator, config: {preset: orders, count: 1}}
  transformations:
    q: {type: route, inputs: [src], config: {routes: [{name: big, condition: "total > 1"}]}}
    r: {type: filter, inputs: [q], config: {condition: "true"}}
  destinations:
    q: {type: file, inputs: [r], config: {path: out.jsonl, format: jsonl}}
""", "g.yaml")
    msgs = {(p.path, p.message) for p in v.errors()}
    assert ("destinations.q", "duplicate id 'q': already used in transformations") in msgs
    assert ("transformations.r.inputs[0]",
            "input 'q' is a route; read one of its outputs: q.big, q._unmatched") in msgs


def test_a_sql_append_of_records_without_positions_is_warned():
    # A rest_api sync appended to PostgreSQL wrote rows twice after a kill -9 and a resume,
    # without a word: only records with a source position (offset, line) are appended
    # exactly once.
    text = """workflow:
  sources:
    api: {type: rest_api, config: {url: "http://127.0.0.1:1/x"}}
    log: {type: file, config: {path: in.jsonl}}
  transformations:
    keep: {type: filter, inputs: [api, log], config: {condition: "true"}}
  destinations:
    pg: {type: postgres, inputs: [keep], config: {dsn: "postgresql://u@h/d", table: t}}
    merged:
      type: duckdb
      inputs: [keep]
      config: {path: x.duckdb, table: t}
      write_mode: {type: merge, merge_key: id}
    lines: {type: duckdb, inputs: [log], config: {path: x.duckdb, table: u},
            write_mode: {type: append}}
"""
    v = validate_text(text, "f.yaml")
    said = [(p.line, p.message) for p in v.problems if "twice" in p.message]
    assert said == [(8, "the records of 'api' carry no source position (as a Kafka offset or "
                        "a file line): appended, a crash and resume may write some twice; use "
                        "write_mode {type: merge, merge_key: ...} for exactly once")]
    assert not v.errors()


def test_a_sql_append_of_records_a_stateful_step_made_is_warned():
    # A window's aggregates (and a join's pairs, records a keyed step reorders across its
    # shards) carry no ordered position: appended, they are at least once, like an API's.
    text = """workflow:
  sources:
    log: {type: file, config: {path: in.jsonl}}
  transformations:
    per_min:
      type: window
      inputs: [log]
      config: {group_by: [u], time_field: ts, window: {type: tumbling, size: 1m},
               aggregations: [{field: a, operations: [sum]}]}
    keep: {type: filter, inputs: [per_min], config: {condition: "true"}}
  destinations:
    sums: {type: postgres, inputs: [keep], config: {dsn: "postgresql://u@h/d", table: t}}
    rows: {type: postgres, inputs: [log], config: {dsn: "postgresql://u@h/d", table: r}}
"""
    v = validate_text(text, "f.yaml")
    assert not v.errors()
    said = [(p.line, p.message) for p in v.problems if "twice" in p.message]
    assert said == [(12, "'per_min' (a stateful step) makes new records or reorders them, so "
                         "they carry no ordered position: appended, a crash and resume may "
                         "write some twice; use "
                         "write_mode {type: merge, merge_key: ...} for exactly once")]
