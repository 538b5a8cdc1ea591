"""Kubernetes: the manifests of a workflow, and the entry point bytewax's own tooling runs.

``dataflare k8s WORKFLOW`` renders, for one workflow file:

- a ConfigMap holding the workflow, and a Secret with a key per ``${VAR}`` it reads (values
  to fill in; the pods take them as environment variables);
- a headless Service giving every pod a stable address for bytewax's process mesh;
- a **StatefulSet** for a streaming workflow (one bytewax process per pod; each pod's
  recovery partition on its own volume from ``volumeClaimTemplates``), an **Indexed Job**
  for a bounded one (with a recovery volume of its own when its sources keep their place,
  incremental or CDC catch-up, so each run resumes where the last one ended), or a
  **CronJob** of that Job for a ``cron`` schedule and for an
  ``interval`` that a cron expression can say (``15m``: ``*/15 * * * *``, as the server
  aligns it); ``catchup: none`` is a ``startingDeadlineSeconds`` of a minute. What a
  CronJob cannot say (``once``, ``event``, other intervals, ``start_date``/``end_date``,
  ``catchup: all``) is warned of: the Job runs once when applied;
- a PodMonitor scraping ``/metrics``; liveness and readiness probes on the run's
  ``/health`` and ``/ready`` (``dataflare run --http-port``);
- with ``--autoscale MIN:MAX``, a HorizontalPodAutoscaler on CPU. A bytewax dataflow cannot
  add a process while it runs, so rescaling is stop-and-start: the pods read the replica
  count from the StatefulSet's ``scale`` (a ServiceAccount may read it), and when it changes
  every pod stops at a snapshot and exits (:data:`RESCALE_EXIT`); Kubernetes restarts it and
  the run resumes with the new count. All pods share one ``ReadWriteMany`` recovery volume
  holding MAX partitions, so every process count up to MAX resumes the same state.

Pods run ``dataflare run`` (so a run keeps its id, its timeout and its summary), which reads
its place in the cluster from the environment as bytewax's Helm chart sets it:
``BYTEWAX_POD_NAME`` + ``BYTEWAX_STATEFULSET_NAME`` (or ``JOB_COMPLETION_INDEX`` in a Job) give
the process id, ``BYTEWAX_REPLICAS`` + ``DATAFLARE_PEER_DOMAIN`` the address of every process
(see :func:`cluster_from_env`).

``python -m bytewax.run dataflare.k8s:flow`` runs the workflow named by
``DATAFLARE_WORKFLOW`` unchanged under waxctl or the official bytewax chart.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from dataflare import registry
from dataflare.dsl_compiler import Validated, compile_file, validate_file
from dataflare.dsl_compiler.models import Schedule
from dataflare.live import TOKEN_ENV
from dataflare.logs import say

PORT = 9999
METRICS_PORT = 9090
RECOVERY_MOUNT = "/var/lib/dataflare"
WORKFLOW_MOUNT = "/etc/dataflare"
RESCALE_EXIT = 75  # stopped at a snapshot to restart with another process count
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
JOB_LABEL = "batch.kubernetes.io/"
"""The prefix of the labels Kubernetes (1.27+) puts on a Job's pods: its name and uid."""
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def __getattr__(name: str) -> Any:
    """``dataflare.k8s:flow``: the workflow named by ``DATAFLARE_WORKFLOW``, compiled."""
    if name != "flow":
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    path = os.environ.get("DATAFLARE_WORKFLOW")
    if not path:
        msg = "DATAFLARE_WORKFLOW must name the workflow file to run"
        raise RuntimeError(msg)
    return compile_file(path)


@dataclass(frozen=True)
class Cluster:
    """Where this process stands in a multi-process run."""

    process_id: int
    addresses: list[str]


