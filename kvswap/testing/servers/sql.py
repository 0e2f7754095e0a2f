"""PostgreSQL and MariaDB (Debian's), each run as its service user with kvswap's database and user."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kvswap.testing.servers.process import (
    Started,
    _owned_dir,
    _run_setup,
    _service_user,
    free_port,
    spawn,
    wait_until,
)

DB_USER = "kvswap"


DB_PASSWORD = "kvswap-secret"


DB_NAME = "kvswap_test"


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
