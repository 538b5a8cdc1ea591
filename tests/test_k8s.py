"""Kubernetes manifests (validated offline), the pods' command run locally, and the image."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from dataflare import k8s
from tests.fixtures.pg_private import free_port
from tests.test_exactly_once import produce

ROOT = Path(__file__).resolve().parents[1]
FLOWS = sorted((ROOT / "flows").glob("*.yaml"))
K8S_VERSION = "1.30"


def _validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    if obj["kind"] == "PodMonitor":  # a Prometheus-operator resource: no schema offline
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics"}]
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("flow", FLOWS, ids=lambda p: p.stem)
def test_every_flow_renders_manifests_that_validate_offline(flow: Path) -> None:
    objects = k8s.render(flow, k8s.Options(image="registry.local/dataflare:1", replicas=3))
    for obj in objects:
        _validate(obj)
    kinds = _by_kind(objects)
    assert {"ConfigMap", "Secret", "Service", "PodMonitor"} <= set(kinds)
    assert kinds["ConfigMap"]["data"]["workflow.yaml"] == flow.read_text()
    pods = kinds.get("StatefulSet") or kinds.get("Job") or kinds["CronJob"]
    assert "registry.local/dataflare:1" in json.dumps(pods)
    # The text dumped is the same objects (one multi-document YAML).
    import yaml

    assert list(yaml.safe_load_all(k8s.dump(objects))) == objects


def test_the_offline_validation_is_strict() -> None:
    import kubernetes_validate

    sts = _by_kind(k8s.render(ROOT / "flows/kafka_to_warehouse.yaml", k8s.Options()))
    bad = json.loads(json.dumps(sts["StatefulSet"]))
    bad["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_a_streaming_workflow_is_a_statefulset_with_a_volume_per_pod() -> None:
    kinds = _by_kind(k8s.render(ROOT / "flows/postgres_cdc_mirror.yaml",
                                k8s.Options(replicas=3, name="Mirror")))
    sts = kinds["StatefulSet"]
    assert sts["metadata"]["name"] == "mirror" and sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == kinds["Service"]["metadata"]["name"] == "mirror"
    assert kinds["Service"]["spec"]["clusterIP"] == "None"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["dataflare", "run", "/etc/dataflare/workflow.yaml"]
    assert "--recovery-dir" in container["command"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["command"][container["command"].index("--http-host") + 1] == "0.0.0.0"
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["BYTEWAX_REPLICAS"]["value"] == "3"
    assert env["BYTEWAX_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["envFrom"] == [{"secretRef": {"name": "mirror-env"}}]
    # The mirror reads its connection settings from variables without defaults.
    # the variables the pods need from outside: without a default (an empty one is none)
    # nor a value in the workflow's environment: block
    assert set(kinds["Secret"]["stringData"]) == {"SOURCE_PG_PASSWORD", "DATAFLARE_HTTP_TOKEN"}


def _workflow_env(path: Path) -> dict[str, str]:
    import yaml

    return yaml.safe_load(path.read_text())["workflow"].get("environment", {})


def test_a_bounded_workflow_is_an_indexed_job_and_a_cron_schedule_a_cronjob(
        tmp_path: Path) -> None:
    kinds = _by_kind(k8s.render(ROOT / "flows/quickstart.yaml", k8s.Options(replicas=2)))
    job = kinds["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 2
    assert job["template"]["spec"]["subdomain"] == kinds["Service"]["metadata"]["name"]
    assert "--recovery-dir" not in job["template"]["spec"]["containers"][0]["command"]
    assert job["backoffLimit"] == 2  # 3 attempts of the run unless config.retry says otherwise

    text = (ROOT / "flows/quickstart.yaml").read_text().replace(
        "workflow:\n", "workflow:\n  schedule: {type: cron, expression: '15 2 * * *', "
        "timezone: Europe/Paris}\n  config: {timeout: 10m, retry: {max_attempts: 5}}\n", 1)
    flow = _write(ROOT / "flows", f".k8s-test-{os.getpid()}.yaml", text)
    try:
        objects = k8s.render(flow, k8s.Options(replicas=2))
    finally:
        flow.unlink()
    for obj in objects:
        _validate(obj)
    cron = _by_kind(objects)["CronJob"]["spec"]
    assert cron["schedule"] == "15 2 * * *" and cron["timeZone"] == "Europe/Paris"
    assert cron["jobTemplate"]["spec"]["backoffLimit"] == 4  # config.retry.max_attempts: 5
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 660


@pytest.mark.parametrize(("schedule", "cron", "warned"), [
    ("{type: interval, interval: 15m}", "*/15 * * * *", None),
    ("{type: interval, expression: 1m}", "* * * * *", None),
    ("{type: interval, interval: 2h, catchup: none}", "0 */2 * * *", None),
    ("{type: interval, interval: 1d}", "0 0 * * *", None),
    ("{type: interval, interval: 7m}", None, "no cron expression says"),
    ("{type: interval, interval: 1h, start_date: '2026-01-01T00:10:00Z'}", None,
     "without start_date"),
    ("{type: once, start_date: '2036-01-01T00:00:00Z'}", None, "a schedule of type once is not"),
    ("{type: event, event: done}", None, "a schedule of type event is not"),
    ("{type: cron, expression: '0 3 * * *', end_date: '2036-01-01T00:00:00Z', "
     "catchup: all}", "0 3 * * *", "does not honour the schedule's end_date, catchup: all"),
])
def test_a_schedule_is_a_cronjob_where_cron_can_say_it_and_warned_where_not(
        schedule: str, cron: str | None, warned: str | None,
        capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "flows/quickstart.yaml").read_text().replace(
        "workflow:\n", f"workflow:\n  schedule: {schedule}\n", 1)
    flow = _write(ROOT / "flows", f".k8s-test-{os.getpid()}.yaml", text)
    try:
        kinds = _by_kind(k8s.render(flow, k8s.Options()))
    finally:
        flow.unlink()
    said = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                   if "which the pods cannot write" not in line)  # quickstart's outputs
    if cron is None:
        assert "CronJob" not in kinds and "Job" in kinds
    else:
        assert kinds["CronJob"]["spec"]["schedule"] == cron and "Job" not in kinds
        assert ("startingDeadlineSeconds" in kinds["CronJob"]["spec"]) == ("none" in schedule)
    assert (warned is None and said == "") or (warned is not None and warned in said), said


def test_an_invalid_workflow_renders_nothing(tmp_path: Path) -> None:
    flow = _write(tmp_path, "bad.yaml", "workflow:\n  sources: {a: {type: nope}}\n")
    out = subprocess.run([sys.executable, "-m", "dataflare", "k8s", str(flow)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "bad.yaml:2" in out.stderr and not out.stdout


def test_printed_manifests_are_the_written_ones_with_a_token_in_the_environment(
        tmp_path: Path) -> None:
    # "Secret" is six characters of the token, and "Bearer " was registered with it: the
    # manifests printed for `| kubectl apply -f -` read `kind: ***` and lost "Bearer ".
    flow = _write(tmp_path, "hdr.yaml", """\