def cluster_from_env(env: Mapping[str, str] = os.environ) -> Cluster | None:
    """The pod's process id and every process's address, from the environment.

    The process id comes from ``BYTEWAX_PROCESS_ID``, ``JOB_COMPLETION_INDEX`` (an Indexed
    Job) or the ordinal of ``BYTEWAX_POD_NAME`` in ``BYTEWAX_STATEFULSET_NAME``. The addresses
    come from ``BYTEWAX_ADDRESSES`` (``;``-separated), the file ``BYTEWAX_HOSTFILE_PATH``, or are
    generated from ``BYTEWAX_REPLICAS`` as ``<name>-<i>.<DATAFLARE_PEER_DOMAIN>:<port>``, like
    the host list bytewax's chart writes at start. None when nothing says it is a cluster.
    """
    pid: int | None = None
    if env.get("BYTEWAX_PROCESS_ID"):
        pid = int(env["BYTEWAX_PROCESS_ID"])
    elif env.get("JOB_COMPLETION_INDEX"):
        pid = int(env["JOB_COMPLETION_INDEX"])
    elif env.get("BYTEWAX_POD_NAME") and env.get("BYTEWAX_STATEFULSET_NAME"):
        pid = int(env["BYTEWAX_POD_NAME"].removeprefix(env["BYTEWAX_STATEFULSET_NAME"] + "-"))
    if pid is None:
        return None
    replicas = None
    if env.get("DATAFLARE_REPLICAS_FROM") == "statefulset":
        replicas = statefulset_replicas(env)
    elif env.get("BYTEWAX_REPLICAS"):
        replicas = int(env["BYTEWAX_REPLICAS"])
    if env.get("BYTEWAX_ADDRESSES"):
        addresses = [a for a in env["BYTEWAX_ADDRESSES"].split(";") if a]
    elif env.get("BYTEWAX_HOSTFILE_PATH"):
        text = Path(env["BYTEWAX_HOSTFILE_PATH"]).read_text()
        addresses = [line.strip() for line in text.splitlines() if line.strip()]
    elif replicas is not None:
        name = env.get("BYTEWAX_STATEFULSET_NAME") or env.get("DATAFLARE_JOB_NAME", "")
        domain = env.get("DATAFLARE_PEER_DOMAIN", name)
        port = env.get("DATAFLARE_PEER_PORT", str(PORT))
        addresses = [f"{name}-{i}.{domain}:{port}" for i in range(replicas)]
    else:
        msg = "a process id is set but no addresses (BYTEWAX_ADDRESSES, BYTEWAX_HOSTFILE_PATH "
        msg += "or BYTEWAX_REPLICAS)"
        raise ValueError(msg)
    if env.get("DATAFLARE_REPLICAS_FROM") == "statefulset" and replicas is not None:
        if len(addresses) < replicas:
            msg = f"the StatefulSet asks for {replicas} processes; {len(addresses)} addresses"
            raise ValueError(msg)
        addresses = addresses[:replicas]  # a listed address per possible pod: the first N run
    if not 0 <= pid < len(addresses):
        msg = f"process id {pid} is outside the {len(addresses)} addresses"
        raise ValueError(msg)
    return Cluster(pid, addresses)


def statefulset_replicas(env: Mapping[str, str] = os.environ) -> int:
    """The replica count the pod's StatefulSet asks for, read from its ``scale``.

    The API server is the in-cluster one (``KUBERNETES_SERVICE_HOST``, the ServiceAccount's
    token and CA), or ``DATAFLARE_KUBE_API`` (e.g. ``http://127.0.0.1:8001`` of ``kubectl
    proxy``). The namespace is ``DATAFLARE_NAMESPACE`` or the ServiceAccount's.
    """
    accounts = Path(env.get("DATAFLARE_SERVICE_ACCOUNT_DIR", str(SERVICE_ACCOUNT)))
    base = env.get("DATAFLARE_KUBE_API")
    if not base:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host:
            msg = "DATAFLARE_REPLICAS_FROM=statefulset needs the Kubernetes API: not in a pod "
            msg += "(no KUBERNETES_SERVICE_HOST) and no DATAFLARE_KUBE_API"
            raise ValueError(msg)
        base = f"https://{host}:{port or 443}"
    namespace = env.get("DATAFLARE_NAMESPACE")
    if not namespace and (accounts / "namespace").exists():
        namespace = (accounts / "namespace").read_text().strip()
    name = env.get("BYTEWAX_STATEFULSET_NAME")
    if not namespace or not name:
        msg = "DATAFLARE_REPLICAS_FROM=statefulset needs BYTEWAX_STATEFULSET_NAME and a namespace"
        raise ValueError(msg)
    url = f"{base.rstrip('/')}/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}/scale"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if (accounts / "token").exists():
        token = (accounts / "token").read_text().strip()
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if url.startswith("https:") and (accounts / "ca.crt").exists():
        context = ssl.create_default_context(cafile=str(accounts / "ca.crt"))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            scale = json.load(answer)
    except OSError as exc:
        msg = f"cannot read the replica count of StatefulSet {name!r}: {exc}"
        raise ValueError(msg) from exc
    return int(scale["spec"].get("replicas", 0))


