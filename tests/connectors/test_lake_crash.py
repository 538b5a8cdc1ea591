"""Crash test of the partitioned outputs: a file (Parquet) lake and an s3 (JSON lines) lake
are killed with SIGKILL at random moments and resumed; in the end their files hold every
record exactly once, in the right partition, and every refused record has its dead letter."""

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from dataflare.connectors.generator import GeneratorConfig, make_records, record_maker
from tests.connectors.test_lake import outputs
from tests.fixtures.workflows import ROOT, read_jsonl

COUNT = 16_000
GENERATOR = {
    "count": COUNT, "rate": 4000, "batch_size": 200, "seed": 11,
    "fields": {
        "id": {"type": "sequence"},
        "kind": {"type": "choice", "values": ["click", "view", "buy"]},
        "ts": {"type": "timestamp", "start": "2024-01-01T00:00:00Z", "step": "1m", "unit": "s"},
        "amount": {"type": "float", "min": 0, "max": 100, "decimals": 2},
        "score": {"type": "choice", "values": [1.5, 2.5, "n/a"], "weights": [60, 39, 1]},
    },
}


def flow_text(s3_bucket) -> str:
    return f"""\
workflow:
  id: lake_crash
  sources:
    events: {{type: generator, config: {orjson.dumps(GENERATOR).decode()}}}
  destinations:
    parquet_lake:
      inputs: [events]
      type: file
      config:
        path_template: "lake/day={{{{day}}}}/events.parquet"
        time_field: ts
        partition_by: [kind]
        max_records: 400
        flush_interval: 500ms
      error_handling: {{strategy: redirect, redirect_to: refused}}
    s3_lake:
      inputs: [events]
      type: s3
      config: {{{s3_bucket.config()}, path_template: "events/", format: jsonl,
               partition_by: [kind], max_records: 1500}}
    refused: {{type: file, config: {{path: refused.jsonl}}}}
"""


def test_sigkills_leave_every_record_once_in_file_and_s3_lakes(tmp_path, s3_bucket):
    config = GeneratorConfig.model_validate(GENERATOR)
    records = make_records(record_maker(config), config.seed, 0, COUNT)
    assert isinstance(records[0]["score"], float)  # the column's type: later "n/a" is refused
    refused = {r["id"] for r in records if r["score"] == "n/a"}
    assert refused
    (tmp_path / "flow.yaml").write_text(flow_text(s3_bucket))
    cmd = [sys.executable, "-m", "dataflare", "run", "flow.yaml", "--quiet",
           "--recovery-dir", "recovery", "-s", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUST_BACKTRACE": "0"}
    lake = tmp_path / "lake"
    rng = random.Random(20261204)
    kills = []
    for _ in range(5):
        # kill once a few more files are published: a random moment while the run writes
        before = len(outputs(lake, ".parquet"))
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        target = before + rng.randint(2, 6)
        deadline = time.monotonic() + 60
        while len(outputs(lake, ".parquet")) < target and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None:
            break  # it finished first
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(len(outputs(lake, ".parquet")))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    print("parquet files when killed:", kills)
    assert len(kills) >= 5

    # The Parquet lake: each record once, in the directory of its day and kind.
    seen: Counter[int] = Counter()
    for key, path in outputs(lake, ".parquet").items():
        for row in pq.read_table(path).to_pylist():
            day = datetime.fromtimestamp(row["ts"], UTC).day
            assert key.startswith(f"day={day:02d}/kind={row['kind']}/events.parquet"), key
            seen[row["id"]] += 1
    assert set(seen.values()) == {1}
    assert set(seen) == {r["id"] for r in records} - refused
    by_id = {r["id"]: r for r in records}
    sample = rng.sample(sorted(seen), 50)
    rows = {r["id"]: r for p in outputs(lake, ".parquet").values()
            for r in pq.read_table(p).to_pylist() if r["id"] in sample}
    assert all(rows[i] == by_id[i] for i in sample)

    # The s3 lake: the same records, each once.
    objects = [k for k in s3_bucket.keys("events/") if "/_dataflare/" not in k]
    got = Counter()
    for key in objects:
        for line in s3_bucket.read(key).splitlines():
            rec = orjson.loads(line)
            assert key.startswith(f"events/kind={rec['kind']}/part-"), key
            assert rec == by_id[rec["id"]]
            got[rec["id"]] += 1
    assert got == Counter({r["id"]: 1 for r in records})

    # Every refused record has its dead letter (at least once), with its position.
    letters = read_jsonl(tmp_path / "refused.jsonl")
    assert {d["record"]["id"] for d in letters} == refused
    assert all(d["error"]["step"] == "parquet_lake" and d["error"]["type"] == "ParquetTypeError"
               for d in letters)
    assert not any(Path(tmp_path, "lake", "_dataflare").rglob("*.part"))
