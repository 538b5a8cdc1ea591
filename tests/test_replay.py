"""``dataflare replay``: dead letters fed back into a step once the cause is fixed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FLOW = """
workflow:
  sources:
    orders: {{type: file, config: {{path: in.jsonl}},
              error_handling: {{strategy: redirect, redirect_to: dead}}}}
  transformations:
    clean:
      type: mapping
      inputs: [orders]
      config:
        mappings:
          - {{source: id, destination: id}}
          - {{source: amount, destination: amount, transform: {transform}}}
      error_handling: {{strategy: redirect, redirect_to: dead}}
  destinations:
    out: {{type: file, inputs: [clean], config: {{path: out.jsonl}}, write_mode: {{type: append}}}}
    dead: {{type: file, config: {{path: {dead}}}}}
"""


def dataflare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dataflare", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_dead_letters_replayed_into_the_fixed_step(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"id": 1, "amount": "3"}\n{"id": 2, "amount": "7.5"}\n{broken\n'
        '{"id": 4, "amount": "2.25"}\n{"id": 5, "amount": "lots"}\n')
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(transform="to_int", dead="dead.jsonl"))
    first = dataflare("run", str(flow), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    dead = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(d["error"]["step"] for d in dead) == ["clean", "clean", "clean", "orders"]
    # The cause is fixed (amounts are decimals); the replay's own failures go elsewhere.
    flow.write_text(FLOW.format(transform="to_float", dead="dead-again.jsonl"))
    replay = dataflare("replay", "dead.jsonl", "--to", "clean", str(flow), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert "replaying 3 dead letters of dead.jsonl into step 'clean'" in replay.stderr
    assert "not replayed: dead.jsonl:" in replay.stderr  # the raw '{broken' line
    assert "replayed into 'clean': 1 failed again" in replay.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["amount"]) for r in out) == [(1, 3), (2, 7.5), (4, 2.25)]
    [again] = [json.loads(x) for x in (tmp_path / "dead-again.jsonl").read_text().splitlines()]
    assert again["record"]["id"] == 5
    position = again["source"]["position"]
    assert position["line"] == 5 and position["file"].endswith("in.jsonl")  # where it began
    missing = dataflare("replay", "dead.jsonl", "--to", "nope", str(flow), cwd=tmp_path)
    assert missing.returncode == 1 and "no step 'nope'" in missing.stderr
    # A table or database that is not there: a traceback, now one line (no password).
    table = "postgresql://postgres:pw-0123456789@127.0.0.1:5432/test#public.no_such_dlq_x"
    gone = dataflare("replay", table, "--to", "clean", str(flow), cwd=tmp_path)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert 'relation "public.no_such_dlq_x" does not exist' in gone.stderr
    assert "pw-0123" not in gone.stderr and "cannot read postgresql://postgres:***@" in gone.stderr


def test_a_replay_adds_to_destinations_that_a_run_rewrites(tmp_path: Path) -> None:
    # A file without write_mode and a table with write_mode overwrite are emptied at the
    # start of a run: a replay emptied them too, leaving only the replayed records.
    import duckdb

    (tmp_path / "in.jsonl").write_text('{"id": 1, "amount": "3"}\n{"id": 2, "amount": "7.5"}\n')
    flow = tmp_path / "wf.yaml"
    rewritten = FLOW.replace(", write_mode: {{type: append}}", "") + (
        "    table: {{type: duckdb, inputs: [clean], config: {{path: dw.duckdb, table: t}},\n"
        "            write_mode: {{type: overwrite}}}}\n")
    flow.write_text(rewritten.format(transform="to_int", dead="dead.jsonl"))
    assert dataflare("run", str(flow), cwd=tmp_path).returncode == 0
    flow.write_text(rewritten.format(transform="to_float", dead="dead-again.jsonl"))
    replay = dataflare("replay", "dead.jsonl", "--to", "clean", str(flow), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert "replay: destination 'out' adds the replayed records" in replay.stderr
    assert "replay: destination 'table' adds the replayed records" in replay.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["amount"]) for r in out) == [(1, 3), (2, 7.5)]
    with duckdb.connect(str(tmp_path / "dw.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT id, amount FROM t ORDER BY id").fetchall() == [
            (1, 3.0), (2, 7.5)]


def test_a_dead_letter_written_again_after_a_crash_is_replayed_once(tmp_path: Path) -> None:
    # Dead letters are written at least once: a PostgreSQL dead-letter table held 1,348
    # rows for 1,200 offsets after a SIGKILL, and a replay pushed the repeats through.
    (tmp_path / "in.jsonl").write_text('{"id": 1, "amount": "1.5"}\n{"id": 2, "amount": "x"}\n')
    flow = tmp_path / "wf.yaml"
    flow.write_text(FLOW.format(transform="to_int", dead="dead.jsonl"))
    assert dataflare("run", str(flow), cwd=tmp_path).returncode == 0
    letters = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert len(letters) == 2
    again = {**letters[0], "error": {**letters[0]["error"], "at": "2030-01-01T00:00:00.000Z"}}
    fanned = {**letters[0], "record": {**letters[0]["record"], "part": 2}}  # same position
    lines = [*letters, again, fanned]
    (tmp_path / "dead.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    flow.write_text(FLOW.format(transform="to_float", dead="dead-again.jsonl"))
    replay = dataflare("replay", "dead.jsonl", "--to", "clean", str(flow), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert "1 dead letter(s) repeat an earlier one" in replay.stderr
    assert "replaying 3 dead letters" in replay.stderr


def test_a_destinations_dead_letters_are_replayed_into_it(tmp_path: Path) -> None:
    # A destination's dead letters hold what it was to write: replayed into the step
    # before it, they were mapped again (from fields they no longer have) and written as
    # nulls; the destination itself could not be named.
    (tmp_path / "in.jsonl").write_text('{"id": 1, "amount": "3"}\n{"id": 2, "amount": "4", '
                                       '"note": "late"}\n')
    flow = tmp_path / "wf.yaml"
    text = """
