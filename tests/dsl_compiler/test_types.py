"""The type flow at validate: schemas through the DAG, fields read checked where known."""

import re
from pathlib import Path

import pytest

from dataflare.cli import main
from dataflare.dsl_compiler import schemas, validate_file, validate_text

ROOT = Path(__file__).parents[2]
FLOWS = sorted((ROOT / "flows").glob("*.yaml")) + sorted((ROOT / "flows").glob("seed/*.yaml"))
SEEDS = Path(__file__).parent / "seeds"


def _type_problems(v):
    return [p for p in v.problems if "is not in the records" in p.message or " needs " in
            p.message or "does not bind" in p.message or "never match" in p.message]


def _line_col(text: str, needle: str, offset: int = 0) -> tuple[int, int]:
    """Line and column (1-based) of ``needle`` in ``text`` (plus ``offset`` columns)."""
    before = text[: text.index(needle)]
    return before.count("\n") + 1, len(before) - before.rfind("\n") + offset


@pytest.mark.parametrize("path", FLOWS, ids=lambda p: p.name)
def test_every_flow_validates_without_type_warnings(path):
    v = validate_file(path)
    assert not v.errors()
    assert _type_problems(v) == []
    assert schemas(v)  # every step has a schema (possibly unknown)


ISSUE_EXAMPLE = """\
workflow:
  sources:
    orders:
      type: file
      config: {path: orders.jsonl, format: jsonl}
  transformations:
    keep_id:
      inputs: [orders]
      type: mapping
      config:
        mappings:
          - {source: id, destination: id}
    big:
      inputs: [keep_id]
      type: filter
      config:
        condition: "amount > 10"
    per_field:
      inputs: [big]
      type: aggregation
      config:
        group_by: [nonexistent.field]
        aggregations:
          - {field: id, operations: [count]}
  destinations:
    out: {type: stdout, inputs: [per_field]}
"""


def test_issue_example_is_located_and_strict_fails(tmp_path, capsys):
    path = tmp_path / "issue.yaml"
    path.write_text(ISSUE_EXAMPLE)
    v = validate_file(path)
    assert not v.errors()
    found = {(p.line, p.col, p.path, p.message) for p in v.problems}
    assert found == {
        (17, 21, "transformations.big.config.condition",
         "field 'amount' is not in the records from 'keep_id'; they have: id"),
        (22, 20, "transformations.per_field.config.group_by[0]",
         "field 'nonexistent.field' is not in the records from 'big'; they have: id"),
    }
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}:17:21: transformations.big.config.condition: warning: field 'amount'" in err
    assert main(["validate", "--strict", str(path)]) == 1


# (flow, text replaced, replacement, path of the problem, did-you-mean)
PLANTED = [
    ("quickstart.yaml", "status == 'paid'", "stauts == 'paid'",
     "transformations.paid.config.condition", "status"),
    ("quickstart.yaml", "amount >= 100", "amout >= 100",
     "transformations.by_size.config.routes[0].condition", "amount"),
    ("clicks_per_minute.yaml", "group_by: [event]", "group_by: [evnt]",
     "transformations.per_minute.config.group_by[0]", "event"),
    ("clicks_per_minute.yaml", "{field: amount, operations: [count, sum, max]}",
     "{field: amont, operations: [count, sum, max]}",
     "transformations.per_minute.config.aggregations[0].field", "amount"),
    ("customer_value.yaml", "config: {keys: [id]}", "config: {keys: [idd]}",
     "transformations.unique.config.keys[0]", "id"),
    ("customer_value.yaml", "join_key: email", "join_key: e_mail", None, "email"),
    ("web_funnel.yaml", "time_field: ts", "time_field: tss",
     "transformations.sessions.config.time_field", "ts"),
    ("kafka_to_warehouse.yaml", "- {source: events, destination: events}",
     "- {source: event_count, destination: events}",
     "transformations.summary.config.mappings[2].source", None),
    ("kafka_to_warehouse.yaml", "merge_key: [user_id, window_start]",
     "merge_key: [user_id, window_strat]",
     "destinations.warehouse.write_mode.merge_key[1]", "window_start"),
]


