"""Lineage: datasets and column lineage of workflows, and OpenLineage run events."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import dataflare
from dataflare.cli import main
from dataflare.dsl_compiler import validate_file, validate_text
from dataflare.lineage import lineage, render, workflow_lineage

SEEDS = Path(__file__).parent / "dsl_compiler" / "seeds"


def _columns(use: dict[str, Any]) -> dict[str, set[str]]:
    return {col: {f"{i['dataset']}#{i['field']}" for i in ins}
            for col, ins in use["columns"].items()}


def test_seed_multi_source_analytics_datasets_and_column_mappings():
    data = workflow_lineage(validate_file(SEEDS / "multi_source_analytics.yaml"))
    assert data["workflow"] == "multi-source-analytics"
    reads = {r["step"]: r["dataset"] for r in data["reads"]}
    assert reads == {
        "users": "postgres://localhost:5432/public.users",
        "orders": "mysql://localhost:3306/orders",
        "product_catalog": "https://api.example.com/products",
        "clickstream": "kafka://localhost:9092/user_clicks",
    }
    writes = {w["step"]: w for w in data["writes"]}
    assert {k: w["dataset"] for k, w in writes.items()} == {
        "data_warehouse": "snowflake://account/customer_segments",
        "real_time_api": "redis://localhost:6379/0/customer:{{user.id}}",
        "data_lake": "s3://data-lake/year={{year}}/month={{month}}/day={{day}}/"
                     "{{source}}_data.parquet",
    }
    users = "postgres://localhost:5432/public.users"
    orders = "mysql://localhost:3306/orders"
    products = "https://api.example.com/products"
    clicks = "kafka://localhost:9092/user_clicks"
    lake = _columns(writes["data_lake"])
    assert lake == {
        "user.firstName": {f"{users}#first_name"}, "user.lastName": {f"{users}#last_name"},
        "user.email": {f"{users}#email"}, "order.id": {f"{orders}#id"},
        "order.userId": {f"{orders}#user_id"}, "order.total": {f"{orders}#total"},
        "order.createdAt": {f"{orders}#created_at"}, "product.id": {f"{products}#id"},
        "product.name": {f"{products}#name"}, "product.price": {f"{products}#price"},
        "product.category": {f"{products}#category"},
    }
    assert writes["data_lake"]["from"] == sorted([users, orders, products])
    warehouse = _columns(writes["data_warehouse"])
    assert warehouse["user.user.email"] == {f"{users}#email"}  # joined under the prefix
    assert warehouse["click_count"] == {f"{clicks}#event"}  # count of the window
    assert warehouse["orders.order.total"] == {f"{orders}#total"}
    assert warehouse["user.segment"] == {f"{clicks}#event"}  # ml over the known features
    assert writes["data_warehouse"]["fields"]["click_count"] == "integer"


CHAIN_A = """\
workflow:
  id: ingest
  sources:
    raw: {type: file, config: {path: raw.jsonl}}
  transformations:
    clean:
      inputs: [raw]
      type: mapping
      config: {mappings: [{source: order_id, destination: id, transform: to_int},
                          {source: amount, destination: amount, transform: to_float}]}
  destinations:
    staged: {type: file, inputs: [clean], config: {path: staged.jsonl}}
"""
CHAIN_B = """\
workflow:
  id: report
  sources:
    staged: {type: file, config: {path: staged.jsonl}}
  transformations:
    big: {type: filter, inputs: [staged], config: {condition: "amount > 10"}}
  destinations:
    report: {type: file, inputs: [big], config: {path: report.jsonl}}
