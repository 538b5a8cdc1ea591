"""Partitioned, rolling file outputs: templated paths, partitions, rolling, refusals."""

import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

import dataflare
from dataflare.connectors.file import FileDestinationConfig
from dataflare.connectors.lake import (
    LakeOutput,
    LocalStorage,
    PathTemplate,
    _ConformLogic,
    _LakeLogic,
    journal_retention,
    path_value,
)
from tests.fixtures.workflows import ROOT, read_jsonl

NAME = re.compile(r"^(?P<stem>.+)-(?P<run>[0-9a-f]{12})-(?P<seq>\d{6})(?P<ext>\.\w+)$")


def write_flow(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    return path


def refusing_flow(tmp_path: Path, rows: list[dict], config: str) -> Path:
    """``rows`` in in.jsonl, written by a file output ``out`` (``config``) whose refused
    records go to bad.jsonl."""
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return write_flow(tmp_path, f"""\
workflow:
  sources:
    src: {{type: file, config: {{path: in.jsonl}}}}
  destinations:
    out:
      inputs: [src]
      type: file
      config: {config}
      error_handling: {{strategy: redirect, redirect_to: bad}}
    bad: {{type: file, config: {{path: bad.jsonl}}}}
""")


def outputs(root: Path, ext: str) -> dict[str, Path]:
    """The output files under ``root`` by relative path, the run and number taken out."""
    out = {}
    for p in sorted(root.rglob(f"*{ext}")):
        rel = p.relative_to(root)
        if rel.parts[0] == "_dataflare":
            continue
        m = NAME.match(p.name)
        assert m, p.name
        out[f"{rel.parent}/{m['stem']}{m['ext']}#{int(m['seq'])}"] = p
    return out


def by_partition(files: dict[str, Path]) -> dict[str, list[dict]]:
    got: dict[str, list[dict]] = {}
    for key, path in files.items():
        got.setdefault(key.split("#")[0], []).extend(read_jsonl(path))
    return got


def test_paths_are_templated_with_fields_time_source_and_hive_partitions(tmp_path):
    events = [
        {"id": 1, "region": "eu", "kind": "click", "ts": "2024-03-05T07:30:00Z"},
        {"id": 2, "region": "eu", "kind": "view", "ts": 1709712000},  # 2024-03-06T08:00Z
        {"id": 3, "region": "us/west", "kind": None, "ts": "2024-12-31T23:59:59"},
        {"id": 4, "region": "..", "kind": "click", "ts": "2024-03-05T07:00:00+00:00"},
    ]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    path = write_flow(tmp_path, """\
workflow:
  sources:
    events: {type: file, config: {path: in.jsonl}}
  transformations:
    web: {inputs: [events], type: filter, config: {condition: "id <= 2"}}
    app: {inputs: [events], type: filter, config: {condition: "id > 2"}}
  destinations:
    lake:
      inputs: [web, app]
      type: file
      config:
        path_template: >-
          out/{{source}}/year={{year}}/month={{month}}/day={{day}}/h{{hour}}-{{region}}.jsonl
        time_field: ts
        partition_by: [year, kind]
""")
    result = dataflare.run(path)
    assert result.ok, result.error
    got = by_partition(outputs(tmp_path / "out", ".jsonl"))
    assert got == {
        "web/year=2024/month=03/day=05/kind=click/h07-eu.jsonl": [events[0]],
        "web/year=2024/month=03/day=06/kind=view/h08-eu.jsonl": [events[1]],
        "app/year=2024/month=12/day=31/kind=__HIVE_DEFAULT_PARTITION__/h23-us%2Fwest.jsonl":
            [events[2]],
        "app/year=2024/month=03/day=05/kind=click/h07-%2E%2E.jsonl": [events[3]],
    }


def test_processing_time_fills_the_time_parts_when_no_time_field(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    before = time.gmtime()
    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    lake: {inputs: [src], type: file, config: {path: "out/{{year}}/{{month}}/x.jsonl"}}
""")
    assert dataflare.run(path).ok
    [key] = outputs(tmp_path / "out", ".jsonl")
    after = time.gmtime()
    assert key.split("#")[0] in {f"{t.tm_year:04d}/{t.tm_mon:02d}/x.jsonl" for t in (before, after)}


def test_files_roll_by_max_records_and_by_max_bytes(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"".join(
        orjson.dumps({"id": i, "part": i % 2, "pad": "x" * 50}) + b"\n" for i in range(1000)))
    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl, batch_size: 64}}
  destinations:
    by_count:
      inputs: [src]
      type: file
      config: {path_template: "count/", format: parquet, partition_by: [part], max_records: 120}
    by_size:
      inputs: [src]
      type: file
      config: {path_template: "size/data.jsonl", max_bytes: 10000}
""")
    assert dataflare.run(path).ok
    counted = outputs(tmp_path / "count", ".parquet")
    sizes = {k: pq.read_metadata(p).num_rows for k, p in counted.items()}
    for part in ("part=0", "part=1"):
        rows = sorted((int(k.split("#")[1]), n) for k, n in sizes.items() if k.startswith(part))
        assert [n for _, n in rows] == [120, 120, 120, 120, 20]  # 500 records a partition
    ids = sorted(r for p in counted.values() for r in pq.read_table(p).column("id").to_pylist())
    assert ids == list(range(1000))
    sized = outputs(tmp_path / "size", ".jsonl")
    lengths = [p.stat().st_size for p in sized.values()]
    line = len(orjson.dumps({"id": 100, "part": 0, "pad": "x" * 50})) + 1
    assert all(10000 <= n < 10000 + line for n in lengths[:-1]) and lengths[-1] <= 10000 + line
    assert sorted(r["id"] for p in sized.values() for r in read_jsonl(p)) == list(range(1000))


def test_files_appear_while_a_streaming_run_goes(tmp_path):
    path = write_flow(tmp_path, """\
workflow:
  sources:
    gen:
      type: generator
      config: {count: null, rate: 200, batch_size: 20, fields: {n: {type: sequence}}}
  destinations:
    lake:
      inputs: [gen]
      type: file
      config: {path_template: "out/data.jsonl", flush_interval: 300ms}
""")
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", str(path), "--quiet"],
                            cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(outputs(tmp_path / "out", ".jsonl")) < 3:  # three files rolled by time
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no file rolled in 60 s"
            time.sleep(0.1)
        files = outputs(tmp_path / "out", ".jsonl")
        numbers = sorted(r["n"] for p in files.values() for r in read_jsonl(p))
        assert numbers == list(range(len(numbers)))  # complete files, in order, no gap
        assert proc.poll() is None  # the run still goes: the files came while it ran
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_a_parquet_type_clash_refuses_that_record_alone(tmp_path):
    rows = [{"id": i, "amount": i * 0.5} for i in range(12_000)]
    rows[11_500]["amount"] = "12,5"
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    lake:
      inputs: [src]
      type: file
      config: {path_template: "out/", format: parquet}
      error_handling: {strategy: redirect, redirect_to: bad}
    bad: {type: file, config: {path: bad.jsonl}}
""")
    result = dataflare.run(path)
    assert result.ok, result.error
    ids = [i for p in outputs(tmp_path / "out", ".parquet").values()
           for i in pq.read_table(p).column("id").to_pylist()]
    assert sorted(ids) == [i for i in range(12_000) if i != 11_500]
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["record"] == {"id": 11_500, "amount": "12,5"}
    assert bad["source"]["position"] == {"file": "in.jsonl", "line": 11_501}
    assert bad["error"]["message"] == (
        "step 'lake': field 'amount' is a str ('12,5'), the Parquet column is double")


@pytest.mark.parametrize("config", [
    '{path: out.parquet}', '{path_template: "out/", format: parquet}'])
def test_a_fraction_after_a_refused_record_widens_the_integer_column(tmp_path, config):
    # 1, then "text" (refused), then 2.5 in one batch: the column's type came from the
    # first value, and Arrow cut 2.5 to 2 in an integer column without a word.
    rows = [{"id": 1, "x": 1}, {"id": 2, "x": "text"}, {"id": 3, "x": 2.5}]
    path = refusing_flow(tmp_path, rows, config)
    result = dataflare.run(path)
    assert result.ok, result.error
    files = [tmp_path / "out.parquet"] if "path:" in config else list(
        outputs(tmp_path / "out", ".parquet").values())
    got = sorted((r for p in files for r in pq.read_table(p).to_pylist()), key=lambda r: r["id"])
    assert got == [{"id": 1, "x": 1.0}, {"id": 3, "x": 2.5}]
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["record"] == {"id": 2, "x": "text"}


def test_a_csv_field_first_seen_late_refuses_that_record_alone(tmp_path):
    rows = [{"id": i, "name": f"n{i}"} for i in range(30_000)]
    rows[25_000]["extra"] = 1
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    lake:
      inputs: [src]
      type: file
      config: {path_template: "out/part.csv", max_records: 10000}
      error_handling: {strategy: skip}
""")
    result = dataflare.run(path)
    assert result.ok, result.error
    files = outputs(tmp_path / "out", ".csv")
    lines = [ln for p in files.values() for ln in p.read_text().splitlines()]
    assert lines.count("id,name") == len(files) == 3
    assert sorted(int(ln.split(",")[0]) for ln in lines if ln != "id,name") == [
        i for i in range(30_000) if i != 25_000]


