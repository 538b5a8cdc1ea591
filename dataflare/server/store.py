"""The server's store: workflows and their revisions, runs, schedules and the audit log.

One SQL database (a SQLite file at the edge, PostgreSQL when several server processes
share it) is the only thing the api, scheduler and worker roles share: they coordinate
through it alone. A scheduled instant is one row of ``runs`` (unique per workflow and
instant), so two schedulers can never fire it twice; a worker claims a queued run with
``FOR UPDATE SKIP LOCKED`` (SQLite serialises writers instead) and holds it by a lease
it renews, so a dead worker's run is taken over by another.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()


class UtcTime(sa.types.TypeDecorator[datetime]):
    """A time written in UTC, read back aware.

    SQLite keeps no offset: a time of another offset (a schedule's ``start_date`` at
    ``+08:00`` and the instants aligned to it) would be read back hours off.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """The time written: in UTC."""
        return None if value is None else _utc(value).astimezone(UTC)  # type: ignore[union-attr]

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """The time read: aware."""
        return _utc(value)


workflows = sa.Table(
    "workflows", metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(400), nullable=True),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("created_at", UtcTime(), nullable=False),
    sa.Column("updated_at", UtcTime(), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    # The last scheduled instant turned into a run (the scheduler's position).
    sa.Column("scheduled_until", UtcTime(), nullable=True),
)

