"""etcd: one member, or three members of one cluster."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

from kvswap.testing.servers.process import (
    Started,
    _owned_dir,
    _poll,
    _stopped_on_failure,
    find_binary,
    free_port,
    spawn,
)


def start_etcd(state: Path) -> Started:
    return _etcd_members(state / "etcd", 1)[0]


def start_etcd_cluster(state: Path) -> list[Started]:
    return _etcd_members(state / "etcd-cluster", 3)


def _etcd_members(base: Path, count: int) -> list[Started]:
    """``count`` etcd members forming one cluster, on free ports; the first carries the test URI."""
    binary = find_binary("etcd") or shutil.which("etcd", path="/usr/bin")
    if not binary:
        raise RuntimeError("etcd not found (apt-get install etcd-server)")
    base = _owned_dir(base, None)
    clients, peers = [free_port() for _ in range(count)], [free_port() for _ in range(count)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, peer in enumerate(peers))
    started: list[Started] = []
    with _stopped_on_failure(started):
        for index, (port, peer) in enumerate(zip(clients, peers)):
            client_url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
            proc = spawn([binary, "--name", f"m{index}", "--data-dir", str(base / f"data{index}"),
                          "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                          "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                          "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token",
                          base.name, "--quota-backend-bytes", str(8 << 30), "--auto-compaction-mode", "revision",
                          "--auto-compaction-retention", "10000"], base / f"server{index}.log")
            started.append(Started(f"{base.name}-{index}", proc.pid, {}))

        def healthy() -> bool:
            for port in clients:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if json.loads(response.read()).get("health") != "true":
                        return False
            return True

        _poll(healthy, 30, "etcd", None)
    if count == 1:
        started[0].env["KVSWAP_TEST_ETCD_URI"] = f"etcd://127.0.0.1:{clients[0]}/kvswap-test"
    else:
        others = ",".join(f"127.0.0.1:{port}" for port in clients[1:])
        started[0].env["KVSWAP_TEST_ETCD_CLUSTER_URI"] = f"etcd://127.0.0.1:{clients[0]}/kvswap-test?endpoints={others}"
        started[0].env["KVSWAP_TEST_ETCD_CLUSTER_PIDS"] = ",".join(str(m.pid) for m in started)
    return started
