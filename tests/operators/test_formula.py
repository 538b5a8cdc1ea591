"""Built-in formula steps (the seed's customer_value) through ``dataflare run``/``validate``."""

from __future__ import annotations

import orjson
import pytest

from dataflare.expr import compile_expression
from dataflare.operators.formula import compile_formula
from dataflare.records import RecordError
from tests.fixtures.workflows import read_jsonl, run_cli

FLOW = """\
workflow:
  id: formula
  sources:
    users: {type: file, config: {path: users.jsonl}}
  transformations:
    customer_value:
      inputs: [users]
      type: custom
      PLUGIN
      config:
        formula: "FORMULA"
        output_field: user.customerValue
      error_handling: {strategy: redirect, redirect_to: dead}
  destinations:
    out: {type: file, inputs: [customer_value], config: {path: out/out.jsonl}}
    dead: {type: file, config: {path: out/dead.jsonl}}
"""

ROWS = [
    {"id": 1, "orders": [{"total": 10}, {"total": 20.5}], "click_count": 7},
    {"id": 2, "orders": [], "click_count": 1},
    {"id": 3, "orders": [{"total": "lots"}], "click_count": 1},
    {"id": 4, "click_count": 2},
]


def write(tmp_path, formula="sum(orders.total) * 0.7 + click_count * 0.3",
          plugin='plugin: "value_calculator"'):
    (tmp_path / "users.jsonl").write_text(
        "\n".join(orjson.dumps(r).decode() for r in ROWS) + "\n")
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW.replace("FORMULA", formula).replace("PLUGIN", plugin))
    return flow


@pytest.mark.parametrize("plugin", ['plugin: "value_calculator"', ""])
def test_seed_customer_value(tmp_path, plugin):
    result = run_cli("run", str(write(tmp_path, plugin=plugin)))
    assert result.code == 0, result.stderr
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "out.jsonl")}
    assert out[1]["user"]["customerValue"] == pytest.approx(30.5 * 0.7 + 7 * 0.3)
    assert out[2]["user"]["customerValue"] == pytest.approx(0.3)
    assert out[4]["user"]["customerValue"] is None  # no orders: sum(orders.total) is null
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [d["record"]["id"] for d in dead] == [3]
    assert dead[0]["error"]["step"] == "customer_value"
    assert "sum(orders.total): 'lots' is not a number" in dead[0]["error"]["message"]


def test_bad_formula_refused_at_validate(tmp_path):
    result = run_cli("validate", str(write(tmp_path, formula="sum(orders.total) *")))
    assert result.code != 0
    assert "customer_value" in result.stderr


def test_aggregates():
    rec = {"a": [{"b": [{"c": 1}, {"c": 5}]}, {"b": {"c": 3}}, {"b": [{"c": None}]}], "k": 2}
    assert compile_formula("sum(a.b.c)")(rec) == 9
    assert compile_formula("avg(a.b.c) * k")(rec) == 6
    assert compile_formula("max(a.b.c) - min(a.b.c)")(rec) == 4
    assert compile_formula("count(a.b.c) + count(k)")(rec) == 4
    assert compile_formula("sum(a.x) + count(a.x)")(rec) == 0  # a list, no value: 0
    with pytest.raises(RecordError, match="not a number"):
        compile_formula("sum(a)")({"a": [True]})


@pytest.mark.parametrize("rec", [{}, {"xs": None}, {"xs": []}, {"xs": [None]},
                                 {"xs": [1, None, 2.5]}])
def test_sum_and_count_as_the_expression_language_sum_and_len(rec):
    assert compile_formula("sum(xs)")(rec) == compile_expression("sum(xs)")(rec)
    if None not in (rec.get("xs") or []):  # len() counts nulls, count() does not
        assert compile_formula("count(xs)")(rec) == compile_expression("len(xs)")(rec)


@pytest.mark.parametrize("rec", [{}, {"xs": None}, {"user": {"xs": 1}}, {"xs": {"m": 1}}])
def test_aggregates_of_a_null_or_missing_path_are_null(rec):
    for fn in ("sum", "avg", "min", "max", "count"):
        assert compile_formula(f"{fn}(xs.n)")(rec) is None, fn
    assert compile_formula("sum(xs.n) * 0.7 + 1")(rec) is None


def test_undefined_plugin_without_formula_is_refused(tmp_path):
    flow = write(tmp_path)
    flow.write_text(flow.read_text().replace('formula: "', 'expression: "'))
    result = run_cli("validate", str(flow))
    assert result.code != 0, result.stderr
    assert "plugin 'value_calculator' is not defined in 'plugins'" in result.stderr
    assert run_cli("run", str(flow)).code != 0


def test_a_formula_step_config_is_checked_by_validate_with_its_line(tmp_path):
    # FormulaConfig was validated unguarded while deriving the schema: a traceback.
    flow = tmp_path / "flow.yaml"
    flow.write_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    f1: {type: custom, inputs: [src], config: {formula: "a * b"}}
    f3: {type: custom, inputs: [src], config: {formula: "a * b", output_field: x, extra: 1}}
  destinations:
    out: {type: stdout, inputs: [f1, f3]}
""")
    result = run_cli("validate", str(flow))
    assert result.code != 0
    assert result.stderr.splitlines() == [
        f"{flow}:5:47: transformations.f1.config: missing required key 'output_field'",
        f"{flow}:6:90: transformations.f3.config.extra: unknown key 'extra'; known: formula, "
        "output_field"]


def test_a_result_too_large_for_a_float_fails_its_record(tmp_path):
    # inf passed the number check and JSON wrote it as null.
    ROWS.append({"id": 5, "orders": [{"total": 1e308}], "click_count": 1e308})
    try:
        result = run_cli("run", str(write(tmp_path, formula="click_count * 10 + 1")))
    finally:
        ROWS.pop()
    assert result.code == 0, result.stderr
    dead = read_jsonl(tmp_path / "out" / "dead.jsonl")
    assert [d["record"]["id"] for d in dead] == [5]
    assert dead[0]["error"]["message"].endswith("formula result is inf: a value is too large "
                                                "for a float")