def test_a_field_first_seen_later_starts_a_parquet_file_with_the_wider_schema(tmp_path):
    cfg = FileDestinationConfig.model_validate({"path_template": "out/", "format": "parquet"})
    template = PathTemplate(f"{tmp_path}/out/", "parquet", cfg)
    logic = _LakeLogic(LakeOutput("lake", "parquet", template, cfg, LocalStorage), None)
    rows = [{"id": 1, "note": None}, {"id": 2, "note": None}]
    later = [{"id": 3, "note": "hi", "tag": "t"}]
    assert logic.on_batch([rows]) == ([], False)
    assert logic.on_batch([later]) == ([], False)
    assert logic.on_eof() == ([], False)
    files = sorted(outputs(tmp_path / "out", ".parquet").items(),
                   key=lambda kv: int(kv[0].split("#")[1]))
    tables = [pq.read_table(p) for _, p in files]
    assert [t.to_pylist() for t in tables] == [rows, later]
    assert str(tables[1].schema.field("note").type) == "string"


def test_a_resume_under_a_changed_template_undoes_what_the_crash_published(tmp_path):
    # The journal of what a crashed execution published lived under the old template's
    # directory: resumed under a new one, those files stayed, and were written again.
    def logic(directory, state):
        cfg = FileDestinationConfig.model_validate(
            {"path_template": f"{directory}/", "format": "jsonl", "max_records": 1})
        template = PathTemplate(f"{tmp_path}/{directory}/", "jsonl", cfg)
        return _LakeLogic(LakeOutput("lake", "jsonl", template, cfg, LocalStorage), state)

    first = logic("old", None)
    first.on_batch([[{"id": 1}]])
    state = first.snapshot()
    first.on_batch([[{"id": 2}, {"id": 3}]])  # published, then the crash: no snapshot
    assert len(outputs(tmp_path / "old", ".jsonl")) == 3
    resumed = logic("new", state)
    resumed.on_batch([[{"id": 2}, {"id": 3}]])  # replayed from the snapshot
    resumed.on_eof()
    ids = sorted(orjson.loads(p.read_text())["id"] for root in ("old", "new")
                 for p in outputs(tmp_path / root, ".jsonl").values())
    assert ids == [1, 2, 3]


