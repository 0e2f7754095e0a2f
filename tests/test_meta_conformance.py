"""Every meta store runs the whole conformance suite, against a real server."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from kvswap.meta import MetaStore
from kvswap.meta.etcd import EtcdMetaStore
from kvswap.meta.redis import RedisMetaStore
from kvswap.testing.connector_suite import env_or_skip
from kvswap.testing.meta_suite import MetaSuite
from kvswap.uri import URI


def namespaced(variable: str, **query: str) -> str:
    return URI.parse(env_or_skip(variable)).with_query(**query).render(hide_password=False)


def table_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}_"


class TestMemKV(MetaSuite):
    processes = False

    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        return f"memkv://{unique}"


class TestSQLite(MetaSuite):
    @pytest.fixture
    def meta_uri(self, tmp_path: Path) -> str:
        return f"sqlite://{tmp_path}/meta.db"


class TestPostgres(MetaSuite):
    @pytest.fixture
    def meta_uri(self) -> str:
        return namespaced("KVSWAP_TEST_POSTGRES_URI", table_prefix=table_prefix())


class TestMySQL(MetaSuite):
    @pytest.fixture
    def meta_uri(self) -> str:
        return namespaced("KVSWAP_TEST_MYSQL_URI", table_prefix=table_prefix())


class TestEtcd(MetaSuite):
    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        uri = URI.parse(env_or_skip("KVSWAP_TEST_ETCD_URI"))
        return f"etcd://{uri.host}:{uri.port}/{unique}"

    def test_expiry_index_covers_sessions_written_before_it(
            self, meta: EtcdMetaStore, clocked: Callable[[float], MetaStore]) -> None:
        """A store as a kvswap without the expiry index left it (no ``x/`` keys, no marker) is
        indexed by the first ``expired``; an index key its session no longer matches (left by
        such a writer) is removed, not returned."""
        short = {f"old-{i:02d}" for i in range(70)}  # more than one indexing transaction holds
        for session_id in sorted(short):
            meta.create(session_id, "fp", ttl=100)
        meta.create("old-forever", "fp")
        root = meta._keys.root
        meta._call(meta._kv.DeleteRange, meta._delete_range(root + b"x", root + b"y"), "test")  # x/ and x-ready
        assert {s.id for s in clocked(500).expired()} == short
        assert meta._call(meta._kv.Range, meta._range(root + b"x-ready"), "test").kvs
        stale = root + b"x/%015d\x00old-forever" % 1
        meta._call(meta._kv.Put, meta._put(stale, b""), "test")
        assert {s.id for s in clocked(500).expired()} == short
        assert not meta._call(meta._kv.Range, meta._range(stale), "test").kvs
        assert [s.id for s in clocked(50).expired()] == []


class TestEtcdCluster(MetaSuite):
    """Three members; the store knows all of them (``endpoints``)."""

    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        uri = URI.parse(env_or_skip("KVSWAP_TEST_ETCD_CLUSTER_URI"))
        return f"etcd://{uri.host}:{uri.port}/{unique}?endpoints={dict(uri.query)['endpoints']}"


class TestRedis(MetaSuite):
    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        return namespaced("KVSWAP_TEST_REDIS_URI", prefix=f"{unique}:")


class TestValkey(MetaSuite):
    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        return namespaced("KVSWAP_TEST_VALKEY_URI", prefix=f"{unique}:")


class TestValkeyCluster(MetaSuite):
    """Three primaries: a session's keys share its bucket's slot; 8 buckets, so pages merge
    buckets on every primary."""

    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        return namespaced("KVSWAP_TEST_VALKEY_CLUSTER_URI", prefix=f"{unique}:", buckets="8")

    def test_reads_when_nodes_lost_their_scripts(self, meta: RedisMetaStore) -> None:
        """A replica promoted by a failover has no scripts loaded: a page's pipelined reads
        load them where missing and go on."""
        ids = [f"s{i:02d}" for i in range(40)]
        for session_id in ids:
            meta.create(session_id, "fp")
        meta._client.execute_command("SCRIPT", "FLUSH", target_nodes=meta._client.ALL_NODES)
        assert [s.id for s in meta.list_sessions().sessions] == ids
        assert meta.get("s07").id == "s07"


class TestRedisPyOnValkeyCluster(TestValkeyCluster):
    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        uri = namespaced("KVSWAP_TEST_VALKEY_CLUSTER_URI", prefix=f"{unique}:", buckets="8")
        return "redis" + uri.removeprefix("valkey")
