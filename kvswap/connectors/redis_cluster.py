"""``redis://...?cluster=true`` (and ``valkey``, ``rediss``, ``valkeys``): a Redis/Valkey Cluster.

The layout and protocol of :mod:`kvswap.connectors.redis` through the library's cluster
client, the URI naming any node (``nodes=host:port,...``: more seeds). Chunk keys carry no
hash tag, so a large value's chunks spread over the primaries, and reads fetch each
primary's chunks on their own connections in parallel (the point: aggregate bandwidth); a
manifest lives on its own key's slot and is still published last. MOVED/ASK and failover
are the client's (a direct chunk read that meets one, or a connection error, re-learns the
slot map and reads again). What differs from one server is here: commands are routed by the
client, key by key, so batches are not sent down one connection and values are joined.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvswap.connectors.redis import RedisConnector
from kvswap.connectors.redis_wire import Redirected


class RedisClusterConnector(RedisConnector):
    """A Redis/Valkey Cluster (module docstring)."""

    _sends_batches: ClassVar[bool] = False

    def _moved(self) -> tuple[type[BaseException], ...]:
        return (Redirected, *self._errors_table)  # a primary that died: the map moved too

    def _swap(self, name: str, manifest: list[Any]) -> Any:
        """Replace the manifest ``name``; the one it replaced (``SET ... GET``: no MULTI across slots)."""
        return self._client.set(name, b"".join(manifest), get=True)

    def _set_new(self, name: str, parts: list[Any]) -> bool:
        """``SET name <parts joined> NX`` through the routing client."""
        return bool(self._client.set(name, b"".join(parts), nx=True))