workflow:
  id: hdr
  sources:
    items:
      type: rest_api
      config:
        url: http://127.0.0.1:9/page
        headers: {Authorization: "Bearer ${API_TOKEN}"}
  destinations: {out: {type: stdout, inputs: [items]}}
""")
    env = {**os.environ, "API_TOKEN": "tok_SuperSecret_98765"}
    cmd = [sys.executable, "-m", "dataflare", "k8s", str(flow), "--image", "x"]
    printed = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    subprocess.run([*cmd, "--out", str(tmp_path / "out")], env=env, check=True)
    def canon(texts: list[str]) -> list[str]:
        return sorted(json.dumps(o, sort_keys=True) for t in texts for o in yaml.safe_load_all(t))

    assert canon([printed]) == canon([p.read_text() for p in (tmp_path / "out").iterdir()])
    assert "kind: Secret" in printed and 'Bearer ${API_TOKEN}' in printed
    assert "tok_SuperSecret_98765" not in printed


def test_a_secret_written_out_in_the_workflow_renders_nothing(tmp_path: Path) -> None:
    # It was warned of, and then printed masked (a ConfigMap with "***", whose pods cannot
    # log in) or written in clear with --out.
    flow = _write(tmp_path, "lit.yaml", """\
workflow:
  id: lit
  sources:
    items:
      type: rest_api
      config:
        url: http://127.0.0.1:9/page
        auth: {type: bearer, token: "tok_Literal_Value_77"}
  destinations: {out: {type: stdout, inputs: [items]}}