"""


@pytest.fixture
def chain(tmp_path):
    (tmp_path / "a.yaml").write_text(CHAIN_A)
    (tmp_path / "b.yaml").write_text(CHAIN_B)
    return tmp_path


def test_workflows_chain_through_a_shared_dataset(chain, capsys):
    assert main(["lineage", str(chain / "a.yaml"), str(chain / "b.yaml"), "--format",
                 "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    staged = f"file:{(chain / 'staged.jsonl').resolve()}"
    by_id = {d["dataset"]: d for d in data["datasets"]}
    assert by_id[staged]["written_by"] == ["ingest"]
    assert by_id[staged]["read_by"] == ["report"]
    assert set(by_id) == {staged, f"file:{(chain / 'raw.jsonl').resolve()}",
                          f"file:{(chain / 'report.jsonl').resolve()}"}
    ingest = data["workflows"][0]
    assert _columns(ingest["writes"][0]) == {
        "id": {f"file:{(chain / 'raw.jsonl').resolve()}#order_id"},
        "amount": {f"file:{(chain / 'raw.jsonl').resolve()}#amount"},
    }
    assert ingest["writes"][0]["fields"] == {"id": "integer", "amount": "number"}


def test_mermaid_and_dot_show_the_chain(chain, capsys):
    data = lineage([validate_file(chain / "a.yaml"), validate_file(chain / "b.yaml")])
    ids = {d["dataset"]: f"d{i}" for i, d in enumerate(data["datasets"])}
    raw, staged, report = (ids[f"file:{(chain / n).resolve()}"]
                           for n in ("raw.jsonl", "staged.jsonl", "report.jsonl"))
    mermaid = render(data, "mermaid").splitlines()
    assert mermaid[0] == "graph LR"
    for edge in (f"{raw} --> w0", f"w0 --> {staged}", f"{staged} --> w1", f"w1 --> {report}"):
        assert f"  {edge}" in mermaid
    assert '  w0{{"ingest"}}' in mermaid
    assert any(line.startswith(f"  {staged}[(") and "id <- raw.jsonl" not in line
               and "id &lt;-" not in line and "<br/>id <- " in line for line in mermaid)
    dot = render(data, "dot")
    assert dot.startswith("digraph lineage {") and f"  w1 -> {report};" in dot
    assert main(["lineage", str(chain / "a.yaml")]) == 0
    assert capsys.readouterr().out.startswith("graph LR")


def test_no_credential_in_dataset_names():
    v = validate_text("""\
workflow:
  sources:
    db:
      type: postgres
      config: {dsn: "postgresql://ann:hunter2secret@db.internal:6543/shop", table: orders}
  destinations:
    out: {type: stdout, inputs: [db]}
""", "t.yaml")
    data = workflow_lineage(v)
    assert data["reads"][0]["dataset"] == "postgres://db.internal:6543/shop.public.orders"
    assert "hunter2secret" not in json.dumps(data) and "ann" not in json.dumps(data)


def test_a_destination_dsn_names_its_database():
    # The destination's `database` default ("postgres") named the dataset, not the DSN's.
    v = validate_text("""workflow:
  sources: {g: {type: generator, config: {preset: orders, count: 1}}}
  destinations:
    url: {type: postgres, inputs: [g], config: {dsn: "postgresql://u@db:5433/shop", table: t}}
    kv: {type: postgres, inputs: [g], config: {dsn: "host=db2 port=5434 dbname=sales user=u",
                                               table: t}}
""", "t.yaml")
    assert sorted(w["dataset"] for w in workflow_lineage(v)["writes"]) == [
        "postgres://db2:5434/sales.public.t", "postgres://db:5433/shop.public.t"]


# OpenLineage run events -------------------------------------------------------------------

RUN = """\
workflow:
  id: lineage_run
  sources:
    raw: {type: file, config: {path: raw.jsonl}}
  transformations:
    clean:
      inputs: [raw]
      type: mapping
      config: {mappings: [{source: n, destination: number, transform: to_int}]}
  destinations:
    out: {type: file, inputs: [clean], config: {path: out.jsonl}}
