"""A run's live HTTP endpoints (``dataflare run --http-port``) and the tap.

- ``/health``: the process is alive.
- ``/ready``: every source and destination endpoint (database, broker, HTTP service) accepts
  a connection; 503 naming each that does not, as Redpanda Connect's ``/ready``.
- ``/metrics``: Prometheus metrics (DataFlare's and bytewax's own).
- ``/status``: per-step records, failures and rates (records/s over the last seconds).
- ``/tap/<step>?limit=N``: records as they leave a step, masked by the workflow's
  ``masking_rules``, one JSON object per line (``dataflare tap``), like ``vector tap``.
- ``/views/<step>?key=K&where=EXPR&limit=N``: the state of a step with ``serve: true``
  (:mod:`dataflare.views`), masked: ``{"step", "rows"}``; with ``key`` that key's rows (404
  when it holds none).

``/tap`` and ``/views`` serve records: with ``DATAFLARE_HTTP_TOKEN`` set they ask for it
(``Authorization: Bearer <token>``); without it they answer only on a loopback address
(403 elsewhere: a pod serves on 0.0.0.0, where any other pod could read the records).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from dataflare import metrics, views

TOKEN_ENV = "DATAFLARE_HTTP_TOKEN"
"""The token ``/tap`` and ``/views`` ask for (``dataflare tap`` and the peers send it)."""
_TAPS: dict[str, list[queue.Queue[list[Any]]]] = {}
_TAPS_LOCK = threading.Lock()
_DEFAULT_PORTS = {"postgres": 5432, "postgresql": 5432, "mysql": 3306, "redis": 6379,
                  "rediss": 6379, "http": 80, "https": 443, "kafka": 9092}


def tapper(step: str, mask: Callable[[Any], Any] | None) -> Callable[[str, list[Any]], None]:
    """An ``op.inspect`` function publishing a step's batches to its taps (if any)."""

    def publish(_step_id: str, batch: list[Any]) -> None:
        subscribers = _TAPS.get(step)
        if not subscribers:
            return
        records = [mask(r) if mask is not None and isinstance(r, dict) else r for r in batch]
        for q in list(subscribers):
            try:
                q.put_nowait(records)
            except queue.Full:  # a slow reader misses batches rather than slow the run
                pass

    return publish


def _subscribe(step: str) -> queue.Queue[list[Any]]:
    q: queue.Queue[list[Any]] = queue.Queue(maxsize=100)
    with _TAPS_LOCK:
        _TAPS.setdefault(step, []).append(q)
    return q


def _unsubscribe(step: str, q: queue.Queue[list[Any]]) -> None:
    with _TAPS_LOCK:
        if q in _TAPS.get(step, []):
            _TAPS[step].remove(q)


def endpoints(config: Any) -> list[tuple[str, int]]:
    """The host:port pairs a component's config connects to (for ``/ready``)."""
    found: list[tuple[str, int]] = []
    data = config.model_dump() if hasattr(config, "model_dump") else dict(config or {})
    for key in ("url", "endpoint_url", "dsn"):
        value: Any = data.get(key)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if not isinstance(value, str) or not value:
            continue
        if "://" in value:
            u = urlparse(value)
            if u.hostname:
                found.append((u.hostname, u.port or _DEFAULT_PORTS.get(u.scheme, 80)))
        else:  # a key/value DSN
            host = re.search(r"(?:^|\s)host=(\S+)", value)
            port = re.search(r"(?:^|\s)port=(\d+)", value)
            if host and not host.group(1).startswith("/"):
                found.append((host.group(1), int(port.group(1)) if port else 5432))
    servers = data.get("bootstrap_servers")
    if isinstance(servers, str):
        for s in servers.split(","):
            name, _, number = s.strip().rpartition(":")
            if name and number.isdigit():
                found.append((name, int(number)))
    h, p = data.get("host"), data.get("port")
    if isinstance(h, str) and h and isinstance(p, int):
        found.append((h, p))
    return list(dict.fromkeys(found))