def test_a_streaming_outputs_journal_keeps_only_what_a_resume_can_need(tmp_path):
    # The journal had an entry per file published for the whole run, so a streaming
    # output's grew for good. Entries older than the runner's retention are now deleted.
    def logic(root, state):
        cfg = FileDestinationConfig.model_validate(
            {"path_template": f"{root}/", "format": "jsonl", "max_records": 1})
        template = PathTemplate(f"{tmp_path}/{root}/", "jsonl", cfg)
        return _LakeLogic(LakeOutput("lake", "jsonl", template, cfg, LocalStorage), state)

    def entries(root):
        return len([p for p in (tmp_path / root / "_dataflare").rglob("*") if p.name.isdigit()])

    for root, retention, left in (("long", 3600.0, 3), ("short", 0.0, 0)):
        with journal_retention(retention):
            out = logic(root, None)
            for i in range(3):
                out.on_batch([[{"id": i}]])
                state = out.snapshot()
            assert entries(root) == left
            out.on_batch([[{"id": 9}]])  # published after the last snapshot: the crash
        assert entries(root) == left + 1
    resumed = logic("short", state)  # the entry the resume needs was kept: no duplicate
    resumed.on_batch([[{"id": 9}]])
    resumed.on_eof()
    ids = sorted(orjson.loads(p.read_text())["id"]
                 for p in outputs(tmp_path / "short", ".jsonl").values())
    assert ids == [0, 1, 2, 9]


