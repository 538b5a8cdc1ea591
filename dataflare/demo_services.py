"""Local stand-ins for the HTTP services the seed workflows call (``flows/seed/``).

One threaded HTTP server on a loopback port answers:

- ``GET /products?page=&size=``: the product catalog, a JSON list per page (page numbers
  from 1; an empty page ends it), for the ``rest_api`` source;
- ``POST /credit-score`` ``{"customer_id": ...}`` -> ``{"score": credit_score(id)}``, for an
  ``enrich`` ``http_api`` step;
- ``POST /predict``: a remote plugin (``{"config", "records"}`` -> ``{"records"}``) that sets
  ``config.output_field`` of each record to :func:`churn_probability` of its
  ``customer.email``;
- ``POST /alerts``: an alert receiver; the bodies it got are in ``alerts``;
- ``POST /slack``: a Slack incoming webhook; the bodies it got are in ``slack``.

The answers are deterministic functions of the request, so a test computes them itself.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from dataflare.records import get_path, set_path


def credit_score(customer_id: Any) -> int:
    """The credit score the stand-in gives a customer id (300 to 849)."""
    return 300 + (int(customer_id) * 37) % 550


def churn_probability(email: Any) -> float:
    """The churn probability the stand-in model gives an e-mail address (0 to 1)."""
    digest = hashlib.sha256(str(email).encode()).hexdigest()
    return round(int(digest[:8], 16) / 0xFFFFFFFF, 4)


@dataclass
class SeedServices:
    """What the stand-ins serve and received."""

    url: str = ""
    products: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[Any] = field(default_factory=list)
    slack: list[Any] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    services: SeedServices

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.services.lock:
            self.services.requests.append(f"GET {self.path}")
            products = list(self.services.products)
        if url.path != "/products":
            self._send(404, {"error": f"no route {url.path}"})
            return
        page, size = int(q.get("page", 1)), int(q.get("size", 100))
        self._send(200, products[(page - 1) * size: page * size])

    def do_POST(self) -> None:
        path = urlparse(self.path).path
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        with self.services.lock:
            self.services.requests.append(f"POST {self.path}")
        if path == "/credit-score":
            self._send(200, {"score": credit_score(body["customer_id"])})
        elif path == "/predict":
            out_field = body["config"].get("output_field", "churn_probability")
            records = []
            for rec in body["records"]:
                rec = dict(rec)
                set_path(rec, out_field, churn_probability(get_path(rec, "customer.email")))
                records.append(rec)
            self._send(200, {"records": records})
        elif path in ("/alerts", "/slack"):
            with self.services.lock:
                getattr(self.services, path[1:]).append(body)
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": f"no route {path}"})


@contextmanager
def seed_services(products: list[dict[str, Any]] | None = None,
                  host: str = "127.0.0.1", port: int = 0) -> Iterator[SeedServices]:
    """Serve the stand-ins on ``host:port`` (a free port by default) while in the block."""
    services = SeedServices(products=list(products or []))
    handler = type("Handler", (_Handler,), {"services": services})
    server = ThreadingHTTPServer((host, port), handler)
    services.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="seed services", daemon=True)
    thread.start()
    try:
        yield services
    finally:
        server.shutdown()
        server.server_close()