revisions = sa.Table(
    "revisions", metadata,
    sa.Column("workflow_id", sa.String(200), sa.ForeignKey("workflows.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("yaml", sa.Text, nullable=False),
    sa.Column("author", sa.String(200), nullable=False),
    sa.Column("created_at", UtcTime(), nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("workflow_id", sa.String(200), sa.ForeignKey("workflows.id"), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("trigger", sa.String(20), nullable=False),  # manual|schedule|trigger|backfill
    sa.Column("scheduled_for", UtcTime(), nullable=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=1),
    sa.Column("created_at", UtcTime(), nullable=False),
    sa.Column("not_before", UtcTime(), nullable=False),
    sa.Column("started_at", UtcTime(), nullable=True),
    sa.Column("ended_at", UtcTime(), nullable=True),
    sa.Column("worker", sa.String(200), nullable=True),
    sa.Column("lease_until", UtcTime(), nullable=True),
    sa.Column("stop_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("summary", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("log", sa.Text, nullable=True),
    sa.Column("actions", sa.Text, nullable=True),  # post-action deliveries (JSON list)
    sa.Column("parent_run", sa.String(32), nullable=True),
    sa.UniqueConstraint("workflow_id", "scheduled_for", name="one_run_per_instant"),
)
sa.Index("runs_by_status", runs.c.status, runs.c.not_before)
sa.Index("runs_by_workflow", runs.c.workflow_id, runs.c.created_at)

audit = sa.Table(
    "audit", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UtcTime(), nullable=False),
    sa.Column("user", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("revision", sa.Integer, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
)

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "stopped")


def now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they are UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def default_url(directory: str | Path = ".dataflare") -> str:
    """The edge store: a SQLite file under ``directory``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / 'server.sqlite3').resolve()}"


def engine_for(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///...`` or ``postgresql://...``, driven by psycopg 3)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite(dbapi: Any, _record: Any) -> None:  # pragma: no cover - driver hook
            dbapi.execute("PRAGMA journal_mode=WAL")
            dbapi.execute("PRAGMA foreign_keys=ON")
            dbapi.isolation_level = None  # SQLAlchemy's begin() issues BEGIN

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:  # pragma: no cover - driver hook
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # one writer at a time, no upgrade races

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def migrate(url: str) -> None:
    """Bring the store's schema to the newest revision (Alembic)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "dataflare.server:migrations")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


@dataclass(frozen=True)
class Run:
    """A run as the API shows it."""

    id: str
    workflow: str
    revision: int
    trigger: str
    status: str
    attempt: int
    scheduled_for: datetime | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    summary: dict[str, Any] | None
    error: str | None
    actions: list[dict[str, Any]]
    worker: str | None
    parent_run: str | None

    def as_json(self) -> dict[str, Any]:
        """The run as JSON (times as ISO-8601)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        return out


def schedule_block(text: str) -> Any:
    """The ``schedule`` block of a workflow text as data (``None`` without one)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    wf = data.get("workflow") if isinstance(data, dict) else None
    return wf.get("schedule") if isinstance(wf, dict) else None


def _run(row: Any) -> Run:
    return Run(
        id=row.id, workflow=row.workflow_id, revision=row.revision, trigger=row.trigger,
        status=row.status, attempt=row.attempt, scheduled_for=row.scheduled_for,
        created_at=row.created_at, started_at=row.started_at,
        ended_at=row.ended_at, summary=json.loads(row.summary) if row.summary else None,
        error=row.error, actions=json.loads(row.actions) if row.actions else [],
        worker=row.worker, parent_run=row.parent_run,
    )


class Conflict(Exception):
    """A change the store refuses (an id taken, a run already over)."""


class NotFound(Exception):
    """No such workflow, revision or run."""


class Store:
    """The operations of the three roles on one database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)
        self.postgres = self.engine.dialect.name == "postgresql"

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One transaction."""
        with self.engine.begin() as conn:
            yield conn

    # -- workflows -------------------------------------------------------------------

    def put_workflow(self, wid: str, name: str | None, text: str, user: str,
                     create: bool) -> int:
        """Store a new revision of workflow ``wid`` (creating it when ``create``).

        The same text and name again is no new revision: its number is the current one's.
        """
        at = now()
        with self.tx() as c:
            row = c.execute(sa.select(workflows).where(workflows.c.id == wid)
                            .with_for_update()).first()
            if create and row is not None and not row.deleted:
                msg = f"workflow {wid!r} exists: update it with PUT"
                raise Conflict(msg)
            if not create and (row is None or row.deleted):
                msg = f"no workflow {wid!r}"
                raise NotFound(msg)
            number = (row.revision + 1) if row is not None else 1
            if row is None:
                c.execute(workflows.insert().values(
                    id=wid, name=name, revision=number, created_at=at, updated_at=at,
                    deleted=False))
            else:
                values: dict[str, Any] = {"name": name, "revision": number, "updated_at": at,
                                          "deleted": False}
                old = c.execute(sa.select(revisions.c.yaml).where(
                    (revisions.c.workflow_id == wid)
                    & (revisions.c.number == row.revision))).scalar()
                if not row.deleted and old == text and row.name == name:
                    return int(row.revision)  # unchanged (a deploy applied again)
                if row.deleted or schedule_block(str(old)) != schedule_block(text):
                    # A schedule set (or a workflow made again) now has no missed instants.
                    values["scheduled_until"] = at
                if row.deleted:  # made again: a new workflow (its runs keep no old state)
                    values["created_at"] = at
                c.execute(workflows.update().where(workflows.c.id == wid).values(**values))
            c.execute(revisions.insert().values(workflow_id=wid, number=number, yaml=text,
                                                author=user, created_at=at))
            created = row is None or row.deleted
            self._audit(c, user, "workflow.create" if created else "workflow.update",
                        wid, number)
            return number

    def delete_workflow(self, wid: str, user: str) -> None:
        """Mark a workflow deleted (its revisions and runs stay, for the record).

        Its queued runs are stopped and its running one is asked to stop: a deleted
        workflow runs no more.
        """
        with self.tx() as c:
            done = c.execute(workflows.update().where(
                (workflows.c.id == wid) & ~workflows.c.deleted).values(deleted=True)).rowcount
            if not done:
                msg = f"no workflow {wid!r}"
                raise NotFound(msg)
            mine = runs.c.workflow_id == wid
            active = c.execute(sa.select(runs.c.id, runs.c.revision).where(
                mine & runs.c.status.in_(("queued", "running"))).order_by(runs.c.created_at)).all()
            c.execute(runs.update().where(mine & (runs.c.status == "queued")).values(
                status="stopped", stop_requested=True, ended_at=now(), error=None))
            c.execute(runs.update().where(mine & (runs.c.status == "running"))
                      .values(stop_requested=True))
            self._audit(c, user, "workflow.delete", wid, None)
            for rid, revision in active:  # every run stop is an audit record
                self._audit(c, user, "run.stop", wid, revision,
                            {"run": rid, "reason": "workflow deleted"})

    def workflows(self) -> list[dict[str, Any]]:
        """Every live workflow: id, name, revision, times."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(workflows).where(~workflows.c.deleted)
                             .order_by(workflows.c.id)).all()
        return [{"id": r.id, "name": r.name, "revision": r.revision,
                 "created_at": r.created_at.isoformat(),
                 "updated_at": r.updated_at.isoformat()} for r in rows]

    def workflow(self, wid: str) -> dict[str, Any]:
        """One live workflow with its current YAML."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(workflows).where(
                (workflows.c.id == wid) & ~workflows.c.deleted)).first()
            if r is None:
                msg = f"no workflow {wid!r}"
                raise NotFound(msg)
            text = c.execute(sa.select(revisions.c.yaml).where(
                (revisions.c.workflow_id == wid) & (revisions.c.number == r.revision))).scalar()
        return {"id": r.id, "name": r.name, "revision": r.revision, "yaml": text,
                "created_at": r.created_at.isoformat(),
                "updated_at": r.updated_at.isoformat()}

    def revisions(self, wid: str) -> list[dict[str, Any]]:
        """The revisions of a workflow, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(revisions.c.number, revisions.c.author,
                                       revisions.c.created_at)
                             .where(revisions.c.workflow_id == wid)
                             .order_by(revisions.c.number)).all()
        if not rows:
            msg = f"no workflow {wid!r}"
            raise NotFound(msg)
        return [{"number": r.number, "author": r.author,
                 "created_at": r.created_at.isoformat()} for r in rows]

    def revision(self, wid: str, number: int) -> str:
        """The YAML of one revision."""
        with self.engine.connect() as c:
            text = c.execute(sa.select(revisions.c.yaml).where(
                (revisions.c.workflow_id == wid) & (revisions.c.number == number))).scalar()
        if text is None:
            msg = f"no revision {number} of workflow {wid!r}"
            raise NotFound(msg)
        return str(text)

    def scheduled(self) -> list[tuple[str, int, str, datetime | None, datetime]]:
        """Live workflows: (id, revision, current YAML, scheduled_until, created_at)."""
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(workflows.c.id, workflows.c.revision, revisions.c.yaml,
                          workflows.c.scheduled_until, workflows.c.created_at)
                .join(revisions, (revisions.c.workflow_id == workflows.c.id)
                      & (revisions.c.number == workflows.c.revision))
                .where(~workflows.c.deleted)).all()
        return [(r.id, r.revision, r.yaml, r.scheduled_until,
                 r.created_at) for r in rows]

    # -- runs ------------------------------------------------------------------------

    def start_run(self, wid: str, user: str, trigger: str = "manual",
                  scheduled_for: datetime | None = None, parent_run: str | None = None,
                  conn: Connection | None = None) -> str | None:
        """Queue a run of the workflow's current revision; its id (None: instant taken)."""
        if conn is None:
            with self.tx() as c:
                return self.start_run(wid, user, trigger, scheduled_for, parent_run, c)
        c = conn
        row = c.execute(sa.select(workflows.c.revision).where(
            (workflows.c.id == wid) & ~workflows.c.deleted)).first()
        if row is None:
            msg = f"no workflow {wid!r}"
            raise NotFound(msg)
        rid = uuid.uuid4().hex
        at = now()
        values = dict(id=rid, workflow_id=wid, revision=row.revision, trigger=trigger,
                      scheduled_for=scheduled_for, status="queued", attempt=1, created_at=at,
                      not_before=at, stop_requested=False, parent_run=parent_run)
        if scheduled_for is not None:
            # A savepoint: a taken instant (another scheduler) leaves the transaction usable.
            try:
                with c.begin_nested():
                    c.execute(runs.insert().values(**values))
            except sa.exc.IntegrityError:
                return None
        else:
            c.execute(runs.insert().values(**values))
        self._audit(c, user, "run.start", wid, row.revision,
                    {"run": rid, "trigger": trigger,
                     "scheduled_for": scheduled_for.isoformat() if scheduled_for else None})
        return rid

    def queued_run(self, wid: str, conn: Connection) -> tuple[str, datetime | None] | None:
        """``(id, scheduled_for)`` of a run of workflow ``wid`` waiting in the queue, if any."""
        row = conn.execute(sa.select(runs.c.id, runs.c.scheduled_for).where(
            (runs.c.workflow_id == wid) & (runs.c.status == "queued")).limit(1)).first()
        return None if row is None else (row.id, row.scheduled_for)

    def set_scheduled_until(self, c: Connection, wid: str, until: datetime) -> None:
        """Move the scheduler's position of a workflow forward (never back)."""
        c.execute(workflows.update().where(
            (workflows.c.id == wid)
            & ((workflows.c.scheduled_until.is_(None))
               | (workflows.c.scheduled_until < until))).values(scheduled_until=until))

    def run(self, rid: str) -> Run:
        """One run."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(runs).where(runs.c.id == rid)).first()
        if row is None:
            msg = f"no run {rid!r}"
            raise NotFound(msg)
        return _run(row)

    def runs(self, workflow: str | None = None, status: str | None = None,
             limit: int = 100) -> list[Run]:
        """Runs, newest first, filtered by workflow and status."""
        q = sa.select(runs).order_by(runs.c.created_at.desc()).limit(limit)
        if workflow:
            q = q.where(runs.c.workflow_id == workflow)
        if status:
            q = q.where(runs.c.status == status)
        with self.engine.connect() as c:
            return [_run(r) for r in c.execute(q).all()]

    def log(self, rid: str) -> str:
        """The captured output of a run (so far)."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(runs.c.log).where(runs.c.id == rid)).first()
        if row is None:
            msg = f"no run {rid!r}"
            raise NotFound(msg)
        return row.log or ""

    def request_stop(self, rid: str, user: str) -> Run:
        """Ask a run to stop: a queued one at once, a running one at its worker's next beat."""
        with self.tx() as c:
            row = c.execute(sa.select(runs).where(runs.c.id == rid).with_for_update()).first()
            if row is None:
                msg = f"no run {rid!r}"
                raise NotFound(msg)
            if row.status in FINAL:
                msg = f"run {rid} is already {row.status}"
                raise Conflict(msg)
            values: dict[str, Any] = {"stop_requested": True}
            if row.status == "queued":  # the error of an attempt before a retry goes too
                values.update(status="stopped", ended_at=now(), error=None)
            c.execute(runs.update().where(runs.c.id == rid).values(**values))
            self._audit(c, user, "run.stop", row.workflow_id, row.revision, {"run": rid})
        return self.run(rid)

    def claim(self, worker: str, lease: timedelta) -> tuple[Run, str] | None:
        """Take the oldest runnable queued run (and its YAML), or an expired lease's run.

        A run is runnable when its ``not_before`` has come and no other run of its workflow
        is running (runs of one workflow never overlap).
        """
        at = now()
        with self.tx() as c:
            if self.postgres:  # one claim at a time: the next one sees this one's run busy
                c.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('dataflare.claim'))"))
            # Runs whose worker died: back to the queue, the same run id and attempt.
            c.execute(runs.update().where(
                (runs.c.status == "running") & (runs.c.lease_until < at)).values(
                status="queued", worker=None, lease_until=None))
            busy = sa.select(runs.c.workflow_id).where(runs.c.status == "running")
            q = (sa.select(runs.c.id).where(
                (runs.c.status == "queued") & (runs.c.not_before <= at)
                & runs.c.workflow_id.not_in(busy))
                .order_by(runs.c.not_before, runs.c.created_at).limit(1))
            if self.postgres:
                q = q.with_for_update(skip_locked=True)
            rid = c.execute(q).scalar()
            if rid is None:
                return None
            c.execute(runs.update().where(runs.c.id == rid).values(
                status="running", worker=worker, lease_until=at + lease,
                started_at=sa.func.coalesce(runs.c.started_at, at)))
            row = c.execute(sa.select(runs).where(runs.c.id == rid)).one()
            text = c.execute(sa.select(revisions.c.yaml).where(
                (revisions.c.workflow_id == row.workflow_id)
                & (revisions.c.number == row.revision))).scalar()
            return _run(row), str(text)

    def take_stopped(self, worker: str) -> tuple[Run, str] | None:
        """Take a run stopped while queued (and its YAML), to carry out its post-actions.

        Such a run never reached a worker (``worker`` is empty, as no finished run's is);
        taking it names the worker, so one worker carries them out.
        """
        with self.tx() as c:
            rid = c.execute(sa.select(runs.c.id).where(
                (runs.c.status == "stopped") & runs.c.worker.is_(None))
                .order_by(runs.c.ended_at).limit(1)).scalar()
            if rid is None:
                return None
            took = c.execute(runs.update().where((runs.c.id == rid) & runs.c.worker.is_(None))
                             .values(worker=worker))
            if took.rowcount != 1:  # another worker took it first
                return None
            row = c.execute(sa.select(runs).where(runs.c.id == rid)).one()
            text = c.execute(sa.select(revisions.c.yaml).where(
                (revisions.c.workflow_id == row.workflow_id)
                & (revisions.c.number == row.revision))).scalar()
            return _run(row), str(text)

    def heartbeat(self, rid: str, worker: str, lease: timedelta, log: str,
                  progress: dict[str, Any] | None = None) -> bool:
        """Renew a run's lease, store its output and counts so far; whether a stop was asked."""
        values: dict[str, Any] = {"lease_until": now() + lease, "log": log}
        if progress is not None:
            values["summary"] = json.dumps(progress)
        with self.tx() as c:
            c.execute(runs.update().where((runs.c.id == rid) & (runs.c.worker == worker))
                      .values(**values))
            return bool(c.execute(sa.select(runs.c.stop_requested)
                                  .where(runs.c.id == rid)).scalar())

    def finish(self, rid: str, worker: str, status: str, summary: dict[str, Any] | None,
               error: str | None, log: str, retry_at: datetime | None = None) -> None:
        """Record a run's end; with ``retry_at`` the run goes back to the queue instead."""
        with self.tx() as c:
            values: dict[str, Any] = {
                "summary": json.dumps(summary) if summary is not None else None,
                "error": error, "log": log, "lease_until": None}
            if retry_at is not None:
                values.update(status="queued", worker=None, not_before=retry_at,
                              attempt=runs.c.attempt + 1)
            else:
                values.update(status=status, ended_at=now())
            c.execute(runs.update().where((runs.c.id == rid) & (runs.c.worker == worker))
                      .values(**values))

    def release(self, rid: str, worker: str, log: str,
                summary: dict[str, Any] | None = None) -> None:
        """Put a run its worker had to leave (shutdown) back in the queue, as the same run.

        ``summary``: its counts so far, when known (the next part adds to them).
        """
        values: dict[str, Any] = {"status": "queued", "worker": None, "lease_until": None,
                                  "log": log}
        if summary is not None:
            values["summary"] = json.dumps(summary)
        with self.tx() as c:
            c.execute(runs.update().where((runs.c.id == rid) & (runs.c.worker == worker))
                      .values(**values))

    def record_actions(self, rid: str, actions: list[dict[str, Any]]) -> None:
        """Store what a run's post-actions did."""
        with self.tx() as c:
            c.execute(runs.update().where(runs.c.id == rid)
                      .values(actions=json.dumps(actions, default=str)))

    # -- audit -----------------------------------------------------------------------

    def _audit(self, c: Connection, user: str, action: str, target: str,
               revision: int | None, detail: dict[str, Any] | None = None) -> None:
        c.execute(audit.insert().values(at=now(), user=user, action=action, target=target,
                                        revision=revision,
                                        detail=json.dumps(detail) if detail else None))

    def audit(self, limit: int = 200, target: str | None = None) -> list[dict[str, Any]]:
        """Audit records, newest first."""
        q = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
        if target:
            q = q.where(audit.c.target == target)
        with self.engine.connect() as c:
            return [{"id": r.id, "at": r.at.isoformat(),
                     "user": r.user, "action": r.action, "target": r.target,
                     "revision": r.revision,
                     "detail": json.loads(r.detail) if r.detail else None}
                    for r in c.execute(q).all()]
