"""Every connector runs the whole conformance suite against its real server."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvswap.connectors import open_connector
from kvswap.connectors.base import Connector
from kvswap.testing.connector_suite import ConnectorSuite, env_or_skip, flip_byte, payload


def _flip_file(path: Path) -> None:
    path.write_bytes(flip_byte(path.read_bytes()))


class TestFile(ConnectorSuite):
    @pytest.fixture
    def connector(self, tmp_path: Path) -> Iterator[Connector]:
        with open_connector(f"file://{tmp_path}/store?parallel_min=1MiB&io_chunk=256KiB") as conn:
            yield conn

    @pytest.fixture
    def corrupt(self, connector: Connector) -> Callable[[str], None]:
        return lambda key: _flip_file(Path(connector.root) / key)


class TestJuiceFS(TestFile):
    """file:// on a mounted JuiceFS file system (the shared-FS case, like 3FS)."""

    @pytest.fixture
    def connector(self, unique: str) -> Iterator[Connector]:
        mount = env_or_skip("KVSWAP_TEST_JUICEFS_DIR")
        with open_connector(f"file://{mount}/{unique}?parallel_min=1MiB&io_chunk=256KiB") as conn:
            yield conn


class TestMem(ConnectorSuite):
    @pytest.fixture
    def connector(self) -> Iterator[Connector]:
        with open_connector("mem://") as conn:
            yield conn

    @pytest.fixture
    def corrupt(self, connector: Connector) -> Callable[[str], None]:
        def flip(key: str) -> None:
            space = connector._space  # type: ignore[attr-defined]
            space.values[key] = flip_byte(space.values[key])
        return flip


