"""A client of the server's API: ``dataflare push | runs | trigger | stop``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class ApiError(Exception):
    """The server refused a request; the message says why (problems listed when invalid)."""


class Client:
    """Calls ``/api/v1`` of a server with a bearer token."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/v1", timeout=timeout,
                                 headers={"Authorization": f"Bearer {token or ''}"})

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body if "problems" in body else body.get("detail")
            except (ValueError, AttributeError):
                detail = r.text
            if isinstance(detail, dict) and "problems" in detail:
                detail = "\n".join(f"{p['line']}:{p['column']}: {p['path']}: {p['message']}"
                                   for p in detail["problems"])
            msg = f"HTTP {r.status_code}: {detail}"
            raise ApiError(msg)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") \
            else r.text

    def push(self, path: str | Path) -> dict[str, Any]:
        """Create the workflow of a file, or store it as a new revision."""
        text = Path(path).read_text(encoding="utf-8")
        headers = {"content-type": "text/yaml"}
        try:
            return dict(self._call("POST", "/workflows", content=text, headers=headers))
        except ApiError as exc:
            if not str(exc).startswith("HTTP 409"):
                raise
        import yaml

        wid = (yaml.safe_load(text) or {}).get("workflow", {}).get("id")
        return dict(self._call("PUT", f"/workflows/{wid}", content=text, headers=headers))

    def runs(self, workflow: str | None = None, status: str | None = None) -> list[Any]:
        """Runs, newest first."""
        params = {k: v for k, v in (("workflow", workflow), ("status", status)) if v}
        return list(self._call("GET", "/runs", params=params))

    def trigger(self, workflow: str) -> dict[str, Any]:
        """Start a run of a stored workflow."""
        return dict(self._call("POST", f"/workflows/{workflow}/runs"))

    def run(self, rid: str) -> dict[str, Any]:
        """One run."""
        return dict(self._call("GET", f"/runs/{rid}"))

    def stop(self, rid: str) -> dict[str, Any]:
        """Stop a run."""
        return dict(self._call("POST", f"/runs/{rid}/stop"))

    def wait(self, rid: str, poll: float = 1.0) -> dict[str, Any]:
        """The run once it ended."""
        while True:
            run = self.run(rid)
            if run["status"] in ("succeeded", "failed", "stopped"):
                return run
            time.sleep(poll)

    def trigger_for_post_action(self, workflow: str, wait: bool) -> tuple[bool, str]:
        """A post-action ``trigger`` of ``dataflare run --server``: (ok, what happened)."""
        try:
            run = self.trigger(workflow)
            if wait:
                run = self.wait(run["id"])
                return run["status"] == "succeeded", f"run {run['id']} {run['status']}"
            return True, f"run {run['id']} queued"
        except Exception as exc:  # noqa: BLE001 - reported with the post-action's outcome
            return False, str(exc)
