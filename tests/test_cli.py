"""The command line: discover, graph formats, schema."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.workflows import ROOT, Result, run_cli


def test_discover_infers_file_and_generator_schemas(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1, "tags": ["x"], "n": {"v": 1.5}}\n{"id": 2}\n')
    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    files: {type: file, config: {path: "*.jsonl"}}
    gen: {type: generator, config: {preset: orders}}
  destinations:
    out: {type: stdout, inputs: [files, gen]}
""")
    result = run_cli("discover", str(flow))
    assert result.code == 0, result.stderr
    catalog = json.loads(result.stdout)
    files = catalog["files"]
    assert files["files"] == ["a.jsonl"] and files["sampled"] == 2
    schema = files["json_schema"]
    assert schema["required"] == ["id"]
    assert schema["properties"]["id"]["type"] == "integer"
    assert schema["properties"]["n"]["properties"]["v"]["type"] == "number"
    assert set(catalog["gen"]["json_schema"]["properties"]) == {
        "order_id", "user_id", "total", "items", "ts"}
    only = run_cli("discover", str(flow), "gen")
    assert list(json.loads(only.stdout)) == ["gen"]
    missing = run_cli("discover", str(flow), "nope")
    assert missing.code == 1 and "no source 'nope'" in missing.stderr
    (tmp_path / "f.yaml").write_text(flow.read_text().replace("*.jsonl", "none-*.jsonl"))
    unread = run_cli("discover", str(flow), "files")
    assert unread.code == 1
    (error,) = [ln for ln in unread.stderr.splitlines() if ln.startswith("error: ")]
    assert error.startswith("error: step 'files': no file matches 'none-*.jsonl'"), error


def test_graph_as_dot_and_schema_as_json():
    dot = run_cli("graph", "--format", "dot", str(ROOT / "flows" / "quickstart.yaml"))
    assert dot.code == 0 and '"by_size" -> "large_orders" [label="large"];' in dot.stdout
    schema = run_cli("schema")
    assert schema.code == 0 and "Workflow" in json.loads(schema.stdout)["$defs"]


