"""Hosts on one machine: network namespaces ``svc``, ``p0``..``pN`` on one bridge.

Each namespace has an address of its own on a private /24, as pods and a service host
have in a cluster; processes started with :meth:`Hosts.run` see only that network. Used by
``bench/pods.py`` and ``tests/test_pods.py``; needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and iproute2"
    probe = f"dfprobe{uuid.uuid4().hex[:4]}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "ip netns add is not permitted here"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces ``svc`` (address .1) and ``p0``..``p<pods-1>`` (.10, .11, ...) on a bridge."""

    def __init__(self, pods: int = 3) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.subnet = f"10.213.{int(self.tag, 16) % 200 + 20}"
        hosts = ["svc", *(f"p{i}" for i in range(pods))]
        self.names = {n: f"df{self.tag}{n}" for n in hosts}
        self.addr = {"svc": f"{self.subnet}.1",
                     **{f"p{i}": f"{self.subnet}.{10 + i}" for i in range(pods)}}
        self.bridge = f"dfbr{self.tag}"

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for host, ns in self.names.items():
            outer, inner = f"v{self.tag}{host}", f"i{self.tag}{host}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", self.bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr[host]}/24",
               "dev", inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in self.names.values():
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def run(self, host: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        """Start a process in the namespace of ``host``."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], *args], **kw)

    def broker(self, cwd: Path) -> subprocess.Popen[str]:
        """Start a Tansu broker (memory only) in ``svc`` on port 9092; wait until it answers."""
        from dataflare.broker import find_tansu

        url = f"tcp://{self.addr['svc']}:9092"
        proc = self.run("svc", str(find_tansu()), "broker", "--listener-url", url,
                        "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(cwd))
        self.python("svc", f"""
import time
from confluent_kafka.admin import AdminClient
admin = AdminClient({{"bootstrap.servers": "{self.addr['svc']}:9092"}})
for _ in range(200):
    try:
        admin.list_topics(timeout=1)
        break
    except Exception:
        time.sleep(0.1)
""")
        return proc

    def create_topic(self, name: str, partitions: int) -> None:
        """Create a topic on the broker of :meth:`broker`."""
        self.python("svc", f"""
from confluent_kafka.admin import AdminClient, NewTopic
admin = AdminClient({{"bootstrap.servers": "{self.addr['svc']}:9092"}})
for f in admin.create_topics([NewTopic({name!r}, {partitions}, 1)]).values():
    f.result(30)
""")

    def python(self, host: str, code: str, timeout: float = 120) -> str:
        """Run Python code in the namespace of ``host``; its stdout."""
        out = subprocess.run(["ip", "netns", "exec", self.names[host], sys.executable, "-c",
                              code], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            msg = f"python in {host} failed:\n{out.stderr[-3000:]}"
            raise RuntimeError(msg)
        return out.stdout
