"""The seed design document's examples validate as written; broken variants fail precisely."""

from pathlib import Path

import pytest
import yaml

from dataflare.cli import main
from dataflare.dsl_compiler import validate_file, validate_text

SEEDS = Path(__file__).parent / "seeds"
WORKFLOWS = ["dsl_reference", "multi_source_analytics", "customer_360"]
SNIPPETS = ["mode_full", "mode_incremental", "mode_cdc", "mode_streaming", "mode_hybrid"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_seed_workflow_validates(name, capsys):
    assert main(["validate", str(SEEDS / f"{name}.yaml")]) == 0
    err = capsys.readouterr().err
    assert all(": warning: " in line for line in err.splitlines()), err


def test_seed_undefined_references_are_warnings_then_run_errors():
    v = validate_file(SEEDS / "multi_source_analytics.yaml")
    assert not v.errors()
    run_errors = [p.render(for_run=True) for p in v.errors(for_run=True)]
    # customer_value has a formula: without a defined plugin it is a built-in formula step
    assert not any("plugin 'value_calculator' is not defined" in e for e in run_errors)
    v = validate_file(SEEDS / "dsl_reference.yaml")
    assert any("redirect_to 'error_records' names no destination" in p.message
               for p in v.errors(for_run=True))


def _minimal(**blocks):
    wf = {
        "sources": {"gen": {"type": "generator", "config": {"preset": "orders", "count": 1}}},
        "destinations": {"out": {"type": "stdout", "inputs": ["gen"]}},
    }
    for key, value in blocks.items():
        if key == "sources":
            wf["sources"].update(value)
            wf["destinations"]["out"]["inputs"] += list(value)
        else:
            wf[key] = value
    return yaml.safe_dump({"workflow": wf})


@pytest.mark.parametrize("name", SNIPPETS)
def test_seed_source_mode_snippets_validate(name):
    snippet = yaml.safe_load((SEEDS / f"{name}.yaml").read_text())
    v = validate_text(_minimal(sources={"s": snippet["source"]}))
    assert not v.errors(), [str(p) for p in v.errors()]


@pytest.mark.parametrize("name", ["roles", "data_protection"])
def test_seed_roles_and_data_protection_validate(name):
    block = yaml.safe_load((SEEDS / f"{name}.yaml").read_text())
    v = validate_text(_minimal(**block))
    assert not v.errors(), [str(p) for p in v.errors()]
    assert v.workflow is not None


BREAKS = [
    # (original text, broken text, located text, expected component path, expected message)
    ('transform: "trim"', 'transform: "trimm"', '"trimm"',
     "transformations.clean_customer_data.config.mappings[0].transform",
     "unknown transform 'trimm' (did you mean 'trim'?)"),
    ('type: "postgres"                    # 源类型', 'type: "postgress"', '"postgress"',
     "sources.main_db.type", "unknown source type 'postgress' (did you mean 'postgres'?)"),
    ('strategy: "skip"', 'strategy: "skp"', '"skp"',
     "transformations.clean_customer_data.error_handling.strategy",
     "unknown value 'skp' (did you mean 'skip'?)"),
    ('inputs: ["predict_churn"]           # 输入转换', 'inputs: ["predict_chrun"]',
     '"predict_chrun"', "destinations.analytics_db.inputs[0]",
     "input 'predict_chrun' names nothing (did you mean 'predict_churn'?)"),
    ("merge_key: \"customer.email\"", "merge_keys: \"customer.email\"", "merge_keys",
     "destinations.analytics_db.write_mode.merge_keys",
     "unknown key 'merge_keys' (did you mean 'merge_key'?)"),
    ("max_attempts: 3", 'max_attempts: "three"', '"three"', "config.retry.max_attempts",
     "valid integer"),
]


def _position(text: str, needle: str) -> tuple[int, int]:
    index = text.index(needle)
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def test_broken_variants_report_every_problem_with_location(tmp_path, capsys):
    text = (SEEDS / "dsl_reference.yaml").read_text()
    for original, broken, _, _, _ in BREAKS:
        assert original in text, original
        text = text.replace(original, broken, 1)
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": warning: " not in ln]
    assert len(lines) == len(BREAKS), lines
    for _, _, located, component, message in BREAKS:
        line, col = _position(text, located)
        prefix = f"{path}:{line}:{col}: {component}: "
        match = [ln for ln in lines if ln.startswith(prefix)]
        assert match, (prefix, lines)
        assert message in match[0], match[0]


def test_a_source_that_stops_at_its_end_is_bounded_for_join_advice():
    text = """\
workflow:
  sources:
    a: {type: kafka, mode: streaming, config: {bootstrap_servers: "h:1", topic: a, STOP}}
    b: {type: kafka, mode: cdc, config: {bootstrap_servers: "h:1", topic: b}}
  transformations:
    j: {type: join, inputs: [a, b], config: {join_key: id}}
  destinations:
    out: {type: stdout, inputs: [j]}
"""
    unbounded = "a join without 'window' joins when one of its inputs ends"

    def warnings(stop: str) -> list[str]:
        v = validate_text(text.replace("STOP", stop))
        assert not v.errors(), [p.render() for p in v.errors()]
        return [p.message for p in v.problems]

    assert any(unbounded in w for w in warnings("stop_at_end: false"))
    assert not any(unbounded in w for w in warnings("stop_at_end: true"))