@pytest.mark.parametrize(("name", "old", "new", "where", "hint"), PLANTED)
def test_planted_wrong_field_is_located(tmp_path, name, old, new, where, hint):
    text = (ROOT / "flows" / name).read_text()
    assert old in text
    broken = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(broken)
    (tmp_path / "data").symlink_to(ROOT / "flows" / "data")
    v = validate_file(path)
    found = _type_problems(v)
    assert found, "no problem reported"
    assert all(p.severity == "warning" for p in found)
    line = broken[: broken.index(new)].count("\n") + 1
    wrong = next(w for w in re.findall(r"[A-Za-z_][\w.]*", new)
                 if w not in re.findall(r"[A-Za-z_][\w.]*", old))
    col = broken.splitlines()[line - 1].index(wrong) + 1
    assert {(p.line, p.col) for p in found} == {(line, col)}  # at the wrong name itself
    if where is not None:
        assert where in {p.path for p in found}
    if hint is not None:
        assert all(f"(did you mean {hint!r}?)" in p.message for p in found)


def test_seed_multi_source_analytics_reports_its_real_misreads():
    """The seed's joins read fields its mappings never write: each is reported, located."""
    v = validate_file(SEEDS / "multi_source_analytics.yaml")
    assert not v.errors()
    found = {(p.line, p.path) for p in _type_problems(v)}
    assert found == {
        (120, "transformations.order_products.config.left_key[0]"),  # order.productId
        (128, "transformations.user_behavior.config.time_field"),  # default 'timestamp'
        (129, "transformations.user_behavior.config.left_key[0]"),  # user.id
        (141, "transformations.customer_value.config.formula"),  # orders.total
        (150, "transformations.customer_segmentation.config.features[2]"),  # orders.count
        (164, "destinations.data_warehouse.write_mode.merge_key"),  # user.email
        (172, "destinations.real_time_api.config.key_template"),  # user.id
        (174, "destinations.real_time_api.config.fields[0].source"),  # user.email
        (178, "destinations.real_time_api.config.fields[2].source"),  # user.segment
    }
    assert all(p.severity == "warning" for p in _type_problems(v))


def test_seed_customer_360_has_no_type_warnings():
    assert _type_problems(validate_file(SEEDS / "customer_360.yaml")) == []


def _wf(transformations: str, sources: str | None = None, dests: str = "") -> str:
    sources = sources or """\
    ev:
      type: generator
      config:
        count: 1
        fields:
          id: {type: sequence}
          name: {type: text}
          flag: {type: bool}
          amount: {type: float}
          at: {type: timestamp}
"""
    return f"workflow:\n  sources:\n{sources}  transformations:\n{transformations}" \
           f"  destinations:\n{dests or '    out: {type: stdout, inputs: [last]}'}\n"


@pytest.mark.parametrize(("step", "message"), [
    ("{type: aggregation, inputs: [ev], config: {aggregations: "
     "[{field: name, operations: [sum]}]}}",
     "field 'name' is a string in the records from 'ev', field needs a number"),
    ("{type: window, inputs: [ev], config: {time_field: flag, window: {size: 1m}}}",
     "field 'flag' is a boolean in the records from 'ev', time_field needs a time"),
    ("{type: filter, inputs: [ev], config: {condition: \"name > 10\"}}",
     "field 'name' is a string in the records from 'ev', condition needs a number"),
    ("{type: mapping, inputs: [ev], config: {mappings: [{source: amount, destination: a, "
     "transform: trim}]}}",
     "field 'amount' is a number in the records from 'ev', source needs a string"),
])
def test_type_clash_is_an_error(step, message):
    v = validate_text(_wf(f"    last: {step}\n"), "t.yaml")
    errors = [p.message for p in v.errors()]
    assert any(e.startswith(message) for e in errors), errors