@pytest.mark.parametrize(("config", "message"), [
    ({"path": "a.jsonl", "path_template": "b/"}, "give one of 'path'"),
    ({"path_template": "out/{{id}}/"}, "cannot tell the format"),
    ({"path_template": "out/x.jsonl", "time_field": "ts"}, "'time_field' is set but"),
    ({"path_template": "../x.jsonl"}, "must not contain '..'"),
    ({"path_template": "x/", "format": "jsonl", "columns": ["a"]}, "'columns' applies to CSV"),
    ({"path_template": "x/{{year}}/a.csv", "time_unit": "ms"}, "'time_unit' is set but"),
])
def test_settings_that_cannot_work_are_refused(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FileDestinationConfig.model_validate(config)


def test_a_plain_path_stays_one_file_and_values_cannot_escape_their_directory():
    assert not FileDestinationConfig.model_validate({"path": "out.jsonl"}).partitioned()
    cfg = FileDestinationConfig.model_validate({"path": "out/{{k}}/x.jsonl"})
    assert cfg.partitioned()
    template = PathTemplate("out/{{k}}/x.jsonl", "jsonl", cfg)
    assert template.prefix == "out/"
    assert path_value("a/../b") == "a%2F..%2Fb"
    assert path_value(3.0) == "3" and path_value(True) == "true"
    assert Counter(path_value(v) for v in (None, "")) == {"__HIVE_DEFAULT_PARTITION__": 2}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_one_file_refuses_what_it_cannot_hold_record_by_record(tmp_path, fmt):
    # A string in a float column at record 11,500 (Parquet); a field first seen at record
    # 25,000 (CSV): each refuses its record alone, and the file holds all the others.
    rows = [{"id": i, "amount": i * 0.5} for i in range(30_000)]
    if fmt == "parquet":
        rows[11_500]["amount"] = "oops"
        bad_id = 11_500
    else:
        rows[25_000]["extra"] = 1
        bad_id = 25_000
    rows[3]["amount"] = 7  # an integer among doubles is not a clash
    path = refusing_flow(tmp_path, rows, f"{{path: out.{fmt}}}")
    result = dataflare.run(path)
    assert result.ok, result.error
    if fmt == "parquet":
        ids = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    else:
        ids = [int(ln.split(",")[0]) for ln in (tmp_path / "out.csv").read_text().splitlines()[1:]]
    assert ids == [i for i in range(30_000) if i != bad_id]
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["record"]["id"] == bad_id
    assert bad["source"]["position"] == {"file": "in.jsonl", "line": bad_id + 1}
    assert bad["error"]["step"] == "out"


@pytest.mark.parametrize("config", ["{path: out.parquet, columns: [id, cat]}",
                                    "{path_template: 'o/{{cat}}/p.parquet', columns: [id, cat]}"])
def test_a_field_outside_the_parquet_columns_refuses_its_record(tmp_path, config):
    # Parquet with `columns` dropped every other field without a word (CSV refused them).
    rows = [{"id": 1, "cat": "a"}, {"id": 2, "cat": "b", "amount": 3.5}, {"id": 3, "cat": "a"}]
    result = dataflare.run(refusing_flow(tmp_path, rows, config))
    assert result.ok, result.error
    written = [pq.read_table(p).to_pylist() for p in sorted(tmp_path.rglob("*.parquet"))]
    assert sorted((r for t in written for r in t), key=lambda r: r["id"]) == [rows[0], rows[2]]
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["record"]["id"] == 2 and bad["error"]["message"] == (
        "step 'out': field(s) amount are not among the Parquet columns (id, cat); list every "
        "column in 'columns'")


def test_a_field_the_path_holds_needs_no_parquet_column(tmp_path):
    rows = [{"id": 1, "cat": "a"}, {"id": 2, "cat": "b", "amount": 3.5}]
    config = "{path_template: 'p/', format: parquet, partition_by: [cat], columns: [id]}"
    result = dataflare.run(refusing_flow(tmp_path, rows, config))
    assert result.ok, result.error
    [a] = [pq.read_table(p).to_pylist() for p in (tmp_path / "p").rglob("*.parquet")]
    assert a == [{"id": 1}]  # cat=a is in its directory
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["record"]["id"] == 2 and "field(s) amount are not" in bad["error"]["message"]


def test_a_partition_value_too_long_for_a_file_name_refuses_its_record(tmp_path):
    # "File name too long" stopped the run, and every resume, on that one record.
    rows = [{"id": 1, "cat": "a"}, {"id": 2, "cat": "x" * 1100}, {"id": 3, "cat": "a"}]
    config = "{path_template: 'p/', format: jsonl, partition_by: [cat]}"
    result = dataflare.run(refusing_flow(tmp_path, rows, config))
    assert result.ok, result.error
    written = [orjson.loads(line) for p in (tmp_path / "p").rglob("*.jsonl")
               for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in written) == [1, 3]
    [bad] = read_jsonl(tmp_path / "bad.jsonl")
    assert bad["record"]["id"] == 2 and bad["error"]["message"].endswith(
        "is 1104 bytes; a file name holds at most 255")


def test_two_workers_write_each_record_once(tmp_path):
    (tmp_path / "in").mkdir()
    for part in range(4):  # one source partition per file, spread over the workers
        (tmp_path / "in" / f"{part}.jsonl").write_bytes(b"".join(
            orjson.dumps({"id": part * 1000 + i, "k": i % 3}) + b"\n" for i in range(1000)))
    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: "in/*.jsonl", batch_size: 100}}
  destinations:
    lake:
      inputs: [src]
      type: file
      config: {path_template: "out/", format: parquet, partition_by: [k], max_records: 300}