""")
    for out_dir in ([], ["--out", str(tmp_path / "manifests")]):
        out = subprocess.run([sys.executable, "-m", "dataflare", "k8s", str(flow), "--image",
                              "x", *out_dir], capture_output=True, text=True, check=False)
        assert out.returncode == 1
        assert f"{flow}:8: error: a secret value is written out here" in out.stderr
        assert out.stdout == ""
        assert "tok_Literal_Value_77" not in out.stderr
    assert not (tmp_path / "manifests").exists()


def test_cluster_from_env_follows_bytewax_conventions(tmp_path: Path) -> None:
    assert k8s.cluster_from_env({}) is None
    c = k8s.cluster_from_env({"BYTEWAX_POD_NAME": "wf-2", "BYTEWAX_STATEFULSET_NAME": "wf",
                              "BYTEWAX_REPLICAS": "3", "DATAFLARE_PEER_DOMAIN": "wf.ns"})
    assert c == k8s.Cluster(2, ["wf-0.wf.ns:9999", "wf-1.wf.ns:9999", "wf-2.wf.ns:9999"])
    c = k8s.cluster_from_env({"JOB_COMPLETION_INDEX": "1", "DATAFLARE_JOB_NAME": "j",
                              "BYTEWAX_REPLICAS": "2"})
    assert c == k8s.Cluster(1, ["j-0.j:9999", "j-1.j:9999"])
    hosts = _write(tmp_path, "hosts.txt", "a:1\nb:2\n\n")
    c = k8s.cluster_from_env({"BYTEWAX_PROCESS_ID": "0", "BYTEWAX_HOSTFILE_PATH": str(hosts)})
    assert c == k8s.Cluster(0, ["a:1", "b:2"])
    with pytest.raises(ValueError, match="outside"):
        k8s.cluster_from_env({"BYTEWAX_PROCESS_ID": "5", "BYTEWAX_ADDRESSES": "a:1;b:2"})


def _pod_command(sts: dict[str, Any], workflow: Path, recovery: Path) -> list[str]:
    """The container's command with the pod's mounts replaced by local paths."""
    cmd = list(sts["spec"]["template"]["spec"]["containers"][0]["command"])
    cmd = [str(workflow) if a == f"{k8s.WORKFLOW_MOUNT}/workflow.yaml" else
           str(recovery) if a == f"{k8s.RECOVERY_MOUNT}/recovery" else a for a in cmd]
    assert cmd[0] == "dataflare"
    return [str(Path(sys.executable).with_name("dataflare")), *cmd[1:]]


def _pod_env(sts: dict[str, Any], pod: str, secrets: dict[str, str],
             namespace: str = "default") -> dict[str, str]:
    env = dict(os.environ)
    job = pod.rsplit("-", 1)[0]
    fields = {"metadata.name": pod, "metadata.namespace": namespace,
              f"metadata.labels['{k8s.JOB_LABEL}job-name']": job,
              f"metadata.labels['{k8s.JOB_LABEL}controller-uid']": f"uid-of-{job}"}
    for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    env.update(secrets)
    return env


def test_an_incremental_job_run_again_reads_only_the_new_rows(
        tmp_path: Path, pg_schema: Any) -> None:
    # The Job's command, run twice on the claim's directory, as Kubernetes reruns the Job.
    table = f'"{pg_schema.schema}".items'
    with pg_schema.connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, at int NOT NULL)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 10), (2, 20)")
    out = tmp_path / "out.jsonl"
    flow = _write(tmp_path, "sync.yaml", f"""
workflow:
  id: sync
  sources:
    db:
      type: postgres
      mode: incremental
      config: {{host: 127.0.0.1, database: test, username: postgres,
               table: {pg_schema.schema}.items, stop_at_end: true}}
      incremental: {{column: at}}
  destinations:
    out: {{type: file, inputs: [db], config: {{path: {out}}}, write_mode: {{type: append}}}}
""")
    job = _by_kind(k8s.render(flow, k8s.Options()))["Job"]
    for new_row in ("(3, 30)", None):
        env = {**_pod_env(job, "sync-0", {}), "JOB_COMPLETION_INDEX": "0",
               "BYTEWAX_ADDRESSES": f"127.0.0.1:{free_port()}"}  # the pod's own DNS name
        cmd = _pod_command(job, flow, tmp_path / "claim")
        cmd[cmd.index("--http-port") + 1] = str(free_port())
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        if new_row:
            with pg_schema.connect() as conn:
                conn.execute(f"INSERT INTO {table} VALUES {new_row}")
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 2, 3]


def test_each_job_of_a_cronjob_is_a_new_run_of_one_pod_without_a_mesh(
        tmp_path: Path, pg_schema: Any) -> None:
    # The template held one fixed DATAFLARE_RUN_ID: the second night's Job skipped every
    # line up to the first night's last as "already written". And its pods built their
    # peers' names from the CronJob's name, not the Job's (<name>-<minutes>): no DNS.
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(5)))
    flow = _write(tmp_path, "nightly.yaml", f"""
