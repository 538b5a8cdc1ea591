"""The generated DSL reference and JSON Schema stay in step with the models."""

import json
from pathlib import Path

from dataflare.dsl_compiler import reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_docs_reference_is_generated_from_the_models():
    assert DOC.read_text() == reference.markdown() + "\n", (
        "docs/reference.md is stale: run `dataflare schema --markdown > docs/reference.md`")


def test_json_schema_lists_every_type_with_its_config():
    schema = json.loads(reference.json_schema_text())
    source = schema["$defs"]["Source"]
    assert "file" in source["properties"]["type"]["enum"]
    rule = next(r for r in source["allOf"] if r["if"]["properties"]["type"]["const"] == "file")
    target = rule["then"]["properties"]["config"]["$ref"].split("/")[-1]
    assert "path" in schema["$defs"][target]["properties"]


ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "docs" / "workflow.schema.json"


def test_the_committed_json_schema_is_generated_from_the_models():
    assert SCHEMA.read_text() == reference.json_schema_text() + "\n", (
        "docs/workflow.schema.json is stale: run `dataflare schema > docs/workflow.schema.json`")


def _documents():
    import yaml

    from tests.dsl_compiler.test_seeds import SEEDS, SNIPPETS, _minimal

    for path in sorted((ROOT / "flows").glob("*.yaml")):
        yield path.name, yaml.safe_load(path.read_text())
    for name in ("dsl_reference", "customer_360", "multi_source_analytics"):
        yield name, yaml.safe_load((SEEDS / f"{name}.yaml").read_text())
    for name in SNIPPETS:  # source snippets, wrapped in a minimal workflow as validate does
        snippet = yaml.safe_load((SEEDS / f"{name}.yaml").read_text())
        yield name, yaml.safe_load(_minimal(sources={"s": snippet["source"]}))
    for name in ("roles", "data_protection"):
        block = yaml.safe_load((SEEDS / f"{name}.yaml").read_text())
        yield name, yaml.safe_load(_minimal(**block))


def test_the_json_schema_accepts_every_flow_and_seed_example():
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for name, data in _documents():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
        assert not errors, (name, errors[:5])
    # ...and still refuses what validate refuses: an unknown key, a bad duration.
    bad = {"workflow": {"sources": {"s": {"type": "file", "config": {"path": "x.jsonl",
                                                                      "colour": 1}}}}}
    assert list(validator.iter_errors(bad))
    late = {"workflow": {"transformations": {"w": {"type": "window", "inputs": ["s"], "config": {
        "window": {"type": "tumbling", "size": "5 minutes"}, "time_field": "t"}}}}}
    assert list(validator.iter_errors(late))


def test_every_flow_names_the_schema_for_editors():
    for path in sorted((ROOT / "flows").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../docs/workflow.schema.json", path


def test_reference_shows_every_nested_option():
    doc = DOC.read_text()
    for heading, option in [
        ("#### `rest_api` `pagination`: Pagination", "| `cursor_path` |"),
        ("#### `rest_api` `rate_limit`: RateLimit", "| `requests_per_second` |"),
        ("#### `rest_api` `auth`: Auth", "| `query_param` |"),
        ("#### `file` `csv`: CsvOptions", "| `delimiter` |"),
        ("#### `window` `window`: WindowSpec", "| `gap` |"),
        ("#### `window` `aggregations`: Aggregate", "'count_distinct'"),
        ("#### `mapping` `mappings`: FieldMapping", "| `transform` |"),
        ("##### `regex_extract`", "| `group` |"),
        ("##### `parse_timestamp`", "| `format` |"),
        ("#### `post_actions`: PostAction", "| `condition` |"),
        ("#### `metrics`: MetricSpec", "| `name` |"),
    ]:
        assert heading in doc, heading
        section = doc.split(heading, 1)[1].split("\n#", 1)[0]
        assert option in section, (heading, option)
    assert "| `watermark_delay` | duration |" in doc
