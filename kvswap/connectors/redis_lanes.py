"""Parallel pipelined lanes over a Redis/Valkey client's connections: how the Redis
connector moves many commands (a value's chunks, a batch's values) at once.

A lane is one pooled connection with its commands pipelined; ``parallel`` lanes run at once
on threads. Reads land straight in the caller's buffers (:func:`read_bulk`), not in a bytes
object per reply that would be copied again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from kvswap.connectors.redis_wire import read_bulk
from kvswap.redis_client import RedisClient


class PipelinedLanes:
    """The lanes of a connector holding ``options["parallel"]``, a :class:`RedisClient` and its client."""

    options: Any
    _redis: RedisClient
    _client: Any
    _threads: ThreadPoolExecutor | None = None  # a value's chunks
    _batch_threads: ThreadPoolExecutor | None = None  # put_many's and get_many's lanes (their values use the above)

    def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run commands over up to ``parallel`` pipelined connections; results in order."""
        return self._in_order(self._run_pipeline, commands) if commands else []

    def _in_order(self, run: Callable[[list[Any]], list[Any]], items: list[Any],
                  executor: ThreadPoolExecutor | None = None) -> list[Any]:
        """:meth:`_across_lanes` of a ``run`` that gives one result per item: the results in the items' order."""
        shares = self._across_lanes(run, items, executor)
        ordered: list[Any] = [None] * len(items)
        for lane, share in enumerate(shares):
            ordered[lane::len(shares)] = share
        return ordered

    def _across_lanes(self, run: Callable[[list[Any]], Any], items: list[Any],
                      executor: ThreadPoolExecutor | None = None) -> list[Any]:
        """``run`` of each lane ``items[i::lanes]`` (``lanes`` = min(``parallel``, items)), the
        lanes at once on ``executor`` (the chunk threads by default; batches have their own, as
        a batch's values use the chunk threads); results by lane, once every lane has finished
        (the first error is raised then)."""
        lanes = min(self.options["parallel"], len(items))
        if lanes <= 1:
            return [run(items)]
        futures = [(executor or self._executor()).submit(run, items[i::lanes]) for i in range(lanes)]
        wait(futures)
        return [future.result() for future in futures]

    def _batch_executor(self) -> ThreadPoolExecutor:
        if self._batch_threads is None:
            self._batch_threads = ThreadPoolExecutor(self.options["parallel"], thread_name_prefix="kvswap-redis-batch")
        return self._batch_threads

    def _run_pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for op, name, *args in commands:
            if op == "set":
                pipe.set(name, args[0], px=args[1])
            elif op == "persist":
                pipe.persist(name)
            elif op == "pexpire":
                pipe.pexpire(name, args[0])
        return pipe.execute()

    def _read_by_node(self, reads: list[tuple[tuple[Any, ...], memoryview]]) -> list[list[Any]]:
        """Each server's reads on up to ``parallel`` pipelined connections of its own, all at once; replies by lane."""
        by_pool: dict[int, tuple[Any, list[tuple[tuple[Any, ...], memoryview]]]] = {}
        for read in reads:
            pool = self._redis.node_pool(read[0][1])
            by_pool.setdefault(id(pool), (pool, []))[1].append(read)
        lanes = [(pool, group[i::width]) for pool, group in by_pool.values()
                 for width in [min(self.options["parallel"], len(group))] for i in range(width)]
        if len(lanes) == 1:
            return [self._read_lane(*lanes[0])]
        futures = [self._executor().submit(self._read_lane, pool, lane) for pool, lane in lanes]
        wait(futures)  # all of them: none may still write into the buffer when this returns or raises
        return [future.result() for future in futures]

    def _executor(self) -> ThreadPoolExecutor:
        if self._threads is None:
            workers = self.options["parallel"] * self._redis.primaries()
            self._threads = ThreadPoolExecutor(workers, thread_name_prefix="kvswap-redis")
        return self._threads

    def _read_lane(self, pool: Any, reads: Sequence[tuple[tuple[Any, ...], memoryview | None]]) -> list[Any]:
        """Pipeline the reads on one connection; bulk replies land straight in their targets (new
        buffers for None): each reply's bytes, None for a missing key.

        redis-py's parsers build a bytes object per reply that we would copy again; here the
        socket fills the caller's buffer directly (about 2x the throughput). The connection
        comes from the pool, so auth, TLS and db selection are the library's; if anything is
        unexpected the connection is dropped, never reused half-read.
        """
        with self._redis.connection(pool) as conn:
            conn.send_packed_command(conn.pack_commands([command for command, _ in reads]))
            with conn._sock.makefile("rb") as reader:  # buffered: a reply's header is one read, not one per byte
                return [read_bulk(reader, target) for _, target in reads]  # every one read, even after a miss

    def _close_lanes(self) -> None:
        for threads in (self._threads, self._batch_threads):
            if threads is not None:
                threads.shutdown()