""")
    result = dataflare.run(path, workers=2)
    assert result.ok, result.error
    files = outputs(tmp_path / "out", ".parquet")
    ids = Counter(i for p in files.values() for i in pq.read_table(p).column("id").to_pylist())
    assert ids == Counter({p * 1000 + i: 1 for p in range(4) for i in range(1000)})
    assert all(pq.read_metadata(p).num_rows <= 300 for p in files.values())


def test_a_value_csv_cannot_hold_refuses_its_record_alone(tmp_path):
    # A lone surrogate (text Python holds and UTF-8 cannot) in a partitioned CSV output and
    # before a one-file CSV output: refused with its position, the other records written.
    cfg = FileDestinationConfig.model_validate({"path_template": "out/x.csv"})
    logic = _LakeLogic(LakeOutput("lake", "csv", PathTemplate(f"{tmp_path}/out/x.csv", "csv",
                                                              cfg), cfg, LocalStorage), None)
    meta = {"file": "in.jsonl", "line": 2}
    rows = [{"id": 1, "t": "ok"}, {"id": 2, "t": "bad \ud800", "_meta": meta}, {"id": 3, "t": ""}]
    [refused], _ = logic.on_batch([rows])
    assert [(f.record["id"], f.meta, f.type) for f in refused] == [(2, meta, "RecordError")]
    assert "cannot be written as CSV" in refused[0].message
    logic.on_eof()
    [path] = outputs(tmp_path / "out", ".csv").values()
    assert path.read_text() == "id,t\n1,ok\n3,\n"
    conform = _ConformLogic("one", None)
    [(good, bad)], _ = conform.on_batch([rows])
    assert [r["id"] for r in good] == [1, 3] and [f.record["id"] for f in bad] == [2]


def test_partitioned_files_refuse_overwrite_at_run(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    lake:
      inputs: [src]
      type: file
      write_mode: {type: overwrite}
      config: {path_template: "out/{{a}}/x.jsonl"}
""")
    result = dataflare.run(path)
    assert not result.ok
    assert "write_mode 'overwrite' is not supported by a destination of type 'file' with " \
        "this config; it supports: append" in (result.error or "")
    assert not (tmp_path / "out").exists()


