"""Connectors: byte stores addressed by URI, shared by the session cache and weights.

>>> from kvswap.connectors import open_connector
>>> with open_connector("file:///tmp/kvswap") as store:
...     store.put("a/b", b"hello")
...     bytes(store.get("a/b"))
b'hello'
"""

from __future__ import annotations

from typing import Any

from kvswap.connectors.base import Connector, PutMode, validate_key, validate_prefix
from kvswap.registry import Entry, LazyRegistry
from kvswap.uri import URI

CONNECTORS: LazyRegistry[Connector] = LazyRegistry(
    "connector",
    {
        "file": Entry("kvswap.connectors.file:FileConnector"),
        "mem": Entry("kvswap.connectors.mem:MemConnector"),
        "redis": Entry("kvswap.connectors.redis:RedisConnector", "redis"),
        "rediss": Entry("kvswap.connectors.redis:RedisConnector", "redis"),
        "valkey": Entry("kvswap.connectors.redis:RedisConnector", "valkey"),
        "valkeys": Entry("kvswap.connectors.redis:RedisConnector", "valkey"),
        "s3": Entry("kvswap.connectors.s3:S3Connector", "s3"),
    },
)


def open_connector(uri: str | URI, **options: Any) -> Connector:
    """Open the connector for ``uri``; keyword options override query parameters."""
    parsed, cls = CONNECTORS.resolve(uri)
    return cls(parsed, **options)


__all__ = ["CONNECTORS", "Connector", "PutMode", "open_connector", "validate_key", "validate_prefix"]
