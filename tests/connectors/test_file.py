"""File source and destination: formats, globs, CSV columns, exactly-once resume."""

import os
import signal
import subprocess
import sys
import time

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataflare.connectors.file import FileDestinationConfig
from dataflare.connectors.lake import LakeOutput, LocalStorage, OneFile, PathTemplate, _LakeLogic
from tests.fixtures.workflows import ROOT, read_jsonl, run_cli


def flow(tmp_path, source: str, destination: str, extra: str = "") -> str:
    text = f"""\
workflow:
  sources:
    src:
{source}
  destinations:
    out:
      inputs: [src]
{destination}
{extra}"""
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return str(path)


def test_csv_to_jsonl_with_type_inference_and_bad_rows(tmp_path):
    (tmp_path / "in.csv").write_text("id,name,score\n1,ann,1.5\n2,bob\n3,cy,\n")
    path = flow(
        tmp_path,
        "      type: file\n      config: {path: in.csv, csv: {infer_types: true}}\n"
        "      error_handling: {strategy: redirect, redirect_to: bad}",
        "      type: file\n      config: {path: out.jsonl}",
        "    bad: {type: file, config: {path: bad.jsonl}}",
    )
    path_text = open(path).read().replace("{path: out.jsonl}\n", "{path: out.jsonl}\n")
    open(path, "w").write(path_text.replace("\n    bad:", "\n    bad:"))
    result = run_cli("run", path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": 1, "name": "ann", "score": 1.5}, {"id": 3, "name": "cy", "score": None}]
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    del bad["error"]["at"], bad["error"]["run_id"]
    assert bad == {"error": {"step": "src", "type": "CsvError",
                             "message": "row has 2 fields, the header has 3"},
                   "source": {"component": "src", "position": {"file": "in.csv", "line": 3}},
                   "record": "2,bob"}


def test_glob_of_json_and_parquet_files_to_csv_and_parquet(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_bytes(orjson.dumps({"data": [{"k": 1, "v": "x"}]}))
    (tmp_path / "in" / "b.json").write_bytes(orjson.dumps({"data": [{"k": 2, "v": "y,z"}]}))
    path = flow(
        tmp_path,
        "      type: file\n      config: {path: 'in/*.json', records_path: data}",
        "      type: file\n      config: {path: out.csv, columns: [k, v]}",
        "    pq: {type: file, inputs: [src], config: {path: out.parquet}}",
    )
    result = run_cli("run", path)
    assert result.code == 0, result.stderr
    assert (tmp_path / "out.csv").read_text() == 'k,v\n1,x\n2,"y,z"\n'
    table = pq.read_table(tmp_path / "out.parquet")
    assert sorted(table.to_pylist(), key=lambda r: r["k"]) == [
        {"k": 1, "v": "x"}, {"k": 2, "v": "y,z"}]
    pq.write_table(pa.Table.from_pylist([{"k": i} for i in range(5)]), tmp_path / "in.parquet")
    path = flow(tmp_path, "      type: file\n      config: {path: in.parquet}",
                "      type: file\n      config: {path: out2.jsonl}")
    assert run_cli("run", path).code == 0
    assert read_jsonl(tmp_path / "out2.jsonl") == [{"k": i} for i in range(5)]


def test_bytes_are_written_as_hex_text_to_jsonl_and_csv_and_stay_binary_in_parquet(tmp_path):
    table = pa.table({"id": [1, 2], "raw": [b"\x00\xff", b'{"a": 1}']})
    pq.write_table(table, tmp_path / "in.parquet")
    path = flow(
        tmp_path,
        "      type: file\n      config: {path: in.parquet}",
        "      type: file\n      config: {path: out.jsonl}",
        "    csv: {type: file, inputs: [src], config: {path: out.csv}}\n"
        "    pq: {type: file, inputs: [src], config: {path: out.parquet}}",
    )
    result = run_cli("run", path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": 1, "raw": "\\x00ff"}, {"id": 2, "raw": "\\x7b2261223a20317d"}]
    assert (tmp_path / "out.csv").read_text() == "id,raw\n1,\\x00ff\n2,\\x7b2261223a20317d\n"
    assert pq.read_table(tmp_path / "out.parquet").equals(table)
    path = flow(tmp_path, "      type: file\n      config: {path: in.parquet}",
                "      type: stdout")
    result = run_cli("run", "-q", path)
    assert result.code == 0, result.stderr
    assert [orjson.loads(line)["raw"] for line in result.stdout.splitlines()] == [
        "\\x00ff", "\\x7b2261223a20317d"]


def test_parquet_columns_are_every_field_of_any_record(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n{"id": 2, "email": "b@x"}\n')
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      config: {path: out.parquet}")
    assert run_cli("run", path).code == 0
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [
        {"id": 1, "email": None}, {"id": 2, "email": "b@x"}]


def test_csv_destination_rejects_fields_outside_its_columns(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n{"a": 2, "b": 3}\n')
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      config: {path: out.csv, columns: [a]}")
    result = run_cli("run", path)
    assert result.code == 1
    assert "field(s) b are not among the CSV columns (a)" in result.stderr


def test_missing_input_file_is_a_clear_error(tmp_path):
    path = flow(tmp_path, "      type: file\n      config: {path: 'nothing/*.jsonl'}",
                "      type: stdout")
    result = run_cli("run", path)
    assert result.code == 1
    assert "step 'src': no file matches 'nothing/*.jsonl'" in result.stderr


def test_append_mode_adds_to_the_file_and_default_rewrites_it(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      config: {path: out.jsonl}")
    assert run_cli("run", path).code == 0
    assert run_cli("run", path).code == 0
    assert read_jsonl(tmp_path / "out.jsonl") == [{"a": 1}]
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      write_mode: {type: append}\n"
                "      config: {path: out.jsonl}")
    assert run_cli("run", path).code == 0
    assert read_jsonl(tmp_path / "out.jsonl") == [{"a": 1}, {"a": 1}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_resume_after_the_output_was_moved_away_writes_a_fresh_file(tmp_path, fmt):
    # The resume seeked to the snapshot's length in the new, empty file: NUL bytes.
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      write_mode: {type: append}\n"
                f"      config: {{path: out/o.{fmt}}}")
    recovery = str(tmp_path / "rec")
    assert run_cli("run", path, "-r", recovery).code == 0
    (tmp_path / "out" / f"o.{fmt}").rename(tmp_path / f"consumed.{fmt}")
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"a": 3}\n')
    result = run_cli("run", path, "-r", recovery)
    assert result.code == 0, result.stderr
    assert "it was moved or cut since; the run writes on at its end" in result.stderr
    text = (tmp_path / "out" / f"o.{fmt}").read_text()
    assert text == ('{"a":3}\n' if fmt == "jsonl" else "a\n3\n")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_run_that_writes_nothing_still_rewrites_the_file(tmp_path, fmt):
    # A file of a previous run was left as it was: its records read as this run's.
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    for keep, want in (("true", 2), ("false", 0)):
        path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                    f"      type: file\n      config: {{path: out.{fmt}}}\n"
                    f"      filter: '{keep}'")
        result = run_cli("run", path)
        assert result.code == 0, result.stderr
        out = tmp_path / f"out.{fmt}"
        rows = (pq.read_table(out).num_rows if fmt == "parquet" else
                len(out.read_text().splitlines()) - (fmt == "csv" and want > 0))
        assert rows == want


def test_parquet_append_keeps_the_existing_rows_and_unites_the_columns(tmp_path):
    (tmp_path / "p1.jsonl").write_text('{"id": 1, "a": "x"}\n{"id": 2, "a": "y"}\n')
    (tmp_path / "p2.jsonl").write_text('{"id": 3, "b": true}\n')
    (tmp_path / "p3.jsonl").write_text('{"id": "four"}\n')
    out = tmp_path / "out.parquet"
    results = [
        run_cli("run", flow(tmp_path, f"      type: file\n      config: {{path: {name}}}",
                            "      type: file\n      write_mode: {type: append}\n"
                            "      config: {path: out.parquet}"))
        for name in ("p1.jsonl", "p2.jsonl", "p3.jsonl")
    ]
    assert [r.code for r in results] == [0, 0, 1], results[-1].stderr
    assert ("step 'out' failed on the record at p3.jsonl:1: ParquetTypeError: step 'out': "
            "field 'id' is a str ('four'), the Parquet column is int64") in results[-1].stderr
    assert pq.read_table(out).to_pylist() == [  # the failed run left the file as it was
        {"id": 1, "a": "x", "b": None}, {"id": 2, "a": "y", "b": None},
        {"id": 3, "a": None, "b": True}]


@pytest.mark.parametrize("written", [False, True])
def test_parquet_append_resumed_from_a_snapshot_keeps_the_existing_rows_once(tmp_path, written):
    # The execution that crashes after the snapshot had (written=True) or had not yet
    # written the file from its parts when it stopped.
    out = tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 1}]), out)
    cfg = FileDestinationConfig.model_validate({"path": "out.parquet"})
    parts = f"{tmp_path}/.out.parquet.parts/part.parquet"
    lake = LakeOutput("out", "parquet", PathTemplate(parts, "parquet", cfg), cfg,
                      LocalStorage, OneFile(out, append=True))
    first = _LakeLogic(lake, None)
    first.on_batch([[{"id": 2}]])
    state = first.snapshot()
    first.on_batch([[{"id": 3}]])  # an epoch that a failure interrupts
    if written:
        first.on_eof()
        assert [r["id"] for r in pq.read_table(out).to_pylist()] == [1, 2, 3]
    resumed = _LakeLogic(lake, state)
    resumed.on_batch([[{"id": 3}], [{"id": 4}]])
    resumed.on_eof()
    assert [r["id"] for r in pq.read_table(out).to_pylist()] == [1, 2, 3, 4]
    assert not list((tmp_path / ".out.parquet.parts").glob("*.parquet"))