def test_lineage_names_a_partitioned_output_by_its_template(tmp_path):
    from dataflare import registry

    spec = registry.lookup("destination", "file")
    assert spec is not None and spec.datasets is not None
    cfg = FileDestinationConfig.model_validate({"path_template": "out/{{k}}/x.jsonl"})
    [dataset] = spec.datasets(cfg, tmp_path)
    assert dataset.name == str(tmp_path / "out/{{k}}/x.jsonl")


def test_validate_warns_that_overwrite_has_no_effect_on_partitioned_files(tmp_path):
    from dataflare.dsl_compiler import validate_file

    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  destinations:
    lake:
      inputs: [src]
      type: file
      write_mode: {type: overwrite}
      config: {path_template: "out/{{a}}/x.jsonl"}
    one:
      inputs: [src]
      type: file
      write_mode: {type: overwrite}
      config: {path: out.jsonl}
""")
    problems = [str(p) for p in validate_file(path).problems]
    assert problems == [
        f"{path}:8:26: destinations.lake.write_mode.type: write_mode 'overwrite' is not "
        "supported by a destination of type 'file' with this config; it supports: append"]


def test_validate_warns_of_template_and_partition_fields_the_records_lack(tmp_path):
    from dataflare.dsl_compiler import validate_file

    path = write_flow(tmp_path, """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    m: {type: mapping, inputs: [src], config: {mappings: [{source: kind, destination: kind}]}}
  destinations:
    lake:
      inputs: [m]
      type: file
      config: {path_template: "out/{{kindd}}/{{source}}/x.jsonl", partition_by: [kinnd, day]}
""")
    problems = [str(p) for p in validate_file(path).problems]
    assert [p.split(": warning: ")[1] for p in problems if "not in the records" in p] == [
        "field 'kindd' is not in the records from 'm' (did you mean 'kind'?); they have: kind",
        "field 'kinnd' is not in the records from 'm' (did you mean 'kind'?); they have: kind"]


ONE_FILE_FLOW = """\
workflow:
  sources:
    src: {source}
  destinations:
    out: {{type: file, inputs: [src], config: {{path: out.parquet}}}}
"""


def test_a_completed_run_with_recovery_leaves_no_parts_beside_its_one_file(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    path = write_flow(tmp_path, ONE_FILE_FLOW.format(
        source="{type: file, config: {path: in.jsonl}}"))
    recovery = tmp_path / "rec"
    assert dataflare.run(path, recovery_dir=recovery).ok
    assert not (tmp_path / ".out.parquet.parts").exists()  # the journal went with the run
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write('{"a": 3}\n')
    assert dataflare.run(path, recovery_dir=recovery).ok  # resumes: reads the new line
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.yaml", "in.jsonl",
                                                          "out.parquet", "rec"]


@pytest.mark.parametrize("stop", ["sigterm", "timeout"])
def test_a_stopped_run_keeps_the_parts_of_its_one_file_for_the_resume(tmp_path, stop):
    # The one file is written when the input ends, also by a stop (SIGTERM, config.timeout);
    # the journal beside it stays for the resume.
    source = ("{type: generator, config: {count: null, rate: 200, batch_size: 20, "
              "fields: {n: {type: sequence}}}}")
    text = ONE_FILE_FLOW.format(source=source)
    if stop == "timeout":
        text += "  config: {timeout: 1}\n"
    path = write_flow(tmp_path, text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataflare", "run", str(path), "--quiet", "-r", "rec", "-s", "0.2"],
        cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE, text=True)
    try:
        if stop == "sigterm":  # once a part is published: the run is under way
            journal = tmp_path / ".out.parquet.parts" / "_dataflare" / "out"
            deadline = time.monotonic() + 60
            while not any(p.name.isdigit() for p in journal.glob("*/*")):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "no part published in 60 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if stop == "sigterm" else 124), err
    assert pq.read_table(tmp_path / "out.parquet").num_rows >= 0  # written at the stop
    assert (tmp_path / ".out.parquet.parts" / "_dataflare" / "out").is_dir()
