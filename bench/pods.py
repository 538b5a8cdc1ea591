"""W2 across hosts: DataFlare on 1, 2 and 3 processes, each in a network namespace of its
own (pods on separate hosts), next to the same processes meshed over one host's loopback
(W7 of bench/stateful.py).

    sudo .venv/bin/python bench/pods.py                       # 300,000 events, 3 runs
    sudo .venv/bin/python bench/pods.py --events 100000 --runs 1

The broker (Tansu) runs in a ``svc`` namespace, so every system reads the same topic
(``--partitions``, 6 by default: 1, 2 and 3 processes get equal shares) over the bridge,
as pods read a broker on another host. ``raw`` is the hand-written loop of
bench/stateful.py in one pod; every run's output is checked against it. Wall time is
from the first process's start of work to the last one's end (imports excluded). Needs
root and iproute2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import stateful
from netns import Hosts, unavailable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per set-up (median)")
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"bench/pods.py: {reason}")
    h = Hosts(pods=3)
    tmp = Path(tempfile.mkdtemp(prefix="dataflare-pods-bench-"))
    broker = None
    try:
        h.up()
        servers = f"{h.addr['svc']}:9092"
        broker = h.broker(tmp)
        h.create_topic("events", args.partitions)
        h.python("svc", f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import stateful
stateful.produce_keyed("{servers}", "events", stateful.events({args.events}))
""", timeout=1800)
        print(f"events: {args.events:,} over {args.partitions} partitions, runs: {args.runs}")

        def ns(host: str) -> list[str]:
            return ["ip", "netns", "exec", h.names[host]]

        setups = {"raw": None, **{f"{n} pods": n for n in (1, 2, 3)},
                  **{f"{n} on loopback": -n for n in (2, 3)}}
        walls: dict[str, list[float]] = {s: [] for s in setups}
        checks: dict[str, str] = {}
        raw_digest = ""
        for run in range(args.runs):
            for name, n in setups.items():
                dump = tmp / f"{uuid.uuid4().hex}.txt"
                if n is None:
                    out = subprocess.run(
                        [*ns("p0"), sys.executable, stateful.__file__, "--child", "w2-raw",
                         "--events", str(args.events), "--source", "kafka",
                         "--servers", servers, "--dump", str(dump)],
                        capture_output=True, text=True, check=True)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    walls[name].append(result["wall"])
                    raw_digest = result["digest"]
                    continue
                port = 2101 + 10 * run
                if n > 0:  # one process per pod, meshed over the bridge
                    addresses = [f"{h.addr[f'p{i}']}:{port}" for i in range(n)]
                    pods = [f"p{i}" for i in range(n)]
                else:  # every process in one pod, meshed over its loopback
                    addresses = [f"127.0.0.1:{port + i}" for i in range(-n)]
                    pods = ["p0"] * -n
                wargs = argparse.Namespace(source="kafka", servers=servers,
                                           events=args.events, dump=str(dump))
                rows = stateful.w7_processes(wargs, addresses, lambda i, p=pods: ns(p[i]))
                walls[name].append(stateful.TIMED["wall"])
                lines = stateful.canonical(rows)
                digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
                checks[name] = "same output as raw" if digest == raw_digest else "DIFFERS"
        med = {s: statistics.median(w) for s, w in walls.items()}
        one = med["1 pods"]
        for name, wall in med.items():
            ratio = f"   {one / wall:.2f}x one pod's throughput" if name != "raw" else ""
            print(f"  {name:<15} wall {wall:6.2f} s  {args.events / wall:>10,.0f} events/s"
                  f"{ratio}   {checks.get(name, '')}")
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=30)
        h.down()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    main()
