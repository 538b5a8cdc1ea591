"""The ``dataflare`` command: validate, run, test and graph workflows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dataflare import logs
from dataflare.dsl_compiler import validate_file


def _print_problems(problems: Sequence[object], for_run: bool) -> None:
    for p in problems:
        print(p.render(for_run), file=sys.stderr)  # type: ignore[attr-defined]


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate workflow files; every problem is one line on stderr."""
    failed = False
    for path in args.paths:
        v = validate_file(path)
        _print_problems(v.problems, for_run=False)
        if v.errors() or (args.strict and v.problems):
            failed = True
        else:
            warnings = len(v.problems)
            stops = sum(p.at_run for p in v.problems)
            # A warning `run` takes for an error (an unset variable, an undefined target)
            stopping = (", which stops a run as it stands" if warnings == 1 else
                        f"; {stops} stop{'s' * (stops == 1)} a run as it stands") if stops else ""
            note = f" ({warnings} warning{'s' * (warnings != 1)}{stopping})" if warnings else ""
            print(f"{path}: valid{note}")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run a workflow with bytewax (bounded inputs run until they end)."""
    from dataclasses import fields

    from dataflare.runner import RunOptions, run_with

    names = {f.name for f in fields(RunOptions)}
    return run_with(RunOptions(**{k: v for k, v in vars(args).items() if k in names})).exit_code


def cmd_replay(args: argparse.Namespace) -> int:
    """Run a workflow from one of its steps, on dead letters."""
    from dataflare.runner import RunOptions, run_with

    return run_with(RunOptions(
        path=args.path, recovery_dir=args.recovery_dir, quiet=args.quiet,
        summary_json=args.summary_json, no_post_actions=True,
        replay=(args.step, args.letters), verbose=args.verbose)).exit_code


def cmd_test(args: argparse.Namespace) -> int:
    """Run the ``tests:`` blocks of workflow files."""
    from dataflare.runner import without_worker_panics
    from dataflare.testing import run_workflow_tests

    with without_worker_panics():
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


def cmd_plan(args: argparse.Namespace) -> int:
    """What a changed workflow does to a run's state: exit 0 none, 2 safe, 3 unsafe."""
    from dataflare.plan import PlanError, plan_against_file, plan_against_recovery

    new = validate_file(args.path)
    old = validate_file(args.against) if args.against else None
    invalid = [p for v in (new, old) if v is not None for p in v.errors(for_run=True)]
    if invalid:
        _print_problems(invalid, for_run=True)
        return 1
    try:
        plan = (plan_against_file(new, old) if old is not None
                else plan_against_recovery(new, args.recovery_dir))
    except (PlanError, OSError) as exc:
        print(f"error: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a builder's configuration error, shown plainly
        from dataflare.runner import error_text

        print(f"error: cannot compile the workflow: {error_text(exc)}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(plan.text())
    return plan.exit_code


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print the datasets the workflows read and write (Mermaid, DOT or JSON)."""
    from dataflare.lineage import lineage, render

    validated = []
    for path in args.paths:
        v = validate_file(path)
        if v.errors() or v.workflow is None:
            _print_problems(v.errors(), for_run=False)
            return 1
        validated.append(v)
    print(render(lineage(validated), args.format))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    """Print what each source would read: tables and columns, or inferred record schemas."""
    from dataflare.connectors.schema import discover
    from dataflare.dsl_compiler.compiler import component_context
    from dataflare.runner import error_text

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
            text = error_text(exc)
            named = text.startswith((f"source {name!r}: ", f"step {name!r}: "))
            print(f"error: {text if named else f'source {name!r}: {text}'}", file=sys.stderr)
            code = 1
    print(json.dumps(catalog, indent=2, default=str))
    return code


def cmd_server(args: argparse.Namespace) -> int:
    """Run the platform server's roles."""
    from dataflare.server import serve

    return serve(args.store, args.role, args.host, args.port, args.config,
                 Path(args.data_dir), args.workers, args.lease)


def cmd_client(args: argparse.Namespace) -> int:
    """``push``, ``runs``, ``trigger`` and ``stop`` against a server."""
    import httpx

    from dataflare.server.client import ApiError, Client

    client = Client(args.server, args.token)
    try:
        if args.action == "push":
            out = client.push(args.target)
            print(f"{out['id']}: revision {out['revision']}")
        elif args.action == "runs":
            for r in client.runs(args.target, args.status):
                print(f"{r['id']}  {r['workflow']}  {r['status']:<9}  {r['trigger']:<8}  "
                      f"{r['started_at'] or '-'}")
        elif args.action == "trigger":
            run = client.trigger(args.target)
            print(run["id"])
            if args.wait:
                run = client.wait(run["id"])
                print(run["status"] + (f": {run['error']}" if run.get("error") else ""))
                return 0 if run["status"] == "succeeded" else 1
        else:
            print(client.stop(args.target)["status"])
    except (ApiError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # the server cannot be reached, or broke off
        print(f"error: no answer from the server ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 1
    return 0


def cmd_tap(args: argparse.Namespace) -> int:
    """Print the records leaving a step of a running workflow, one JSON object per line."""
    import httpx

    from dataflare.live import auth_headers

    url = f"{args.url.rstrip('/')}/tap/{args.step}"
    try:
        with httpx.stream("GET", url, params={"limit": args.limit}, timeout=None,
                          headers=auth_headers()) as r:
            if r.status_code != 200:
                r.read()
                print(f"error: {r.json().get('error', r.text)}", file=sys.stderr)
                return 1
            for line in r.iter_lines():
                print(line, flush=True)
    except (httpx.HTTPError, KeyboardInterrupt) as exc:
        if isinstance(exc, httpx.HTTPError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """Show per-step records, rates and errors of a running workflow, refreshed."""
    import time

    import httpx

    try:
        while True:
            status = httpx.get(f"{args.url.rstrip('/')}/status", timeout=5).json()
            lines = [f"{status['workflow']}  run {status['run_id'] or '-'}  "
                     f"up {status['uptime_s']}s",
                     f"{'step':<24}{'kind':<16}{'records':>12}{'rate/s':>10}{'errors':>8}"]
            for step, s in status["steps"].items():
                lines.append(f"{step:<24}{s['kind']:<16}{s['records']:>12}{s['rate']:>10}"
                             f"{s['failed']:>8}")
            if sys.stdout.isatty() and not args.once:
                print("\x1b[H\x1b[2J", end="")
            print("\n".join(lines), flush=True)
            if args.once:
                return 0
            time.sleep(args.interval)
    except httpx.HTTPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    """Print (or write) the Kubernetes manifests that run a workflow."""
    from dataflare import k8s

    try:
        scale = None
        if args.autoscale:
            try:
                low, colon, high = args.autoscale.partition(":")
                scale = (int(low), int(high)) if colon else None
            except ValueError:
                scale = None
            if scale is None:
                msg = f"--autoscale {args.autoscale!r}: expected MIN:MAX, e.g. 2:10"
                raise ValueError(msg)
        if args.replicas < 1:
            msg = f"--replicas {args.replicas}: expected at least 1"
            raise ValueError(msg)
        objects = k8s.render(args.path, k8s.Options(
            image=args.image, replicas=args.replicas, name=args.name, namespace=args.namespace,
            autoscale=scale, cpu_target=args.cpu_target))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    clear = k8s.secrets_in_clear(args.path)
    for line in clear:  # a ConfigMap is read by whoever may read the namespace's ConfigMaps
        print(f"{args.path}:{line}: error: a secret value is written out here and would go "
              "into the ConfigMap: write it as ${VAR}, and VAR goes into the rendered Secret",
              file=sys.stderr)
    if clear:
        return 1
    if args.out is None:
        print(k8s.dump(objects), end="")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        kind, name = obj["kind"].lower(), obj["metadata"]["name"]
        (out / f"{name}.{kind}.yaml").write_text(k8s.dump([obj]))
    print(f"wrote {len(objects)} manifests to {out}")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    """Print JSON-lines records with the workflow's encrypted fields read back."""
    import json

    from dataflare.encryption import field_cipher

    v = validate_file(args.workflow)
    if v.errors(for_run=True) or v.workflow is None:
        _print_problems(v.errors(for_run=True), for_run=True)
        return 1
    try:
        cipher = field_cipher(v.workflow.data_protection)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cipher is None:
        print(f"error: {args.workflow} encrypts no fields (data_protection.encryption.at_rest, "
              "fields, key)", file=sys.stderr)
        return 1
    with open(args.path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = cipher.decrypt_record(json.loads(line))
            except ValueError as exc:
                print(f"error: {args.path}:{number}: {exc}", file=sys.stderr)
                return 1
            print(json.dumps(record))
    return 0



def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of workflow files, or the Markdown DSL reference."""
    from dataflare.dsl_compiler import reference

    print(reference.markdown() if args.markdown else reference.json_schema_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dataflare`` command."""
    parser = argparse.ArgumentParser(prog="dataflare", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log more.")
    parser.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="Log lines as text or JSON objects (default: "
                        "$DATAFLARE_LOG_FORMAT, else text).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="Check workflow files; problems go to stderr.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--strict", action="store_true",
                   help="Warnings are errors too (exit 1), for CI.")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("run", help="Run a workflow.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="Log more.")
    p.add_argument("--metrics-port", type=int,
                   help="Serve Prometheus metrics on HOST:PORT/metrics while running.")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="Address the metrics server binds (0.0.0.0 in a pod).")
    p.add_argument("--http-port", type=int,
                   help="Serve /health, /ready, /metrics, /status and the tap on this port.")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="Address --http-port binds (0.0.0.0 in a pod).")
    p.add_argument("--otlp-url", default=os.environ.get("DATAFLARE_OTLP_URL"),
                   help="Send bytewax's traces (spans per step) to this OpenTelemetry "
                   "collector over gRPC, e.g. http://127.0.0.1:4317.")
    p.add_argument("--openlineage-url", default=os.environ.get("DATAFLARE_OPENLINEAGE_URL"),
                   help="Send OpenLineage run events (START, COMPLETE/FAIL) to this endpoint "
                   "(e.g. Marquez: http://host:5000; posted to /api/v1/lineage).")
    p.add_argument("--openlineage-file", metavar="FILE",
                   help="Append OpenLineage run events to FILE, one JSON object per line.")
    p.add_argument("-w", "--workers-per-process", type=int, help="Workers in this process.")
    p.add_argument("-i", "--process-id", type=int, help="This process's id (with -a).")
    p.add_argument("-a", "--addresses", help="host:port of every process, ';'-separated.")
    p.add_argument("-r", "--recovery-dir", "--recovery-directory", dest="recovery_dir",
                   help="Recovery directory; created with its partitions when absent.")
    p.add_argument("-s", "--snapshot-interval", type=float, default=None,
                   help="Seconds between snapshots (epochs); default: the smallest "
                   "streaming.checkpoint_interval of the sources, else 5.")
    p.add_argument("-b", "--backup-interval", type=float, default=0.0,
                   help="Seconds older snapshots are kept.")
    p.add_argument("--recovery-partitions", type=int, default=1,
                   help="Partitions created in a new recovery directory.")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress or summary.")
    p.add_argument("--summary-json", metavar="FILE",
                   help="Write the run's result (status, totals, per-step counts) as JSON.")
    p.add_argument("--progress-json", metavar="FILE",
                   help="Rewrite FILE every second with the per-step counts so far.")
    p.add_argument("--no-post-actions", action="store_true",
                   help="Leave the post-actions to the caller (the server's workers).")
    p.add_argument("--server", default=os.environ.get("DATAFLARE_SERVER"),
                   help="DataFlare server URL: post-action triggers start workflows there.")
    p.add_argument("--token", default=os.environ.get("DATAFLARE_TOKEN"),
                   help="API token for --server (or DATAFLARE_TOKEN).")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("replay", help="Feed dead letters back into a step of a workflow.")
    p.add_argument("letters", metavar="DEAD_LETTERS", help="A JSON-lines file of dead letters.")
    p.add_argument("--to", required=True, dest="step", metavar="STEP",
                   help="The source or transformation that receives them.")
    p.add_argument("path", metavar="WORKFLOW")
    p.add_argument("-r", "--recovery-dir", dest="recovery_dir",
                   help="Recovery directory of the replay (not the workflow's own).")
    p.add_argument("-q", "--quiet", action="store_true", help="No progress or summary.")
    p.add_argument("--summary-json", metavar="FILE")
    p.set_defaults(fn=cmd_replay)

    p = sub.add_parser("test", help="Run the tests: blocks of workflow files.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(fn=cmd_test)

    p = sub.add_parser("graph", help="Print the workflow DAG.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=["mermaid", "dot", "svg"], default="mermaid")
    p.set_defaults(fn=cmd_graph)

    p = sub.add_parser("plan", help="What a changed workflow does before it runs: steps, "
                       "saved state, source positions, destination shapes (exit 0 no change, "
                       "2 safe change, 3 unsafe change).")
    p.add_argument("path", metavar="WORKFLOW")
    against = p.add_mutually_exclusive_group(required=True)
    against.add_argument("-r", "--recovery-dir", metavar="DIR",
                         help="The recovery directory of the run to resume.")
    against.add_argument("--against", metavar="OLD", help="The workflow file it replaces.")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(fn=cmd_plan)


    p = sub.add_parser("lineage", help="Print the datasets workflows read and write, with "
                       "column lineage.")
    p.add_argument("paths", nargs="+", metavar="WORKFLOW")
    p.add_argument("--format", choices=["mermaid", "dot", "json"], default="mermaid")
    p.set_defaults(fn=cmd_lineage)

    p = sub.add_parser("discover", help="Print the fields and types each source reads.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("source", nargs="?", help="Only this source.")
    p.set_defaults(fn=cmd_discover)

    p = sub.add_parser("server", help="Run the platform server (API, scheduler, workers).")
    p.add_argument("--store", help="Store URL: sqlite:///FILE or postgresql://... "
                   "(default: a SQLite file under --data-dir).")
    p.add_argument("--role", choices=["all", "api", "scheduler", "worker"], default="all")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--config", help="Users, tokens and roles (YAML).")
    p.add_argument("--data-dir", default=".dataflare",
                   help="Runs' working and recovery directories, the default store.")
    p.add_argument("--workers", type=int, default=1, help="Runs carried out at once.")
    p.add_argument("--lease", type=float, default=30.0,
                   help="Seconds a worker holds a run without a heartbeat before another "
                   "worker takes it over.")
    p.set_defaults(fn=cmd_server)

    for name, help_text in (("push", "Store a workflow file on a server (a new revision)."),
                            ("runs", "List a server's runs."),
                            ("trigger", "Start a run of a stored workflow."),
                            ("stop", "Stop a run.")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("target", nargs="?" if name == "runs" else None,
                       metavar={"push": "FILE", "runs": "WORKFLOW", "trigger": "WORKFLOW",
                                "stop": "RUN"}[name])
        p.add_argument("--server", default=os.environ.get("DATAFLARE_SERVER",
                                                          "http://127.0.0.1:8080"))
        p.add_argument("--token", default=os.environ.get("DATAFLARE_TOKEN"),
                       help="API token (or DATAFLARE_TOKEN).")
        if name == "runs":
            p.add_argument("--status", help="Only runs in this status.")
        if name == "trigger":
            p.add_argument("--wait", action="store_true", help="Wait for the run to end.")
        p.set_defaults(fn=cmd_client, action=name)

    p = sub.add_parser("tap", help="Print records as they leave a step of a running workflow.")
    p.add_argument("url", metavar="URL", help="The run's --http-port address, e.g. "
                   "http://127.0.0.1:8686")
    p.add_argument("step", metavar="STEP")
    p.add_argument("--limit", type=int, default=0, help="Stop after N records (0: never).")
    p.set_defaults(fn=cmd_tap)

    p = sub.add_parser("top", help="Per-step records, rates and errors of a running workflow.")
    p.add_argument("url", metavar="URL")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--once", action="store_true", help="Print once and exit.")
    p.set_defaults(fn=cmd_top)

    p = sub.add_parser("k8s", help="Print the Kubernetes manifests of a workflow.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--image", default="dataflare:latest", help="Container image of the pods.")
    p.add_argument("--replicas", type=int, default=1, help="Processes (pods).")
    p.add_argument("--name", help="Name of the objects (default: the workflow id).")
    p.add_argument("--namespace", help="Namespace of the objects.")
    p.add_argument("--out", help="Write one file per object into this directory.")
    p.add_argument("--autoscale", metavar="MIN:MAX",
                   help="Add a HorizontalPodAutoscaler (streaming workflows; every rescale "
                   "stops at a snapshot and restarts with the new pod count).")
    p.add_argument("--cpu-target", type=int, default=70,
                   help="The autoscaler's average CPU utilisation target, percent.")
    p.set_defaults(fn=cmd_k8s)

    p = sub.add_parser("decrypt", help="Read back the encrypted fields of JSON-lines records.")
    p.add_argument("workflow", metavar="WORKFLOW", help="The workflow that encrypted them.")
    p.add_argument("path", metavar="PATH", help="A JSON-lines file.")
    p.set_defaults(fn=cmd_decrypt)

    p = sub.add_parser("schema", help="Print the JSON Schema of workflow files.")
    p.add_argument("--markdown", action="store_true", help="The DSL reference instead.")
    p.set_defaults(fn=cmd_schema)

    from dataflare import plugin_sdk  # its module imports wasmtime only when a plugin runs

    plugin_sdk.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dataflare`` console script."""
    args = build_parser().parse_args(argv)
    from dataflare import secrets

    secrets.install_logging()  # every log record, whatever its handler, is scrubbed
    logs.setup(args.verbose, args.log_format)
    # Everything the command prints passes the secret scrubber (dataflare.secrets); its
    # results (stdout) only of whole secrets.
    out, err = sys.stdout, sys.stderr
    sys.stdout = secrets.ScrubbedStream(out, fragments=False)
    sys.stderr = secrets.ScrubbedStream(err)
    try:
        return int(args.fn(args))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err


if __name__ == "__main__":
    sys.exit(main())