def test_join_keys_of_two_kinds_never_match():
    v = validate_text(_wf("""\
    names:
      inputs: [ev]
      type: mapping
      config: {mappings: [{source: id, destination: key, transform: to_string}]}
    last:
      inputs: [ev, names]
      type: join
      config: {left_key: id, right_key: key}
"""), "t.yaml")
    assert [p.message for p in v.errors()] == [
        "join keys never match: left 'id' is an integer, right 'key' is a string"]


def test_fields_followed_through_window_and_join_with_prefix():
    v = validate_text(_wf("""\
    per_min:
      inputs: [ev]
      type: window
      config:
        time_field: at
        window: {type: tumbling, size: 1m}
        group_by: [name]
        aggregations: [{field: amount, operations: [sum, avg], as: spend}]
    both:
      inputs: [per_min, ev]
      type: join
      config: {left_key: name, right_key: name, output_prefix: {left: w, right: e}}
    last:
      inputs: [both]
      type: filter
      config: {condition: "w.spend_sum > 1 and e.flag and w.spend_total > 0"}
"""), "t.yaml")
    msgs = [p.message for p in _type_problems(v)]
    assert msgs == ["field 'w.spend_total' is not in the records from 'both' "
                    "(did you mean 'w.spend_avg'?); they have: w, w.name, w.window_start, "
                    "w.window_end, w.spend_sum, w.spend_avg, e, e.id, e.name, e.flag, e.amount, "
                    "e.at"]
    both = schemas(v)["both"]
    assert both.get("w.spend_sum").kind == "number"
    assert both.get("w.spend_sum").origins == {("ev", "amount")}
    assert both.get("e.flag").kind == "boolean"
    assert both.get("w.window_start").origins == {("ev", "at")}
    assert both.to_json()["fields"]["w"]["fields"]["spend_avg"] == {
        "type": "number", "from": ["ev.amount"]}


UNKNOWN = """\
    ev:
      type: file
      config: {path: x.jsonl, format: jsonl}
"""


def test_unknown_schema_stays_permissive():
    v = validate_text(_wf("""\
    f:
      inputs: [ev]
      type: filter
      config: {condition: "anything.at.all > 3 and name == 'x'"}
    w:
      inputs: [f]
      type: window
      config: {time_field: whatever, group_by: [a.b], aggregations: [{field: c, operations: [sum]}]}
    m:
      inputs: [ev]
      type: mapping
      config: {keep_unmapped: true, mappings: [{source: x, destination: y, transform: to_int}]}
    last:
      inputs: [m]
      type: filter
      config: {condition: "y > 1 and also_here == 2"}
""", sources=UNKNOWN, dests="    out: {type: stdout, inputs: [last, w]}"), "t.yaml")
    assert _type_problems(v) == []
    assert schemas(v)["m"].get("y").kind == "integer"
    assert schemas(v)["m"].get("never.declared") is not None  # open: may be there


def test_output_schema_lists_fields_and_additional_properties_false_closes_it():
    declared = """\
    ev:
      type: file
      config: {path: x.jsonl, format: jsonl}
      output_schema:
        definition:
          type: object
          properties:
            id: {type: integer}
            customer: {type: object, properties: {email: {type: string}}}
"""
    step = """\
    last:
      inputs: [ev]
      type: filter
      config: {condition: "customer.emial != null and id > 1"}
"""
    # As JSON Schema reads it, the records may have fields it does not list: only a near
    # miss of a listed one is warned (a field it does not list at all was warned, falsely).
    v = validate_text(_wf(step, sources=declared), "t.yaml")
    assert [p.message for p in _type_problems(v)] == [
        "field 'customer.emial' is not in the records from 'ev' as their schema lists them "
        "(did you mean 'customer.email'?)"]
    other = step.replace("customer.emial != null", "event_ms != null")
    assert _type_problems(validate_text(_wf(other, sources=declared), "t.yaml")) == []
    closed = declared.replace("          properties:\n            id",
                              "          additionalProperties: false\n          properties:\n"
                              "            id")
    assert [p.message for p in _type_problems(validate_text(_wf(other, sources=closed),
                                                            "t.yaml"))] == [
        "field 'event_ms' is not in the records from 'ev'; they have: id, customer, "
        "customer.email"]


