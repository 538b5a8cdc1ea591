"""The HTTP API (``/api/v1``), the probes and the console, on FastAPI.

Workflows are submitted as YAML text (``text/yaml``, or JSON ``{"yaml": ...}``), validated
as ``dataflare validate`` does (422 with the located problems) and stored as a new revision;
the stored text keeps its ``${VAR}`` references, whose values come from the environment of
the workers that run it. Every endpoint but the probes and the console page needs
``Authorization: Bearer <token>``: 401 without a valid token, 403 without the permission.
"""


import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, field_validator

from dataflare import registry
from dataflare.dsl_compiler import Validated, validate_text
from dataflare.dsl_compiler.models import Schedule, check_workflow_id
from dataflare.server.auth import Access, User
from dataflare.server.scheduler import Scheduler, next_instants, read_schedule, schedule_of
from dataflare.server.store import ACTIVE, FINAL, Conflict, NotFound, Store, now

REQUESTS = Counter("dataflare_api_requests", "API requests.", ["method", "status"])
LATENCY = Histogram("dataflare_api_seconds", "API request latency.", ["method"])


class Problem(BaseModel):
    """A located problem of a submitted workflow."""

    line: int = Field(description="Line, from 1.")
    column: int = Field(description="Column, from 1.")
    path: str = Field(description="Component path, e.g. transformations.clean.config.")
    message: str = Field(description="What is wrong.")
    severity: str = Field(description="error or warning.")


class Backfill(BaseModel):
    """A date range to run a workflow's schedule over (a time without a zone is UTC)."""

    start: datetime = Field(description="First instant (inclusive).")
    end: datetime = Field(description="Last instant (inclusive).")

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _validated(text: str, name: str) -> Validated:
    # A variable the server's environment lacks is a warning: workers may have it.
    return validate_text(text, name, dict(os.environ))


def _never_fires(schedule: Schedule | None) -> bool:
    """Whether a time schedule has no instant to come (ten years ahead at most)."""
    if schedule is None or schedule.type == "event":
        return False
    at = now()
    return not next_instants(schedule, 1, max(at, schedule.start_date or at) if
                             schedule.type != "once" else at)


def _problems(v: Validated) -> list[dict[str, Any]]:
    return [{"line": p.line, "column": p.col, "path": p.path, "message": p.message,
             "severity": "error" if p.is_error(False) else "warning"} for p in v.problems]


