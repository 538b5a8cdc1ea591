"""`dataflare schema`: the committed JSON Schema validates every flow and seed example."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from dataflare.dsl_compiler import reference

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "workflow.schema.json"
SEEDS = Path(__file__).parent / "seeds"
FLOWS = sorted((ROOT / "flows").glob("*.yaml"))
EXAMPLES = [*FLOWS, *(SEEDS / f"{n}.yaml" for n in
                      ("dsl_reference", "multi_source_analytics", "customer_360"))]
COMMENT = "# yaml-language-server: $schema=../docs/workflow.schema.json"


def _validator():
    return jsonschema.Draft202012Validator(reference.json_schema())


def test_the_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == reference.json_schema_text() + "\n", (
        "docs/workflow.schema.json is stale: run `dataflare schema > docs/workflow.schema.json`")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_schema_validates_every_flow_and_seed_example(path):
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in _validator().iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


@pytest.mark.parametrize("path", FLOWS, ids=lambda p: p.name)
def test_each_flow_names_the_schema_for_editors(path):
    assert path.read_text().splitlines()[0] == COMMENT


@pytest.mark.parametrize(("change", "message"), [
    ({"window": {"type": "tumbling", "size": "5 minutes"}}, "'5 minutes'"),
    ({"windw": {"type": "tumbling", "size": "5m"}}, "'windw' was unexpected"),
    ({"window": {"type": "hopping", "size": "5m"}}, "'hopping'"),
])
def test_the_schema_still_refuses_what_validate_refuses(change, message):
    data = {"workflow": {
        "sources": {"s": {"type": "file", "config": {"path": "x.jsonl"}}},
        "transformations": {"w": {"type": "window", "inputs": ["s"], "config": {
            "time_field": "ts", "window": {"type": "tumbling", "size": "5m"}}}},
        "destinations": {"o": {"type": "stdout", "inputs": ["w"]}},
    }}
    assert list(_validator().iter_errors(data)) == []
    config = data["workflow"]["transformations"]["w"]["config"]
    config.pop("window")
    config.update(change)
    errors = [e.message for e in _validator().iter_errors(data)]
    errors += [c.message for e in _validator().iter_errors(data) for c in (e.context or [])]
    assert any(message in m for m in errors), errors