def test_killed_run_resumes_from_snapshot_and_writes_each_record_once(tmp_path):
    count = 3000
    path = flow(
        tmp_path,
        f"      type: generator\n      config: {{preset: orders, count: {count}, rate: 600,"
        " batch_size: 50, partitions: 2}",
        "      type: file\n      config: {path: out.jsonl}",
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
    cmd = [sys.executable, "-m", "dataflare", "run", path, "--recovery-dir",
           str(tmp_path / "recovery"), "-s", "0.2", "-q"]
    for delay in (1.0, 1.5):
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path)
        time.sleep(delay + 1.5)  # interpreter start-up, then part of the stream
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = read_jsonl(tmp_path / "out.jsonl")
    assert 0 < len(partial) < count
    assert subprocess.run(cmd, env=env, cwd=tmp_path, timeout=120).returncode == 0
    ids = [r["order_id"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert sorted(ids) == list(range(count))


def test_an_output_path_that_cannot_be_written_names_the_step(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "taken").write_text("a file, not a directory")
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      config: {path: taken/out.jsonl}")
    result = run_cli("run", path)
    assert result.code == 1
    assert "error: step 'out': cannot write " in result.stderr, result.stderr


def test_integers_beyond_64_bits_are_written_as_text(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 10000000000}\n')
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      config: {path: out.jsonl}",
                "  transformations:\n    sq:\n      inputs: [src]\n      type: mapping\n"
                "      config: {mappings: [{expression: 'a * a', destination: big}]}\n")
    text = open(path).read().replace("out:\n      inputs: [src]", "out:\n      inputs: [sq]")
    open(path, "w").write(text)
    result = run_cli("run", path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [{"big": "100000000000000000000"}]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_numbers_a_float_would_round_are_read_as_their_exact_text(tmp_path, fmt):
    rows = [("12345678901234567890.12", "123456789012345678901234567890", "0.1")]
    src = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        src.write_text("a,b,c\n" + "".join(",".join(r) + "\n" for r in rows))
        config = f"{{path: in.{fmt}, csv: {{infer_types: true}}}}"
    else:
        lines = [f'{{"a": {a}, "b": {b}, "c": {c}}}' for a, b, c in rows]
        src.write_text("\n".join(lines) + "\n" if fmt == "jsonl" else f"[{', '.join(lines)}]")
        config = f"{{path: in.{fmt}}}"
    path = flow(tmp_path, f"      type: file\n      config: {config}",
                "      type: file\n      config: {path: out.jsonl}")
    result = run_cli("run", path)
    assert result.code == 0, result.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"a": "12345678901234567890.12", "b": "123456789012345678901234567890", "c": 0.1}]
    if fmt == "csv":  # CSV numbers are always exact: the setting is refused, not ignored
        text = open(path).read().replace("infer_types: true}", "infer_types: true}, "
                                         "decimal_handling: float")
        open(path, "w").write(text)
        refused = run_cli("validate", path)
        assert refused.code == 1 and "decimal_handling reads JSON numbers: csv has none" \
            in refused.stderr


def test_a_completed_one_file_parquet_output_leaves_no_parts(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    path = flow(tmp_path, "      type: file\n      config: {path: in.jsonl}",
                "      type: file\n      config: {path: out.parquet}")
    assert run_cli("run", path).code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.yaml", "in.jsonl", "out.parquet"]
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [{"a": 1}, {"a": 2}]
    assert run_cli("run", path, "-r", str(tmp_path / "rec")).code == 0
    assert not (tmp_path / ".out.parquet.parts").exists()  # completed: nothing to resume
