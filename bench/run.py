"""Every benchmark of BENCHMARKS.md in one invocation: ``make bench``.

    .venv/bin/python bench/run.py                    # 1,000,000 events, 3 runs each
    .venv/bin/python bench/run.py --events 100000 --runs 1

Runs ``bench/sinks.py`` (W1, W5, W6), ``bench/stateful.py`` (W2, W3, W4, W7) and
``bench/nexmark/run.py`` (Nexmark q0-q8) with the same data size; each prints one line per
system and the ratios to its references.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Run the benchmark scripts in turn; the exit code is the first failure's."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    code = 0
    for script in ("sinks.py", "stateful.py", "nexmark/run.py"):
        print(f"== bench/{script}", flush=True)
        cmd = [sys.executable, str(HERE / script), "--events", str(args.events),
               "--runs", str(args.runs)]
        code = code or subprocess.run(cmd, check=False).returncode
    return code


if __name__ == "__main__":
    sys.exit(main())
