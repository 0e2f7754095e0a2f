"""Meta stores: where each session's stored spans live, addressed by URI.

>>> from kvswap.meta import open_meta_store
>>> with open_meta_store("memkv://") as meta:
...     session = meta.create("chat-1", "llama-3-8b/bf16/tp1")
...     session.version
1
"""

from __future__ import annotations

from typing import Any

from kvswap.meta.base import (
    UNSET,
    Entry,
    EntrySpec,
    InvalidEntryError,
    LeaseError,
    MetaStore,
    Session,
    SessionPage,
    validate_session_id,
)
from kvswap.registry import Entry as _Registered
from kvswap.registry import LazyRegistry
from kvswap.uri import URI

META_STORES: LazyRegistry[MetaStore] = LazyRegistry(
    "meta store",
    {
        "memkv": _Registered("kvswap.meta.memkv:MemKVMetaStore"),
        "sqlite": _Registered("kvswap.meta.sql:SQLMetaStore"),
        "postgresql": _Registered("kvswap.meta.sql:SQLMetaStore", "postgresql"),
        "mysql": _Registered("kvswap.meta.sql:SQLMetaStore", "mysql"),
        "etcd": _Registered("kvswap.meta.etcd:EtcdMetaStore", "etcd"),
        "redis": _Registered("kvswap.meta.redis:RedisMetaStore", "redis"),
        "rediss": _Registered("kvswap.meta.redis:RedisMetaStore", "redis"),
        "valkey": _Registered("kvswap.meta.redis:RedisMetaStore", "valkey"),
        "valkeys": _Registered("kvswap.meta.redis:RedisMetaStore", "valkey"),
    },
)


def open_meta_store(uri: str | URI, **options: Any) -> MetaStore:
    """Open the meta store for ``uri``; keyword options override query parameters."""
    parsed, cls = META_STORES.resolve(uri)
    return cls(parsed, **options)


__all__ = ["META_STORES", "UNSET", "Entry", "EntrySpec", "InvalidEntryError", "LeaseError", "MetaStore", "Session",
           "SessionPage", "open_meta_store", "validate_session_id"]
