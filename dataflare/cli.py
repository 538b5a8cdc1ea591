"""The ``dataflare`` command: validate, run, test and graph workflows."""

from __future__ import annotations

import _thread
import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from dataflare import metrics
from dataflare.connectors.batching import RUN_ID_ENV
from dataflare.dsl_compiler import StepFailed, compile_validated, validate_file

if TYPE_CHECKING:
    from bytewax.dataflow import Dataflow

    from dataflare.dsl_compiler.validate import Validated


def _print_problems(problems: Sequence[object], for_run: bool) -> None:
    for p in problems:
        print(p.render(for_run), file=sys.stderr)  # type: ignore[attr-defined]


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate workflow files; every problem is one line on stderr."""
    failed = False
    for path in args.paths:
        v = validate_file(path)
        _print_problems(v.problems, for_run=False)
        if v.errors():
            failed = True
        else:
            warnings = len(v.problems)
            note = f" ({warnings} warning{'s' * (warnings != 1)})" if warnings else ""
            print(f"{path}: valid{note}")
    return 1 if failed else 0


def _is_wrapper(exc: BaseException) -> bool:
    """Whether ``exc`` is bytewax's wrapping of an error raised in a step (or a Rust panic)."""
    package = type(exc).__module__.split(".")[0]
    return package in ("bytewax", "pyo3_runtime") or str(exc).startswith("(src/")