workflow:
  id: nightly
  schedule: {{type: cron, expression: "0 2 * * *"}}
  sources:
    src: {{type: file, config: {{path: {tmp_path / "in.jsonl"}}}}}
  destinations:
    out:
      type: postgres
      inputs: [src]
      config: {{dsn: "{pg_schema.dsn}", schema: {pg_schema.schema}, table: orders}}
      write_mode: {{type: append}}
""")
    cron = _by_kind(k8s.render(flow, k8s.Options()))["CronJob"]
    job = {"spec": cron["spec"]["jobTemplate"]["spec"]}
    for night in ("nightly-29390520", "nightly-29390521"):
        env = {**_pod_env(job, f"{night}-0", {}), "JOB_COMPLETION_INDEX": "0"}
        cmd = _pod_command(job, flow, tmp_path / "unused")
        cmd[cmd.index("--http-port") + 1] = str(free_port())
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "skipped" not in done.stderr
    with pg_schema.connect() as conn:
        rows = conn.execute(f'SELECT count(*) FROM "{pg_schema.schema}".orders').fetchone()
    assert rows == (10,)  # each night's five


def test_the_statefulset_command_runs_the_workflow_as_two_pods(
        tmp_path: Path, kafka_broker: Any, kafka_topic: Any, pg_schema: Any) -> None:
    topic = kafka_topic(partitions=4)
    produce(kafka_broker.bootstrap_servers, topic,
            [{"id": i, "v": i * 2, "user_id": f"u{i % 7}"} for i in range(2000)])
    flow = _write(tmp_path, "wf.yaml", f"""
workflow:
  id: pods
  sources:
    events:
      type: kafka
      mode: streaming
      config: {{bootstrap_servers: "${{KAFKA}}", topic: {topic}, stop_at_end: true,
               consumer_group: pods}}
  destinations:
    table:
      type: postgres
      inputs: [events]
      config: {{dsn: "${{PG_DSN}}", schema: {pg_schema.schema}, table: events}}