class _RedisLike(ConnectorSuite):
    env_name = ""

    @pytest.fixture
    def connector(self, unique: str) -> Iterator[Connector]:
        uri = self.uri(env_or_skip(self.env_name))
        with open_connector(f"{uri}{'&' if '?' in uri else '?'}prefix={unique}:&chunk_size=1MiB&timeout=5") as conn:
            yield conn

    def uri(self, uri: str) -> str:
        return uri

    @pytest.fixture
    def corrupt(self, connector: Connector) -> Callable[[str], None]:
        from kvswap.connectors.redis_wire import decode_manifest

        client = connector._client  # type: ignore[attr-defined]

        def flip(key: str) -> None:
            name = connector._manifest_key(key)  # type: ignore[attr-defined]
            header, _ = decode_manifest(client.get(name), key)
            if header["chunks"]:
                name = connector._chunk_keys(header["id"], header["chunks"])[-1]  # type: ignore[attr-defined]
            client.set(name, flip_byte(client.get(name)))
        return flip


    def test_missing_chunk_under_current_manifest_is_integrity_error(self, connector: Connector) -> None:
        from kvswap.connectors.redis_wire import decode_manifest
        from kvswap.errors import IntegrityError

        connector.put("v", bytes(3 << 20))
        client = connector._client  # type: ignore[attr-defined]
        header, _ = decode_manifest(client.get(connector._manifest_key("v")), "v")  # type: ignore[attr-defined]
        client.delete(connector._chunk_keys(header["id"], header["chunks"])[1])  # type: ignore[attr-defined]
        with pytest.raises(IntegrityError, match="unchanged manifest"):
            connector.get("v")

    def test_overwritten_chunks_expire_and_unpublished_chunks_are_gone(self, connector: Connector) -> None:
        client = connector._client  # type: ignore[attr-defined]
        prefix = connector._prefix  # type: ignore[attr-defined]
        connector.put("v", bytes(3 << 20))
        first = set(client.scan_iter(match=f"{prefix}c/*"))
        assert first and all(client.pttl(k) == -1 for k in first)  # published: no expiry
        connector.put("v", bytes(3 << 20))
        assert all(0 < client.pttl(k) <= 10_000 for k in first)  # retired: readable a while
        connector.delete("v")
        assert not set(client.scan_iter(match=f"{prefix}c/*")) - first

    def test_a_ranged_read_of_an_inline_value_fetches_that_range(self, connector: Connector) -> None:
        """A blob's 64 KiB header probe of a 1 MiB inline value costs the server ~68 KiB of
        replies, not the value, and so do its delete and (on one server) its overwrite; a
        manifest cut short or run long reads as IntegrityError."""
        from kvswap.errors import IntegrityError

        data = payload(1 << 20, 9)
        connector.put("inline", data)  # 1 MiB <= chunk_size: inline in its manifest
        client = connector._client  # type: ignore[attr-defined]
        cluster = connector._redis.cluster  # type: ignore[attr-defined]

        def sent() -> int:  # bytes every server has sent so far
            info = client.info("stats", target_nodes=client.ALL_NODES) if cluster else client.info("stats")
            return sum(int(node_info["total_net_output_bytes"]) for node_info in _per_node(info))

        before = sent()
        assert bytes(connector.get("inline", offset=100, length=64 << 10)) == data[100:100 + (64 << 10)]
        assert sent() - before < 100 << 10
        buffer = bytearray(len(data) + 1)  # a spare byte, as read_blob reads
        assert connector.get_into("inline", buffer) == len(data) and buffer[:-1] == data
        connector.put("gone", data)
        before = sent()
        connector.delete("gone")  # learns the manifest's header only: no value sent back
        assert sent() - before < 100 << 10 and not connector.exists("gone")
        if not connector._redis.cluster:  # type: ignore[attr-defined]  # (a cluster swaps by SET ... GET)
            connector.put("again", data)
            before = sent()
            connector.put("again", data[::-1])  # an overwrite: the old value is not sent back either
            assert sent() - before < 100 << 10 and bytes(connector.get("again")) == data[::-1]
        name = connector._manifest_key("inline")  # type: ignore[attr-defined]
        whole = client.get(name)
        for damaged in (whole[:-1], whole + b"x"):
            client.set(name, damaged)
            with pytest.raises(IntegrityError, match="inline"):
                connector.get_into("inline", bytearray(len(data) + 1))
            with pytest.raises(IntegrityError, match="inline"):
                connector.get("inline")


    def test_a_user_without_scripting_still_deletes(self, connector: Connector, unique: str) -> None:
        """The delete's script falls back to GETDEL for a Redis user whose ACL denies @scripting."""
        if connector._redis.cluster:  # type: ignore[attr-defined]
            pytest.skip("ACL users are set per node; the single-server classes cover the fallback")
        client = connector._client  # type: ignore[attr-defined]
        user = f"noscript-{unique}".replace(":", "")
        client.acl_setuser(user, enabled=True, passwords=["+secret-pw"], keys=["*"],
                           commands=["+@all", "-@scripting"])
        try:
            scheme, rest = self.uri(env_or_skip(self.env_name)).split("://", 1)
            with open_connector(f"{scheme}://{user}:secret-pw@{rest}?prefix={unique}:acl:") as limited:
                limited.put("v", payload(1 << 20, 3))
                limited.put("big", payload(3 << 20, 4))  # chunked: the old chunks must go too
                limited.delete("v")
                limited.delete("big")
                assert not limited.exists("v") and not limited.exists("big")
                assert not list(client.scan_iter(match=f"{unique}:acl:*"))
        finally:
            client.acl_deluser(user)


    def test_a_batch_whose_connection_drops_midway_still_lands_whole(self, connector: Connector) -> None:
        """On one server put_many and get_many send a whole batch on one connection; killed
        midway (CLIENT KILL), what was not answered goes again one by one: every value lands
        whole, and reads back whole."""
        from kvswap.errors import AlreadyExistsError

        if connector._redis.cluster:  # type: ignore[attr-defined]
            pytest.skip("a cluster's batches go over several connections, each value on its own")
        client = connector._client  # type: ignore[attr-defined]
        values = {f"batch/{i}": payload(512 << 10, i) for i in range(160)}  # inline: under chunk_size
        total = sum(len(v) for v in values.values())

        def kill_when(progress: Callable[[], int], threshold: int, seen: list[int]) -> threading.Thread:
            def run() -> None:
                deadline = time.monotonic() + 30
                while progress() < threshold and time.monotonic() < deadline:
                    time.sleep(0.0005)
                killed = client.client_kill_filter(_type="normal", skipme=True)
                seen.extend([killed, progress()])
            thread = threading.Thread(target=run)
            thread.start()
            return thread

        before = client.dbsize()
        seen: list[int] = []
        thread = kill_when(lambda: client.dbsize() - before, 10, seen)
        try:
            connector.put_many(values, mode="create")
        except AlreadyExistsError as exc:  # taken by the server just before the kill, then put again
            assert "batch/" in str(exc)
        thread.join()
        assert seen[0] >= 1 and seen[1] < len(values), f"the kill did not land mid-batch: {seen}"
        assert client.dbsize() - before == len(values)

        def output() -> int:
            return int(client.info("stats")["total_net_output_bytes"])

        start, seen = output(), []
        thread = kill_when(lambda: output() - start, 8 << 20, seen)
        got = connector.get_many(list(values))
        thread.join()
        assert seen[0] >= 1 and seen[1] < total, f"the kill did not land mid-batch: {seen}"
        assert [bytes(v) for v in got] == list(values.values())


