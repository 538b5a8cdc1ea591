"""Loader: positions, duplicate keys, ${VAR} interpolation, secrets kept out of messages."""

import pytest

from dataflare.dsl_compiler import validate_text
from dataflare.dsl_compiler.loader import load

FLOW = """\
workflow:
  environment:
    OUT_DIR: "${BASE:-/tmp}/out"
  sources:
    gen:
      type: generator
      config: {preset: orders, count: "${COUNT:-3}"}
  destinations:
    out:
      type: file
      inputs: [gen]
      config: {path: "${OUT_DIR}/orders.jsonl"}
"""


def test_positions_of_keys_and_values():
    doc = load(FLOW, "f.yaml", env={})
    assert doc.positions[("workflow", "sources", "gen", "type")] == (6, 13)
    assert doc.key_positions[("workflow", "sources", "gen", "type")] == (6, 7)
    assert doc.positions[("workflow", "destinations", "out", "inputs", 0)] == (11, 16)


def test_interpolation_process_env_then_environment_block_then_default():
    v = validate_text(FLOW, env={})
    assert not v.errors(for_run=True)
    assert v.workflow.destinations["out"].config.path == "/tmp/out/orders.jsonl"
    assert v.workflow.sources["gen"].config.count == 3
    v = validate_text(FLOW, env={"BASE": "/data", "COUNT": "7"})
    assert v.workflow.destinations["out"].config.path == "/data/out/orders.jsonl"
    assert v.workflow.sources["gen"].config.count == 7
    v = validate_text(FLOW, env={"OUT_DIR": "/override"})
    assert v.workflow.destinations["out"].config.path == "/override/orders.jsonl"


def test_missing_variable_is_a_warning_for_validate_and_an_error_for_run():
    text = FLOW.replace("${BASE:-/tmp}", "${BASE}")
    v = validate_text(text, "f.yaml", env={})
    assert not v.errors()
    [p] = v.errors(for_run=True)
    assert p.render(for_run=True) == (
        "f.yaml:3:14: environment.OUT_DIR: variable BASE is not set "
        "(use ${BASE:-default} for a default)"
    )


def test_dollar_escape():
    text = FLOW.replace("/orders.jsonl", "/$$x.jsonl")
    v = validate_text(text, env={})
    assert v.workflow.destinations["out"].config.path == "/tmp/out/$x.jsonl"


def test_duplicate_keys_are_errors():
    text = FLOW.replace("      type: generator\n", "      type: generator\n      type: file\n")
    v = validate_text(text, "f.yaml", env={})
    assert any(p.message == "duplicate key 'type' (first at line 6)" and p.line == 7
               for p in v.errors())


def test_a_key_given_beside_a_merge_key_overrides_the_merged_one():
    # `<<: *anchor` then `path: ...` (YAML's way to share a config) was a duplicate key.
    v = validate_text("""\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    a: {type: file, inputs: [src], config: &f {path: a.jsonl, format: jsonl}}
    b: {type: file, inputs: [src], config: {<<: *f, path: b.jsonl}}
    c: {type: file, inputs: [src], config: {path: b.jsonl, <<: *f}}
""", "f.yaml", env={})
    assert v.errors() == []
    assert v.workflow.destinations["b"].config.path == "b.jsonl"
    assert v.workflow.destinations["c"].config.path == "b.jsonl"


def test_syntax_error_has_location():
    v = validate_text("workflow:\n  sources: [a\n", "f.yaml")
    [p] = v.errors()
    assert p.file == "f.yaml" and p.line >= 2 and "invalid YAML" in p.message
    assert "must be quoted" not in p.message


@pytest.mark.parametrize("value", ["out/${TOPIC}.jsonl", "${TOPIC}"])
def test_an_unquoted_variable_in_a_flow_mapping_is_hinted(value):
    text = "workflow:\n  sources: {src: {type: file, config: {path: VALUE}}}\n"
    v = validate_text(text.replace("VALUE", value), "f.yaml")
    [p] = v.errors()
    assert p.line == 2 and "a ${VAR} must be quoted" in p.message, p.message


def test_a_word_yaml_reads_as_a_boolean_is_hinted():
    text = "workflow:\n  id: off\n  sources: {src: {type: file, config: {path: x.jsonl}}}\n"
    [p] = validate_text(text, "f.yaml").errors()
    assert p.line == 2
    assert p.message.endswith("(got False): YAML reads an unquoted on/off/yes/no/true/false "
                              "as a boolean; quote it")


def test_interpolated_secret_values_are_not_printed():
    text = FLOW.replace('count: "${COUNT:-3}"', 'count: "${COUNT}"')
    v = validate_text(text, env={"COUNT": "hunter2-secret"})
    [p] = v.errors()
    assert "hunter2" not in str(p) and "${COUNT}" in str(p)
    secret = """\
workflow:
  sources:
    db: {type: file, config: {path: x.jsonl, batch_size: "s3cr3t-password"}}
  destinations:
    out: {type: stdout, inputs: [db]}
"""
    v = validate_text(secret)
    assert "s3cr3t" in str(v.errors()[0])  # plain values are shown to help ...
    auth = """\
workflow:
  plugins:
    p: {type: remote, url: "http://127.0.0.1/x", auth: {type: bearer, token: [1, 2]}, config: {}}
"""
    v = validate_text(auth)
    assert v.errors() and "[1, 2]" not in str(v.errors()[0])


def test_messages_quoting_an_interpolated_text_show_the_variable():
    text = """\
workflow:
  sources:
    src: {type: file, config: {path: x.jsonl}}
  transformations:
    f: {inputs: [src], type: filter, config: {condition: "token == '${API_TOKEN}"}}
  destinations:
    out: {type: stdout, inputs: [f]}
"""
    [p] = validate_text(text, env={"API_TOKEN": "s3cr3t-xyz"}).errors()
    assert "s3cr3t" not in str(p) and "token == '${API_TOKEN}" in str(p)
