"""Every meta store runs the whole conformance suite, against a real server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

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


class TestRedisPyOnValkeyCluster(TestValkeyCluster):
    @pytest.fixture
    def meta_uri(self, unique: str) -> str:
        uri = namespaced("KVSWAP_TEST_VALKEY_CLUSTER_URI", prefix=f"{unique}:", buckets="8")
        return "redis" + uri.removeprefix("valkey")