workflow:
  sources:
    orders: {type: file, config: {path: in.jsonl}}
  transformations:
    clean:
      type: mapping
      inputs: [orders]
      config: {mappings: [{source: amount, destination: amount, transform: to_int}],
               keep_unmapped: true}
  destinations:
    out:
      type: file
      inputs: [clean]
      config: {path: out.csv, columns: COLUMNS}
      write_mode: {type: append}
      error_handling: {strategy: redirect, redirect_to: dead}
    dead: {type: file, config: {path: dead.jsonl}}
"""
    flow.write_text(text.replace("COLUMNS", "[id, amount]"))
    assert dataflare("run", str(flow), cwd=tmp_path).returncode == 0
    [letter] = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert letter["error"]["step"] == "out" and letter["record"]["note"] == "late"
    refused = dataflare("replay", "dead.jsonl", "--to", "clean", str(flow), cwd=tmp_path)
    assert refused.returncode == 1 and ("dead letters of destination 'out' hold what it was "
                                        "to write, not 'clean''s input: replay them --to out"
                                        ) in refused.stderr
    flow.write_text(text.replace("COLUMNS", "[id, amount, note]"))  # the cause, fixed
    assert (tmp_path / "out.csv").read_text().splitlines() == ["id,amount", "1,3"]
    (tmp_path / "out.csv").write_text("id,amount,note\n1,3,\n")
    replay = dataflare("replay", "dead.jsonl", "--to", "out", str(flow), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    assert (tmp_path / "out.csv").read_text().splitlines() == ["id,amount,note", "1,3,",
                                                               "2,4,late"]


def test_identical_rows_of_a_table_are_distinct_dead_letters(tmp_path: Path) -> None:
    # A database source's records are placed by their table only: three identical rows
    # that failed were taken for one dead letter written again after a crash.
    letter = {"record": {"cust": "a", "v": "bad"}, "source": {"position": {"table": "t"}},
              "error": {"step": "clean", "type": "RecordError", "message": "x"}}
    (tmp_path / "dead.jsonl").write_text(f"{json.dumps(letter)}\n{json.dumps(letter)}\n")
    from dataflare.replay import read_dead_letters

    read = read_dead_letters(str(tmp_path / "dead.jsonl"))
    assert (len(read.records), read.repeated) == (2, 0)


def test_replayed_records_are_not_masked_twice(tmp_path: Path) -> None:
    # Dead letters hold masked records: replayed, they were hashed again (hash(hash(e))).
    import hashlib
    import hmac
    import os

    (tmp_path / "in.jsonl").write_text('{"id": 1, "amount": "2.5", "email": "a@b.c"}\n')
    flow = tmp_path / "wf.yaml"
    protected = FLOW.replace("workflow:\n", "workflow:\n  data_protection:\n    hash_key: "
                             "\"${{MASK_KEY_REPLAY}}\"\n    masking_rules: [{{field: email, "
                             "method: hash}}]\n", 1).replace(
        "          - {{source: id, destination: id}}\n", "          - {{source: id, "
        "destination: id}}\n          - {{source: email, destination: email}}\n")
    flow.write_text(protected.format(transform="to_int", dead="dead.jsonl"))
    env = {**os.environ, "MASK_KEY_REPLAY": "k" * 32}
    run = subprocess.run([sys.executable, "-m", "dataflare", "run", str(flow)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    hashed = hmac.new(b"k" * 32, b"a@b.c", hashlib.sha256).hexdigest()
    [letter] = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert letter["record"]["email"] == hashed
    flow.write_text(protected.format(transform="to_float", dead="dead-again.jsonl"))
    replay = subprocess.run([sys.executable, "-m", "dataflare", "replay", "dead.jsonl", "--to",
                             "clean", str(flow)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)
    assert replay.returncode == 0, replay.stderr
    [out] = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out == {"id": 1, "email": hashed, "amount": 2.5}