def watch_rescale(processes: int, on_change: Callable[[int], None], every: float | None = None,
                  env: Mapping[str, str] = os.environ) -> threading.Event:
    """Call ``on_change(new_count)`` once the StatefulSet's replicas differ from ``processes``.

    Checked every ``DATAFLARE_RESCALE_CHECK`` seconds (15); an API error is said and
    retried. Returns the event that ends the watch.
    """
    every = every if every is not None else float(env.get("DATAFLARE_RESCALE_CHECK", "15"))
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            try:
                wanted = statefulset_replicas(env)
            except ValueError as exc:
                say(str(exc), "warning")
                continue
            if wanted != processes:
                done.set()
                on_change(wanted)

    threading.Thread(target=watch, name="dataflare-rescale", daemon=True).start()
    return done


@dataclass(frozen=True)
class Options:
    """What ``dataflare k8s`` renders: image, size and names."""

    image: str = "dataflare:latest"
    replicas: int = 1
    name: str | None = None
    namespace: str | None = None
    snapshot_interval: float | None = None  # else the workflow's checkpoint_interval, or 5 s
    storage: str = "1Gi"
    cpu: str = "500m"
    memory: str = "1Gi"
    autoscale: tuple[int, int] | None = None  # HPA min and max replicas
    cpu_target: int = 70  # the HPA's average CPU utilisation, percent


def _unwritable(wf: Any, say: Callable[..., None]) -> None:
    """Warn of local outputs the pods cannot write: their filesystem is read-only.

    Relative paths resolve in the workflow's directory, the read-only ConfigMap mount.
    """
    for cid, comp in wf.destinations.items():
        cfg = comp.config
        path = getattr(cfg, "path", None) or getattr(cfg, "path_template", None)
        if comp.type not in ("file", "duckdb") or not isinstance(path, str) or "://" in path:
            continue
        where = PurePosixPath(WORKFLOW_MOUNT, path)
        if not where.is_relative_to("/tmp"):
            say(f"destination {cid!r} writes {where}, which the pods cannot write (the root "
                "filesystem and the workflow's directory are read-only): write it under a "
                "volume you add to the pods, or to object storage", "warning")


def variables(text: str, with_defaults: bool = True) -> list[str]:
    """The ``${VAR}`` names a workflow text reads, sorted (``${VAR:-x}`` unless not wanted)."""
    return sorted({m.group(1) for m in _VAR.finditer(text) if with_defaults or not m.group(2)})


def is_streaming(v: Validated) -> bool:
    """Whether any source streams: its mode says so, or it never ends by itself.

    A streaming, CDC or hybrid source with ``stop_at_end`` (a catch-up) still makes a
    StatefulSet: its pods keep their snapshots.
    """
    wf = v.workflow
    assert wf is not None
    return any(src.runs_as() in registry.UNBOUNDED or src.streaming is not None
               or not src.ends() for src in wf.sources.values())


def _name(v: Validated, options: Options) -> str:
    wf = v.workflow
    assert wf is not None
    raw = options.name or wf.id or wf.name or Path(v.file).stem
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:52]
    return name or "dataflare"


def secrets_in_clear(path: str | Path) -> list[int]:
    """Lines of the workflow at ``path`` holding a secret value written out (not ``${VAR}``).

    The workflow goes into a ConfigMap, which anyone who may read the namespace's
    ConfigMaps reads; call after :func:`render` (its validation registers the secrets).
    """
    from dataflare import secrets

    values = [v for v in secrets.values() if len(v) >= 4]
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [n for n, line in enumerate(lines, 1) if any(v in line for v in values)]


