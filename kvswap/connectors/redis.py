"""``redis://``, ``rediss://``, ``valkey://``, ``valkeys://``: one implementation.

The scheme picks the client library (redis-py for redis*, valkey-py for valkey*); the
``s`` schemes use TLS. ``redis://[user:password@]host[:port][/db]?options``.

Layout under the namespace ``prefix`` (default ``kvswap:``):

* ``{prefix}m/{key}`` — the value's manifest: ``KVSM`` + u32 header length + JSON header
  (size, chunk size, chunk count, write id) + the value itself when it fits in one chunk.
* ``{prefix}c/{write_id}/{i}`` — chunk ``i`` of a larger value.

A put writes its chunks first (each with a short expiry, so a writer that dies leaves
nothing behind for long), removes the expiries, and publishes the manifest last, in one
``SET``: a reader sees the whole value or none. A new key is one ``SET NX``; an overwrite
swaps the manifest (MULTI: GETRANGE, SET; on a cluster SET ... GET) and gives the old
chunks a short expiry (``retire_grace``) so readers of the old manifest finish (one that
still misses a chunk re-reads the manifest). Chunks keep values far under Redis's 512 MB
cap; several pipelined connections move them, read replies landing straight in the
caller's buffer.

**Cluster** (``?cluster=true``, the URI naming any node; ``nodes=host:port,...`` more seeds):
the same layout through the library's cluster client, by :class:`~kvswap.connectors.redis_cluster.RedisClusterConnector`
(what ``open_connector`` returns for such a URI); this module is one server's.

Client construction (library by scheme, Python command packing) is shared with the meta
store: :mod:`kvswap.redis_client`.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

from kvswap.connectors.base import Buffer, Connector, Data, PutMode, as_parts, check_range, validate_key
from kvswap.connectors.redis_lanes import PipelinedLanes
from kvswap.connectors.redis_wire import (
    Redirected,
    decode_manifest,
    encode_header,
    glob_escape,
    new_write_id,
    set_nx_command,
    split,
    write_time,
)
from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    NotFoundError,
    translate_errors,
)
from kvswap.redis_client import CLIENT_OPTIONS, RedisClient
from kvswap.uri import URI, Option, parse_bool, parse_positive_int, parse_seconds, parse_size

_HEADER_PROBE = 4096  # bytes of a manifest fetched to learn a value's size
# Delete KEYS[1], returning its first ARGV[1] + 1 bytes ("" if missing; GETDEL returns all).
_TAKE_HEAD = """local head = redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[1]))
if head ~= '' then redis.call('UNLINK', KEYS[1]) end
return head"""
_READ_ATTEMPTS = 10
_CLUSTER_READ_ATTEMPTS = 3

class RedisConnector(PipelinedLanes, Connector):
    """One Redis/Valkey server (module docstring); with ``cluster=true`` the URI opens a
    :class:`~kvswap.connectors.redis_cluster.RedisClusterConnector` instead."""

    OPTIONS: ClassVar[Mapping[str, Option]] = {
        **CLIENT_OPTIONS,
        "retries": Option(int, 1, "retries of a command after a connection error or timeout"),
        "prefix": Option(str, "kvswap:", "namespace of every key this connector writes"),
        "chunk_size": Option(parse_size, 4 << 20, "values larger than this are split into chunks"),
        "parallel": Option(parse_positive_int, 4, "connections moving one value's chunks in parallel"),
        "pending_ttl": Option(parse_seconds, 600.0, "expiry of chunks until their manifest is published"),
        "retire_grace": Option(parse_seconds, 10.0, "seconds an overwritten value's chunks stay readable"),
        "replicas": Option(int, 0, "a put returns once this many replicas of each primary it wrote have it"),
        "replica_timeout": Option(parse_seconds, 5.0, "how long a put waits for its replicas"),
        "cluster": Option(parse_bool, False, "the host is a node of a Redis/Valkey Cluster"),
        "nodes": Option(str, None, "more cluster nodes to start from: host:port,host:port"),
    }

    def __new__(cls, uri: URI, **options: Any) -> RedisConnector:
        if cls is RedisConnector and uri.options(cls.OPTIONS, options)["cluster"]:
            from kvswap.connectors.redis_cluster import RedisClusterConnector

            cls = RedisClusterConnector
        return super().__new__(cls)

    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        opts = self.options
        if opts["chunk_size"] > 256 << 20:
            raise ConfigError("chunk_size must be at most 256MiB (Redis caps a value at 512MB)")
        if opts["replicas"] < 0:
            raise ConfigError("replicas must be >= 0")
        if opts["replicas"] and opts["replica_timeout"] >= opts["timeout"]:
            raise ConfigError("replica_timeout must be shorter than timeout (the wait is one reply)")
        self._redis = RedisClient(uri, opts, opts["retries"], cluster=opts["cluster"], nodes=opts["nodes"])
        self._errors_table = self._redis.errors
        self._client = self._redis.client
        self._prefix = opts["prefix"]
        self._take_head = self._client.register_script(_TAKE_HEAD)

    # ---- layout -----------------------------------------------------------------

    def _manifest_key(self, key: str) -> str:
        return f"{self._prefix}m/{key}"

    def _chunk_keys(self, write_id: str, count: int) -> list[str]:
        return [f"{self._prefix}c/{write_id}/{i}" for i in range(count)]

    def _errors(self, what: str, key: str) -> Any:
        return translate_errors(self._errors_table, f"{what} {key!r} on {self.uri}")

    # ---- put ----------------------------------------------------------------------

    def _put(self, key: str, parts: list[memoryview], size: int, mode: PutMode) -> None:
        chunk = self.options["chunk_size"]
        with self._errors("writing", key):
            if size <= chunk:
                self._publish(key, [encode_header({"size": size, "chunks": 0}), *parts], mode, [])
                self._wait_replicas(key, [self._manifest_key(key)])
                return
            write_id = new_write_id()
            count = -(-size // chunk)
            chunk_keys = self._chunk_keys(write_id, count)
            try:
                pieces = split(parts, chunk)
                ttl_ms = int(self.options["pending_ttl"] * 1000)
                self._pipelined([("set", k, piece, ttl_ms) for k, piece in zip(chunk_keys, pieces)])
                self._pipelined([("persist", k) for k in chunk_keys])
                header: dict[str, Any] = {"size": size, "chunks": count, "chunk_size": chunk, "id": write_id}
                self._publish(key, [encode_header(header)], mode, chunk_keys)
            except BaseException:
                self._drop_quietly(chunk_keys)
                raise
            self._wait_replicas(key, [*chunk_keys, self._manifest_key(key)])

    def put_many(self, items: Mapping[str, Data] | Iterable[tuple[str, Data]], *, mode: PutMode = "overwrite") -> None:
        """As :meth:`Connector.put_many`. Values of up to ``chunk_size``: created on one server by
        one connection that sends them all before reading a reply (:meth:`_create_all`), else
        spread over up to ``parallel`` connections; larger ones one after another (each spreads
        its chunks). An error other than an existing key stops its share; the others finish."""
        pairs = [(key, as_parts(data)) for key, data in self._checked_batch(items, mode)]
        sizes = [sum(part.nbytes for part in parts) for _, parts in pairs]
        small = [(key, parts, size) for (key, parts), size in zip(pairs, sizes) if size <= self.options["chunk_size"]]
        large = [pair for pair, size in zip(pairs, sizes) if size > self.options["chunk_size"]]
        if len(small) < 2 or (mode != "create" and self.options["parallel"] < 2):
            super().put_many(pairs, mode=mode)
            return
        if mode == "create" and self._sends_batches:
            existing = set(self._create_all(small))
        else:
            shares = self._across_lanes(lambda share: self._put_each([(k, p) for k, p, _ in share], mode), small,
                                        self._batch_executor())
            existing = {key for share in shares for key in share}
        existing.update(self._put_each(large, mode))
        self._raise_existing([key for key, _ in pairs if key in existing])

    def _create_all(self, values: builtins.list[tuple[str, builtins.list[memoryview], int]]) -> builtins.list[str]:
        """Create inline values on one server, every ``SET ... NX`` sent on one connection before the
        first reply is read; the keys that existed. If the connection fails midway, unanswered values
        go one by one (one the server took before the failure then reads as existing, as on a retry)."""
        names = [self._manifest_key(key) for key, _, _ in values]
        commands = [set_nx_command(name, [encode_header({"size": size, "chunks": 0}), *parts])
                    for name, (_, parts, size) in zip(names, values)]
        replies: builtins.list[Any] = []
        try:
            with self._errors("writing", values[0][0]), self._redis.connection(self._redis.node_pool(names[0])) as conn:
                for command in commands:
                    conn.send_packed_command(command)
                for _ in commands:
                    replies.append(conn.read_response())
        except BackendUnavailableError:
            pass  # the unanswered ones one by one, below (each with the URI's retries)
        existing = [key for (key, _, _), reply in zip(values, replies) if reply is None]
        existing += self._put_each([(key, parts) for key, parts, _ in values[len(replies):]], "create")
        if replies:
            self._wait_replicas(values[0][0], names[:len(replies)])
        return existing

    def get_many(self, keys: Iterable[str]) -> builtins.list[Buffer]:
        """As :meth:`Connector.get_many`. On one server every manifest's ``GET`` goes out on one
        connection before the first reply is read, each reply landing in its own buffer, then
        chunked values are read one after another; if that connection fails, and on a cluster,
        each value is read on its own, up to ``parallel`` at once."""
        self._check_open()
        keys = [validate_key(key) for key in keys]

        def one_by_one() -> builtins.list[Buffer]:
            return self._in_order(lambda share: [self.get(key) for key in share], keys, self._batch_executor())

        if not self._sends_batches or len(keys) < 2:
            return one_by_one()
        names = [self._manifest_key(key) for key in keys]
        try:
            with self._errors("reading", keys[0]):
                raws = self._read_lane(self._redis.node_pool(names[0]), [(("GET", name), None) for name in names])
        except BackendUnavailableError:
            return one_by_one()
        values: builtins.list[Buffer] = []
        for key, raw in zip(keys, raws):
            if raw is None:
                raise NotFoundError(f"{key!r} not found on {self.uri}")
            header, inline = decode_manifest(raw, key)
            values.append(self.get(key) if header["chunks"] else inline)
        return values

    def _wait_replicas(self, key: str, written: list[str]) -> None:
        """With ``replicas``: wait until that many replicas of every primary holding one of
        ``written`` have all it was sent (:meth:`RedisClient.wait_replicas`); BackendUnavailableError
        if they do not within ``replica_timeout`` (the value is then on its primary only)."""
        wanted = self.options["replicas"]
        if not wanted:
            return
        acknowledged = self._redis.wait_replicas(written, wanted, self.options["replica_timeout"], self._prefix)
        if acknowledged < wanted:
            raise BackendUnavailableError(
                f"{key!r} on {self.uri}: {acknowledged} of {wanted} replicas acknowledged it within "
                f"{self.options['replica_timeout']} s (it is on its primary only)")

    def _publish(self, key: str, manifest: list[Any], mode: PutMode, chunk_keys: list[str]) -> None:
        name = self._manifest_key(key)
        if mode == "create":
            if not self._set_new(name, manifest):
                raise AlreadyExistsError(f"{key!r} already exists on {self.uri}")
            return
        if self._set_new(name, manifest):
            return  # a new key, the common case: one plain SET
        old = self._swap(name, manifest)  # an overwrite, learning what it replaces
        if old:
            old_header, _ = decode_manifest(old, key, partial=True)
            if old_header["chunks"]:  # retire, don't delete: readers of the old manifest finish
                grace_ms = int(self.options["retire_grace"] * 1000)
                old_chunks = self._chunk_keys(old_header["id"], old_header["chunks"])
                self._pipelined([("pexpire", k, grace_ms) for k in old_chunks])

    #: Whether many values go out on one connection before the first reply is read (one server).
    _sends_batches: ClassVar[bool] = True

    def _moved(self) -> tuple[type[BaseException], ...]:
        """Errors of a chunk read that mean "the slot map moved: learn it and read again"."""
        return (Redirected,)

    def _swap(self, name: str, manifest: list[Any]) -> Any:
        """Replace the manifest ``name``; the head of the one it replaced (one MULTI)."""
        return self._client.pipeline(transaction=True).getrange(name, 0, _HEADER_PROBE - 1).set(
            name, b"".join(manifest)).execute()[0]

    def _set_new(self, name: str, parts: list[Any]) -> bool:
        """``SET name <parts, back to back> NX``: True if set, False if ``name`` exists. The
        parts go out as they are on a pooled connection (redis-py would need them joined: a
        copy, ~15% of a 1 MiB put)."""
        command = set_nx_command(name, parts)
        with self._redis.connection(self._redis.node_pool(name)) as conn:
            def send() -> bool:
                conn.send_packed_command(command)
                return conn.read_response() is not None

            return bool(conn.retry.call_with_retry(send, lambda error: conn.disconnect()))

    def _drop_quietly(self, keys: list[str]) -> None:
        """Best-effort removal of chunks; their expiry or a later sweep covers failures."""
        try:
            for start in range(0, len(keys), 512):
                self._client.unlink(*keys[start:start + 512])
        except tuple(self._errors_table):  # cleanup must not mask the error that led here
            return

    # ---- get ----------------------------------------------------------------------

    def _get(self, key: str, offset: int, length: int | None) -> Buffer:
        return self._read(key, offset, length, None)

    def _read_into(self, key: str, buffer: memoryview, offset: int) -> int:
        return self._read(key, offset, None, buffer)

    def _read(self, key: str, offset: int, length: int | None, buffer: memoryview | None) -> Any:
        """A consistent read: the bytes of one manifest's value, into ``buffer`` if given.

        A chunk missing under a manifest that since changed means an overwrite won the
        race: read the new manifest. Missing under an unchanged manifest: corruption.
        """
        failed_id = None
        want = length if buffer is None else len(buffer) if length is None else min(length, len(buffer))
        for _ in range(_READ_ATTEMPTS):
            header, inline = self._manifest(key, upto=None if want is None else offset + want)
            check_range(key, offset, header["size"])
            count = header["size"] - offset
            if length is not None:
                count = min(count, length)
            if buffer is not None:
                count = min(count, len(buffer))
            if not header["chunks"]:
                if buffer is None:
                    return inline[offset:offset + count]
                buffer[:count] = inline[offset:offset + count]
                return count
            target = memoryview(bytearray(count)) if buffer is None else buffer[:count]
            if self._read_chunks(key, header, target, offset):
                return target.obj if buffer is None else count
            if header["id"] == failed_id:
                raise IntegrityError(f"{key!r} on {self.uri}: a chunk is missing under an unchanged manifest "
                                     "(evicted by maxmemory, or deleted behind kvswap's back)")
            failed_id = header["id"]
        raise BackendUnavailableError(f"{key!r} on {self.uri} was overwritten {_READ_ATTEMPTS} times while being read")

    def _manifest(self, key: str, upto: int | None = None) -> tuple[dict[str, Any], memoryview]:
        """The manifest's header and inline value, the value only as far as its first ``upto``
        bytes when given (0: the header alone; never more of an inline value than needed)."""
        with self._errors("reading", key):
            name = self._manifest_key(key)
            raw = self._client.get(name) if upto is None else self._client.getrange(name, 0, _HEADER_PROBE - 1 + upto)
        if not raw:
            raise NotFoundError(f"{key!r} not found on {self.uri}")
        header, inline = decode_manifest(raw, key, partial=upto is not None)
        if upto is not None and not header["chunks"] and not min(header["size"], upto) <= len(inline) <= header["size"]:
            raise IntegrityError(f"corrupt manifest for {key!r}: inline value holds {len(inline)} bytes where "
                                 f"{min(header['size'], upto)} to {header['size']} were expected")
        return header, inline

    def _read_chunks(self, key: str, header: dict[str, Any], out: memoryview, offset: int) -> bool:
        """Fill ``out`` from the chunks; False if a chunk vanished (overwritten: retry)."""
        chunk, count = header["chunk_size"], len(out)
        if count == 0:
            return True
        first, last = offset // chunk, (offset + count - 1) // chunk
        names = self._chunk_keys(header["id"], header["chunks"])
        reads: list[tuple[tuple[Any, ...], memoryview]] = []
        for index in range(first, last + 1):
            start = max(offset, index * chunk) - index * chunk
            end = min(offset + count, (index + 1) * chunk) - index * chunk
            target = out[index * chunk + start - offset:index * chunk + end - offset]
            whole = start == 0 and end == min(chunk, header["size"] - index * chunk)
            reads.append((("GET", names[index]) if whole else ("GETRANGE", names[index], start, end - 1), target))
        with self._errors("reading", key):
            for attempt in range(_CLUSTER_READ_ATTEMPTS):
                try:
                    return all(reply is not None for lane in self._read_by_node(reads) for reply in lane)
                except self._moved() as exc:  # a slot moved, or its primary died: learn the map, read again
                    if attempt == _CLUSTER_READ_ATTEMPTS - 1:
                        if isinstance(exc, Redirected):
                            raise BackendUnavailableError(
                                f"{key!r} on {self.uri}: the cluster kept moving its slots") from None
                        raise
                    time.sleep(0.25 * attempt)
                    self._redis.refresh()
        return False  # not reached

    def _size(self, key: str) -> int:
        header, _ = self._manifest(key, upto=0)
        return int(header["size"])

    # ---- delete, list, close ----------------------------------------------------------

    def _delete(self, key: str) -> None:
        name = self._manifest_key(key)
        with self._errors("deleting", key):
            try:
                old = self._take_head(keys=[name], args=[_HEADER_PROBE - 1])
            except self._redis.no_permission:  # a user without @scripting: the value comes back
                old = self._client.getdel(name)
        if not old:
            return
        try:
            header, _ = decode_manifest(old, key, partial=True)
        except IntegrityError:
            return  # a damaged manifest names no chunks we can trust: collect_garbage sweeps them
        if header["chunks"]:
            with self._errors("deleting", key):
                self._client.unlink(*self._chunk_keys(header["id"], header["chunks"]))

    def collect_garbage(self, older_than: float = 600.0) -> int:
        """Unlink chunks that no manifest names (their manifest was damaged, deleted behind
        kvswap's back, or never published by a writer that died after making them durable),
        written more than ``older_than`` seconds ago. Chunks that still carry an expiry (a
        write in flight, or an overwritten value's readers finishing) are left to it."""
        self._check_open()
        manifest_root = self._manifest_key("")
        with self._errors("collecting garbage", "*"):
            referenced: set[str] = set()
            names = list(self._client.scan_iter(match=glob_escape(manifest_root) + "*", count=1000))
            for start in range(0, len(names), 512):
                pipe = self._client.pipeline(transaction=False)
                for name in names[start:start + 512]:
                    pipe.getrange(name, 0, _HEADER_PROBE - 1)
                for raw in pipe.execute():
                    try:
                        header, _ = decode_manifest(raw, "?", partial=True) if raw else ({}, None)
                    except IntegrityError:
                        continue
                    if header.get("chunks"):
                        referenced.add(header["id"])
            prefix = f"{self._prefix}c/"
            horizon = time.time() - older_than
            candidates: dict[str, list[Any]] = {}
            for name in self._client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
                text = name.decode() if isinstance(name, bytes) else name
                write_id = text[len(prefix):].split("/", 1)[0]
                if write_id not in referenced and write_time(write_id) < horizon:
                    candidates.setdefault(write_id, []).append(name)
            orphans = [name for group in candidates.values() for name in group]
            deleted = 0
            for start in range(0, len(orphans), 512):
                batch = orphans[start:start + 512]
                pipe = self._client.pipeline(transaction=False)
                for name in batch:
                    pipe.pttl(name)
                durable = [name for name, ttl in zip(batch, pipe.execute()) if ttl == -1]
                if durable:
                    deleted += int(self._client.unlink(*durable))
        return deleted

    def _list(self, prefix: str) -> Iterator[str]:
        start = len(self._manifest_key(""))
        pattern = glob_escape(self._manifest_key(prefix)) + "*"
        with self._errors("listing", prefix):
            for name in self._client.scan_iter(match=pattern, count=1000):
                yield (name.decode() if isinstance(name, bytes) else name)[start:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_lanes()
        self._redis.close()
