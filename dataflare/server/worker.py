"""The worker role: claim queued runs, run each as a ``dataflare run`` process, record it.

A run's process gets the workflow's revision as a file in the workflow's working directory
(relative paths of the workflow resolve there) and a recovery directory: one per workflow
when a source keeps its place from run to run (streaming, CDC, and incremental syncs,
bounded ones included: a new run resumes from the last snapshot, where the cursor is), one
per run for a workflow of full reads (removed when it succeeds). The server's run id is
the process's run id, so a run taken over after its worker died resumes as the same run.
The worker renews the run's lease while it runs, stores its output, stops it (SIGINT, then
SIGKILL after a grace period) when a stop is asked (and the run stops by itself if the
worker's process dies), retries a failed run per ``config.retry`` with backoff, and runs
the post-actions of every finished run, a run stopped while queued included. A run
resumed after its worker left it (a restart, a takeover) or retried adds up the counts of
its parts (records re-read from the last snapshot count in each).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dataflare import stopping
from dataflare.connectors.batching import RUN_ID_ENV
from dataflare.dsl_compiler import validate_text
from dataflare.post_actions import run_post_actions
from dataflare.server.store import NotFound, Run, Store, now

log = logging.getLogger(__name__)
LOG_LIMIT = 256 * 1024  # characters of a run's output kept in the store (the tail)


@dataclass(frozen=True)
class WorkerSettings:
    """Timing of a worker (short in tests)."""

    lease: timedelta = timedelta(seconds=30)
    heartbeat: float = 2.0
    poll: float = 0.2
    stop_grace: float = 30.0


def _data_dir_id(data_dir: Path) -> str:
    """The id of a data directory, made once: workers sharing it share their runs' state."""
    path = data_dir / "dataflare-data-dir-id"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x") as f:
            f.write(uuid.uuid4().hex[:12] + "\n")
    except FileExistsError:
        pass
    return path.read_text().strip()


