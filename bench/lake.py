"""Peak memory of file outputs: Parquet against JSON lines on a ~200 MB input.

    .venv/bin/python bench/lake.py                       # 2,000,000 events (~200 MB)
    .venv/bin/python bench/lake.py --events 200000 --recovery

One ``dataflare run`` process per output (file source -> file destination), each measured
by its own peak RSS (``wait4``) and wall time:

- ``jsonl``: one JSON lines file (``path: out.jsonl``), the reference;
- ``parquet (one file)``: ``path: out.parquet``: one file, written when the run ends;
- ``parquet (partitioned)``: ``path_template: out/`` with ``partition_by: [event]``: row
  groups written as the records come, files rolled at snapshots and at the end;
- ``jsonl (partitioned)``: the same layout in JSON lines.

``--recovery`` runs each with ``--recovery-dir`` and a 5 s snapshot interval (then the
one-file Parquet output also keeps its rows in every snapshot). The target: the
partitioned Parquet output within 2x the JSON lines peak.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ("view", "click", "add_to_cart", "purchase")

OUTPUTS = {
    "jsonl": "{path: out.jsonl}",
    "parquet (one file)": "{path: out.parquet}",
    "parquet (partitioned)": "{path_template: out/, format: parquet, partition_by: [event]}",
    "jsonl (partitioned)": "{path_template: out/, format: jsonl, partition_by: [event]}",
}


def write_input(path: Path, n: int, seed: int = 42) -> int:
    """``n`` benchmark events (~100 bytes each) as JSON lines; the file's size."""
    rng = random.Random(seed)
    t0 = 1_704_067_200_000
    with path.open("wb") as f:
        for start in range(0, n, 10_000):
            f.write(b"".join(
                orjson.dumps({"id": i, "user_id": f"u{rng.randrange(10_000)}",
                              "event": EVENTS[rng.randrange(4)],
                              "amount": round(rng.random() * 100, 2), "ts": t0 + 10 * i,
                              "note": "x" * rng.randrange(20)}) + b"\n"
                for i in range(start, min(n, start + 10_000))))
    return path.stat().st_size


def measure(work: Path, name: str, config: str, recovery: bool) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run writing ``config``."""
    run_dir = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    run_dir.mkdir()
    (run_dir / "flow.yaml").write_text(f"""\
workflow:
  sources:
    events: {{type: file, config: {{path: {work / 'events.jsonl'}, batch_size: 5000}}}}
  destinations:
    out: {{inputs: [events], type: file, config: {config}}}
""")
    cmd = [sys.executable, "-m", "dataflare", "run", "flow.yaml", "--quiet"]
    if recovery:
        cmd += ["--recovery-dir", "recovery", "-s", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=run_dir, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        msg = f"{name}: the run failed ({status})"
        raise SystemExit(msg)
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    """Write the input, run every output, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--recovery", action="store_true")
    parser.add_argument("--only", action="append", choices=list(OUTPUTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dataflare-bench-lake-") as tmp:
        work = Path(tmp)
        size = write_input(work / "events.jsonl", args.events)
        print(f"input: {args.events:,} events, {size / 1e6:.0f} MB"
              f"{', recovery on' if args.recovery else ''}")
        print("| output | wall | peak RSS |")
        print("|---|---|---|")
        peaks = {}
        for name, config in OUTPUTS.items():
            if args.only and name not in args.only:
                continue
            wall, peak = measure(work, name, config, args.recovery)
            peaks[name] = peak
            print(f"| {name} | {wall:.1f} s | {peak:.0f} MB |", flush=True)
        if "jsonl" in peaks and "parquet (partitioned)" in peaks:
            ratio = peaks["parquet (partitioned)"] / peaks["jsonl"]
            print(f"partitioned Parquet / JSON lines peak RSS: {ratio:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