""")
    objects = _by_kind(k8s.render(flow, k8s.Options(replicas=2)))
    sts = objects["StatefulSet"]
    assert set(objects["Secret"]["stringData"]) == {"KAFKA", "PG_DSN", "DATAFLARE_HTTP_TOKEN"}
    secrets = {"KAFKA": kafka_broker.bootstrap_servers, "PG_DSN": pg_schema.dsn}
    # Pods reach each other by DNS name; here both "pods" share loopback, on two ports.
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    procs = []
    for i in range(2):
        env = _pod_env(sts, f"pods-{i}", secrets)
        env["BYTEWAX_ADDRESSES"] = addresses
        cmd = _pod_command(sts, flow, tmp_path / f"recovery-{i}")
        cmd[cmd.index("--http-port") + 1] = str(free_port())
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    # Each pod created its own recovery partition in its own directory.
    assert sorted(p.name for p in (tmp_path / "recovery-0").glob("*.sqlite3")) == [
        "part-0.sqlite3"]
    assert sorted(p.name for p in (tmp_path / "recovery-1").glob("*.sqlite3")) == [
        "part-1.sqlite3"]
    rows = pg_schema.rows(f'SELECT id, v FROM "{pg_schema.schema}".events ORDER BY id')
    assert rows == [(i, i * 2) for i in range(2000)]


def test_autoscaling_renders_an_hpa_a_shared_volume_and_the_right_to_read_the_scale() -> None:
    objects = k8s.render(ROOT / "flows/postgres_cdc_mirror.yaml",
                         k8s.Options(name="mirror", autoscale=(2, 6), cpu_target=70))
    for obj in objects:
        _validate(obj)
    kinds = _by_kind(objects)
    assert [o["kind"] for o in objects].index("HorizontalPodAutoscaler") > \
        [o["kind"] for o in objects].index("StatefulSet")
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                     "name": "mirror"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    sts = kinds["StatefulSet"]["spec"]
    assert sts["replicas"] == 2 and "volumeClaimTemplates" not in sts
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = sts["template"]["spec"]
    assert pod["serviceAccountName"] == "mirror" and pod["automountServiceAccountToken"]
    assert {"name": "recovery", "persistentVolumeClaim": {"claimName": "mirror-recovery"}} \
        in pod["volumes"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--recovery-partitions") + 1] == "6"
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "DATAFLARE_REPLICAS_FROM" in env and "BYTEWAX_REPLICAS" not in env
    assert kinds["Role"]["rules"] == [{"apiGroups": ["apps"], "resources": ["statefulsets/scale"],
                                       "resourceNames": ["mirror"], "verbs": ["get"]}]
    assert kinds["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": "mirror"}]
    # Without autoscaling a pod gets no API token at all.
    plain = _by_kind(k8s.render(ROOT / "flows/postgres_cdc_mirror.yaml", k8s.Options()))
    assert plain["StatefulSet"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert "HorizontalPodAutoscaler" not in plain
    with pytest.raises(ValueError, match="streaming"):
        k8s.render(ROOT / "flows/quickstart.yaml", k8s.Options(autoscale=(1, 3)))
    with pytest.raises(ValueError, match="MIN <= MAX"):
        k8s.render(ROOT / "flows/postgres_cdc_mirror.yaml", k8s.Options(autoscale=(3, 2)))


class _KubeApi(BaseHTTPRequestHandler):
    """The one API call a pod makes: its StatefulSet's ``scale``."""

    replicas = 0
    path_expected = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        ok = self.path == self.path_expected
        body = json.dumps({"kind": "Scale", "spec": {"replicas": type(self).replicas}} if ok
                          else {"kind": "Status", "code": 404}).encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _events(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"id": i, "user_id": f"u{i % 7}"} for i in range(start, stop)]