class Worker:
    """Runs claimed runs one at a time until ``stop`` is set."""

    def __init__(self, store: Store, data_dir: Path, settings: WorkerSettings | None = None,
                 name: str | None = None) -> None:
        # absolute: the runs start in their work directory (a relative --data-dir is the cwd's)
        self.store, self.data_dir = store, Path(data_dir).resolve()
        self.settings = settings or WorkerSettings()
        self.place = _data_dir_id(self.data_dir)
        self.name = name or (f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                             f"@{self.place}")
        self.shutdown = threading.Event()
        self.actions: ThreadPoolExecutor | None = None  # where post-actions run (else inline)

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and run until ``stop``; a run in progress is stopped and put back in the queue.

        Post-actions run on a thread of their own, so a slow or failing webhook (retried)
        does not hold up the next run; the worker waits for them when it stops.
        """
        self.shutdown = stop
        with ThreadPoolExecutor(1, thread_name_prefix="post-actions") as pool:
            self.actions = pool
            try:
                while not stop.is_set():
                    try:
                        if not self.run_one():
                            stop.wait(self.settings.poll)
                    except Exception:  # noqa: BLE001 - the worker outlives a failed run
                        log.exception("worker %s: run failed", self.name)
                        stop.wait(self.settings.poll)
            finally:
                self.actions = None

    def run_one(self) -> bool:
        """Claim one run and carry it out; False when none was runnable.

        With no run to claim, a run stopped while queued gets its post-actions.
        """
        claimed = self.store.claim(self.name, self.settings.lease)
        if claimed is not None:
            self.execute(*claimed)
            return True
        stopped = self.store.take_stopped(self.name)
        if stopped is None:
            return False
        run, text = stopped
        wf = validate_text(text, f"{run.workflow}.yaml", dict(os.environ)).workflow
        if wf is not None and wf.post_actions:
            self._post_actions(wf, "stopped", run, None)
        return True

    def _own_state(self, recovery: Path, run: Run) -> str | None:
        """Keep ``recovery`` only if it is this workflow's, not a deleted one's of that id.

        Why the run cannot go on here, if so: the workflow's position is in another data
        directory.

        A workflow deleted and made again under its id is a new workflow: it would resume
        the old one's position (a sync into a new table would miss every row read before).
        The old state is set aside, named so, not removed. Server processes that do not
        share ``--data-dir`` each keep their own positions: a run here, after runs there,
        would read again what those read.
        """
        wid = run.workflow
        try:
            created = self.store.workflow(wid)["created_at"]
        except NotFound:
            return None
        since = datetime.fromisoformat(created)  # runs of a deleted one of the id are not
        last = next((r for r in self.store.runs(wid, limit=50) if r.id != run.id
                     and r.worker and r.summary is not None  # it ran (it has counts)
                     and r.created_at >= since), None)
        holder = last.worker or "" if last is not None else ""
        if last is not None and "@" in holder and holder.rpartition("@")[2] != self.place:
            return (f"workflow {wid!r} keeps its position (where its sources are) in the "
                    f"data directory of worker {holder!r} (run {last.id}), not in this "
                    f"one ({self.data_dir}): server processes must share --data-dir, or a "
                    "run here would read again what runs there read. If that directory is "
                    "lost, make the workflow again (delete it, then create it): it starts "
                    "afresh")
        marker = recovery / "dataflare-workflow-created"
        if marker.exists() and marker.read_text().strip() != created:
            aside = recovery.with_name(f"{recovery.name}.deleted-{uuid.uuid4().hex[:8]}")
            recovery.rename(aside)
            log.warning("workflow %r was made again: the deleted one's recovery state is "
                        "set aside in %s, and its runs start afresh", wid, aside)
        recovery.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            marker.write_text(created + "\n")
        return None

    def execute(self, run: Run, text: str) -> None:
        """Run ``run`` (workflow text ``text``) to its end and record the outcome."""
        env = dict(os.environ)
        v = validate_text(text, f"{run.workflow}.yaml", env)
        work = self.data_dir / "work" / run.workflow
        work.mkdir(parents=True, exist_ok=True)
        flow = work / f"{run.workflow}.r{run.revision}.yaml"
        flow.write_text(text)
        resumes = v.workflow is not None and any(
            src.runs_as() != "full" for src in v.workflow.sources.values())
        recovery = self.data_dir / "recovery" / run.workflow
        if resumes and (elsewhere := self._own_state(recovery, run)) is not None:
            log.error("run %s: %s", run.id, elsewhere)
            self.store.finish(run.id, self.name, "failed", None, elsewhere, elsewhere)
            if v.workflow is not None and v.workflow.post_actions:
                self._post_actions(v.workflow, "failed", run, None)
            return
        if not resumes:
            recovery = recovery / run.id
        recovery.mkdir(parents=True, exist_ok=True)
        (recovery / "dataflare-run-id").write_text(run.id + "\n")
        summary_file = work / f"{run.id}.summary.json"
        progress_file = work / f"{run.id}.progress.json"
        for part_file in (summary_file, progress_file):  # an earlier part's: in run.summary
            part_file.unlink(missing_ok=True)
        earlier = run.summary  # the counts of the run's earlier parts, if any
        out_file = work / f"{run.id}.log"
        cmd = [sys.executable, "-m", "dataflare", "run", str(flow), "--recovery-dir",
               str(recovery), "--summary-json", str(summary_file), "--no-post-actions",
               "--progress-json", str(progress_file)]
        env[RUN_ID_ENV] = run.id
        env[stopping.PARENT_ENV] = str(os.getpid())  # a killed server stops its runs
        with out_file.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            stopping_since: float | None = None
            while True:
                try:
                    code = proc.wait(timeout=self.settings.heartbeat)
                    break
                except subprocess.TimeoutExpired:
                    pass
                stop = self.store.heartbeat(run.id, self.name, self.settings.lease,
                                            _tail(out_file),
                                            added(earlier, _read_json(progress_file)))
                if self.shutdown.is_set() and stopping_since is None:
                    stopping_since = time.monotonic()  # the server stops: leave the run
                    os.killpg(proc.pid, signal.SIGINT)
                elif stop and stopping_since is None:
                    stopping_since = time.monotonic()
                    os.killpg(proc.pid, signal.SIGINT)
                elif (stopping_since is not None
                      and time.monotonic() - stopping_since > self.settings.stop_grace):
                    os.killpg(proc.pid, signal.SIGKILL)
        output = _tail(out_file)
        summary = added(earlier, _read_json(summary_file))
        if self.shutdown.is_set() and code != 0:
            self.store.release(run.id, self.name, output, summary)  # another worker resumes it
            return
        status = "succeeded" if code == 0 else "stopped" if stopping_since else "failed"
        error = None if code == 0 else (summary or {}).get("error") or _last_error(output)
        if status == "stopped":
            error = None
        wf = v.workflow
        retry_at = None
        if status == "failed" and wf is not None and run.attempt < wf.config.run_attempts:
            b = wf.config.retry.backoff
            delay = min(b.max, b.initial * b.multiplier ** (run.attempt - 1))
            retry_at = now() + timedelta(seconds=delay)
        self.store.finish(run.id, self.name, status, summary, error, output, retry_at)
        if retry_at is None and status == "succeeded" and not resumes:
            shutil.rmtree(recovery, ignore_errors=True)
        if retry_at is None and wf is not None and wf.post_actions:
            self._post_actions(wf, status, run, summary)

    def _post_actions(self, wf: Any, status: str, run: Run, summary: dict[str, Any] | None
                      ) -> None:
        """Carry out a finished run's post-actions and record them (on their thread if any)."""
        inline = self.actions is None

        def act() -> None:
            try:
                results = run_post_actions(wf, status, run.id, summary,
                                           self._trigger(run, inline))
                self.store.record_actions(run.id, results)
            except Exception:  # noqa: BLE001 - the worker outlives a failed post-action
                log.exception("worker %s: post-actions of run %s failed", self.name, run.id)

        if self.actions is None:
            act()
        else:
            self.actions.submit(act)

    def _trigger(self, run: Run, inline: bool) -> Any:
        """A trigger of another workflow's run; ``inline``: this thread may carry it out."""

        def trigger(target: str, wait: bool) -> tuple[bool, str]:
            try:
                rid = self.store.start_run(target, f"workflow:{run.workflow}", "trigger",
                                           parent_run=run.id)
            except NotFound:
                return False, f"no workflow {target!r}"
            if not wait or rid is None:
                return True, f"run {rid} queued"
            while True:  # the triggered run is carried out by any worker (this one too)
                child = self.store.run(rid)
                if child.status in ("succeeded", "failed", "stopped"):
                    return child.status == "succeeded", f"run {rid} {child.status}"
                if self.shutdown.is_set():  # the server stops: do not hold it up
                    return False, f"run {rid} {child.status} when the server stopped"
                if not (inline and self.run_one()):
                    time.sleep(self.settings.poll)

        return trigger