def test_sql_query_bound_against_input_columns():
    v = validate_text(_wf("""\
    q:
      inputs: [ev]
      type: sql
      config: {query: "select name, sum(amount) as total, count(*) as n from input group by name"}
    last:
      inputs: [q]
      type: filter
      config: {condition: "total > 1 and amount > 1"}
"""), "t.yaml")
    assert [p.message for p in _type_problems(v)] == [
        "field 'amount' is not in the records from 'q'; they have: name, total, n"]
    q = schemas(v)["q"]
    assert (q.get("total").kind, q.get("n").kind, q.get("name").kind) == (
        "number", "integer", "string")
    assert q.get("name").origins == {("ev", "name")}
    assert q.get("total").origins == {("ev", "name"), ("ev", "amount")}

    bad = validate_text(_wf("""\
    last:
      inputs: [ev]
      type: sql
      config: {query: "select nam, sum(amount) from input group by 1"}
"""), "t.yaml")
    errors = bad.errors()
    assert len(errors) == 1
    assert errors[0].path == "transformations.last.config.query"
    assert (errors[0].line, errors[0].col) == (17, 23)
    assert "sql query does not bind on the columns of its input (amount, at, flag, id, name)" \
        in errors[0].message
    assert 'Referenced column "nam" not found' in errors[0].message
    # an unknown input: nothing to bind against, nothing reported
    unknown = validate_text(_wf("""\
    last:
      inputs: [ev]
      type: sql
      config: {query: "select nam from input"}
""", sources=UNKNOWN), "t.yaml")
    assert not unknown.errors()


def test_enrichments_read_what_earlier_ones_wrote():
    v = validate_text(_wf("""\
    last:
      inputs: [ev]
      type: enrich
      config:
        enrichments:
          - type: http_api
            url: "http://127.0.0.1:1/users/{{id}}"
            response_mapping: [{source: response.tier, destination: tier}]
          - type: http_api
            url: "http://127.0.0.1:1/tiers/{{tier}}/{{nme}}"
"""), "t.yaml")
    assert [(p.path, p.message[:45]) for p in _type_problems(v)] == [
        ("transformations.last.config.enrichments[1].url",
         "field 'nme' is not in the records from 'ev' (")]


def test_destination_templates_and_keys_are_read():
    v = validate_text(_wf("    last: {type: filter, inputs: [ev], config: {condition: 'id > 0'}}\n",
                          dests="""\
    topic:
      type: kafka
      inputs: [last]
      config: {topic: t, key_template: "{{nme}}-{{id}}", headers: {h: "{{flg}}"}}
    hook:
      type: http
      inputs: [last]
      config: {url: "http://127.0.0.1:1/{{id}}", body_template: '{"a": "{{amout}}"}'}
    kv:
      type: redis
      inputs: [last]
      config: {key_template: "k:{{id}}", fields: [{source: nam, destination: n}],
               data_structure: sorted_set, score_field: name}
"""), "t.yaml")
    found = {(p.path, p.message.split(" is ")[0]) for p in _type_problems(v)}
    assert found == {
        ("destinations.topic.config.key_template", "field 'nme'"),
        ("destinations.topic.config.headers.h", "field 'flg'"),
        ("destinations.hook.config.body_template", "field 'amout'"),
        ("destinations.kv.config.fields[0].source", "field 'nam'"),
        ("destinations.kv.config.score_field", "field 'name'"),  # a string, not a score
    }
    assert [p.path for p in v.errors()] == ["destinations.kv.config.score_field"]


def test_masking_field_no_destination_has():
    text = _wf("    last: {type: filter, inputs: [ev], config: {condition: 'id > 0'}}\n")
    text += "  data_protection:\n    masking_rules:\n      - {field: nmae, method: full}\n" \
            "      - {field: name, method: full}\n"
    v = validate_text(text, "t.yaml")
    assert [p.message for p in _type_problems(v) + [
        p for p in v.problems if p.path.startswith("data_protection")]] == [
        "masking field 'nmae' is in no destination's records (did you mean 'name'?)"]
