"""The runner: everything ``dataflare run`` does around a bytewax run, as a Python API.

:func:`run` validates and compiles a workflow, prepares the recovery directory (and the
run id that keeps appends exactly once across crashes), takes its place in a cluster (from
arguments or a pod's environment), enforces ``config.max_concurrency`` and
``config.timeout``, serves metrics, stops gracefully on SIGTERM/SIGINT, runs the
post-actions and returns a :class:`RunResult` with the summary. The CLI, the server's
workers and the Kubernetes entry point all run workflows through it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from dataflare import metrics, stopping
from dataflare.connectors.batching import RUN_ID_ENV
from dataflare.connectors.lake import journal_retention, remove_one_file_parts
from dataflare.dsl_compiler import StepFailed, Validated, compile_validated, validate_file
from dataflare.dsl_compiler.problems import WorkflowError
from dataflare.logs import CONTEXT, json_mode, say
from dataflare.masking import MASKED
from dataflare.operators.keyed import run_recovery
from dataflare.plan import committed_epoch, record_workflow, restore_record, resume_blocks
from dataflare.records import META, message_of
from dataflare.retry import interrupted
from dataflare.secrets import register_credentials, scrub, scrub_bytes


@dataclass(frozen=True)
class RunOptions:
    """How to run a workflow; the fields are ``dataflare run``'s options."""

    path: str
    workers_per_process: int | None = None
    process_id: int | None = None
    addresses: str | None = None
    recovery_dir: str | None = None
    snapshot_interval: float | None = None
    backup_interval: float = 0.0
    recovery_partitions: int = 1
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    otlp_url: str | None = None
    openlineage_url: str | None = None  # OpenLineage run events to this endpoint
    openlineage_file: str | None = None  # ... and/or appended to this file (JSON lines)
    replay: tuple[str, str] | None = None  # (step, dead-letter file): ``dataflare replay``
    quiet: bool = False
    verbose: bool = False
    summary_json: str | None = None
    progress_json: str | None = None
    no_post_actions: bool = False
    server: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class RunResult:
    """How a run ended.

    ``status`` is succeeded, failed or stopped; ``exit_code`` the process exit code of
    ``dataflare run``; ``summary`` the totals and per-step counts (None when the run could not
    start); ``error`` what stopped it.
    """

    status: str
    exit_code: int
    summary: dict[str, Any] | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Whether the run succeeded."""
        return self.status == "succeeded"


def run(path: str | Path, *, workers: int | None = None, process_id: int | None = None,
        addresses: list[str] | None = None, recovery_dir: str | Path | None = None,
        snapshot_interval: float | None = None, **options: Any) -> RunResult:
    """Run the workflow at ``path`` until its inputs end (or it is stopped).

    ``workers`` per process; ``process_id`` and ``addresses`` for one process of a
    multi-process run; ``recovery_dir`` turns recovery on (created when absent). Further
    keyword arguments are the fields of :class:`RunOptions`.
    """
    known = {f.name for f in fields(RunOptions)}
    unknown = set(options) - known
    if unknown:
        msg = f"unknown run options: {', '.join(sorted(unknown))}"
        raise TypeError(msg)
    opts = RunOptions(
        path=str(path), workers_per_process=workers, process_id=process_id,
        addresses=";".join(addresses) if addresses else None,
        recovery_dir=str(recovery_dir) if recovery_dir is not None else None,
        snapshot_interval=snapshot_interval, **options)
    return run_with(opts)


def _refused(message: str) -> RunResult:
    message = scrub(message)
    say(message, "error")
    return RunResult("failed", 1, None, message)


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


_PEER_LOST = re.compile(r"\b(Send|Recv|Receive) thread panic")
"""How a process of a multi-process run fails when another one dies."""


def error_text(exc: BaseException) -> str:
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
    if inner is not cause and message_of(inner) not in text:
        text += f" ({type(inner).__name__}: {message_of(inner)})"
    return text


class _Progress:
    """Records out per step on a terminal, refreshed every second; a summary at the end.

    A destination's count is of the records it received: once the run ended, all are
    written (or counted failed), but after a failed run some may not be.
    """

    def __init__(self, steps: list[str], destinations: list[str], live: bool,
                 quiet: bool = False, progress_file: str | None = None,
                 late_unread: frozenset[str] = frozenset(), sources: list[str] | None = None
                 ) -> None:
        self.steps, self.destinations, self.live = steps, set(destinations), live
        self.sources = sources or []  # whose records make the summary's total
        self.late_unread = late_unread
        self.quiet, self.progress_file = quiet, progress_file
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.monotonic()
        self.elapsed = 0.0
        # Counters are process-wide: a second run in one process counts from here.
        self.baseline = {s: (n, e) for s, n, e in self._totals()}
        self.late_baseline = {s: metrics.value(metrics.LATE_RECORDS, step=s) for s in steps}
        self.written_baseline = {s: metrics.value(metrics.ALREADY_WRITTEN, step=s)
                                 for s in destinations}

    def already_written(self) -> dict[str, int]:
        """Records of this run destinations left out as written before a restart."""
        counts = {s: int(metrics.value(metrics.ALREADY_WRITTEN, step=s) - base)
                  for s, base in self.written_baseline.items()}
        return {s: n for s, n in counts.items() if n}

    def late(self) -> dict[str, int]:
        """Late records of this run per step that had any."""
        counts = {s: int(metrics.value(metrics.LATE_RECORDS, step=s) - self.late_baseline[s])
                  for s in self.steps}
        return {s: n for s, n in counts.items() if n}

    def late_dropped(self) -> dict[str, int]:
        """Late records of this run that went nowhere (see :func:`late_unread`)."""
        return {s: n for s, n in self.late().items() if s in self.late_unread}

    def summary(self, status: str, error: str | None) -> dict[str, object]:
        """The run's result: status, totals (read, written, failed), per-step counts."""
        counts = self.counts()
        steps = {s: {"records": n, "failed": e} for s, n, e in counts}
        for s, n in self.late().items():
            steps[s]["late"] = n
        for s, n in self.already_written().items():  # received, not written again
            steps[s]["already_written"] = n
        return {
            "status": status,
            "duration_s": round(self.elapsed or time.monotonic() - self.started, 3),
            "total": sum(steps[s]["records"] for s in self.sources if s in steps),
            "succeeded": sum(steps[s]["records"] for s in self.destinations if s in steps),
            "failed": sum(e for _, _, e in counts),
            "steps": steps,
            "quality": {s: [{"field": f, "rule": r, "checked": c, "failed": x}
                            for f, r, c, x in metrics.quality_table(s)]
                        for s in self.steps if metrics.quality_table(s)},
            "late_dropped": self.late_dropped(),
            "error": error,
        }

    def counts(self) -> list[tuple[str, int, int]]:
        """(step, records, failed records) of this run."""
        return [(s, n - self.baseline.get(s, (0, 0))[0], e - self.baseline.get(s, (0, 0))[1])
                for s, n, e in self._totals()]

    def _totals(self) -> list[tuple[str, int, int]]:
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
            if self.live:
                sys.stderr.write("\r\x1b[K" + self._line()[:200])
                sys.stderr.flush()
            if self.progress_file:  # read by the server's worker while the run goes on
                self._write_progress("running")

    def _write_progress(self, status: str) -> None:
        assert self.progress_file is not None  # noqa: S101 - called only with one
        tmp = self.progress_file + ".tmp"
        Path(tmp).write_text(json.dumps(self.summary(status, None)))
        os.replace(tmp, self.progress_file)

    def __enter__(self) -> _Progress:
        if self.live or self.progress_file:
            self.thread.start()
        return self

    def __exit__(self, failure: type[BaseException] | None, *exc: object) -> None:
        self.stop.set()
        if self.live or self.progress_file:
            self.thread.join()
        if self.progress_file:  # its last word: not "running" for ever
            self._write_progress("failed" if failure else
                                 "stopped" if stopping.requested() else "succeeded")
        if self.live:
            sys.stderr.write("\r\x1b[K")
        elapsed = self.elapsed = time.monotonic() - self.started
        if self.quiet:
            return
        state = ", run failed" if failure else ""
        if json_mode():
            counts: dict[str, dict[str, int]] = {s: {"records": n, "failed": e}
                                                 for s, n, e in self.counts()}
            for step, n in self.late().items():  # apart from the records the step emitted
                counts[step]["late"] = n
            say("summary", records_count=sum(n for s, n, _ in self.counts()
                                             if s in self.destinations),
                duration_ms=round(elapsed * 1000), steps=counts,
                status="failed" if failure else "done")
            return
        print(f"summary ({elapsed:.1f}s{state}): records per step", file=sys.stderr)
        late, dropped = self.late(), self.late_dropped()
        again = self.already_written()
        cut = failure is not None or stopping.requested()  # a stop may cut a write short
        for step, n, errors in self.counts():
            unsure = cut and step in self.destinations and n > 0
            extra = " received, not all confirmed written" if unsure else ""
            if step in again:
                extra = (extra or " received") + (f", {again[step]} of them left out as "
                                                  "written before a restart")
            extra += f", {errors} failed" if errors else ""
            if step in late:
                extra += f", {late[step]} late" + (" (dropped)" if step in dropped else "")
            print(f"  {step}: {n}{extra}", file=sys.stderr)
        for step in self.steps:  # data_quality steps: checks per field and rule
            rows = metrics.quality_table(step)
            if rows:
                print(f"quality of {step}: field rule checked failed pass-rate", file=sys.stderr)
            for fld, rule, checked, failed in rows:
                rate = 100.0 * (checked - failed) / checked if checked else 100.0
                print(f"  {fld} {rule} {checked} {failed} {rate:.1f}%", file=sys.stderr)