def added(earlier: dict[str, Any] | None, part: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's summary from its earlier parts' (``earlier``) and its latest part's.

    Counts add up; the status and error are the latest part's; ``parts`` says how many.
    """
    if earlier is None or part is None:
        return part or earlier
    out = {**part, "parts": earlier.get("parts", 1) + 1}
    for key in ("duration_s", "total", "succeeded", "failed"):
        out[key] = _number(earlier.get(key)) + _number(part.get(key))
    out["duration_s"] = round(out["duration_s"], 3)
    steps: dict[str, dict[str, Any]] = {}
    for counts in (earlier.get("steps") or {}, part.get("steps") or {}):
        for step, these in counts.items():
            mine = steps.setdefault(step, {})
            for key, n in these.items():
                mine[key] = _number(mine.get(key)) + _number(n)
    out["steps"] = steps
    late: dict[str, Any] = dict(earlier.get("late_dropped") or {})
    for step, n in (part.get("late_dropped") or {}).items():
        late[step] = _number(late.get(step)) + _number(n)
    out["late_dropped"] = late
    quality: dict[str, list[dict[str, Any]]] = {}
    for checks in (earlier.get("quality") or {}, part.get("quality") or {}):
        for step, rules in checks.items():
            kept = {(r["field"], r["rule"]): r for r in quality.setdefault(step, [])}
            for rule in rules:
                seen = kept.get((rule["field"], rule["rule"]))
                if seen is None:
                    quality[step].append(dict(rule))
                else:
                    seen["checked"] += rule["checked"]
                    seen["failed"] += rule["failed"]
    out["quality"] = quality
    return out


def _number(value: Any) -> float | int:
    return value if isinstance(value, int | float) else 0


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - LOG_LIMIT))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _last_error(output: str) -> str | None:
    for line in reversed(output.splitlines()):
        if line.startswith("error: "):
            return line[len("error: "):]
    lines = [x for x in output.splitlines() if x.strip()]
    return lines[-1] if lines else "the run's process ended without a word"