def _unwrapped(exc: BaseException) -> BaseException:
    """The exception that explains a failed run: the outermost one bytewax did not wrap.

    That is DataFlare's own when there is one (it names the step and the target).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    last = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if not _is_wrapper(cur):
            return cur
        last = cur
        cur = cur.__cause__ or cur.__context__
    for line in str(exc).splitlines():
        if "StepFailed:" in line:
            return StepFailed(line.split("StepFailed:", 1)[1].strip())
    return last


def _error_text(exc: BaseException) -> str:
    """The message of a failed run, printed after ``error:``.

    The message of :func:`_unwrapped`, then the innermost error it was raised from when
    the message does not already say it (a driver's error under ours).
    """
    cause = _unwrapped(exc)
    inner, seen = cause, {id(cause)}
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:
        inner = inner.__cause__
        seen.add(id(inner))
    text = str(cause)
    if inner is not cause and str(inner) not in text:
        text += f" ({type(inner).__name__}: {inner})"
    return text


class _Progress:
    """Records out per step on a terminal, refreshed every second; a summary at the end.

    A destination's count is of the records it received: once the run ended, all are
    written (or counted failed), but after a failed run some may not be.
    """

    def __init__(self, steps: list[str], destinations: list[str], live: bool) -> None:
        self.steps, self.destinations, self.live = steps, set(destinations), live
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.monotonic()

    def counts(self) -> list[tuple[str, int, int]]:
        out = []
        for step in self.steps:
            n = metrics.value(metrics.RECORDS_OUT, step=step) + metrics.value(
                metrics.RECORDS_WRITTEN, step=step
            )
            errors = sum(
                metrics.value(metrics.ERRORS, step=step, strategy=s)
                for s in ("skip", "fail", "redirect")
            )
            out.append((step, int(n), int(errors)))
        return out

    def _line(self) -> str:
        return "  ".join(
            f"{s}={n}" + (f" (errors {e})" if e else "") for s, n, e in self.counts()
        )

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            sys.stderr.write("\r\x1b[K" + self._line()[:200])
            sys.stderr.flush()

    def __enter__(self) -> _Progress:
        if self.live:
            self.thread.start()
        return self

    def __exit__(self, failure: type[BaseException] | None, *exc: object) -> None:
        self.stop.set()
        if self.live:
            self.thread.join()
            sys.stderr.write("\r\x1b[K")
        elapsed = time.monotonic() - self.started
        state = ", run failed" if failure else ""
        print(f"summary ({elapsed:.1f}s{state}): records per step", file=sys.stderr)
        for step, n, errors in self.counts():
            unsure = failure is not None and step in self.destinations and n > 0
            extra = " received, not all confirmed written" if unsure else ""
            extra += f", {errors} failed" if errors else ""
            print(f"  {step}: {n}{extra}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a workflow with bytewax (bounded inputs run until they end)."""
    if not args.verbose:
        os.environ["RUST_BACKTRACE"] = "0"
    v = validate_file(args.path)
    problems = v.errors(for_run=True)
    if problems:
        _print_problems(problems, for_run=True)
        return 1
    try:
        flow = compile_validated(v)
    except Exception as exc:  # noqa: BLE001 - a builder's configuration error, shown plainly
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    return _execute(args, v, flow)


def _execute(args: argparse.Namespace, v: Validated, flow: Dataflow) -> int:
    """Run a compiled workflow with the ``run`` flags (recovery, workers, timeout...)."""
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.run import cli_main

    recovery = None
    snapshot = timedelta(seconds=args.snapshot_interval)
    if args.recovery_dir is not None:
        directory = Path(args.recovery_dir)
        if not any(directory.glob("*.sqlite3")):
            directory.mkdir(parents=True, exist_ok=True)
            init_db_dir(directory, args.recovery_partitions)
        # The run's id outlives a crash before the first snapshot (see connectors.batching).
        run_id = directory / "dataflare-run-id"
        if not run_id.exists():
            run_id.write_text(uuid.uuid4().hex + "\n")
        os.environ[RUN_ID_ENV] = run_id.read_text().strip()
        recovery = RecoveryConfig(str(directory), timedelta(seconds=args.backup_interval))
    kwargs: dict[str, object] = {"epoch_interval": snapshot, "recovery_config": recovery}
    if args.addresses:
        kwargs["addresses"] = args.addresses.split(";")
        kwargs["process_id"] = args.process_id or 0
    if args.workers_per_process:
        kwargs["workers_per_process"] = args.workers_per_process
    wf = v.workflow
    assert wf is not None
    workers = (args.workers_per_process or 1) * (len(args.addresses.split(";"))
                                                  if args.addresses else 1)
    limit = wf.config.max_concurrency
    if limit is not None and workers > limit:
        print(f"error: config.max_concurrency is {limit}, this run asks for {workers} workers",
              file=sys.stderr)
        return 1
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr="127.0.0.1")
    timer = None
    if wf.config.timeout is not None:
        # The timeout interrupts the run like Ctrl-C, even where SIGINT was inherited ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(wf.config.timeout, _stop_now)
        timer.daemon = True
        timer.start()
    steps = [*wf.sources, *wf.transformations, *wf.destinations]
    live = sys.stderr.isatty() and not args.quiet
    try:
        with (_Progress(steps, list(wf.destinations), live) if not args.quiet
              else _nullcontext()), _without_worker_panics():
            cli_main(flow, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported as one clear line
        cause = _unwrapped(exc)
        if timer is not None and timer.finished.is_set():
            print(f"error: the workflow ran longer than its config.timeout "
                  f"({wf.config.timeout:g}s) and was stopped", file=sys.stderr)
            return 124
        if isinstance(cause, KeyboardInterrupt) or isinstance(exc, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    finally:
        if timer is not None:
            timer.cancel()
    return 0


def _stop_now() -> None:
    """Stop the run at once: writes in flight give up, the main thread is interrupted."""
    from dataflare.connectors.batching import STOP

    STOP.set()
    _thread.interrupt_main()


_PANIC = re.compile(rb"^thread '.*' panicked at src/[\w/]+\.rs:\d+:\d+:$")
_PANIC_TAIL = (b"Box<dyn Any>", b"note: run with `RUST_BACKTRACE=1`")


@contextmanager
def _without_worker_panics() -> Iterator[None]:
    """Drop the notice bytewax's worker prints on stderr when a step raises.

    The step's exception still ends the run and is printed as one ``error:`` line. With
    ``RUST_BACKTRACE`` set, stderr is left alone.
    """
    if os.environ.get("RUST_BACKTRACE", "0") not in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    pump = threading.Thread(target=_pump, args=(read, os.dup(saved)), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe: the pump reads to its end and stops
        os.close(saved)
        pump.join(timeout=5)


def _pump(read: int, out: int) -> None:
    """Copy stderr lines from ``read`` to ``out``, without worker panic notices."""
    panic = False
    with os.fdopen(read, "rb") as src, os.fdopen(out, "wb", buffering=0) as dst:
        for line in src:
            text = line.rstrip(b"\n")
            if _PANIC.match(text) or (panic and text.startswith(_PANIC_TAIL)):
                panic = True
                continue
            panic = False
            dst.write(line)


class _nullcontext:  # noqa: N801
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def cmd_replay(args: argparse.Namespace) -> int:
    """Feed dead letters, unwrapped, into a step of a workflow; report what failed again."""
    from dataflare.replay import read_dead_letters

    if not args.verbose:
        os.environ["RUST_BACKTRACE"] = "0"
    v = validate_file(args.path)
    problems = v.errors(for_run=True)
    if problems:
        _print_problems(problems, for_run=True)
        return 1
    try:
        letters = read_dead_letters(args.dead_letters)
        flow = compile_validated(v, replay=(args.to, letters.records))
    except Exception as exc:  # noqa: BLE001 - a bad path or step, shown plainly
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    for line in letters.unusable:
        print(f"replay: skipped {line}", file=sys.stderr)

    def failures() -> dict[str, float]:
        counts: dict[str, float] = {}
        for family in metrics.ERRORS.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    step = sample.labels.get("step", "")
                    counts[step] = counts.get(step, 0) + sample.value
        return counts

    before = failures()
    code = _execute(args, v, flow)
    failed = {step: int(n - before.get(step, 0)) for step, n in failures().items()
              if n - before.get(step, 0) > 0}
    again = ", ".join(f"{n} in step {step!r}" for step, n in sorted(failed.items()))
    print(f"replayed {len(letters.records)} record(s) into step {args.to!r}"
          + (f"; failed again: {again}" if again else "; none failed again")
          + (f"; {len(letters.unusable)} dead letter(s) not replayable" if letters.unusable
             else ""), file=sys.stderr)
    return code


def cmd_test(args: argparse.Namespace) -> int:
    """Run the ``tests:`` blocks of workflow files."""
    from dataflare.testing import run_workflow_tests

    return run_workflow_tests(args.paths)


def cmd_graph(args: argparse.Namespace) -> int:
    """Print the workflow DAG (Mermaid or Graphviz dot)."""
    from dataflare.dsl_compiler.diagram import render

    v = validate_file(args.path)
    if v.errors():
        _print_problems(v.errors(), for_run=False)
        return 1
    print(render(v, args.format))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    """Print what each source would read: tables and columns, or inferred record schemas."""
    import json

    from dataflare.connectors.schema import discover
    from dataflare.dsl_compiler.compiler import component_context

    v = validate_file(args.path)
    if v.errors(for_run=True) or v.workflow is None:
        _print_problems(v.errors(for_run=True), for_run=True)
        return 1
    names = [args.source] if args.source else list(v.workflow.sources)
    unknown = [n for n in names if n not in v.workflow.sources]
    if unknown:
        known = ", ".join(v.workflow.sources)
        print(f"error: no source {unknown[0]!r} in {args.path} (sources: {known})",
              file=sys.stderr)
        return 1
    catalog, code = {}, 0
    for name in names:
        try:
            catalog[name] = discover(component_context(v, name))
        except Exception as exc:  # noqa: BLE001 - one line per source that cannot be read
            print(f"error: source {name!r}: {_error_text(exc)}", file=sys.stderr)
            code = 1
    print(json.dumps(catalog, indent=2, default=str))
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of workflow files, or the Markdown DSL reference."""
    from dataflare.dsl_compiler import reference

    print(reference.markdown() if args.markdown else reference.json_schema_text())
    return 0


def _run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``run`` (and ``replay``): bytewax's, recovery, metrics, quiet."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="Log more.")
    p.add_argument("--metrics-port", type=int,
                   help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics while running.")
    p.add_argument("-w", "--workers-per-process", type=int, help="Workers in this process.")
    p.add_argument("-i", "--process-id", type=int, help="This process's id (with -a).")
    p.add_argument("-a", "--addresses", help="host:port of every process, ';'-separated.")
    p.add_argument("-r", "--recovery-dir", "--recovery-directory", dest="recovery_dir",
                   help="Recovery directory; created with its partitions when absent.")
    p.add_argument("-s", "--snapshot-interval", type=float, default=5.0,
                   help="Seconds between snapshots (epochs).")
    p.add_argument("-b", "--backup-interval", type=float, default=0.0,
                   help="Seconds older snapshots are kept.")
    p.add_argument("--recovery-partitions", type=int, default=1,
                   help="Partitions created in a new recovery directory.")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress or summary.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dataflare`` command."""
    parser = argparse.ArgumentParser(prog="dataflare", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log more.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="Check workflow files; problems go to stderr.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("run", help="Run a workflow.")
    p.add_argument("path", metavar="PATH")
    _run_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("replay", help="Feed dead letters, unwrapped, into a step of a workflow.")
    p.add_argument("dead_letters", metavar="PATH",
                   help="Dead letters: a .jsonl file, or postgresql://...#schema.table.")
    p.add_argument("--to", required=True, metavar="STEP", help="The step that receives them.")
    p.add_argument("path", metavar="WORKFLOW")
    _run_flags(p)
    p.set_defaults(fn=cmd_replay)

    p = sub.add_parser("test", help="Run the tests: blocks of workflow files.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(fn=cmd_test)

    p = sub.add_parser("graph", help="Print the workflow DAG.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    p.set_defaults(fn=cmd_graph)

    p = sub.add_parser("discover", help="Print the fields and types each source reads.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("source", nargs="?", help="Only this source.")
    p.set_defaults(fn=cmd_discover)

    p = sub.add_parser("schema", help="Print the JSON Schema of workflow files.")
    p.add_argument("--markdown", action="store_true", help="The DSL reference instead.")
    p.set_defaults(fn=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dataflare`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
