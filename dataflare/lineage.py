"""Lineage: the datasets a workflow reads and writes, its column lineage, OpenLineage events.

A connector type names the datasets a component of its type reads or writes with a hook
registered beside its builder (``@source(..., datasets=hook)``), using OpenLineage's naming
(a namespace such as ``postgres://host:5432`` or ``kafka://broker:9092``, a name such as
``db.schema.table`` or a topic); credentials never appear. A component whose type names no
dataset (a generator, stdout) stands as a dataset of the workflow itself
(``dataflare://<workflow>``).

Column lineage comes from the type flow (:mod:`dataflare.dsl_compiler.types`): every field
a destination receives carries the source fields it was computed from.

``dataflare lineage WORKFLOW...`` prints it all as Mermaid, DOT or JSON; several files show
how workflows chain through the datasets they share. ``dataflare run --openlineage-url URL``
(or ``--openlineage-file FILE``) emits OpenLineage run events (START, then COMPLETE or FAIL)
with ``openlineage-python`` (``pip install 'dataflare[lineage]'``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from dataflare.dsl_compiler.validate import Validated

PRODUCER = "https://github.com/dataflare/dataflare"
JOB_NAMESPACE = "dataflare"


@dataclass(frozen=True, order=True)
class Dataset:
    """A dataset as OpenLineage names it: a namespace (where) and a name (what)."""

    namespace: str
    name: str

    @property
    def id(self) -> str:
        """``namespace/name`` (``file:/path``), the dataset's key in the lineage output."""
        if "://" not in self.namespace:  # file:/abs/path
            return f"{self.namespace}:{self.name}"
        return f"{self.namespace}{'' if self.name.startswith('/') else '/'}{self.name}"


DatasetsHook = Callable[[Any, Path], list[Dataset]]
"""A connector type's hook: its config and the workflow's directory -> its datasets."""


# Naming helpers for connector hooks --------------------------------------------------------

def _netloc(host: str | None, port: int | None) -> str:
    host = host or "localhost"
    return f"{host}:{port}" if port else host


def _secret(value: Any) -> str:
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter else value or "")


def _dsn_parts(dsn: str) -> dict[str, Any]:
    """``host``, ``port`` and ``dbname`` of a URL or a libpq ``key=value`` string."""
    if "://" in dsn:
        url = urlsplit(dsn)
        try:
            port = url.port
        except ValueError:
            port = None
        return {"host": url.hostname, "port": port, "dbname": url.path.lstrip("/") or None}
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return {}
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - refused at validate; lineage names what it can
        return {}
    given = str(parts.get("port") or "")
    return {"host": parts.get("host"), "port": int(given) if given.isdigit() else None,
            "dbname": parts.get("dbname")}


def table_dataset(scheme: str, config: Any, default_port: int | None = None) -> list[Dataset]:
    """The table of a database connection (``dsn`` or ``host``/``port``/``database``).

    The name is ``database.schema.table`` (the parts given); the namespace
    ``scheme://host:port``, without user or password.
    """
    host, port = getattr(config, "host", None), getattr(config, "port", None)
    database = getattr(config, "database", None)
    given: set[str] = getattr(config, "model_fields_set", set())
    dsn = getattr(config, "dsn", None)
    if dsn is not None:  # its parts, unless a field given beside it says otherwise
        parts = _dsn_parts(_secret(dsn))
        host = host if "host" in given else parts.get("host") or host
        port = port if "port" in given else parts.get("port") or port
        database = database if "database" in given else parts.get("dbname") or database
    schema = getattr(config, "schema_", None) or getattr(config, "db_schema", None)
    table = getattr(config, "table", None)
    if not table:
        return []
    name_parts = [database, schema, table] if "." not in table else [database, table]
    name = ".".join(str(p) for p in name_parts if p)
    return [Dataset(f"{scheme}://{_netloc(host, port or default_port)}", name)]


def file_dataset(path: str, base_dir: Path) -> list[Dataset]:
    """A local file (or glob), by its absolute path."""
    p = Path(path).expanduser()
    return [Dataset("file", str(p if p.is_absolute() else (base_dir / p).resolve()))]


def topic_datasets(bootstrap_servers: str, topics: Iterable[str]) -> list[Dataset]:
    """Kafka topics of a cluster (named by its first bootstrap server)."""
    first = bootstrap_servers.split(",")[0].strip()
    return [Dataset(f"kafka://{first}", t) for t in topics]