"""


def _rebuilt(event: dict[str, Any]) -> Any:
    """The event rebuilt with the client's spec-generated models (their validators run)."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent
    from openlineage.client.event_v2 import RunState as State
    from openlineage.client.facet_v2 import (
        column_lineage_dataset as cl,
    )
    from openlineage.client.facet_v2 import error_message_run, schema_dataset, tags_run

    def facets(raw: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, f in raw.items():
            if name == "schema":
                out[name] = schema_dataset.SchemaDatasetFacet(fields=[
                    schema_dataset.SchemaDatasetFacetFields(name=x["name"], type=x["type"])
                    for x in f["fields"]])
            elif name == "columnLineage":
                out[name] = cl.ColumnLineageDatasetFacet(fields={
                    col: cl.Fields(inputFields=[cl.InputField(
                        namespace=i["namespace"], name=i["name"], field=i["field"])
                        for i in spec["inputFields"]]) for col, spec in f["fields"].items()})
            elif name == "tags":  # the client's own: its version
                out[name] = tags_run.TagsRunFacet(tags=[
                    tags_run.TagsRunFacetFields(key=t["key"], value=t["value"],
                                                source=t.get("source")) for t in f["tags"]])
            elif name == "errorMessage":
                out[name] = error_message_run.ErrorMessageRunFacet(
                    message=f["message"], programmingLanguage=f["programmingLanguage"])
            else:
                raise AssertionError(f"unexpected facet {name}")
        return out

    return RunEvent(
        eventType=State(event["eventType"]), eventTime=event["eventTime"],
        producer=event["producer"],
        run=Run(runId=event["run"]["runId"], facets=facets(event["run"]["facets"])),
        job=Job(namespace=event["job"]["namespace"], name=event["job"]["name"]),
        inputs=[InputDataset(namespace=d["namespace"], name=d["name"],
                             facets=facets(d["facets"])) for d in event["inputs"]],
        outputs=[OutputDataset(namespace=d["namespace"], name=d["name"],
                               facets=facets(d["facets"])) for d in event["outputs"]],
    )


def _check_event(event: dict[str, Any]) -> None:
    """The event is what the client's models (generated from the spec) serialize."""
    from openlineage.client.serde import Serde

    assert event["schemaURL"] == "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
    assert json.loads(Serde.to_json(_rebuilt(event))) == event
    uuid.UUID(event["run"]["runId"])


def _write_run(tmp_path: Path, records: list[str]) -> Path:
    (tmp_path / "raw.jsonl").write_text("".join(r + "\n" for r in records))
    flow = tmp_path / "wf.yaml"
    flow.write_text(RUN)
    return flow


def test_run_events_to_a_file_start_then_complete(tmp_path):
    flow = _write_run(tmp_path, ['{"n": "1"}', '{"n": "2"}'])
    events_file = tmp_path / "events.jsonl"
    result = dataflare.run(flow, quiet=True, openlineage_file=str(events_file))
    assert result.ok
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    for e in events:
        _check_event(e)
    assert events[0]["run"]["runId"] == events[1]["run"]["runId"]
    done = events[1]
    assert done["job"] == {"namespace": "dataflare", "name": "lineage_run", "facets": {}}
    assert [(d["namespace"], d["name"]) for d in done["inputs"]] == [
        ("file", str((tmp_path / "raw.jsonl").resolve()))]
    out = done["outputs"][0]
    assert (out["namespace"], out["name"]) == ("file", str((tmp_path / "out.jsonl").resolve()))
    assert out["facets"]["schema"]["fields"] == [
        {"name": "number", "type": "INTEGER", "fields": []}]
    assert out["facets"]["columnLineage"]["fields"]["number"]["inputFields"] == [{
        "namespace": "file", "name": str((tmp_path / "raw.jsonl").resolve()), "field": "n",
        "transformations": []}]


def test_failed_run_emits_fail_with_the_error(tmp_path):
    flow = _write_run(tmp_path, ['{"n": "1"}', '{"n": "one"}'])
    events_file = tmp_path / "events.jsonl"
    result = dataflare.run(flow, quiet=True, openlineage_file=str(events_file))
    assert not result.ok
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    for e in events:
        _check_event(e)
    message = events[1]["run"]["facets"]["errorMessage"]["message"]
    assert "clean" in message and result.error == message


def test_run_events_posted_to_an_http_endpoint(tmp_path, api):
    flow = _write_run(tmp_path, ['{"n": "3"}'])
    result = dataflare.run(flow, quiet=True, openlineage_url=api.url)
    assert result.ok
    posted = [(path, json.loads(body)) for path, body in api.posted]
    assert [(p, e["eventType"]) for p, e in posted] == [
        ("/api/v1/lineage", "START"), ("/api/v1/lineage", "COMPLETE")]
    for _, e in posted:
        _check_event(e)


def test_unreachable_endpoint_is_a_warning_not_a_failure(tmp_path, capsys):
    flow = _write_run(tmp_path, ['{"n": "3"}'])
    result = dataflare.run(flow, quiet=True, openlineage_url="http://127.0.0.1:9")
    assert result.ok
    err = capsys.readouterr().err
    assert "openlineage START event not sent" in err
    assert "openlineage COMPLETE event not sent" in err