def run_with(opts: RunOptions) -> RunResult:
    """Run a workflow as ``dataflare run`` does; messages go to stderr.

    The run id (``DATAFLARE_RUN_ID``: the recovery directory's, the caller's, or a new one)
    is this run's alone: the environment is restored afterwards, so a second run in the
    same process is a run of its own.
    """
    saved = os.environ.get(RUN_ID_ENV)
    try:
        return _run(opts)
    finally:
        from dataflare.connectors.batching import STOP

        STOP.clear()
        stopping.REQUESTED.clear()
        stopping.SIGNAL.clear()
        stopping.PEER.clear()
        stopping.FAILED.clear()
        if saved is None:
            os.environ.pop(RUN_ID_ENV, None)
        else:
            os.environ[RUN_ID_ENV] = saved


def _run(opts: RunOptions) -> RunResult:
    from bytewax.recovery import RecoveryConfig
    from bytewax.run import cli_main

    v = validate_file(opts.path)
    problems = v.errors(for_run=True)
    for p in v.problems:  # the warnings of validate are shown by run too
        if p not in problems:
            print(p.render(True), file=sys.stderr)
    if problems:
        for p in problems:
            print(p.render(True), file=sys.stderr)
        return RunResult("failed", 1, None, str(WorkflowError(problems)))
    if opts.process_id is not None:  # unchecked, it ran alone, or waited for ever
        count = len(opts.addresses.split(";")) if opts.addresses else 0
        if not count:
            return _refused("--process-id needs --addresses: the address of every process")
        if not 0 <= opts.process_id < count:
            return _refused(f"--process-id {opts.process_id} is outside the {count} addresses "
                            f"of --addresses (0 to {count - 1})")
    replayed = None
    if opts.replay is not None:
        from bytewax.testing import TestingSource

        from dataflare.replay import read_dead_letters

        step, letters = opts.replay
        if v.graph is None or step not in v.graph.kinds:
            return _refused(f"no step {step!r} in {opts.path} to replay into")
        register_credentials(letters)  # a database URL's password
        try:
            read = read_dead_letters(letters)
        except Exception as exc:  # noqa: BLE001 - a file, database or broker's error, in a line
            said = getattr(exc, "strerror", None) or error_text(exc).split("\n")[0]
            return _refused(scrub(f"cannot read {letters}: {said}"))
        for problem in read.unusable:
            say(f"not replayed: {problem}", "warning")
        for failed_at in sorted(read.steps - {step}):
            if v.graph.kinds.get(failed_at) == "destinations":  # written, not read, records
                return _refused(f"dead letters of destination {failed_at!r} hold what it was "
                                f"to write, not {step!r}'s input: replay them --to {failed_at}")
        if read.repeated:
            say(f"{read.repeated} dead letter(s) repeat an earlier one (written again after "
                "a crash: dead letters are written at least once) and are replayed once")
        # Dead letters hold records masked by the workflow's data_protection: not again.
        records = [{**r, META: {**(r.get(META) or {}), MASKED: True}} for r in read.records]
        replayed = (step, TestingSource([records[i:i + 1000]
                                         for i in range(0, len(records), 1000)]))
        say(f"replaying {len(records)} dead letters of {letters} into step {step!r}")
    protection = v.workflow.data_protection if v.workflow else None
    if protection and protection.encryption and protection.encryption.in_transit:
        from dataflare import encryption

        if os.environ.get(encryption.PG_SSLMODE_ENV) not in encryption.TLS_SSLMODES:
            os.environ[encryption.PG_SSLMODE_ENV] = "require"  # libpq: TLS or no connection
    try:
        flow = compile_validated(v, replay=replayed)
    except Exception as exc:  # noqa: BLE001 - a builder's configuration error, shown plainly
        return _refused(error_text(exc))
    rescaled: list[int] = []  # the process count an autoscaled StatefulSet asks for now
    watching = None
    if not opts.addresses:
        from dataflare import k8s

        try:
            cluster = k8s.cluster_from_env()
        except (ValueError, OSError) as exc:
            return _refused(str(exc))
        if cluster is not None:  # a pod of a StatefulSet or an Indexed Job (dataflare k8s)
            one = len(cluster.addresses) == 1  # no mesh: it would resolve its own name
            opts = replace(opts, process_id=cluster.process_id,
                           addresses=None if one else ";".join(cluster.addresses))
            if os.environ.get("DATAFLARE_REPLICAS_FROM") == "statefulset":
                def rescale(wanted: int) -> None:
                    say(f"the StatefulSet now has {wanted} replicas (this run "
                        f"{len(cluster.addresses)}): stopping at a snapshot to restart")
                    rescaled.append(wanted)
                    stopping.REQUESTED.set()

                watching = k8s.watch_rescale(len(cluster.addresses), rescale)
    recovery = None
    interval = opts.snapshot_interval
    if interval is None:  # the sources' streaming.checkpoint_interval, else 5 s
        wanted = [s.streaming.checkpoint_interval for s in v.workflow.sources.values()
                  if s.streaming is not None and s.streaming.checkpoint_interval is not None] \
            if v.workflow is not None else []
        interval = min(wanted) if wanted else 5.0
    snapshot = timedelta(seconds=interval)
    if opts.recovery_dir is not None:
        directory = Path(opts.recovery_dir)
        directory.mkdir(parents=True, exist_ok=True)
        refused = _init_partitions(directory, opts)
        if refused is not None:
            return _refused(refused)
        # The run's id outlives a crash before the first snapshot (see connectors.batching).
        run_id = directory / "dataflare-run-id"
        if not run_id.exists():
            run_id.write_text((os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex) + "\n")
        os.environ[RUN_ID_ENV] = run_id.read_text().strip()
        if committed_epoch(directory) is not None:
            blocks = resume_blocks(flow, directory)
            if blocks:
                return _refused(f"cannot resume from {directory}: " + "; ".join(blocks))
        recovery = RecoveryConfig(str(directory), timedelta(seconds=opts.backup_interval))
        _say_flushed_at_end(v)
    kwargs: dict[str, object] = {"epoch_interval": snapshot, "recovery_config": recovery}
    if opts.addresses:
        addresses = opts.addresses.split(";")
        kwargs["addresses"] = addresses
        kwargs["process_id"] = opts.process_id or 0
        if len(addresses) > 1:
            stopping.spread(flow, opts.process_id or 0)  # a signal to one stops them all
            stopping.agree(flow, opts.process_id or 0, _digest(v))
    if opts.workers_per_process:
        kwargs["workers_per_process"] = opts.workers_per_process
    wf = v.workflow
    assert wf is not None
    os.environ.setdefault(RUN_ID_ENV, uuid.uuid4().hex)
    CONTEXT.update(workflow_id=wf.id or wf.name or Path(opts.path).stem,
                   run_id=os.environ[RUN_ID_ENV])
    workers = (opts.workers_per_process or 1) * (len(opts.addresses.split(";"))
                                                  if opts.addresses else 1)
    limit = wf.config.max_concurrency
    if limit is not None and workers > limit:
        return _refused(f"config.max_concurrency is {limit}, this run asks for {workers} "
                        "workers")
    if opts.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(opts.metrics_port, addr=opts.metrics_host)
    tracer = None
    if opts.otlp_url:  # bytewax's own spans, exported over OTLP/gRPC
        from bytewax.tracing import OtlpTracingConfig, setup_tracing

        service = str(CONTEXT["workflow_id"])
        tracer = setup_tracing(OtlpTracingConfig(service, opts.otlp_url), "INFO")
    lineage = None
    # One process of a multi-process run speaks for the run: the first. The others would
    # send the same post-actions (a trigger would start the next workflow twice) and
    # lineage events again.
    first = not opts.addresses or (opts.process_id or 0) == 0
    if (opts.openlineage_url or opts.openlineage_file) and first:
        from dataflare.lineage import RunEvents

        try:
            lineage = RunEvents(v, os.environ[RUN_ID_ENV], opts.openlineage_url,
                                opts.openlineage_file)
        except ImportError as exc:
            return _refused(str(exc))
        _emit(lineage, "START")
    from dataflare.monitoring import Monitor

    monitor = Monitor(wf)
    monitor.start()
    live = None
    if opts.http_port is not None:
        from dataflare.live import Live

        live = Live(wf, os.environ.get(RUN_ID_ENV), _peers(opts))
        try:
            live.start(opts.http_host, opts.http_port)
        except OSError as exc:
            return _refused(f"cannot serve --http-port {opts.http_port}: {exc.strerror}")
    else:
        served = [cid for cid, t in wf.transformations.items() if t.serve]
        if served:
            say(f"serve: true on {', '.join(map(repr, served))} has no effect without "
                "--http-port (the views are read at GET /views/<step>)", "warning")
    # SIGTERM / SIGINT stop gracefully (dataflare.stopping); so does config.timeout, which
    # stops at once if the graceful stop takes longer than STOP_GRACE.
    stopping.install()
    stopping.stop_with_parent()
    timer = None
    timeout_error = None
    if wf.config.timeout is not None:
        timeout_error = (f"the workflow ran longer than its config.timeout "
                         f"({wf.config.timeout:g}s) and was stopped")
        timer = threading.Timer(wf.config.timeout, _time_out, args=(timeout_error,))
        timer.daemon = True
        timer.start()
    steps = [*wf.sources, *wf.transformations, *wf.destinations]
    on_terminal = sys.stderr.isatty() and not opts.quiet
    progress = _Progress(steps, list(wf.destinations), on_terminal, quiet=opts.quiet,
                         progress_file=opts.progress_json, late_unread=late_unread(wf),
                         sources=list(wf.sources))
    code, status, error = 0, "succeeded", None
    recorded = None  # the workflow the saved state belongs to, for ``dataflare plan``
    if opts.recovery_dir is not None:
        directory = Path(opts.recovery_dir)
        recorded = (directory, record_workflow(directory, opts.path), committed_epoch(directory))
    try:
        # A resume starts from a snapshot at most the backup interval (and a few epochs)
        # old; without recovery a restart under the same run id undoes the whole run.
        retention = (opts.backup_interval + max(10 * interval, 60.0)
                     if recovery is not None else None)
        with progress, without_worker_panics(), run_recovery(recovery is not None), \
                journal_retention(retention):
            cli_main(flow, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported as one clear line
        cause = _unwrapped(exc)
        if timer is not None and timer.finished.is_set():  # a write given up at the timeout
            code, status, error = 124, "failed", timeout_error
        elif isinstance(cause, KeyboardInterrupt) or isinstance(exc, KeyboardInterrupt):
            code, status = 130, "stopped"
        elif stopping.requested() and (cut := interrupted(exc)) is not None:
            # A step's retries were cut short: its batch was not written or transformed,
            # and the resumed run reads it again from the last snapshot.
            signum = stopping.SIGNAL[0] if stopping.SIGNAL else signal.SIGTERM
            code, status = 128 + signum, "stopped"
            again = ("the next run reads its records again from the last snapshot"
                     if recovery is not None else "without --recovery-dir, the next run "
                     "starts over")
            error = (f"stopped on {signal.Signals(signum).name} during retries: {cut}; "
                     f"{again}")
        else:
            code, status, error = 1, "failed", error_text(exc)
            if opts.addresses and _PEER_LOST.search(error):  # timely's words for it
                again = ("the run resumes from its last snapshot" if recovery is not None
                         else "without --recovery-dir, the run starts over")
                error = (f"lost the connection to another process of this run "
                         f"({opts.addresses}): it stopped or its host went away; start "
                         f"every process again: {again}")
        say(error or "interrupted", "error" if status == "failed" else "warning")
    finally:
        if timer is not None:
            timer.cancel()
        if recorded is not None and committed_epoch(recorded[0]) == recorded[2]:
            # Nothing was committed (a refused resume): the state is the previous workflow's.
            restore_record(recorded[0], recorded[1])
    if watching is not None:
        watching.set()
    if "dataflare.connectors.kafka" in sys.modules:
        from dataflare.connectors.kafka import commit_ended

        # Everything read was written when the run succeeded: the consumer groups may know.
        commit_ended(status == "succeeded" and not stopping.requested())
    if status == "succeeded" and stopping.FAILED:  # stopped as one, to fail as one
        code, status, error = 1, "failed", stopping.FAILED[0]
        say(error, "error")
    if status == "succeeded" and stopping.requested():
        if timer is not None and timer.finished.is_set():
            code, status, error = 124, "failed", timeout_error
            say(str(error), "error")
        elif rescaled and not stopping.SIGNAL:
            from dataflare.k8s import RESCALE_EXIT

            code, status = RESCALE_EXIT, "stopped"
            say(f"stopped cleanly to restart as {rescaled[0]} processes (state kept in the "
                "final snapshot)", status="stopped")
        else:
            signum = stopping.SIGNAL[0] if stopping.SIGNAL else (
                stopping.PEER[0][1] if stopping.PEER else signal.SIGTERM)
            code, status = 128 + signum, "stopped"
            kept = " (state kept in the final snapshot)" if recovery is not None else ""
            say(f"stopped cleanly {stopping.stopped_by()}{kept}", status="stopped")
    # Its last snapshot is committed: what only a resume of this run would read can go.
    remove_one_file_parts(os.environ[RUN_ID_ENV], completed=status == "succeeded")
    monitor.close()
    if live is not None:
        live.stop()
    del tracer  # flushes the spans still buffered
    error = scrub(error) if error else error
    if lineage is not None:
        _emit(lineage, {"succeeded": "COMPLETE", "failed": "FAIL"}.get(status, "ABORT"), error)
    idle = any(s.streaming is not None and s.streaming.idle_timeout is not None
               for s in wf.sources.values())
    for step, n in progress.late_dropped().items():
        said = ("allowed_lateness allows, or of a window that streaming.idle_timeout fired"
                if idle else "allowed_lateness allows")
        say(f"step {step!r}: {n} late record(s) dropped: older than the step's {said}, and "
            f"nothing reads {step + '.late'!r} (send them to a destination with late_to, or "
            "make it an input)", "warning")
    summary = progress.summary(status, error)
    if wf.post_actions and not opts.no_post_actions and first:
        summary["post_actions"] = _post_actions(opts, wf, status, summary)
    if replayed is not None:
        failed = int(summary["failed"])  # type: ignore[call-overload]
        say(f"replayed into {replayed[0]!r}: {failed} failed again"
            + (" (they followed the steps' error_handling)" if failed else ""))
    if opts.summary_json:
        Path(opts.summary_json).write_text(scrub(json.dumps(summary, indent=2)) + "\n")
    return RunResult(status, code, summary, error)


def late_unread(wf: Any) -> frozenset[str]:
    """Steps whose late records go nowhere: no ``late_to`` and no input reading ``<step>.late``."""
    read = {ref for comps in (wf.transformations, wf.destinations)
            for c in comps.values() for ref in c.inputs}
    return frozenset(cid for cid, t in wf.transformations.items()
                     if f"{cid}.late" not in read and not getattr(t.config, "late_to", None))


def _peers(opts: RunOptions) -> list[str]:
    """The live endpoints of the other processes of a cluster run (``/views`` gathers there).

    Each process's host (from the cluster addresses) with the same ``--http-port``, as the
    pods of a StatefulSet have.
    """
    if not opts.addresses or not opts.http_port:
        return []
    me = opts.process_id or 0
    return [f"http://{address.rsplit(':', 1)[0]}:{opts.http_port}"
            for i, address in enumerate(opts.addresses.split(";")) if i != me]


def _emit(events: Any, state: str, error: str | None = None) -> None:
    """Send one OpenLineage run event; a catalog that cannot be reached is a warning."""
    try:
        events.emit(state, error)
    except Exception as exc:  # noqa: BLE001 - lineage never stops a run; said, not hidden
        say(f"openlineage {state} event not sent: {scrub(error_text(exc))}", "warning")


STOP_GRACE = 30.0  # seconds a timed-out run may take to stop gracefully


def _time_out(message: str) -> None:
    """``config.timeout`` passed: sources end, writes in flight give up; hard after STOP_GRACE."""
    from dataflare.connectors.batching import STOP

    stopping.REQUESTED.set()
    STOP.set()
    hard = threading.Timer(STOP_GRACE, _hard_stop, args=(message,))
    hard.daemon = True
    hard.start()


def _hard_stop(message: str) -> None:
    print(f"error: {message} (it did not stop within {STOP_GRACE:g}s)", file=sys.stderr,
          flush=True)
    os._exit(124)


def _post_actions(opts: RunOptions, wf: Any, status: str,
                  summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the workflow's post-actions; each outcome is printed on stderr."""
    from dataflare.post_actions import run_post_actions

    trigger = None
    if opts.server:
        from dataflare.server.client import Client

        trigger = Client(opts.server, opts.token).trigger_for_post_action
    results = run_post_actions(wf, status, os.environ.get(RUN_ID_ENV), summary, trigger)
    for r in results:
        what = f"post-action {r['index']} ({r['type']})"
        if r.get("done"):
            say(f"{what}: done")
        elif r.get("reason"):
            continue
        else:
            say(f"{what}: failed: {r.get('error') or r.get('result')}", "warning")
    return results


def _digest(v: Validated) -> str:
    """A digest of the workflow as this process runs it (variables resolved)."""
    import hashlib

    text = json.dumps(v.document.data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_FLUSHED_AT_END = ("window", "aggregation", "join", "window_analytics")
"""Transformations that emit their open windows and groups when a bounded input ends."""


def _say_flushed_at_end(v: Validated) -> None:
    """Warn that a resumed bounded run starts the windows the last one emitted afresh.

    Its open windows (aggregates, joins) are emitted at its end and not kept: records of
    the next run for the same window make a second, partial row, which a merge takes for
    the whole window. (A graceful stop keeps them instead.)
    """
    wf = v.workflow
    if wf is None or not all(src.ends() for src in wf.sources.values()):
        return
    steps = [cid for cid, t in wf.transformations.items() if t.type in _FLUSHED_AT_END]
    if steps:
        say(f"{', '.join(map(repr, steps))} emit their open windows and groups when this "
            "run's input ends; a next run from this recovery directory starts them again "
            "with its own records only, so a window both runs read is written twice, each "
            "part alone (a merge keeps the second)", "warning")


def _init_partitions(directory: Path, opts: RunOptions) -> str | None:
    """Create the recovery partitions of a new recovery directory.

    A single process creates ``--recovery-partitions`` of them. A process of a
    multi-process run creates only its own (``part-<id>`` of one per process), so each
    process (a pod with its own volume) may keep its partition in a directory of its own;
    when the processes share a directory, together they create the full set. With more
    ``--recovery-partitions`` than processes (an autoscaled StatefulSet sharing one volume),
    every process creates the missing ones of that many, so any later process count up to
    it resumes from the same set. A full set of another size is resumed as it is (bytewax
    spreads its partitions over any number of processes).

    Returns why the run cannot resume from ``directory`` when it holds only one process's
    partition of a run of another size (a volume per pod, rescaled).
    """
    from bytewax.recovery import init_db_dir

    if not opts.addresses:
        if not any(directory.glob("*.sqlite3")):
            init_db_dir(directory, opts.recovery_partitions)
        return None
    processes = len(opts.addresses.split(";"))
    count = max(processes, opts.recovery_partitions)
    made = _partition_count(directory)
    if made is not None and made != count:
        if any(not (directory / f"part-{i}.sqlite3").exists() for i in range(made)):
            return (f"cannot resume from {directory}: it holds the recovery partition of one "
                    f"process of a run of {made}, not the others, and this run has "
                    f"{processes} processes. Run {made} processes; to change their number, "
                    "stop every process and put all the partitions in one directory that "
                    "every new process reads (or start with --recovery-partitions at least "
                    "the largest count)")
        if made < processes:  # bytewax resumes any process count from the full set
            return None
        count = made
    wanted = range(count) if opts.recovery_partitions > processes else [opts.process_id or 0]
    missing = [f"part-{i}.sqlite3" for i in wanted
               if not (directory / f"part-{i}.sqlite3").exists()]
    if not missing:
        return None
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        init_db_dir(Path(tmp), count)
        for name in missing:  # processes starting together: the first link of a name wins
            with suppress(FileExistsError):
                os.link(Path(tmp) / name, directory / name)
    return None


def _partition_count(directory: Path) -> int | None:
    """How many recovery partitions the partitions in ``directory`` belong to (None: none)."""
    import sqlite3

    for path in sorted(directory.glob("part-*.sqlite3")):
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT part_count FROM parts").fetchone()
        if row is not None:
            return int(row[0])
    return None


_PANIC = re.compile(rb"^thread '.*' panicked at src/[\w/]+\.rs:\d+:\d+:$")
# What follows the notice: its payload, the hint, with RUST_BACKTRACE=1 the frames, and the
# empty line that ends it.
_PANIC_TAIL = re.compile(rb"^(Box<dyn Any>|note: run with `RUST_BACKTRACE=1`|stack backtrace:"
                         rb"|\s+\d+: |\s+at |note: Some details are omitted|$)")


@contextmanager
def without_worker_panics() -> Iterator[None]:
    """Drop the notice bytewax's worker prints on stderr when a step raises.

    The step's exception still ends the run and is printed as one ``error:`` line; the
    Rust frames of ``RUST_BACKTRACE=1`` (often set for other work) go too. With
    ``RUST_BACKTRACE=full`` the notice is kept. Either way stderr is scrubbed of secrets.
    """
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
    """Copy stderr from ``read`` to ``out``, without worker panic notices.

    Whole lines are checked; the unfinished end of the output (the progress line, redrawn
    in place) is copied at once unless it may be the start of a panic notice.
    """
    panic = seen = False  # in a notice now; one was seen (its frames may come later)
    keep = os.environ.get("RUST_BACKTRACE") == "full"
    pending = b""
    with os.fdopen(out, "wb", buffering=0) as dst:
        while chunk := os.read(read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for text in lines:
                if not keep and (_PANIC.match(text) or (panic and _PANIC_TAIL.match(text))):
                    panic = seen = True
                    continue
                if seen and not keep and text and _PANIC_TAIL.match(text):
                    panic = True  # a notice's frames after another thread's log line
                    continue
                panic = False
                dst.write(scrub_bytes(text) + b"\n")
            if pending and not panic and not b"thread '".startswith(pending[:8]):
                dst.write(scrub_bytes(pending))
                pending = b""
        if pending:
            dst.write(scrub_bytes(pending))
    os.close(read)


