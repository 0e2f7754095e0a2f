"""The connector conformance suite: every backend runs all of it, against a real server.

Use it by subclassing in a test module and binding two fixtures::

    class TestRedis(ConnectorSuite):
        @pytest.fixture
        def connector(self): ...        # a fresh, empty connector (own namespace)

        @pytest.fixture
        def corrupt(self, connector): ...  # callable(key): flip one stored byte of the
                                           # key's value natively, behind kvswap's back

``large_size`` should exceed the backend's chunk / multipart / parallel-I/O threshold as
configured by the fixture, so those paths are exercised.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import pytest

from kvswap.blob import read_blob, write_blob
from kvswap.connectors.base import Connector
from kvswap.errors import AlreadyExistsError, BackendUnavailableError, IntegrityError, InvalidKeyError, NotFoundError

BAD_KEYS = ["", "/abs", "a/../b", "..", ".", "a/./b", "a//b", "a/", "nul\x00byte", "tab\tkey", "back\\slash",
            "x" * 1025, ".kvswap-tmp-1", "a/.kvswap-x", "lone\ud800surrogate"]
ODD_KEYS = ["sp ace/ü/日本", "we?ird*[x]{y}", "q'uote\"s;DROP TABLE x;--", "pct%41%2F", "dots.../x..y", "-dash/_u"]


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    import random

    return random.Random(seed).randbytes(size)


class ConnectorSuite:
    large_size: int = 12 << 20

    # ---- round trips ------------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
    def test_put_get_roundtrip(self, connector: Connector, size: int) -> None:
        data = payload(size, size)
        connector.put("obj", data)
        assert bytes(connector.get("obj")) == data
        assert connector.size("obj") == size
        assert connector.exists("obj")

    def test_large_value_roundtrip(self, connector: Connector) -> None:
        data = payload(self.large_size + 12345, 7)
        connector.put("big/value", data)
        assert connector.size("big/value") == len(data)
        assert bytes(connector.get("big/value")) == data
        buffer = bytearray(len(data))
        assert connector.get_into("big/value", buffer) == len(data)
        assert buffer == data

    def test_gather_write_is_concatenation(self, connector: Connector) -> None:
        parts: list[bytes | bytearray | memoryview] = [payload(10, 1), b"", bytearray(payload(3 << 20, 2)),
                                                       memoryview(payload(5, 3))]
        connector.put("gather", parts)
        assert bytes(connector.get("gather")) == b"".join(bytes(p) for p in parts)

    def test_ranged_get(self, connector: Connector) -> None:
        data = payload(self.large_size + 999, 3)
        connector.put("r", data)
        size = len(data)
        for offset, length in [(0, 1), (1, 100), (size // 2 - 7, 1 << 20), (size - 10, 10), (size - 3, 100),
                               (size, 5), (0, 0), (12345, size)]:
            got = bytes(connector.get("r", offset=offset, length=length))
            assert got == data[offset:offset + length], (offset, length)
        assert bytes(connector.get("r", offset=size - 5)) == data[-5:]
        with pytest.raises(ValueError):
            connector.get("r", offset=size + 1)
        with pytest.raises(ValueError):
            connector.get("r", offset=-1)

    def test_get_into_offsets_and_buffers(self, connector: Connector) -> None:
        import numpy as np

        data = payload(self.large_size + 1, 4)
        connector.put("g", data)
        array = np.zeros(len(data) + 100, dtype=np.uint8)
        assert connector.get_into("g", array) == len(data)  # larger buffer: value size
        assert array[:len(data)].tobytes() == data
        small = bytearray(1000)
        assert connector.get_into("g", small, offset=(4 << 20) - 500) == 1000
        assert small == data[(4 << 20) - 500:(4 << 20) + 500]
        with pytest.raises(ValueError):
            connector.get_into("g", b"readonly")

    # ---- misses, overwrites, create -------------------------------------------------------

    def test_missing_key_raises_not_found(self, connector: Connector) -> None:
        for call in (lambda: connector.get("nope"), lambda: connector.size("nope"),
                     lambda: connector.get_into("nope", bytearray(4)), lambda: connector.get("no/pe", offset=1)):
            with pytest.raises(NotFoundError):
                call()
        assert not connector.exists("nope")
        connector.delete("nope")  # no-op

    def test_overwrite_replaces_whole_value(self, connector: Connector) -> None:
        big, small = payload(self.large_size, 5), payload(100, 6)
        connector.put("o", big)
        connector.put("o", small)
        assert bytes(connector.get("o")) == small
        connector.put("o", big)
        assert bytes(connector.get("o")) == big
        connector.delete("o")
        assert not connector.exists("o")
        with pytest.raises(NotFoundError):
            connector.get("o")

    def test_create_mode(self, connector: Connector) -> None:
        connector.put("c", b"first", mode="create")
        with pytest.raises(AlreadyExistsError):
            connector.put("c", b"second", mode="create")
        with pytest.raises(AlreadyExistsError):
            connector.put("c", payload(self.large_size, 1), mode="create")
        assert bytes(connector.get("c")) == b"first"
        with pytest.raises(ValueError):
            connector.put("c", b"x", mode="append")  # type: ignore[arg-type]

    def test_concurrent_creators_one_wins(self, connector: Connector) -> None:
        results: list[str] = []

        def create(i: int) -> None:
            try:
                connector.put("race", f"writer-{i}".encode(), mode="create")
                results.append(f"writer-{i}")
            except AlreadyExistsError:
                pass

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 1
        assert bytes(connector.get("race")).decode() == results[0]

    def test_concurrent_overwrites_never_mix(self, connector: Connector) -> None:
        values = [payload(self.large_size // 2, 100 + i) for i in range(3)]
        seen: list[bytes] = []
        errors: list[BaseException] = []
        connector.put("hot", values[0])

        def write(i: int) -> None:
            for _ in range(2):
                connector.put("hot", values[i])

        def read() -> None:
            try:
                for _ in range(4):
                    seen.append(bytes(connector.get("hot")))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(3)] + [threading.Thread(target=read)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(value in values for value in seen)
        assert bytes(connector.get("hot")) in values

    # ---- listing and keys ---------------------------------------------------------------

    def test_list_by_prefix(self, connector: Connector) -> None:
        keys = ["a/b", "a/c/d", "ab", "b", "a/bc"]
        for key in keys:
            connector.put(key, key.encode())
        assert sorted(connector.list()) == sorted(keys)
        assert sorted(connector.list("a/")) == ["a/b", "a/bc", "a/c/d"]
        assert sorted(connector.list("a")) == ["a/b", "a/bc", "a/c/d", "ab"]
        assert sorted(connector.list("a/b")) == ["a/b", "a/bc"]
        assert list(connector.list("zzz")) == []

    def test_bad_keys_rejected(self, connector: Connector) -> None:
        for key in BAD_KEYS:
            for call in (functools.partial(connector.put, key, b"x"), functools.partial(connector.get, key),
                         functools.partial(connector.delete, key), functools.partial(connector.exists, key)):
                with pytest.raises(InvalidKeyError):
                    call()
        for prefix in ["/abs", "../x", "a//b", "nul\x00"]:
            with pytest.raises(InvalidKeyError):
                list(connector.list(prefix))
        assert list(connector.list()) == []

    def test_odd_but_valid_keys_roundtrip(self, connector: Connector) -> None:
        for key in ODD_KEYS + ["k" * 200]:
            connector.put(key, key.encode())
            assert bytes(connector.get(key)) == key.encode()
        assert sorted(connector.list()) == sorted(ODD_KEYS + ["k" * 200])

    # ---- batches, blobs, lifecycle --------------------------------------------------------

    def test_batch_forms(self, connector: Connector) -> None:
        items = {f"batch/{i}": payload(1000 + i, i) for i in range(20)}
        connector.put_many(items)
        assert [bytes(v) for v in connector.get_many(list(items))] == list(items.values())
        with pytest.raises(NotFoundError):
            connector.get_many(["batch/0", "batch/missing"])
        connector.delete_many(list(items)[:10])
        assert sorted(connector.list("batch/")) == sorted(list(items)[10:])
        with pytest.raises(InvalidKeyError):
            connector.delete_many(["batch/10", "../escape"])

    def test_batch_create_mixes_sizes_and_names_what_existed(self, connector: Connector) -> None:
        items = {f"create/{i}": payload(self.large_size + 7 if i == 3 else 1 << 20 if i % 2 else 17 + i, 50 + i)
                 for i in range(9)}
        connector.put_many(items, mode="create")
        assert [bytes(v) for v in connector.get_many(list(items))] == list(items.values())
        again = {"create/5": b"other", "create/new": b"fresh", "create/7": b"other"}
        with pytest.raises(AlreadyExistsError, match="create/5"):
            connector.put_many(again, mode="create")
        assert bytes(connector.get("create/new")) == b"fresh"  # every value was tried
        assert bytes(connector.get("create/5")) == items["create/5"]  # nothing existing was touched
        with pytest.raises(InvalidKeyError):
            connector.put_many({"create/ok": b"x", "../escape": b"y"}, mode="create")
        with pytest.raises(InvalidKeyError):
            connector.get_many(["create/0", "a//b"])

    def test_blob_roundtrip_and_corruption(self, connector: Connector, corrupt: Callable[[str], None]) -> None:
        import torch

        tensors = {"k": torch.randn(4, 256, 64, dtype=torch.bfloat16), "v": torch.randn(4, 256, 64),
                   "ids": torch.arange(256)}
        write_blob(connector, "blob/1", tensors, {"fingerprint": "m"})
        blob = read_blob(connector, "blob/1")
        assert all(torch.equal(blob.tensors[n], t) for n, t in tensors.items())
        assert blob.header.metadata == {"fingerprint": "m"}
        corrupt("blob/1")
        with pytest.raises(IntegrityError, match="blob/1"):
            read_blob(connector, "blob/1")

    def test_closed_connector_refuses(self, connector: Connector) -> None:
        connector.put("x", b"1")
        connector.close()
        connector.close()  # idempotent
        with pytest.raises(BackendUnavailableError):
            connector.get("x")

    def test_repr_hides_password(self, connector: Connector) -> None:
        text = repr(connector) + str(connector.uri) + repr(connector.uri)
        if connector.uri.password:
            assert connector.uri.password not in text
            assert "***" in text


def flip_byte(data: bytes, position: int | None = None) -> bytes:
    """``data`` with one bit flipped (near the end by default: inside the payload)."""
    out = bytearray(data)
    index = len(out) - 3 if position is None else position
    out[index] ^= 0x40
    return bytes(out)


def env_or_skip(name: str) -> str:
    """A server address from the environment; skip locally, fail under CI=true."""
    value = os.environ.get(name)
    if value:
        return value
    message = f"{name} is not set: start the servers with scripts/test.sh (or kvswap.testing.servers up)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def store_uri(kind: str, directory: str, unique: str, redis_options: str = "") -> str:
    """A connector URI of ``kind`` for one test: ``file`` under ``directory``, the shared
    file system, Redis/Valkey (prefix ``unique``) or S3 (key prefix ``unique``) from the
    servers scripts/test.sh starts."""
    if kind == "file":
        return f"file://{directory}"
    if kind == "juicefs":
        return f"file://{env_or_skip('KVSWAP_TEST_JUICEFS_DIR')}/{unique}"
    if kind in ("redis", "valkey"):
        return f"{env_or_skip(f'KVSWAP_TEST_{kind.upper()}_URI')}?prefix={unique}:{redis_options}&timeout=5"
    if kind == "s3":
        head, _, query = env_or_skip("KVSWAP_TEST_S3_URI").partition("?")
        return f"{head.rstrip('/')}/{unique}?{query}"
    raise ValueError(kind)
