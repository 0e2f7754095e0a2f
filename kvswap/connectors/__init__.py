"""Connectors: byte stores addressed by URI, shared by the session cache and weights.

>>> from kvswap.connectors import open_connector
>>> with open_connector("file:///tmp/kvswap") as store:
...     store.put("a/b", b"hello")
...     bytes(store.get("a/b"))
b'hello'
"""

from __future__ import annotations

import os
from typing import Any

from kvswap.connectors.base import Connector, PutMode, validate_key, validate_prefix
from kvswap.registry import Backend, LazyRegistry
from kvswap.uri import URI

CONNECTORS: LazyRegistry[Connector] = LazyRegistry(
    "connector",
    {
        "file": Backend("kvswap.connectors.file:FileConnector"),
        "mem": Backend("kvswap.connectors.mem:MemConnector"),
        "redis": Backend("kvswap.connectors.redis:RedisConnector", "redis"),
        "rediss": Backend("kvswap.connectors.redis:RedisConnector", "redis"),
        "valkey": Backend("kvswap.connectors.redis:RedisConnector", "valkey"),
        "valkeys": Backend("kvswap.connectors.redis:RedisConnector", "valkey"),
        "s3": Backend("kvswap.connectors.s3:S3Connector", "s3"),
    },
)


def open_connector(uri: str | URI, **options: Any) -> Connector:
    """Open the connector for ``uri``; keyword options override query parameters."""
    parsed, cls = CONNECTORS.resolve(uri)
    return cls(parsed, **options)


def as_connector(where: str | os.PathLike[str] | URI | Connector, *, reading: bool = False) -> Connector:
    """A connector for ``where``: a connector (returned as is), a URI (kept as an object, so
    its password is never rendered into a string and parsed again), or a plain path (taken
    as ``file://``). ``reading``: the caller only reads, so a missing directory is an error
    (a mistyped path), not a new empty directory left behind."""
    if isinstance(where, Connector):
        return where
    if not isinstance(where, URI):
        where = os.fspath(where)
        if "://" not in where:
            where = "file://" + os.path.abspath(where)
    parsed, cls = CONNECTORS.resolve(where)
    options = {"create": False} if reading and "create" in cls.OPTIONS else {}
    return cls(parsed, **options)


__all__ = ["CONNECTORS", "Connector", "PutMode", "as_connector", "open_connector", "validate_key", "validate_prefix"]