def url_dataset(url: str) -> list[Dataset]:
    """An HTTP endpoint: namespace ``scheme://host``, name its path (no query, no user)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return [Dataset(f"{parts.scheme or 'http'}://{netloc}", parts.path or "/")]


# A workflow's lineage ------------------------------------------------------------------------

def workflow_name(v: Validated) -> str:
    """The workflow's id, else its name, else the file's stem."""
    wf = v.workflow
    return (wf.id or wf.name if wf is not None else None) or Path(v.file).stem


def component_datasets(v: Validated, cid: str) -> list[Dataset]:
    """The datasets source or destination ``cid`` reads or writes."""
    from dataflare import registry
    from dataflare.dsl_compiler.graph import SECTIONS

    assert v.workflow is not None and v.graph is not None  # noqa: S101 - callers validate
    section = v.graph.kinds[cid]
    comp = getattr(v.workflow, section)[cid]
    spec = registry.lookup(SECTIONS[section], comp.type)  # type: ignore[arg-type]
    found = spec.datasets(comp.config, v.base_dir) if spec and spec.datasets else []
    return found or [Dataset(f"dataflare://{workflow_name(v)}", cid)]


def _type_name(kind: str) -> str:
    return kind.upper() if kind != "any" else "UNKNOWN"


def workflow_lineage(v: Validated) -> dict[str, Any]:
    """The datasets a validated workflow reads and writes, with column lineage (JSON-able)."""
    from dataflare.dsl_compiler.types import schemas

    wf, graph = v.workflow, v.graph
    assert wf is not None and graph is not None  # noqa: S101 - callers validate
    found = schemas(v)
    by_source = {cid: component_datasets(v, cid) for cid in wf.sources}
    reads = []
    for cid, comp in wf.sources.items():
        schema = found.get(cid)
        fields = {p: t.kind for p, t in schema.leaves().items()} if schema else {}
        for ds in by_source[cid]:
            reads.append({"step": cid, "type": comp.type, "namespace": ds.namespace,
                          "name": ds.name, "dataset": ds.id, "fields": fields})
    writes = []
    for cid, dest in wf.destinations.items():
        schema = found.get(cid)
        columns: dict[str, list[dict[str, str]]] = {}
        for path, t in (schema.leaves() if schema is not None else {}).items():
            inputs = []
            for src, field in sorted(t.all_origins()):
                if not field or src not in by_source:
                    continue
                for ds in by_source[src]:
                    inputs.append({"dataset": ds.id, "namespace": ds.namespace,
                                   "name": ds.name, "field": field})
            columns[path] = inputs
        upstream = wf.upstream_sources(dest.inputs)
        sources = sorted({ds.id for s in upstream for ds in by_source.get(s, [])})
        fields = {p: t.kind for p, t in schema.leaves().items()} if schema else {}
        for ds in component_datasets(v, cid):
            writes.append({"step": cid, "type": dest.type, "namespace": ds.namespace,
                           "name": ds.name, "dataset": ds.id, "from": sources,
                           "fields": fields, "columns": columns})
    return {"workflow": workflow_name(v), "file": v.file, "reads": reads, "writes": writes}


def lineage(validated: list[Validated]) -> dict[str, Any]:
    """The lineage of several workflows, and every dataset with its readers and writers.

    Datasets shared by several workflows show how they chain.
    """
    flows = [workflow_lineage(v) for v in validated]
    datasets: dict[str, dict[str, Any]] = {}
    for flow in flows:
        for role, key in (("reads", "read_by"), ("writes", "written_by")):
            for use in flow[role]:
                entry = datasets.setdefault(use["dataset"], {
                    "dataset": use["dataset"], "namespace": use["namespace"],
                    "name": use["name"], "read_by": [], "written_by": []})
                if flow["workflow"] not in entry[key]:
                    entry[key].append(flow["workflow"])
    return {"workflows": flows, "datasets": sorted(datasets.values(), key=lambda d: d["dataset"])}


def _columns_text(use: dict[str, Any]) -> list[str]:
    out = []
    for column, inputs in use["columns"].items():
        if inputs:
            srcs = ", ".join(sorted({f"{i['name']}.{i['field']}" for i in inputs}))
            out.append(f"{column} <- {srcs}")
    return out


def render(data: dict[str, Any], fmt: str) -> str:
    """The lineage of :func:`lineage` as ``json``, ``mermaid`` or ``dot``."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    ids = {d["dataset"]: f"d{i}" for i, d in enumerate(data["datasets"])}
    columns: dict[str, list[str]] = {}
    for flow in data["workflows"]:
        for use in flow["writes"]:
            columns.setdefault(use["dataset"], []).extend(_columns_text(use))
    edges: list[tuple[str, str]] = []
    jobs = {}
    for i, flow in enumerate(data["workflows"]):
        job = jobs[flow["workflow"]] = f"w{i}"
        edges += [(ids[u["dataset"]], job) for u in flow["reads"]]
        edges += [(job, ids[u["dataset"]]) for u in flow["writes"]]
    edges = list(dict.fromkeys(edges))
    if fmt == "dot":
        lines = ["digraph lineage {", "  rankdir=LR;"]
        for d in data["datasets"]:
            label = "\\n".join([d["dataset"], *columns.get(d["dataset"], [])])
            lines.append(f"  {ids[d['dataset']]} [shape=cylinder, label={json.dumps(label)}];")
        for name, job in jobs.items():
            lines.append(f"  {job} [shape=box, style=rounded, label={json.dumps(name)}];")
        lines += [f"  {a} -> {b};" for a, b in edges]
        return "\n".join([*lines, "}"])
    lines = ["graph LR"]
    for d in data["datasets"]:
        label = "<br/>".join([d["dataset"], *columns.get(d["dataset"], [])])
        lines.append(f"  {ids[d['dataset']]}[({_mermaid(label)})]")
    for name, job in jobs.items():
        lines.append(f"  {job}{{{{{_mermaid(name)}}}}}")
    lines += [f"  {a} --> {b}" for a, b in edges]
    return "\n".join(lines)


