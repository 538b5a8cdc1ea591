"""The platform server: REST API, scheduler and workers over one store.

``dataflare server`` runs every role in one process on a SQLite file by default (the edge
mode); with ``--store postgresql://...`` several processes, each with ``--role api |
scheduler | worker``, share one PostgreSQL database and coordinate only through it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
ROLES = ("all", "api", "scheduler", "worker")


def serve(store_url: str | None, role: str, host: str, port: int, config: str | None,
          data_dir: Path, workers: int = 1, lease: float = 30.0) -> int:
    """Run the server's roles until SIGTERM or SIGINT."""
    from dataflare.server import auth
    from dataflare.server.scheduler import Scheduler
    from dataflare.server.store import Store, default_url, migrate
    from dataflare.server.worker import Worker, WorkerSettings

    access = None
    if role in ("all", "api"):  # a bad config stops the server before any role starts
        token_file = data_dir / "admin-token"
        try:
            access = auth.load(config, default_token_file=token_file)
        except (OSError, ValueError, AttributeError, yaml.YAMLError) as exc:
            print(f"error: --config {config}: {exc}", file=sys.stderr, flush=True)
            return 1
        if config is None:
            print(f"dataflare server: admin token in {token_file}", flush=True)
    url = store_url or default_url(data_dir)
    try:
        migrate(url)
    except Exception as exc:  # noqa: BLE001 - a store missing or out of reach, said in one line
        from dataflare import secrets
        from dataflare.runner import error_text

        secrets.register_credentials(url)
        said = error_text(exc).split("\n")[0]  # not SQLAlchemy's "Background on this error"
        print(f"error: --store: cannot open {secrets.scrub(url)}: {secrets.scrub(said)}",
              file=sys.stderr, flush=True)
        return 1
    store = Store(url)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    if role in ("all", "scheduler"):
        threads.append(threading.Thread(target=Scheduler(store).run_forever, args=(stop,),
                                        name="scheduler", daemon=True))
    if role in ("all", "worker"):
        for i in range(workers):
            settings = WorkerSettings(lease=timedelta(seconds=lease),
                                      heartbeat=max(0.2, min(2.0, lease / 5)))
            w = Worker(store, data_dir, settings)
            threads.append(threading.Thread(target=w.run_forever, args=(stop,),
                                            name=f"worker-{i}", daemon=True))

    def _stop(*_: Any) -> None:
        stop.set()

    # uvicorn handles these while it serves, then raises the signal again: to this handler,
    # so the workers stop their runs and put them back in the queue before the process ends
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    for t in threads:
        t.start()
    try:
        if role in ("all", "api"):
            import uvicorn

            from dataflare.server.api import create_app

            assert access is not None
            app = create_app(store, access)
            uvicorn.run(app, host=host, port=port, log_level="warning")
        else:
            stop.wait()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return 0