def _per_node(info: dict) -> list[dict]:
    """``INFO`` of one server, or of every node of a cluster (a dict by node)."""
    return [info] if "total_net_output_bytes" in info else list(info.values())


class TestRedis(_RedisLike):
    env_name = "KVSWAP_TEST_REDIS_URI"


class TestValkey(_RedisLike):
    env_name = "KVSWAP_TEST_VALKEY_URI"


class TestValkeyCluster(_RedisLike):
    """A three-primary Valkey Cluster through valkey-py's cluster client: chunks on every primary."""

    env_name = "KVSWAP_TEST_VALKEY_CLUSTER_URI"

    def test_a_large_value_spreads_over_the_primaries(self, connector: Connector) -> None:
        connector.put("v", bytes(12 << 20))  # 12 chunks of 1 MiB
        client = connector._client  # type: ignore[attr-defined]
        holders = {client.get_node_from_key(name).name
                   for name in client.scan_iter(match=f"{connector._prefix}c/*")}  # type: ignore[attr-defined]
        assert len(holders) == len(client.get_primaries()) == 3


class TestRedisPyOnValkeyCluster(TestValkeyCluster):
    """The same cluster through redis-py's cluster client (``redis://...?cluster=true``)."""

    def uri(self, uri: str) -> str:
        return "redis" + uri.removeprefix("valkey")


class TestS3(ConnectorSuite):
    @pytest.fixture
    def connector(self, unique: str) -> Iterator[Connector]:
        base = env_or_skip("KVSWAP_TEST_S3_URI")
        head, _, query = base.partition("?")
        with open_connector(f"{head.rstrip('/')}/{unique}?{query}&multipart_min=6MiB&part_size=5MiB") as conn:
            yield conn

    @pytest.fixture
    def corrupt(self, connector: Connector, unique: str) -> Callable[[str], None]:
        from kvswap.testing.servers import S3_BUCKET, s3_client

        endpoint = os.environ["KVSWAP_TEST_S3_ENDPOINT"]
        client = s3_client(int(endpoint.rsplit(":", 1)[1]))

        def flip(key: str) -> None:
            name = f"{unique}/{key}"
            data = client.get_object(Bucket=S3_BUCKET, Key=name)["Body"].read()
            client.put_object(Bucket=S3_BUCKET, Key=name, Body=flip_byte(data))
        return flip
