"""Meta stores against servers that are down, hung or killed; foreign schemas; killed writers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from kvswap.errors import BackendUnavailableError, ConfigError
from kvswap.meta import MetaStore, open_meta_store
from kvswap.testing import servers
from kvswap.testing.connector_suite import env_or_skip
from kvswap.testing.meta_suite import FP, fill, spec
from kvswap.uri import URI

DOWN_URIS = {
    "postgresql": "postgresql://kvswap:pw@127.0.0.1:{port}/kvswap?connect_timeout=1&timeout=1",
    "mysql": "mysql://kvswap:pw@127.0.0.1:{port}/kvswap?connect_timeout=1&timeout=1",
    "etcd": "etcd://127.0.0.1:{port}/kvswap?timeout=1",
    "redis": "redis://127.0.0.1:{port}/0?connect_timeout=1&timeout=1",
    "valkey": "valkey://127.0.0.1:{port}/0?connect_timeout=1&timeout=1",
}


def _calls(meta: MetaStore) -> list[Callable[[], object]]:
    return [lambda: meta.get("s"), lambda: meta.create("s", FP), lambda: meta.append("s", 1, spec(0)),
            lambda: meta.list_sessions()]


def _unavailable_within(open_store: Callable[[], MetaStore], within: float) -> None:
    """Opening, or else every call, fails with BackendUnavailableError within ``within`` s."""
    start = time.monotonic()
    try:
        meta = open_store()
    except BackendUnavailableError:
        assert time.monotonic() - start < within
        return
    try:
        for call in _calls(meta):
            start = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                call()
            assert time.monotonic() - start < within
    finally:
        meta.close()


@pytest.mark.parametrize("scheme", sorted(DOWN_URIS))
def test_down_or_hung_server_is_unavailable_within_timeout(scheme: str, closed_port: int,
                                                           blackhole_port: int) -> None:
    # libpq rounds connect_timeout up to 2 s.
    within = 4.0 if scheme == "postgresql" else 3.0
    for port in (closed_port, blackhole_port):
        uri = DOWN_URIS[scheme].format(port=port)
        _unavailable_within(lambda uri=uri: open_meta_store(uri), within)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


STARTERS = {
    "postgresql": (servers.start_postgres, "KVSWAP_TEST_POSTGRES_URI"),
    "mysql": (servers.start_mariadb, "KVSWAP_TEST_MYSQL_URI"),
    "etcd": (servers.start_etcd, "KVSWAP_TEST_ETCD_URI"),
    "redis": (servers.start_redis, "KVSWAP_TEST_REDIS_URI"),
}


@pytest.mark.parametrize("scheme", sorted(STARTERS))
def test_server_killed_mid_run(scheme: str, tmp_path: Path) -> None:
    """A private server dies under a busy writer: every later call fails fast, none hangs."""
    start, variable = STARTERS[scheme]
    env_or_skip(variable)  # the servers' binaries are installed where the shared ones run
    state = Path(tempfile.mkdtemp(prefix="kvswap-kill-"))  # not under pytest's 0700 tmp: db users read it
    os.chmod(state, 0o755)
    started = start(state)
    try:
        uri = URI.parse(started.env[variable]).with_query(timeout=2)
        meta = open_meta_store(uri)
        session = meta.create("busy", FP)
        errors: list[BaseException] = []
        stop = threading.Event()

        def writer() -> None:
            version = session.version
            while not stop.is_set():
                try:
                    new, _ = meta.append("busy", version, spec(4 * (version - 1), 4))
                    version = new.version
                except BaseException as exc:
                    errors.append(exc)
                    return

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.5)
        _kill_group(started.pid)
        thread.join(10)
        stop.set()
        assert not thread.is_alive(), "the writer hung after its server died"
        assert errors and isinstance(errors[0], BackendUnavailableError), errors
        for call in _calls(meta):
            begin = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                call()
            assert time.monotonic() - begin < 6
        meta.close()
    finally:
        _kill_group(started.pid)
        shutil.rmtree(state, ignore_errors=True)


def test_etcd_keeps_working_when_one_of_three_members_dies(tmp_path: Path) -> None:
    """A member SIGKILLed under a busy writer: calls in flight fail with BackendUnavailableError
    or succeed, later ones go to another member, and no acknowledged append is lost."""
    env_or_skip("KVSWAP_TEST_ETCD_CLUSTER_URI")  # etcd is installed where the shared servers run
    state = Path(tempfile.mkdtemp(prefix="kvswap-etcd3-"))
    members = servers.start_etcd_cluster(state)
    try:
        uri = URI.parse(members[0].env["KVSWAP_TEST_ETCD_CLUSTER_URI"]).with_query(timeout=2)
        meta = open_meta_store(uri)
        meta.create("busy", FP)
        acknowledged: list[int] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                try:
                    session = meta.get("busy")
                    _, entry = meta.append("busy", session.version, spec(session.total_tokens, 4))
                    acknowledged.append(entry.token_offset)
                except BackendUnavailableError:
                    time.sleep(0.05)  # the member died under this call: the next goes elsewhere
                except BaseException as exc:
                    failures.append(exc)
                    return

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.5)
        before = len(acknowledged)
        _kill_group(members[0].pid)  # the member the URI names, the one the channel uses first
        time.sleep(3.0)
        stop.set()
        thread.join(30)
        assert not thread.is_alive() and failures == []
        assert len(acknowledged) > before + 5  # it kept writing through the other two
        offsets = [e.token_offset for e in meta.entries("busy")]
        assert offsets == [4 * i for i in range(len(offsets))]  # contiguous
        assert set(acknowledged) <= set(offsets)  # nothing acknowledged was lost
        meta.close()
    finally:
        for member in members:
            _kill_group(member.pid)
        shutil.rmtree(state, ignore_errors=True)


# ---- SQL schemas that are not ours -------------------------------------------------------------


def _sql_uri(scheme: str, tmp_path: Path) -> str:
    if scheme == "sqlite":
        return f"sqlite://{tmp_path}/meta.db"
    variable = {"postgresql": "KVSWAP_TEST_POSTGRES_URI", "mysql": "KVSWAP_TEST_MYSQL_URI"}[scheme]
    prefix = f"f{uuid.uuid4().hex[:10]}_"
    return URI.parse(env_or_skip(variable)).with_query(table_prefix=prefix).render(hide_password=False)


def _raw_engine(uri: str) -> sa.Engine:
    parsed = URI.parse(uri)
    if parsed.scheme == "sqlite":
        return sa.create_engine(f"sqlite:///{parsed.path}")
    driver = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}[parsed.scheme]
    return sa.create_engine(sa.URL.create(driver, username=parsed.username, password=parsed.password,
                                          host=parsed.host, port=parsed.port, database=parsed.path.strip("/")))


def _prefix(uri: str) -> str:
    return dict(URI.parse(uri).query).get("table_prefix", "kvswap_")


@pytest.mark.parametrize("scheme", ["sqlite", "postgresql", "mysql"])
def test_foreign_table_of_the_same_name_is_refused_and_untouched(scheme: str, tmp_path: Path) -> None:
    uri = _sql_uri(scheme, tmp_path)
    table = f"{_prefix(uri)}sessions"
    engine = _raw_engine(uri)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, payroll TEXT)"))
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (1, 'keep me')"))
    with pytest.raises(ConfigError, match="not kvswap's"):
        open_meta_store(uri)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT payroll FROM {table}")).scalar() == "keep me"
    engine.dispose()


@pytest.mark.parametrize("scheme", ["sqlite", "postgresql", "mysql"])
def test_other_schema_version_is_refused(scheme: str, tmp_path: Path) -> None:
    uri = _sql_uri(scheme, tmp_path)
    with open_meta_store(uri) as meta:
        fill(meta, "s", [4])
    engine = _raw_engine(uri)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {_prefix(uri)}schema SET version = 99"))
    engine.dispose()
    with pytest.raises(ConfigError, match="schema version 99"):
        open_meta_store(uri)


@pytest.mark.parametrize("scheme", ["sqlite", "postgresql", "mysql"])
def test_concurrent_first_opens_create_the_schema_once(scheme: str, tmp_path: Path) -> None:
    uri = _sql_uri(scheme, tmp_path)
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def open_one() -> None:
        barrier.wait()
        try:
            with open_meta_store(uri) as meta:
                meta.list_sessions()
            outcomes.append("ok")
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes == ["ok"] * 4


# ---- a writer killed mid-append ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["sqlite", "postgresql"])
def test_writer_killed_with_sigkill_leaves_a_consistent_store(scheme: str, tmp_path: Path) -> None:
    uri = _sql_uri(scheme, tmp_path)
    with open_meta_store(uri) as meta:
        meta.create("victim", FP)
    log = tmp_path / "appended.log"
    code = ("import sys; from kvswap.testing.meta_suite import run_appender; "
            "run_appender(sys.argv[1], 'victim', sys.argv[2], 1_000_000)")
    proc = subprocess.Popen([sys.executable, "-c", code, uri, str(log)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 60):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    logged = [line.split() for line in log.read_text().splitlines() if line.endswith("\n") or line]
    assert len(logged) >= 60
    with open_meta_store(uri) as meta:
        session = meta.get("victim")
        entries = meta.entries("victim")
    count = len(entries)
    assert count >= len(logged)  # every append that returned is there (one more may have landed)
    assert count <= len(logged) + 1
    assert [e.seq for e in entries] == list(range(count))
    assert [e.token_offset for e in entries] == [4 * i for i in range(count)]
    assert (session.version, session.total_tokens) == (count + 1, 4 * count)
    for seq, version, key in logged:
        assert entries[int(seq)].key == key and int(version) == int(seq) + 2


def test_redis_meta_on_a_cluster_node_without_cluster_is_a_clear_config_error() -> None:
    """A cluster node opened as a single primary: said plainly (add cluster=true), not as an outage."""
    node = env_or_skip("KVSWAP_TEST_VALKEY_CLUSTER_URI").partition("?")[0]
    prefix = f"m{uuid.uuid4().hex[:6]}:"
    with pytest.raises(ConfigError, match="cluster=true"):
        open_meta_store(f"{node}?prefix={prefix}").create("s1", FP)
    with open_meta_store(f"{node}?prefix={prefix}&cluster=true") as meta:
        assert meta.create("s1", FP).version == 1 and meta.delete("s1") == []