def _mermaid(text: str) -> str:
    return json.dumps(text.replace('"', "#quot;"))


# OpenLineage run events ------------------------------------------------------------------------

def _client_module() -> Any:
    try:
        import openlineage.client as client
    except ImportError:
        msg = ("OpenLineage events need openlineage-python: "
               "pip install 'dataflare[lineage]'")
        raise ImportError(msg) from None
    return client


def run_uuid(run_id: str) -> str:
    """The OpenLineage run id (a UUID) of a DataFlare run id (a UUID's hex, or any text)."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"dataflare:{run_id}"))


class RunEvents:
    """Emits one run's OpenLineage events to an HTTP endpoint and/or a file."""

    def __init__(self, validated: Validated, run_id: str, url: str | None = None,
                 file: str | None = None) -> None:
        _client_module()
        from openlineage.client import OpenLineageClient
        from openlineage.client.transport.composite import CompositeConfig, CompositeTransport
        from openlineage.client.transport.file import FileConfig, FileTransport
        from openlineage.client.transport.http import HttpConfig, HttpTransport

        transports: list[Any] = []
        if url:
            # two retries (about 1.5 s) before a warning: a catalog down delays no run long
            retry = {"total": 2, "connect": 2, "read": 2, "backoff_factor": 0.5,
                     "status_forcelist": [429, 500, 502, 503, 504],
                     "allowed_methods": ["HEAD", "POST"]}
            transports.append(HttpTransport(HttpConfig(url=url, timeout=10.0, retry=retry)))
        if file:
            transports.append(FileTransport(FileConfig(log_file_path=file, append=True)))
        transport = transports[0] if len(transports) == 1 else CompositeTransport(
            CompositeConfig(transports=transports, continue_on_failure=True))
        self.client = OpenLineageClient(transport=transport)
        self.lineage = workflow_lineage(validated)
        self.run_id = run_uuid(run_id)

    def event(self, state: str, error: str | None = None) -> Any:
        """The run event of ``state`` (START, COMPLETE, FAIL, ABORT)."""
        from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent
        from openlineage.client.event_v2 import RunState as State
        from openlineage.client.facet_v2 import (
            column_lineage_dataset,
            error_message_run,
            schema_dataset,
        )

        def schema(fields: dict[str, str]) -> schema_dataset.SchemaDatasetFacet:
            return schema_dataset.SchemaDatasetFacet(fields=[
                schema_dataset.SchemaDatasetFacetFields(name=n, type=_type_name(k))
                for n, k in fields.items()])

        inputs = [InputDataset(namespace=u["namespace"], name=u["name"],
                               facets={"schema": schema(u["fields"])} if u["fields"] else {})
                  for u in self.lineage["reads"]]
        outputs = []
        for u in self.lineage["writes"]:
            facets: dict[str, Any] = {}
            if u["fields"]:
                facets["schema"] = schema(u["fields"])
            lineage = {col: column_lineage_dataset.Fields(inputFields=[
                column_lineage_dataset.InputField(namespace=i["namespace"], name=i["name"],
                                                  field=i["field"]) for i in ins])
                for col, ins in u["columns"].items() if ins}
            if lineage:
                facets["columnLineage"] = column_lineage_dataset.ColumnLineageDatasetFacet(
                    fields=lineage)
            outputs.append(OutputDataset(namespace=u["namespace"], name=u["name"],
                                         facets=facets))
        run_facets: dict[str, Any] = {}
        if error:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=error, programmingLanguage="python")
        return RunEvent(
            eventType=getattr(State, state), eventTime=datetime.now(UTC).isoformat(),
            run=Run(runId=self.run_id, facets=run_facets),
            job=Job(namespace=JOB_NAMESPACE, name=self.lineage["workflow"]),
            producer=PRODUCER, inputs=inputs, outputs=outputs)

    def emit(self, state: str, error: str | None = None) -> None:
        """Send the event of ``state``."""
        self.client.emit(self.event(state, error))