def render(path: str | Path, options: Options) -> list[dict[str, Any]]:
    """The Kubernetes objects running the workflow at ``path``, in apply order."""
    text = Path(path).read_text(encoding="utf-8")
    # Rendering needs no secret: unset variables validate as placeholders.
    # (each stays its ``${VAR}``, which no check of a value's form holds against it)
    v = validate_file(path, {n: os.environ.get(n, f"${{{n}}}") for n in variables(text)})
    errors = v.errors(for_run=True)
    if errors or v.workflow is None:
        msg = "the workflow is not valid:\n" + "\n".join(p.render(True) for p in errors)
        raise ValueError(msg)
    wf = v.workflow
    # The Secret holds the variables the workflow needs from outside: neither defaulted
    # in the text (an empty default is no value: `${PASSWORD:-}`) nor set in its
    # `environment:` block. A key of the Secret set to "" would override those.
    defaults: dict[str, set[str]] = {}
    for m in _VAR.finditer(text):
        defaults.setdefault(m.group(1), set()).add((m.group(2) or "").removeprefix(":-"))
    names = [n for n, given in sorted(defaults.items())
             if given == {""} and n not in wf.environment]
    _unwritable(wf, say)
    kept = [n for n in defaults if n not in names]
    if kept:
        say(f"the pods take {', '.join(sorted(kept))} from the workflow's defaults or its "
            "environment: block; to set them in the cluster, add them to the Secret "
            f"{_name(v, options)}-env (a secret among them belongs there)", "warning")
    name = _name(v, options)
    meta = {"labels": {"app.kubernetes.io/name": "dataflare", "dataflare.io/workflow": name}}
    if options.namespace:
        meta["namespace"] = options.namespace  # type: ignore[assignment]

    def md(suffix: str = "") -> dict[str, Any]:
        return {"name": name + suffix, **meta}

    streaming = is_streaming(v)
    # A bounded run whose sources keep their place (incremental, CDC catch-up) resumes
    # from the last run's snapshot, kept on a volume of its own.
    keeps = not streaming and any(src.runs_as() != "full" for src in wf.sources.values())
    if streaming and wf.schedule is not None:
        say("a streaming workflow runs as a StatefulSet, without end: its schedule is not "
            "used", "warning")
    cron = None if streaming or wf.schedule is None else cron_of(wf.schedule, say)
    scale = options.autoscale
    if scale is not None and not streaming:
        msg = "--autoscale needs a streaming workflow (a bounded one runs as a Job)"
        raise ValueError(msg)
    if scale is not None and not 1 <= scale[0] <= scale[1]:
        msg = f"--autoscale {scale[0]}:{scale[1]}: expected 1 <= MIN <= MAX"
        raise ValueError(msg)
    pods, limit = scale[1] if scale else options.replicas, wf.config.max_concurrency
    if limit is not None and pods > limit:  # each pod would refuse to start
        msg = (f"config.max_concurrency is {limit}: {pods} pods (one worker each) would "
               "refuse to start")
        raise ValueError(msg)
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": md("-workflow"),
         "data": {"workflow.yaml": text}},
        # DATAFLARE_HTTP_TOKEN: /tap and /views answer (on 0.0.0.0) only once it is filled
        {"apiVersion": "v1", "kind": "Secret", "metadata": md("-env"), "type": "Opaque",
         "stringData": {n: "" for n in [*names, TOKEN_ENV]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": md(),
         "spec": {"clusterIP": "None", "selector": {"dataflare.io/workflow": name},
                  "publishNotReadyAddresses": True,
                  "ports": [{"name": "bytewax", "port": PORT},
                            {"name": "metrics", "port": METRICS_PORT}]}},
    ]
    pod = _pod(name, options, streaming, keeps)
    if keeps:
        objects.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": md("-recovery"), "spec": {
                            "accessModes": ["ReadWriteOnce" if options.replicas == 1
                                            else "ReadWriteMany"],
                            "resources": {"requests": {"storage": options.storage}}}})
    if streaming:
        claim = {"accessModes": ["ReadWriteMany" if scale else "ReadWriteOnce"],
                 "resources": {"requests": {"storage": options.storage}}}
        sts: dict[str, Any] = {
            "serviceName": name, "replicas": scale[0] if scale else options.replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"dataflare.io/workflow": name}},
            "template": {"metadata": {"labels": meta["labels"]}, "spec": pod},
        }
        if scale is None:  # a recovery partition per pod, on the pod's own volume
            sts["volumeClaimTemplates"] = [{"metadata": {"name": "recovery"}, "spec": claim}]
        else:  # every partition on one shared volume: any pod count resumes the same state
            objects += _scale_access(name, md, claim)
        objects.append({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": md(),
                        "spec": sts})
        if scale is not None:
            objects.append(_autoscaler(name, md, scale, options.cpu_target))
    else:
        job = {
            "completions": options.replicas, "parallelism": options.replicas,
            "completionMode": "Indexed", "backoffLimit": wf.config.run_attempts - 1,
            "template": {"metadata": {"labels": meta["labels"]},
                         "spec": {**pod, "subdomain": name, "restartPolicy": "Never"}},
        }
        if wf.config.timeout is not None:
            job["activeDeadlineSeconds"] = int(wf.config.timeout) + 60
        if cron:
            assert wf.schedule is not None
            spec: dict[str, Any] = {"schedule": cron, "concurrencyPolicy": "Forbid",
                                    "jobTemplate": {"spec": job}}
            if wf.schedule.timezone != "UTC" and wf.schedule.type == "cron":
                spec["timeZone"] = wf.schedule.timezone
            if wf.schedule.catchup == "none":
                spec["startingDeadlineSeconds"] = 60
            objects.append({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": md(),
                            "spec": spec})
        else:
            objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": md(),
                            "spec": job})
    objects.append({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": md(),
        "spec": {"selector": {"matchLabels": {"dataflare.io/workflow": name}},
                 "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}]},
    })
    return objects


_CRON_MINUTES = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30)
_CRON_HOURS = (1, 2, 3, 4, 6, 8, 12)


