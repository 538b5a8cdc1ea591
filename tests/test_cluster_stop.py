"""A run of several processes stops as one, and says so when one of them dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.fixtures.pg_private import free_port

FLOW = """\
workflow:
  id: cluster_stop
  sources:
    gen:
      type: generator
      config: {count: null, rate: 500, partitions: 2, fields: {n: {type: sequence}}}
  destinations:
    out: {type: file, inputs: [gen], config: {path: out/o.jsonl}}
"""


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Whatever a failed test leaves running (a process waiting for its peers) is killed."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _STARTED.clear()


def start(tmp_path: Path) -> list[subprocess.Popen[str]]:
    (tmp_path / "flow.yaml").write_text(FLOW)
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dataflare", "run", "flow.yaml", "-i", str(i), "-a", addresses,
         "-r", "rec", "-s", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    _STARTED.extend(procs)
    out = tmp_path / "out" / "o.jsonl"
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
        time.sleep(0.2)
    return procs


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running: {proc.communicate()[1]}")
    return proc.returncode, err


def test_a_signal_to_one_process_stops_every_process_at_a_snapshot(tmp_path: Path) -> None:
    # The signalled process stopped its own sources only, and waited for the others'
    # input to end: for ever, with a stream (a pod deleted ended in SIGKILL).
    procs = start(tmp_path)
    procs[1].send_signal(signal.SIGTERM)
    (code0, err0), (code1, err1) = finish(procs[0]), finish(procs[1])
    assert code1 == 128 + signal.SIGTERM, err1
    assert "stopped cleanly on SIGTERM (state kept in the final snapshot)" in err1
    assert code0 == 128 + signal.SIGTERM, err0
    assert ("stopped cleanly with process 1, which got SIGTERM (state kept in the final "
            "snapshot)") in err0


def test_a_process_whose_peer_died_says_so(tmp_path: Path) -> None:
    procs = start(tmp_path)
    procs[1].kill()
    code, err = finish(procs[0])
    assert code == 1
    assert err.splitlines()[-1].startswith(
        "error: lost the connection to another process of this run (127.0.0.1:")
    assert err.splitlines()[-1].endswith(
        "it stopped or its host went away; start every process again: the run resumes from "
        "its last snapshot")


RESCALED = """\
workflow:
  id: rescaled
  sources:
    gen:
      type: generator
      config: {count: 6000, rate: 600, partitions: 6, fields: {n: {type: sequence}}}
  transformations:
    per:
      type: aggregation
      inputs: [gen]
      config: {group_by: [n], aggregations: [{field: n, operations: [count], as: c}]}
  destinations:
    out: {type: file, inputs: [per], config: {path: out/o.jsonl}}
"""


def run_processes(tmp_path: Path, n: int, shared: bool) -> list[subprocess.Popen[str]]:
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(n))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dataflare", "run", "flow.yaml", "-i", str(i), "-a", addresses,
         "-r", "rec" if shared else f"rec{i}", "-s", "0.5"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    _STARTED.extend(procs)
    return procs


def stopped_after_a_snapshot(tmp_path: Path, shared: bool) -> None:
    from dataflare.runner import committed_epoch

    (tmp_path / "flow.yaml").write_text(RESCALED)
    procs = run_processes(tmp_path, 2, shared)
    deadline = time.monotonic() + 60
    while committed_epoch(tmp_path / ("rec" if shared else "rec0")) is None:
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.2)
    procs[0].send_signal(signal.SIGTERM)
    assert [finish(p)[0] for p in procs] == [128 + signal.SIGTERM] * 2


def test_two_processes_resume_as_three_from_their_shared_directory(tmp_path: Path) -> None:
    # The third process made its partition as one of 3 beside two of 2: every process died
    # with "Send thread panic".
    stopped_after_a_snapshot(tmp_path, shared=True)
    results = [finish(p) for p in run_processes(tmp_path, 3, shared=True)]
    assert [code for code, _ in results] == [0, 0, 0], results
    rows = [orjson.loads(line) for line in (tmp_path / "out" / "o.jsonl").read_bytes().split()]
    assert sorted(r["n"] for r in rows) == list(range(6000))
    assert {r["c"] for r in rows} == {1}


def test_a_directory_of_one_process_of_two_is_refused_by_a_run_of_three(tmp_path: Path) -> None:
    stopped_after_a_snapshot(tmp_path, shared=False)
    procs = run_processes(tmp_path, 3, shared=False)
    for i in (0, 1):  # the third waits for the others for ever: _reap kills it
        code, err = finish(procs[i])
        assert code == 1, err
        assert (f"cannot resume from rec{i}: it holds the recovery partition of one "
                "process of a run of 2, not the others, and this run has 3 processes. "
                "Run 2 processes") in err


def test_a_process_id_is_checked_against_the_addresses(tmp_path: Path) -> None:
    # -i 1 without -a ran the whole workflow alone; -i 5 of 2 waited for ever, unkillable.
    (tmp_path / "flow.yaml").write_text(RESCALED)
    for args, said in ((["-i", "1"], "--process-id needs --addresses"),
                       (["-i", "5", "-a", "127.0.0.1:1;127.0.0.1:2"],
                        "--process-id 5 is outside the 2 addresses of --addresses (0 to 1)")):
        done = subprocess.run([sys.executable, "-m", "dataflare", "run", "flow.yaml", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and said in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_the_first_process_alone_carries_out_the_post_actions(tmp_path: Path) -> None:
    # Every process sent the webhook (a trigger would start the next workflow twice).
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "flow.yaml").write_text(RESCALED.replace("rate: 600", "rate: 6000") + f"""\
  post_actions:
    - {{type: webhook, config: {{url: "http://127.0.0.1:{server.server_address[1]}/done"}}}}
""")
        assert [finish(p)[0] for p in run_processes(tmp_path, 2, shared=True)] == [0, 0]
    finally:
        server.shutdown()
        server.server_close()
    assert calls == ["/done"]


def test_processes_running_different_workflows_stop_the_run(tmp_path: Path) -> None:
    # One process read an edited file: half the windows were of one size, half of another.
    flows = [RESCALED, RESCALED.replace("rate: 600", "rate: 700")]
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    procs = []
    for i, text in enumerate(flows):
        (tmp_path / f"flow{i}.yaml").write_text(text)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dataflare", "run", f"flow{i}.yaml", "-i", str(i), "-a",
             addresses], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True))
    _STARTED.extend(procs)
    results = [finish(p) for p in procs]
    assert all(code != 0 for code, _ in results), results
    assert all("runs another workflow than process" in err for _, err in results), results