class Live:
    """The endpoints of one run."""

    def __init__(self, workflow: Any, run_id: str | None, peers: list[str] | None = None
                 ) -> None:
        """Endpoints of ``workflow``'s run; ``peers``: the URLs of its other processes."""
        self.workflow, self.run_id = workflow, run_id
        self.peers = peers or []
        self.started = time.monotonic()
        self.steps = [*workflow.sources, *workflow.transformations, *workflow.destinations]
        self.components = {**workflow.sources, **workflow.destinations}
        self._rates: dict[str, tuple[float, float]] = {}
        self._server: ThreadingHTTPServer | None = None

    def served(self) -> list[str]:
        """The steps with ``serve: true`` (``/views/<step>``)."""
        return [cid for cid, t in self.workflow.transformations.items()
                if getattr(t, "serve", False)]

    def gathered(self, step: str, found: list[tuple[str, dict[str, Any]]], key: str | None,
                 where: str | None, limit: str) -> list[tuple[str, dict[str, Any]]]:
        """``found`` (this process's rows) with the other processes' rows, in key order.

        Each process holds the keys of its workers' shards; a process that does not answer
        is an ``OSError`` naming it (a view is never silently partial).
        """
        if not self.peers:
            return found
        import urllib.request
        from urllib.parse import urlencode

        params = {"local": "1", **{k: v for k, v in (("key", key), ("where", where),
                                                     ("limit", limit)) if v}}
        merged = list(found)
        for peer in self.peers:
            url = f"{peer}/views/{step}?{urlencode(params)}"
            try:
                with urllib.request.urlopen(urllib.request.Request(  # noqa: S310 - http
                        url, headers=auth_headers()), timeout=10) as answer:
                    body = json.loads(answer.read())
            except (OSError, ValueError) as exc:
                msg = f"the process at {peer} did not answer for view {step!r}: {exc}"
                raise OSError(msg) from None
            merged.extend(zip(body["keys"], body["rows"], strict=True))
        return sorted(merged, key=lambda kr: kr[0])

    def ready(self) -> tuple[bool, list[dict[str, Any]]]:
        """Whether every endpoint accepts a connection, and those that do not."""
        failing = []
        for cid, comp in self.components.items():
            for host, port in endpoints(comp.config):
                try:
                    with socket.create_connection((host, port), timeout=1.0):
                        pass
                except OSError as exc:
                    failing.append({"component": cid, "endpoint": f"{host}:{port}",
                                    "error": exc.strerror or type(exc).__name__})
        return not failing, failing

    def status(self) -> dict[str, Any]:
        """Per-step records, failures and rates."""
        now = time.monotonic()
        steps = {}
        for step in self.steps:
            n = metrics.value(metrics.RECORDS_OUT, step=step) + metrics.value(
                metrics.RECORDS_WRITTEN, step=step)
            failed = sum(metrics.value(metrics.ERRORS, step=step, strategy=s)
                         for s in ("skip", "fail", "redirect"))
            last_n, last_t = self._rates.get(step, (0.0, self.started))
            rate = (n - last_n) / (now - last_t) if now > last_t else 0.0
            if now - last_t >= 1.0:
                self._rates[step] = (n, now)
            kind = ("source" if step in self.workflow.sources else
                    "destination" if step in self.workflow.destinations else "transformation")
            steps[step] = {"kind": kind, "records": int(n), "failed": int(failed),
                           "rate": round(rate, 1)}
        return {"workflow": self.workflow.id or self.workflow.name, "run_id": self.run_id,
                "uptime_s": round(now - self.started, 1), "steps": steps}

    def start(self, host: str, port: int) -> int:
        """Serve in a daemon thread; the port bound (``port`` 0 picks a free one)."""
        live = self
        token = os.environ.get(TOKEN_ENV) or None
        if token is not None:
            from dataflare import secrets

            secrets.register(token)
        local = _loopback(host)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                if url.path == "/health":
                    self._json(200, {"status": "alive"})
                elif url.path == "/ready":
                    ok, failing = live.ready()
                    self._json(200 if ok else 503,
                               {"status": "ready"} if ok else
                               {"status": "not ready", "not_ready": failing})
                elif url.path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    data = generate_latest()
                    self.send_response(200)
                    self.send_header("content-type", CONTENT_TYPE_LATEST)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif url.path == "/status":
                    self._json(200, live.status())
                elif url.path.startswith(("/tap/", "/views/")) and not self._allowed():
                    return
                elif url.path.startswith("/tap/"):
                    self._tap(url.path[5:], parse_qs(url.query))
                elif url.path.startswith("/views/"):
                    self._view(url.path[7:], parse_qs(url.query))
                else:
                    self._json(404, {"error": f"no endpoint {url.path}"})

            def _allowed(self) -> bool:
                """Whether records may be served to this request (see the module docs)."""
                if token is None:
                    if local:
                        return True
                    self._json(403, {"error": f"records are served off the loopback address "
                                     f"only with a token: set {TOKEN_ENV} where the run and "
                                     "the client run"})
                    return False
                given = self.headers.get("authorization", "").removeprefix("Bearer ")
                if hmac.compare_digest(given.encode(), token.encode()):
                    return True
                self._json(401, {"error": f"a valid token is needed ({TOKEN_ENV}, sent as "
                                 "Authorization: Bearer)"})
                return False

            def _view(self, step: str, query: dict[str, list[str]]) -> None:
                served = live.served()
                view = views.VIEWS.get(step) if step in served else None
                if view is None:
                    self._json(404, {"error": f"no served step {step!r} (a stateful step "
                                     "with serve: true)", "views": served})
                    return
                key = query.get("key", [None])[0]
                where = query.get("where", [None])[0]
                limit = query.get("limit", [""])[0]
                if limit and not limit.isdigit():
                    self._json(400, {"error": f"limit {limit!r} is not a number"})
                    return
                n = int(limit) if limit else None
                try:
                    found = view.matches(key, where, n)
                except ValueError as exc:
                    self._json(400, {"error": f"where: {exc}"})
                    return
                if "local" in query:  # asked by another process of the run
                    self._json(200, {"step": step, "keys": [k for k, _ in found],
                                     "rows": [r for _, r in found]})
                    return
                try:
                    found = live.gathered(step, found, key, where, limit)
                except OSError as exc:
                    self._json(502, {"error": str(exc)})
                    return
                rows = [r for _, r in found][:n]
                if key is not None and not rows:
                    self._json(404, {"error": f"no key {key!r} in the state of {step!r}"})
                    return
                body: dict[str, Any] = {"step": step, "rows": rows}
                if key is not None:
                    body["key"] = key
                self._json(200, body)

            def _tap(self, step: str, query: dict[str, list[str]]) -> None:
                if step not in live.steps:
                    self._json(404, {"error": f"no step {step!r}",
                                     "steps": live.steps})
                    return
                limit = int(query.get("limit", ["0"])[0] or 0)
                q = _subscribe(step)
                self.send_response(200)
                self.send_header("content-type", "application/x-ndjson")
                self.end_headers()
                sent = 0
                try:
                    while not limit or sent < limit:
                        try:
                            batch = q.get(timeout=1.0)
                        except queue.Empty:
                            continue
                        for record in batch:
                            self.wfile.write(json.dumps(record, default=str).encode() + b"\n")
                            sent += 1
                            if limit and sent >= limit:
                                break
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    _unsubscribe(step, q)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="dataflare-live").start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def auth_headers() -> dict[str, str]:
    """The headers a client of ``/tap`` and ``/views`` sends: the token, when set."""
    token = os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind) is reachable from this machine only."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
