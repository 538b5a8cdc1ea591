"""``make demo``: run the quickstart workflow and print what it wrote."""

from __future__ import annotations

import sys
from pathlib import Path

from dataflare.cli import main

FLOW = Path(__file__).resolve().parent.parent / "flows" / "quickstart.yaml"


def run() -> int:
    """Run ``flows/quickstart.yaml`` and print its output files."""
    code = main(["run", "--quiet", str(FLOW)])
    if code:
        return code
    for name in ("large_orders", "small_orders"):
        path = FLOW.parent / "out" / f"{name}.jsonl"
        print(f"\n== {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
        print(path.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run())