def cron_of(schedule: Schedule, say: Callable[[str, str], None]) -> str | None:
    """The CronJob schedule of a bounded workflow's ``schedule`` (``None``: a plain Job).

    An interval that divides an hour or a day is the cron expression of the same instants
    (the server aligns intervals to the Unix epoch); what a CronJob cannot say is warned.
    """
    kind = schedule.type
    expression: str | None = None
    if kind == "cron" and schedule.expression and len(schedule.expression.split()) == 6:
        say("the schedule's 6-field cron expression (with seconds) is not a Kubernetes "
            "CronJob schedule: the Job runs once when applied", "warning")
        return None
    if kind == "cron":
        expression = schedule.expression
    elif kind == "interval" and schedule.start_date is None and schedule.interval:
        period = int(schedule.interval)
        if period == schedule.interval and period % 60 == 0:
            minutes = period // 60
            if minutes in _CRON_MINUTES:
                expression = "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
            elif minutes % 60 == 0 and minutes // 60 in _CRON_HOURS:
                hours = minutes // 60
                expression = "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
            elif minutes == 24 * 60:
                expression = "0 0 * * *"
    if expression is None:
        what = ("an interval schedule that no cron expression says (one that divides an hour "
                "or a day, without start_date)" if kind == "interval" else
                f"a schedule of type {kind}")
        say(f"{what} is not a Kubernetes CronJob: the Job runs once when applied (run the "
            "workflow on `dataflare server` to have it scheduled)", "warning")
        return None
    unsaid = [k for k in ("start_date", "end_date") if getattr(schedule, k) is not None]
    if schedule.catchup == "all":
        unsaid.append("catchup: all")
    if unsaid:
        say(f"the CronJob does not honour the schedule's {', '.join(unsaid)}", "warning")
    return expression


def _scale_access(name: str, md: Any, claim: dict[str, Any]) -> list[dict[str, Any]]:
    """An autoscaled workflow's shared recovery claim, and its pods' right to read their scale."""
    rbac = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": md("-recovery"),
         "spec": claim},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": md()},
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": md(),
         "rules": [{"apiGroups": ["apps"], "resources": ["statefulsets/scale"],
                    "resourceNames": [name], "verbs": ["get"]}]},
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": md(),
         "roleRef": {"apiGroup": rbac, "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name}]},
    ]