def _wait_rows(pg_schema: Any, table: str, n: int, procs: list[Any]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if pg_schema.rows(f'SELECT count(*) FROM "{pg_schema.schema}".{table}')[0][0] >= n:
                return
        for p in procs:
            assert p.poll() is None, p.communicate()[1]
        time.sleep(0.5)
    pytest.fail(f"{n} rows did not arrive")


def test_an_autoscaled_statefulset_rescales_by_stop_and_start_with_exact_output(
        tmp_path: Path, kafka_broker: Any, kafka_topic: Any, pg_schema: Any) -> None:
    topic = kafka_topic(partitions=4)
    flow = _write(tmp_path, "wf.yaml", f"""
workflow:
  id: scaled
  sources:
    events:
      type: kafka
      mode: streaming
      config: {{bootstrap_servers: "${{KAFKA}}", topic: {topic}, consumer_group: scaled}}
  destinations:
    table:
      type: postgres
      inputs: [events]
      config: {{dsn: "${{PG_DSN}}", schema: {pg_schema.schema}, table: events}}
""")
    sts = _by_kind(k8s.render(flow, k8s.Options(autoscale=(1, 3), snapshot_interval=1)))[
        "StatefulSet"]
    api = type("Api", (_KubeApi,), {
        "replicas": 2, "path_expected": "/apis/apps/v1/namespaces/ns/statefulsets/scaled/scale"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secrets = {"KAFKA": kafka_broker.bootstrap_servers, "PG_DSN": pg_schema.dsn}
    # A listed address per possible pod (DNS names in a cluster); the scale says how many run.
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    recovery = tmp_path / "recovery"  # the shared ReadWriteMany volume

    def start(n: int) -> list[subprocess.Popen[str]]:
        procs = []
        for i in range(n):
            env = _pod_env(sts, f"scaled-{i}", secrets, namespace="ns")
            env.update(BYTEWAX_ADDRESSES=addresses, DATAFLARE_RESCALE_CHECK="0.5",
                       DATAFLARE_KUBE_API=f"http://127.0.0.1:{server.server_port}")
            cmd = _pod_command(sts, flow, recovery)
            cmd[cmd.index("--http-port") + 1] = str(free_port())
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        return procs

    try:
        pods = start(2)
        produce(kafka_broker.bootstrap_servers, topic, _events(0, 1000))
        _wait_rows(pg_schema, "events", 1000, pods)
        api.replicas = 3  # the autoscaler adds a pod: the running two stop at a snapshot
        for p in pods:
            _, err = p.communicate(timeout=120)
            assert p.returncode == k8s.RESCALE_EXIT, err
            assert "restart as 3 processes" in err
        assert sorted(f.name for f in recovery.glob("*.sqlite3")) == [
            "part-0.sqlite3", "part-1.sqlite3", "part-2.sqlite3"]  # MAX partitions, shared
        produce(kafka_broker.bootstrap_servers, topic, _events(1000, 2000))
        pods = start(3)  # Kubernetes restarts the two and starts the third
        _wait_rows(pg_schema, "events", 2000, pods)
        for p in pods:
            p.send_signal(signal.SIGTERM)
        for p in pods:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 128 + signal.SIGTERM, err
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
        server.shutdown()
    rows = pg_schema.rows(f'SELECT id FROM "{pg_schema.schema}".events ORDER BY id')
    assert rows == [(i,) for i in range(2000)]


def test_bytewax_run_takes_the_workflow_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(f'{{"n": {i}}}\n' for i in range(5)))
    flow = _write(tmp_path, "wf.yaml", """
workflow:
  sources: {numbers: {type: file, config: {path: in.jsonl}}}
  transformations:
    big: {type: filter, inputs: [numbers], config: {condition: "n >= 2"}}
  destinations: {out: {type: file, inputs: [big], config: {path: out.jsonl}}}
""")
    env = {**os.environ, "DATAFLARE_WORKFLOW": str(flow)}
    out = subprocess.run([sys.executable, "-m", "bytewax.run", "dataflare.k8s:flow"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line)["n"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(got) == [2, 3, 4]
    env.pop("DATAFLARE_WORKFLOW")
    out = subprocess.run([sys.executable, "-m", "bytewax.run", "dataflare.k8s:flow"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DATAFLARE_WORKFLOW" in out.stderr


def _dockerfile() -> tuple[dict[str, str], list[str]]:
    """The Dockerfile's build arguments (with defaults) and its entry point."""
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry is not None
    return args, json.loads(entry.group(1))


def test_the_image_entry_point_runs_a_workflow_with_the_core_only(tmp_path: Path) -> None:
    """What the image's build stage does, in a venv: install the checkout, run the entry point.

    Installed with no extra, as a core-only install: file -> mapping -> file needs none.
    """
    args, entry = _dockerfile()
    assert args["EXTRAS"] == "all" and entry == ["dataflare"]
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M), "the image runs as a non-root user"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    missing = subprocess.run([str(venv / "bin/python"), "-c", "import confluent_kafka"],
                             capture_output=True)
    assert missing.returncode != 0, "the core install must not bring the Kafka client"
    (tmp_path / "in.jsonl").write_text('{"id": "1", "amount": "12.5"}\n{"id": "2"}\n')
    flow = _write(tmp_path, "wf.yaml", """
workflow:
  sources: {orders: {type: file, config: {path: in.jsonl}}}
  transformations:
    clean:
      type: mapping
      inputs: [orders]
      config:
        mappings:
          - {source: id, destination: id, transform: to_int}
          - {source: amount, destination: amount, transform: to_float, default: 0}
  destinations: {out: {type: file, inputs: [clean], config: {path: out.jsonl}}}
""")
    run = subprocess.run([str(venv / "bin" / entry[0]), *shlex.split("run -q"), str(flow)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(lines, key=lambda r: r["id"]) == [{"id": 1, "amount": 12.5},
                                                   {"id": 2, "amount": 0}]
    # A component whose extra is missing is refused at validate, with what to install.
    kafka = _write(tmp_path, "kafka.yaml", """
workflow:
  sources: {events: {type: kafka, config: {topic: t}}}
  destinations: {out: {type: duckdb, inputs: [events], config: {path: x.db, table: t}}}
""")
    refused = subprocess.run([str(venv / "bin" / entry[0]), "validate", str(kafka)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "source type 'kafka' needs confluent_kafka, not installed: pip install " \
           "'dataflare[kafka]'" in refused.stderr
    assert "pip install 'dataflare[duckdb]'" in refused.stderr


def test_a_workflow_runs_as_a_job_only_when_its_sources_end(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def kinds(source: str) -> set[str]:
        flow = _write(tmp_path, "w.yaml", f"workflow:\n  id: w\n  sources:\n    src: {source}\n"
                      "  destinations: {out: {type: stdout, inputs: [src]}}\n")
        return set(_by_kind(k8s.render(flow, k8s.Options())))

    api = "{type: rest_api, config: {url: 'http://127.0.0.1:9/x'"
    assert "Job" in kinds(api + "}}")  # one read of the endpoint (was a StatefulSet)
    assert "StatefulSet" in kinds(api + "}, mode: incremental, incremental: {column: t}}")
    assert "StatefulSet" in kinds("{type: kafka, config: {topic: t}}")
    assert "Job" in kinds("{type: kafka, mode: full, config: {topic: t}}")
    assert "StatefulSet" in kinds("{type: kafka, mode: full, config: {topic: t, "
                                  "stop_at_end: false}}")
    # A catch-up run keeps its place on a volume of its own: the next run resumes there.
    flow = _write(tmp_path, "w.yaml", "workflow:\n  id: w\n  sources:\n    src: " + api
                  + ", stop_at_end: true}, mode: incremental, incremental: {column: t}}\n"
                  "  destinations: {out: {type: stdout, inputs: [src]}}\n")
    objects = _by_kind(k8s.render(flow, k8s.Options()))
    pod = objects["Job"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--recovery-dir") + 1].startswith(k8s.RECOVERY_MOUNT)
    assert {"name": "recovery", "persistentVolumeClaim": {"claimName": "w-recovery"}} \
        in pod["volumes"]
    assert objects["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    for obj in k8s.render(flow, k8s.Options()):
        _validate(obj)
    shared = _by_kind(k8s.render(flow, k8s.Options(replicas=3)))["PersistentVolumeClaim"]
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on any node
    assert "Job" in kinds("{type: kafka, mode: full, config: {topic: t}}")
    assert "PersistentVolumeClaim" not in kinds("{type: kafka, mode: full, config: {topic: t}}")
    assert "warning" not in capsys.readouterr().err


def test_outputs_the_pods_cannot_write_and_variables_they_take_from_defaults_are_warned(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The pods crashed at their first write (relative paths resolve in the read-only
    # ConfigMap mount), and the Secret left out a password with an empty default.
    flow = _write(tmp_path, "w.yaml", """\
workflow:
  id: w
  environment: {DB_HOST: 127.0.0.1}
  sources:
    src:
      type: postgres
      config: {host: "${DB_HOST}", password: "${DB_PASSWORD:-}", database: d, table: t}
  destinations:
    out: {type: file, inputs: [src], config: {path: out/o.jsonl}}
    tmp: {type: duckdb, inputs: [src], config: {path: /tmp/w.duckdb, table: t}}
""")
    secret = _by_kind(k8s.render(flow, k8s.Options()))["Secret"]
    assert secret["stringData"] == {"DB_PASSWORD": "", "DATAFLARE_HTTP_TOKEN": ""}
    said = capsys.readouterr().err
    assert "destination 'out' writes /etc/dataflare/out/o.jsonl, which the pods cannot " \
        "write" in said
    assert "'tmp'" not in said
    assert "the pods take DB_HOST from the workflow's defaults or its environment: block" \
        in said


@pytest.mark.parametrize(("args", "said"), [
    (["--replicas", "0"], "--replicas 0: expected at least 1"),
    (["--autoscale", "2"], "--autoscale '2': expected MIN:MAX"),
])
def test_counts_that_cannot_be_are_refused(args: list[str], said: str) -> None:
    # They rendered manifests without a word (--autoscale 2 read as 2:2).
    done = subprocess.run([sys.executable, "-m", "dataflare", "k8s",
                           str(ROOT / "flows/postgres_cdc_mirror.yaml"), "--image", "x", *args],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and said in done.stderr and done.stdout == ""


def test_more_pods_than_max_concurrency_are_refused(tmp_path: Path) -> None:
    # Each pod refused to start ("config.max_concurrency is 2, this run asks for 3").
    flow = _write(tmp_path, "w.yaml", """\
workflow:
  id: w
  config: {max_concurrency: 2}
  sources: {src: {type: kafka, config: {bootstrap_servers: "k:9092", topic: t}}}
  destinations: {out: {type: stdout, inputs: [src]}}
""")
    with pytest.raises(ValueError, match="config.max_concurrency is 2: 3 pods"):
        k8s.render(flow, k8s.Options(replicas=3))
    assert k8s.render(flow, k8s.Options(replicas=2))