def test_validate_reports_several_files_and_fails_if_any_is_invalid(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workflow:\n  sources: {s: {type: nope}}\n")
    result = run_cli("validate", str(ROOT / "flows" / "quickstart.yaml"), str(bad))
    assert result.code == 1
    assert "quickstart.yaml: valid" in result.stdout
    assert f"{bad}:2:23: sources.s.type: unknown source type 'nope'" in result.stderr


def test_validate_says_which_warnings_stop_a_run(tmp_path):
    # validate said "valid (1 warning)" and run refused the same file.
    flow = tmp_path / "f.yaml"
    flow.write_text("workflow:\n  sources: {s: {type: file, config: {path: in.jsonl},\n"
                    "    error_handling: {strategy: redirect, redirect_to: nowhere}}}\n"
                    "  destinations: {o: {type: stdout, inputs: [s]}}\n")
    result = run_cli("validate", str(flow))
    assert result.code == 0
    assert result.stdout == f"{flow}: valid (1 warning, which stops a run as it stands)\n"
    assert "redirect_to 'nowhere' names no destination" in result.stderr
    assert run_cli("run", str(flow)).code == 1


def test_metrics_endpoint_serves_per_step_counts(tmp_path):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from dataflare.broker import free_port

    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  sources:
    gen: {type: generator, config: {preset: orders, count: 400, rate: 100, batch_size: 10}}
  transformations:
    big: {type: filter, inputs: [gen], config: {condition: "total > 250"}}
  destinations:
    out: {type: file, inputs: [big], config: {path: out.jsonl}}
""")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dataflare", "run", str(flow), "-q",
                             "--metrics-port", str(port)], env=env, cwd=tmp_path)
    try:
        deadline, seen = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline and seen == 0:
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            lines = [ln for ln in text.splitlines()
                     if ln.startswith('dataflare_records_out_total{step="gen"}')]
            seen = float(lines[0].split()[-1]) if lines else 0.0
        assert seen > 0
    finally:
        assert proc.wait(timeout=60) == 0


def test_workflow_timeout_and_max_concurrency_are_enforced(tmp_path):
    flow = tmp_path / "f.yaml"
    flow.write_text("""\
workflow:
  config: {timeout: 2s, max_concurrency: 2}
  sources:
    g: {type: generator, config: {preset: orders, count: null, rate: 50}}
  destinations:
    o: {type: file, inputs: [g], config: {path: out.jsonl}}
""")
    result = run_cli("run", str(flow), "-q")
    assert result.code == 124
    assert "ran longer than its config.timeout (2s) and was stopped" in result.stderr
    assert (tmp_path / "out.jsonl").read_text().count("\n") > 0
    result = run_cli("run", str(flow), "-q", "-w", "3")
    assert result.code == 1
    assert "config.max_concurrency is 2, this run asks for 3 workers" in result.stderr



def test_a_failed_run_names_the_step_and_keeps_the_driver_error(tmp_path, mariadb_private):
    flow = tmp_path / "f.yaml"
    sources = {
        "pg": "type: postgres, config: {host: 127.0.0.1, database: no_such_db, "
        "username: postgres, table: t}",
        "my": f"type: mysql, config: {{host: 127.0.0.1, port: {mariadb_private.port}, "
        "username: nobody, database: dataflare, table: t}",
    }
    errors = {}
    for name, source in sources.items():
        flow.write_text(f"""\
workflow:
  config: {{retry: {{max_attempts: 1}}}}
  sources:
    {name}: {{{source}}}
  destinations:
    out: {{type: stdout, inputs: [{name}]}}
""")
        result = run_cli("run", str(flow), cwd=tmp_path)
        assert result.code == 1
        (errors[name],) = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
        assert "(src/" not in errors[name]  # no bytewax wrapper text
    assert errors["pg"].startswith("error: step 'pg': looking up the key of public.t failed: ")
    assert 'database "no_such_db" does not exist' in errors["pg"]
    assert errors["my"].startswith("error: step 'my': ")
    assert "Access denied for user 'nobody'" in errors["my"]


def test_error_text_keeps_our_message_and_adds_the_driver_error_it_lacks():
    from bytewax.errors import BytewaxRuntimeError

    from dataflare.runner import error_text as _error_text

    def raised(exc, cause):
        try:
            raise exc from cause
        except BaseException as e:  # noqa: BLE001
            return e

    try:  # a driver's error raised while handling the socket's, as redis-py does
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError:
            raise ConnectionError("Error 111 connecting to h:1.")  # noqa: B904
    except ConnectionError as exc:
        refused = exc
    ours = raised(RuntimeError("step 'r': write 1 record(s) to redis failed"), refused)
    wrapped = raised(BytewaxRuntimeError("(src/outputs.rs:554:34): error writing output batch"),
                     ours)
    assert _error_text(wrapped) == (
        "step 'r': write 1 record(s) to redis failed "
        "(ConnectionError: Error 111 connecting to h:1.)")
    said = raised(RuntimeError("step 'r': write failed: ConnectionError: Error 111 connecting "
                               "to h:1."), refused)
    assert _error_text(said) == str(said)  # the driver's error is already in the message


def test_summary_does_not_count_records_of_a_failed_run_as_written(capsys):
    from dataflare import metrics
    from dataflare.runner import _Progress

    metrics.RECORDS_OUT.labels("summary_src").inc(5)  # an earlier run in this process
    with _Progress(["summary_src", "summary_dst"], ["summary_dst"], live=False):
        metrics.RECORDS_OUT.labels("summary_src").inc(3)
        metrics.RECORDS_WRITTEN.labels("summary_dst").inc(3)
    assert "  summary_dst: 3\n" in capsys.readouterr().err
    progress = _Progress(["summary_src", "summary_dst"], ["summary_dst"], live=False)
    metrics.RECORDS_OUT.labels("summary_src").inc(3)
    metrics.RECORDS_WRITTEN.labels("summary_dst").inc(3)
    progress.__exit__(RuntimeError, RuntimeError("write failed"), None)
    err = capsys.readouterr().err
    assert ", run failed): records per step" in err and "  summary_src: 3\n" in err
    assert "  summary_dst: 3 received, not all confirmed written\n" in err


def test_the_progress_of_a_running_run_counts_its_total(tmp_path):
    # The progress the server's worker reads said total 0 while the run went on; a run
    # taken over after a crash then summed that 0 into its final total.
    import json
    import time

    from dataflare import metrics
    from dataflare.runner import _Progress

    path = tmp_path / "progress.json"
    with _Progress(["progress_src", "progress_dst"], ["progress_dst"], live=False,
                   progress_file=str(path), sources=["progress_src"]):
        metrics.RECORDS_OUT.labels("progress_src").inc(7)
        metrics.RECORDS_WRITTEN.labels("progress_dst").inc(7)
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        running = json.loads(path.read_text())
    assert (running["status"], running["total"], running["succeeded"]) == ("running", 7, 7)


def test_server_commands_say_when_the_server_cannot_be_reached():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for args in (["runs"], ["stop", "r1"], ["trigger", "w"]):
        out = run_cli(*args, "--server", f"http://127.0.0.1:{port}", "--token", "t")
        assert out.code == 1
        assert out.stderr.startswith("error: no answer from the server (ConnectError:"), out.stderr
        assert "Traceback" not in out.stderr


FAILING_STEP = """\
workflow:
  sources:
    src: {type: file, config: {path: in.jsonl}}
  transformations:
    m:
      type: mapping
      inputs: [src]
      config: {mappings: [{source: a, destination: b, transform: to_int}]}
  destinations:
    out: {type: file, inputs: [m], config: {path: out.jsonl}}
tests:
  - name: bad
    inputs: {src: [{a: "x"}]}
    expect: {out: []}
"""


def run_with_backtrace(rust_backtrace: str | None, *args: str, cwd: Path) -> Result:
    """``dataflare ARGS`` with ``RUST_BACKTRACE`` as a user may have it (unset: None)."""
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    env["PYTHONPATH"] = str(ROOT)
    if rust_backtrace is not None:
        env["RUST_BACKTRACE"] = rust_backtrace
    proc = subprocess.run([sys.executable, "-m", "dataflare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("rust_backtrace", [None, "0", "1"])
def test_a_failing_step_is_one_message_in_run_run_v_and_test(tmp_path, rust_backtrace):
    # bytewax's worker prints a panic notice when a step raises: its line, "Box<dyn Any>",
    # a hint or Rust frames, then an empty line, which was left on stderr.
    (tmp_path / "in.jsonl").write_text('{"a": "x"}\n')
    (tmp_path / "wf.yaml").write_text(FAILING_STEP)
    for args in (["run"], ["run", "-v"], ["-v", "run"]):
        out = run_with_backtrace(rust_backtrace, *args, "wf.yaml", cwd=tmp_path)
        assert out.code == 1
        lines = out.stderr.splitlines()
        assert ("error: step 'm' failed on the record at in.jsonl:1: RecordError: to_int: "
                "'x' is not a number") in lines, out.stderr
        assert "" not in lines, (args, out.stderr)
        for noise in ("panicked", "Box<dyn Any>", "RUST_BACKTRACE", "stack backtrace"):
            assert noise not in out.stderr, (args, out.stderr)
    for args in (["test"], ["-v", "test"]):
        out = run_with_backtrace(rust_backtrace, *args, "wf.yaml", cwd=tmp_path)
        assert out.code == 1
        assert ("FAIL wf.yaml: bad: the run failed: step 'm' failed on the record at "
                "test_input=src, index=0") in out.stdout, out.stdout
        assert out.stderr == "", (args, out.stderr)  # the failure is in the test's line


def test_rust_backtrace_full_keeps_the_panic_notice_in_run_as_in_test(tmp_path):
    # RUST_BACKTRACE=full asks for bytewax's own report (its frames): run without -v
    # dropped it where run -v and test kept it.
    (tmp_path / "in.jsonl").write_text('{"a": "x"}\n')
    (tmp_path / "wf.yaml").write_text(FAILING_STEP)
    for args in (["run"], ["run", "-v"], ["test"]):
        out = run_with_backtrace("full", *args, "wf.yaml", cwd=tmp_path)
        assert out.code == 1
        assert "panicked at" in out.stderr and "stack backtrace:" in out.stderr, args


def test_a_panic_notice_split_by_another_threads_line_is_dropped_whole():
    # Two destinations failing: a retry warning came between the notice and its frames,
    # and 64 lines of Rust frames were printed.
    import os
    import threading

    from dataflare.runner import _pump

    text = (b"thread 'main' panicked at src/worker.rs:1:2:\n"
            b"WARNING dataflare.retry: step 'pg2': retry 2/9\n"
            b"   0: std::panicking::begin_panic\n"
            b"             at /x/y.rs:3:4\n"
            b"  17: cfunction_vectorcall\n"
            b"note: Some details are omitted, run with `RUST_BACKTRACE=full`\n"
            b"\n"
            b"summary (1.0s): records per step\n"
            b"  s: 9\n")
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    pump = threading.Thread(target=_pump, args=(src_r, dst_w))
    pump.start()
    os.write(src_w, text)
    os.close(src_w)
    pump.join(10)
    with os.fdopen(dst_r, "rb") as got:
        assert got.read() == (b"WARNING dataflare.retry: step 'pg2': retry 2/9\n"
                              b"summary (1.0s): records per step\n  s: 9\n")