class Invalid(Exception):  # noqa: N818 - the 422 answer, as NotFound is the 404
    """A workflow text refused: answered 422 ``{"problems": [...]}`` (CONTRACT §11)."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__(problems)
        self.problems = problems


def create_app(store: Store, access: Access, scheduler: Scheduler | None = None) -> FastAPI:
    """The server's ASGI application over ``store``."""
    app = FastAPI(title="DataFlare", version="1", docs_url="/api/docs",
                  openapi_url="/openapi.json")
    sched = scheduler or Scheduler(store)

    @app.middleware("http")
    async def _metrics(request: Request, call_next: Callable[..., Any]) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        LATENCY.labels(request.method).observe(time.perf_counter() - start)
        REQUESTS.labels(request.method, str(response.status_code)).inc()
        return response

    def require(permission: str) -> Callable[..., User]:
        def check(request: Request) -> User:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            user = access.authenticate(token.strip() if scheme.lower() == "bearer" else None)
            if user is None:
                raise HTTPException(401, "a valid 'Authorization: Bearer <token>' is needed",
                                    headers={"WWW-Authenticate": "Bearer"})
            if not user.may(permission):
                raise HTTPException(403, f"user {user.name!r} lacks {permission}")
            return user

        return check

    Read = Annotated[User, Depends(require("workflow:read"))]
    Create = Annotated[User, Depends(require("workflow:create"))]
    Update = Annotated[User, Depends(require("workflow:update"))]
    Delete = Annotated[User, Depends(require("workflow:delete"))]
    Execute = Annotated[User, Depends(require("workflow:execute"))]
    Connectors = Annotated[User, Depends(require("connector:read"))]
    Audit = Annotated[User, Depends(require("system:audit"))]

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(Invalid)
    async def _invalid(_request: Request, exc: Invalid) -> JSONResponse:
        return JSONResponse({"problems": exc.problems}, status_code=422)

    async def _yaml(request: Request) -> str:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            import json

            try:
                text = json.loads(body)["yaml"]
            except (ValueError, KeyError, TypeError) as exc:
                raise HTTPException(422, 'a JSON body is {"yaml": "<workflow text>"}') from exc
            if not isinstance(text, str):
                raise HTTPException(422, 'a JSON body is {"yaml": "<workflow text>"}')
        else:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HTTPException(422, "the workflow is not UTF-8 text") from exc
        if "\x00" in text:  # no store's text column holds it
            raise HTTPException(422, "the workflow text holds a NUL character")
        return text

    def _stored_schedule(wid: str) -> Schedule | None:
        """The schedule of workflow ``wid`` as stored (an unchanged one is kept as it is)."""
        try:
            return schedule_of(store.workflow(wid)["yaml"])
        except NotFound:
            return None

    def _check(text: str, wid: str | None) -> tuple[str, str | None]:
        v = _validated(text, f"{wid or 'workflow'}.yaml")
        errors = v.errors()
        if not errors and v.workflow is not None and not (wid or v.workflow.id):
            raise Invalid([{
                "line": 1, "column": 1, "path": "workflow.id", "severity": "error",
                "message": "a stored workflow needs 'id'"}])
        if errors or v.workflow is None:
            raise Invalid(_problems(v))
        wf = v.workflow
        if ("workflow", "id") in v.document.templates:
            raise Invalid([{
                "line": 1, "column": 1, "path": "workflow.id", "severity": "error",
                "message": "a stored workflow's id is written out: ${...} in it would take "
                           "a value of the server's"}])
        if wid is not None and wf.id and wf.id != wid:
            raise Invalid([{
                "line": 1, "column": 1, "path": "workflow.id", "severity": "error",
                "message": f"the text's id {wf.id!r} is not the workflow's id {wid!r}"}])
        target = wid or wf.id
        assert target is not None
        try:
            check_workflow_id(target)  # the URL's id (the text's was checked by validation)
        except ValueError as exc:
            raise Invalid([{"line": 1, "column": 1, "path": "workflow.id",
                            "severity": "error", "message": str(exc)}]) from None
        if _never_fires(wf.schedule) and (wid is None or wf.schedule != _stored_schedule(wid)):
            assert wf.schedule is not None
            said = ("its start_date is past" if wf.schedule.type == "once" else
                    "no instant in the next ten years" + (
                        " before its end_date" if wf.schedule.end_date else ""))
            raise Invalid([{
                "line": 1, "column": 1, "path": "workflow.schedule", "severity": "error",
                "message": f"the schedule never fires ({said})"}])
        _check_trigger_cycle(store, target, wf)
        # The name as written: its ${VAR} and ${file:...} are the workers' values, and
        # the server's would be shown to every viewer.
        return target, v.document.templates.get(("workflow", "name"), wf.name)

    openapi_yaml = {"requestBody": {"required": True, "content": {
        "text/yaml": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "object", "properties": {
            "yaml": {"type": "string"}}, "required": ["yaml"]}}}}}

    @app.post("/api/v1/workflows", status_code=201, openapi_extra=openapi_yaml,
              responses={422: {"description": "Invalid workflow: located problems."}})
    async def create_workflow(request: Request, user: Create) -> dict[str, Any]:
        """Store a new workflow from its YAML text (revision 1)."""
        text = await _yaml(request)
        wid, name = _check(text, None)
        number = store.put_workflow(wid, name, text, user.name, create=True)
        return {"id": wid, "revision": number}

    @app.get("/api/v1/workflows")
    def list_workflows(_user: Read) -> list[dict[str, Any]]:
        """Every workflow with its current revision."""
        return store.workflows()

    @app.get("/api/v1/workflows/{wid}")
    def get_workflow(wid: str, _user: Read) -> dict[str, Any]:
        """One workflow, its current YAML, schedule and next fire times."""
        wf = store.workflow(wid)
        sched, problem = read_schedule(wf["yaml"])
        if problem is not None:  # stored by an earlier version: not scheduled, said so
            wf["schedule_error"] = problem
        wf["schedule"] = sched.model_dump(mode="json") if sched else None
        wf["next_runs"] = ([t.isoformat() for t in next_instants(sched)]
                           if sched and sched.type != "event" else [])
        return wf

    @app.put("/api/v1/workflows/{wid}", openapi_extra=openapi_yaml)
    async def update_workflow(wid: str, request: Request, user: Update) -> dict[str, Any]:
        """Store a new revision of a workflow."""
        text = await _yaml(request)
        _, name = _check(text, wid)
        return {"id": wid, "revision": store.put_workflow(wid, name, text, user.name,
                                                           create=False)}

    @app.delete("/api/v1/workflows/{wid}", status_code=204)
    def delete_workflow(wid: str, user: Delete) -> Response:
        """Delete a workflow (its revisions, runs and audit stay)."""
        store.delete_workflow(wid, user.name)
        return Response(status_code=204)

    @app.get("/api/v1/workflows/{wid}/revisions")
    def list_revisions(wid: str, _user: Read) -> list[dict[str, Any]]:
        """The revisions of a workflow."""
        return store.revisions(wid)

    @app.get("/api/v1/workflows/{wid}/revisions/{number}")
    def get_revision(wid: str, number: Annotated[int, Path(ge=1, le=2**31 - 1)],
                     _user: Read) -> dict[str, Any]:
        """The YAML of one revision."""
        return {"id": wid, "revision": number, "yaml": store.revision(wid, number)}

    @app.get("/api/v1/workflows/{wid}/graph")
    def graph(wid: str, _user: Read, format: str = "mermaid") -> PlainTextResponse:  # noqa: A002
        """The workflow's DAG as Mermaid, dot or SVG."""
        from dataflare.dsl_compiler.diagram import render

        if format not in ("mermaid", "dot", "svg"):
            raise HTTPException(422, "format is mermaid, dot or svg")
        v = _validated(store.workflow(wid)["yaml"], f"{wid}.yaml")
        media = "image/svg+xml" if format == "svg" else "text/plain"
        return PlainTextResponse(render(v, format), media_type=media)

    @app.post("/api/v1/workflows/{wid}/runs", status_code=201)
    def start_run(wid: str, user: Execute) -> dict[str, Any]:
        """Queue a run of the workflow's current revision."""
        rid = store.start_run(wid, user.name)
        assert rid is not None
        return store.run(rid).as_json()

    @app.post("/api/v1/workflows/{wid}/backfill", status_code=201)
    def backfill(wid: str, body: Annotated[Backfill, Body()], user: Execute) -> dict[str, Any]:
        """One run per instant of the workflow's schedule in a date range."""
        if body.end < body.start:
            raise HTTPException(422, "end is before start")
        try:
            ids = sched.backfill(wid, body.start, body.end, user.name)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"runs": ids}

    @app.get("/api/v1/workflows/{wid}/discover/{source}")
    def discover(wid: str, source: str, _user: Execute) -> Any:
        """What a source of a stored workflow reads (tables and columns, or a schema).

        It reads the source, with the server's credentials and files, as a run does: so
        it needs ``workflow:execute`` (a file's first line would show a viewer its text).
        """
        from dataflare.connectors.schema import discover as run_discover
        from dataflare.dsl_compiler.compiler import component_context

        v = validate_text(store.workflow(wid)["yaml"], f"{wid}.yaml", dict(os.environ))
        if v.errors(for_run=True) or v.workflow is None:
            raise Invalid(_problems(v))
        if source not in v.workflow.sources:
            raise HTTPException(404, f"no source {source!r} in workflow {wid!r}")
        try:
            return run_discover(component_context(v, source))
        except Exception as exc:  # noqa: BLE001 - the source's own error, as the CLI shows it
            text = str(exc)  # the connectors' own errors name the source already
            prefix = f"source '{source}': "
            named = text.startswith((prefix, f"step '{source}': "))
            raise HTTPException(502, text if named else prefix + text) from exc

    @app.get("/api/v1/runs")
    def list_runs(_user: Read, workflow: str | None = None, status: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """Runs, newest first (filters: workflow, status)."""
        if status is not None and status not in (*ACTIVE, *FINAL):
            raise HTTPException(422, f"status {status!r} is none of "
                                     f"{', '.join((*ACTIVE, *FINAL))}")
        return [r.as_json() for r in store.runs(workflow, status, max(1, min(limit, 1000)))]

    @app.get("/api/v1/runs/{rid}")
    def get_run(rid: str, _user: Read) -> dict[str, Any]:
        """One run: status, times, summary, post-actions, error."""
        return store.run(rid).as_json()

    @app.post("/api/v1/runs/{rid}/stop")
    def stop_run(rid: str, user: Execute) -> dict[str, Any]:
        """Stop a run (a queued one at once, a running one gracefully)."""
        return store.request_stop(rid, user.name).as_json()

    @app.get("/api/v1/runs/{rid}/logs")
    def run_logs(rid: str, _user: Read) -> PlainTextResponse:
        """The run's output so far."""
        return PlainTextResponse(store.log(rid))

    @app.get("/api/v1/connectors")
    def connectors(_user: Connectors) -> list[dict[str, Any]]:
        """Every component type with its config's JSON Schema."""
        return [{"kind": s.kind, "type": s.type, "description": s.description,
                 "available": s.available, "schema": s.config.model_json_schema()}
                for kind in registry.KINDS for s in registry.specs(kind)]

    @app.get("/api/v1/audit")
    def audit(_user: Audit, target: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
        """Audit records (who, when, what, which revision), newest first."""
        return store.audit(max(1, min(limit, 1000)), target)

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    def ready() -> JSONResponse:
        try:
            with store.engine.connect() as c:
                c.exec_driver_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "store unreachable",
                                 "error": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def console() -> HTMLResponse:
        return HTMLResponse(files("dataflare.server").joinpath("console.html").read_text())

    return app


def _check_trigger_cycle(store: Store, wid: str, wf: Any) -> None:
    """Refuse a workflow whose triggers lead back to itself through stored workflows."""
    def targets(post_actions: Any) -> list[str]:
        return [str(a.config.get("workflow")) for a in post_actions
                if a.type == "trigger" and a.config.get("workflow")]

    graph: dict[str, list[str]] = {}
    for other in store.workflows():
        if other["id"] == wid:
            continue
        v = _validated(store.workflow(other["id"])["yaml"], "stored.yaml")
        if v.workflow is not None:
            graph[other["id"]] = targets(v.workflow.post_actions)
    graph[wid] = targets(wf.post_actions)
    path = [wid]

    def visit(node: str, seen: set[str]) -> None:
        for nxt in graph.get(node, []):
            if nxt == wid:
                chain = " -> ".join([*path, wid])
                raise Invalid([{
                    "line": 1, "column": 1, "path": "workflow.post_actions",
                    "severity": "error", "message": f"the triggers form a cycle: {chain}"}])
            if nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                visit(nxt, seen)
                path.pop()

    visit(wid, {wid})
