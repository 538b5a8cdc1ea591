"""``dataflare replay``: dead letters, unwrapped, back into a step once the cause is fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fixtures.workflows import read_jsonl, run_cli

ORDERS = '{"id": 1, "amount": "3"}\n{"id": 2, "amount": "7.5"}\n{"id": 3, "amount": "seven"}\n'

FLOW = """\
workflow:
  id: orders
  sources:
    orders: {{type: file, config: {{path: orders.jsonl}}}}
  transformations:
    clean:
      inputs: [orders]
      type: mapping
      config:
        mappings:
          - {{source: id, destination: id}}
          - {{source: amount, destination: amount, transform: {transform}}}
      error_handling: {{strategy: redirect, redirect_to: dead}}
  destinations:
    out: {{type: file, inputs: [clean], config: {{path: {out}}}}}
    dead: {dead}
"""


def write_flow(tmp_path: Path, name: str, transform: str, out: str, dead: str) -> str:
    (tmp_path / name).write_text(FLOW.format(transform=transform, out=out, dead=dead))
    return name


def test_replay_a_dead_letter_file_into_the_fixed_step(tmp_path: Path) -> None:
    (tmp_path / "orders.jsonl").write_text(ORDERS)
    first = write_flow(tmp_path, "flow.yaml", "to_int", "out.jsonl",
                       "{type: file, config: {path: dead.jsonl}}")
    assert run_cli("run", first, cwd=tmp_path).code == 0
    assert read_jsonl(tmp_path / "out.jsonl") == [{"id": 1, "amount": 3}]
    assert [d["record"]["id"] for d in read_jsonl(tmp_path / "dead.jsonl")] == [2, 3]
    # The cause is fixed for 7.5 (to_float), not for "seven"; the source is not read again.
    fixed = write_flow(tmp_path, "fixed.yaml", "to_float", "replayed.jsonl",
                       "{type: file, config: {path: dead_again.jsonl}}")
    result = run_cli("replay", "dead.jsonl", "--to", "clean", fixed, cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "replayed 2 record(s) into step 'clean'; failed again: 1 in step 'clean'" \
        in result.stderr
    assert read_jsonl(tmp_path / "replayed.jsonl") == [{"id": 2, "amount": 7.5}]
    [again] = read_jsonl(tmp_path / "dead_again.jsonl")  # the step's error handling again
    assert again["record"] == {"id": 3, "amount": "seven"}
    assert again["source"]["position"] == {"file": "orders.jsonl", "line": 3}


def test_replay_from_a_postgres_dead_letter_table_and_into_a_destination(
    tmp_path: Path, pg_schema: Any
) -> None:
    (tmp_path / "orders.jsonl").write_text(ORDERS)
    dead = (f'{{type: postgres, config: {{dsn: "{pg_schema.dsn}", schema: {pg_schema.schema}, '
            "table: dead}}")
    first = write_flow(tmp_path, "flow.yaml", "to_int", "out.jsonl", dead)
    assert run_cli("run", first, cwd=tmp_path).code == 0
    url = f"postgresql://postgres@127.0.0.1:5432/test#{pg_schema.schema}.dead"
    # Into the destination `out` of a workflow: the records as they were, one by one.
    result = run_cli("replay", url, "--to", "out", first, cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "replayed 2 record(s) into step 'out'; none failed again" in result.stderr
    assert sorted(read_jsonl(tmp_path / "out.jsonl"), key=lambda r: r["id"]) == [
        {"id": 2, "amount": "7.5"}, {"id": 3, "amount": "seven"}]


def test_replay_names_an_unknown_step(tmp_path: Path) -> None:
    (tmp_path / "orders.jsonl").write_text(ORDERS)
    (tmp_path / "dead.jsonl").write_text("")
    flow = write_flow(tmp_path, "flow.yaml", "to_int", "out.jsonl",
                      "{type: file, config: {path: dead.jsonl}}")
    result = run_cli("replay", "dead.jsonl", "--to", "cleen", flow, cwd=tmp_path)
    assert result.code == 1 and "no step 'cleen' in the workflow" in result.stderr


def test_replay_from_a_kafka_dead_letter_topic(tmp_path: Path, kafka_broker: Any,
                                               kafka_topic: Any) -> None:
    (tmp_path / "orders.jsonl").write_text(ORDERS)
    servers, topic = kafka_broker.bootstrap_servers, kafka_topic()
    dead = f'{{type: kafka, config: {{bootstrap_servers: "{servers}", topic: {topic}}}}}'
    first = write_flow(tmp_path, "flow.yaml", "to_int", "out.jsonl", dead)
    assert run_cli("run", first, cwd=tmp_path).code == 0
    fixed = write_flow(tmp_path, "fixed.yaml", "to_float", "replayed.jsonl",
                       "{type: file, config: {path: dead_again.jsonl}}")
    result = run_cli("replay", f"kafka://{servers}/{topic}", "--to", "clean", fixed,
                     cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert "replayed 2 record(s) into step 'clean'; failed again: 1 in step 'clean'" \
        in result.stderr
    assert read_jsonl(tmp_path / "replayed.jsonl") == [{"id": 2, "amount": 7.5}]
    [again] = read_jsonl(tmp_path / "dead_again.jsonl")
    assert again["source"]["position"] == {"file": "orders.jsonl", "line": 3}
