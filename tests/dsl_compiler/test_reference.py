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