def _autoscaler(name: str, md: Any, scale: tuple[int, int], cpu_target: int) -> dict[str, Any]:
    """The seed's HPA (CPU), slow to change size: every rescale restarts from a snapshot."""
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": md(),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name},
            "minReplicas": scale[0], "maxReplicas": scale[1],
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": cpu_target}}}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 120,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 300}]},
                "scaleDown": {"stabilizationWindowSeconds": 600,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]},
            },
        },
    }


def _pod(name: str, options: Options, streaming: bool, keeps: bool = False
         ) -> dict[str, Any]:
    """The pod of a StatefulSet (``streaming``) or Job; ``keeps``: a Job that resumes."""
    run = ["dataflare", "run", f"{WORKFLOW_MOUNT}/workflow.yaml",
           "--http-port", str(METRICS_PORT), "--http-host", "0.0.0.0"]
    mounts = [{"name": "workflow", "mountPath": WORKFLOW_MOUNT, "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "workflow", "configMap": {"name": f"{name}-workflow"}}]
    if streaming or keeps:  # other bounded runs start over: no snapshots
        run += ["--recovery-dir", f"{RECOVERY_MOUNT}/recovery"]
        if options.snapshot_interval is not None:
            run += ["-s", f"{options.snapshot_interval:g}"]
        mounts.append({"name": "recovery", "mountPath": RECOVERY_MOUNT})
    if options.autoscale:
        run += ["--recovery-partitions", str(options.autoscale[1])]
    if options.autoscale or keeps:  # one claim that every pod shares
        volumes.append({"name": "recovery",
                        "persistentVolumeClaim": {"claimName": f"{name}-recovery"}})
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})  # the root filesystem is read-only
    replicas: list[dict[str, Any]] = [
        {"name": "DATAFLARE_REPLICAS_FROM", "value": "statefulset"},
        {"name": "DATAFLARE_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ] if options.autoscale else [{"name": "BYTEWAX_REPLICAS", "value": str(options.replicas)}]
    env: list[dict[str, Any]] = [
        *replicas,
        {"name": "DATAFLARE_PEER_DOMAIN", "value": name},
        {"name": "DATAFLARE_PEER_PORT", "value": str(PORT)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if streaming:  # the run's id lives in the recovery directory (a new volume: a new run)
        env += [{"name": "BYTEWAX_POD_NAME",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "BYTEWAX_STATEFULSET_NAME", "value": name}]
    else:
        # A CronJob's Jobs are named <name>-<minutes>: the pods' names come from the Job.
        # Its uid is the run's id: its pods' restarts are one run (appends stay exactly
        # once), each Job of a CronJob a new one.
        env += [{"name": "DATAFLARE_JOB_NAME", "valueFrom": {"fieldRef": {
                    "fieldPath": f"metadata.labels['{JOB_LABEL}job-name']"}}},
                {"name": "DATAFLARE_RUN_ID", "valueFrom": {"fieldRef": {
                    "fieldPath": f"metadata.labels['{JOB_LABEL}controller-uid']"}}}]
    def probe(path: str) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": 10}

    account: dict[str, Any] = {"serviceAccountName": name} if options.autoscale else {}
    return {
        **account,
        # Only an autoscaled pod talks to the API server (to read its scale).
        "automountServiceAccountToken": bool(options.autoscale),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "dataflare",
            "image": options.image,
            "command": run,
            "env": env,
            "envFrom": [{"secretRef": {"name": f"{name}-env"}}],
            "ports": [{"name": "bytewax", "containerPort": PORT},
                      {"name": "metrics", "containerPort": METRICS_PORT}],
            # /health: the process is alive; /ready: its sources and destinations answer.
            "livenessProbe": {**probe("/health"), "initialDelaySeconds": 30},
            "readinessProbe": probe("/ready"),
            "resources": {"requests": {"cpu": options.cpu, "memory": options.memory},
                          "limits": {"memory": options.memory}},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }


class _Dumper(yaml.SafeDumper):
    """Block text for multi-line strings (the workflow reads as itself), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def dump(objects: list[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML text."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=100)
