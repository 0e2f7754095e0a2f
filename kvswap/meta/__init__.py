"""Meta stores: where each session's stored spans live, addressed by URI.

>>> from kvswap.meta import open_meta_store
>>> with open_meta_store("memkv://") as meta:
...     session = meta.create("chat-1", "llama-3-8b/bf16/tp1")
...     session.version
1
"""

from __future__ import annotations

from typing import Any

from kvswap.meta.base import MetaStore
from kvswap.meta.records import UNSET, Entry, EntrySpec, InvalidEntryError, LeaseError, Session, SessionPage
from kvswap.meta.rules import SessionId, validate_session_id
from kvswap.registry import Backend, LazyRegistry
from kvswap.uri import URI

META_STORES: LazyRegistry[MetaStore] = LazyRegistry(
    "meta store",
    {
        "memkv": Backend("kvswap.meta.memkv:MemKVMetaStore"),
        "sqlite": Backend("kvswap.meta.sql:SQLMetaStore"),
        "postgresql": Backend("kvswap.meta.sql:SQLMetaStore", "postgresql"),
        "mysql": Backend("kvswap.meta.sql:SQLMetaStore", "mysql"),
        "etcd": Backend("kvswap.meta.etcd:EtcdMetaStore", "etcd"),
        "redis": Backend("kvswap.meta.redis:RedisMetaStore", "redis"),
        "rediss": Backend("kvswap.meta.redis:RedisMetaStore", "redis"),
        "valkey": Backend("kvswap.meta.redis:RedisMetaStore", "valkey"),
        "valkeys": Backend("kvswap.meta.redis:RedisMetaStore", "valkey"),
    },
)


def open_meta_store(uri: str | URI, **options: Any) -> MetaStore:
    """Open the meta store for ``uri``; keyword options override query parameters."""
    parsed, cls = META_STORES.resolve(uri)
    return cls(parsed, **options)


__all__ = ["META_STORES", "UNSET", "Entry", "EntrySpec", "InvalidEntryError", "LeaseError", "MetaStore", "Session",
           "SessionId", "SessionPage", "open_meta_store", "validate_session_id"]
