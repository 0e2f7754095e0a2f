"""One way to open a Redis or Valkey client from a kvswap URI (connectors and meta stores).

``redis://``/``rediss://`` use redis-py, ``valkey://``/``valkeys://`` valkey-py; the ``s``
schemes use TLS. ``scheme://[user:password@]host[:port][/db]``. With ``cluster=True`` the
host is one node of a Redis/Valkey Cluster (``nodes``: more seed nodes, ``host:port,...``)
and the client is the library's own cluster client: it learns the slot map, follows MOVED
and ASK, and re-learns the map after a failover. Connections keep the C reply
parser but pack commands in Python: the C packers copy large values (about 4x slower SETs,
see notes/SERVICES.md), the Python one sends them as separate buffers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

from kvswap.errors import (
    BackendUnavailableError,
    ConfigError,
    KVSwapError,
    StorageFullError,
)
from kvswap.uri import URI, Option, parse_bool, parse_positive_int, parse_seconds

LIBRARIES = {"redis": "redis", "rediss": "redis", "valkey": "valkey", "valkeys": "valkey"}

CLIENT_OPTIONS = {
    "timeout": Option(parse_seconds, 10.0, "seconds to wait for any reply"),
    "connect_timeout": Option(parse_seconds, 5.0, "seconds to wait for a connection"),
    "max_connections": Option(parse_positive_int, 64, "connection pool size"),
    "tls_ca_file": Option(str, None, "CA bundle for rediss:// and valkeys://"),
    "tls_verify": Option(parse_bool, True, "verify the server's TLS certificate"),
}


def _connection_classes(lib: Any) -> tuple[type, type]:
    """Connection classes of ``lib`` that pack commands in Python (see module doc)."""

    def _construct_command_packer(self: Any, packer: Any) -> Any:
        return packer or lib.connection.PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)

    plain = type("PythonPackConnection", (lib.connection.Connection,),
                 {"_construct_command_packer": _construct_command_packer})
    tls = type("PythonPackSSLConnection", (lib.connection.SSLConnection,),
               {"_construct_command_packer": _construct_command_packer})
    return plain, tls


def error_table(lib: Any) -> dict[type[BaseException], type[KVSwapError]]:
    exc = lib.exceptions
    return {
        exc.AuthenticationError: ConfigError,
        exc.AuthorizationError: ConfigError,
        exc.NoPermissionError: ConfigError,
        exc.OutOfMemoryError: StorageFullError,
        exc.ConnectionError: BackendUnavailableError,
        exc.TimeoutError: BackendUnavailableError,
        exc.RedisError if hasattr(exc, "RedisError") else exc.ValkeyError: BackendUnavailableError,
        OSError: BackendUnavailableError,
    }


class RedisClient:
    """A pooled client for ``uri`` with the options of :data:`CLIENT_OPTIONS` (plus ``retries``).

    ``client`` is the library's client, ``pool`` its pool, ``errors`` the exception table for
    :func:`kvswap.errors.translate_errors`, ``checkout_args`` what ``pool.get_connection``
    needs on this library version.
    """

    def __init__(self, uri: URI, opts: dict[str, Any], retries: int, *, large_values: bool = True,
                 cluster: bool = False, nodes: str | None = None) -> None:
        """``large_values``: pack commands in Python (module doc); False keeps the library's
        own packer, faster for many small arguments (the meta store's scripts). ``cluster``:
        ``uri`` names a node of a cluster, ``nodes`` more of them (``host:port,...``)."""
        library = LIBRARIES[uri.scheme]
        lib = importlib.import_module(library)
        self.errors = error_table(lib)
        self.no_script: type[Exception] = lib.exceptions.NoScriptError
        self.no_permission: type[Exception] = lib.exceptions.NoPermissionError
        if retries < 0:
            raise ConfigError("retries must be >= 0")
        db = 0
        if uri.path not in ("", "/"):
            try:
                db = int(uri.path.strip("/"))
            except ValueError:
                raise ConfigError(f"the path of {uri} must be a database number, like /0") from None
        if not uri.host:
            raise ConfigError(f"{uri.scheme}:// needs a host, like {uri.scheme}://127.0.0.1:6379/0")
        plain, tls = (_connection_classes(lib) if large_values
                      else (lib.connection.Connection, lib.connection.SSLConnection))
        kwargs: dict[str, Any] = dict(
            username=uri.username, password=uri.password,
            socket_timeout=opts["timeout"], socket_connect_timeout=opts["connect_timeout"],
            retry=lib.retry.Retry(lib.backoff.ExponentialBackoff(cap=1.0, base=0.05), retries),
            max_connections=opts["max_connections"], connection_class=plain,
        )
        if uri.scheme in ("rediss", "valkeys"):
            kwargs.update(connection_class=tls, ssl_ca_certs=opts["tls_ca_file"],
                          ssl_cert_reqs="required" if opts["tls_verify"] else "none")
        self.cluster = cluster
        if cluster:
            if db:
                raise ConfigError(f"{uri}: a cluster has only database 0")
            # url= makes the cluster client build each node's pool with our connection class;
            # the credentials stay out of the URL string (passed as arguments).
            seeds = [lib.cluster.ClusterNode(*_host_port(node)) for node in (nodes or "").split(",") if node]
            self.pool = None
            self.client = getattr(lib.cluster, "RedisCluster" if library == "redis" else "ValkeyCluster")(
                url=f"{'rediss' if uri.scheme in ('rediss', 'valkeys') else 'redis'}://{uri.host}:{uri.port or 6379}",
                startup_nodes=seeds or None, **kwargs)
            self.checkout_args = _checkout_args(self.node_pool("probe"))
            return
        self.pool = lib.ConnectionPool(host=uri.host, port=uri.port or 6379, db=db, **kwargs)
        self.client = lib.Redis(connection_pool=self.pool) if library == "redis" \
            else lib.Valkey(connection_pool=self.pool)
        self.checkout_args = _checkout_args(self.pool)

    def node_pool(self, key: str) -> Any:
        """The connection pool of the server holding ``key`` (a cluster's primary for its slot)."""
        if self.pool is not None:
            return self.pool
        node = self.client.get_node_from_key(key)
        return (getattr(node, "redis_connection", None) or node.valkey_connection).connection_pool

    @contextlib.contextmanager
    def connection(self, pool: Any) -> Iterator[Any]:
        """A connection of ``pool`` (see :meth:`node_pool`) for commands sent and read by hand,
        given back after; dropped instead if the body raised (a reply may be unread, or a
        command half sent: it is never reused)."""
        conn = pool.get_connection(*self.checkout_args)
        try:
            yield conn
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def refresh(self) -> None:
        """Re-learn a cluster's slot map (after a MOVED or ASK met outside the client)."""
        if self.cluster:
            self.client.nodes_manager.initialize()

    def slot_of(self, key: str) -> int:
        """The cluster slot of ``key`` (CRC16 of it, or of its hash tag)."""
        return int(self.client.keyslot(key))

    def wait_replicas(self, names: list[str], wanted: int, timeout: float, prefix: str) -> int:
        """The fewest replicas, over the primaries holding ``names``, that acknowledged within
        ``timeout`` seconds every write sent to their primary so far (stops at the first short
        of ``wanted``). Replication is one stream per primary: a WAIT after a write of our own
        on it (a small marker key under ``prefix``, in the slot of one of ``names``) covers
        every earlier write to it, from any connection."""
        by_pool: dict[int, tuple[Any, str]] = {}
        for name in names:
            pool = self.node_pool(name)
            by_pool.setdefault(id(pool), (pool, name))
        for pool, name in by_pool.values():
            marker = f"{prefix}replicated" + (f":{{{slot_tags()[self.slot_of(name)]}}}" if self.cluster else "")
            with self.connection(pool) as conn:
                conn.send_command("SET", marker, b"1", "PX", "60000")
                conn.read_response()
                conn.send_command("WAIT", wanted, max(1, int(timeout * 1000)))
                acknowledged = int(conn.read_response())
            if acknowledged < wanted:
                return acknowledged
        return wanted

    def primaries(self) -> int:
        return len(self.client.get_primaries()) if self.cluster else 1

    def close(self) -> None:
        self.client.close()
        if self.pool is not None:
            self.pool.disconnect()


@functools.cache
def slot_tags() -> dict[int, str]:
    """A short hash tag for each of the 16384 cluster slots (built once, ~0.1 s)."""
    try:
        from valkey.crc import key_slot
    except ImportError:  # the redis extra only
        from redis.crc import key_slot

    tags: dict[int, str] = {}
    index = 0
    while len(tags) < 16384:
        tags.setdefault(key_slot(b"r%d" % index), f"r{index}")
        index += 1
    return tags


def _checkout_args(pool: Any) -> tuple[str, ...]:
    """What ``pool.get_connection`` needs: valkey-py still requires a command name; redis-py
    deprecates passing one."""
    needs_name = inspect.signature(pool.get_connection).parameters.get("command_name")
    return ("GET",) if needs_name and needs_name.default is inspect.Parameter.empty else ()


def _host_port(node: str) -> tuple[str, int]:
    host, _, port = node.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster nodes are host:port, not {node!r}")
    return host, int(port)
