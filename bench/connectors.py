"""Connector throughput against the raw ceiling of the same path, measured in the same run.

    .venv/bin/python bench/connectors.py [--sizes 1MiB,64MiB] [--only file,redis,...]

Starts its own servers on loopback (kvswap.testing.servers), then for each connector and
value size measures put and get (into a preallocated buffer) throughput, and the ceiling:

* file:// and the JuiceFS mount: one plain file written with write+fsync, read with readinto;
* redis:// and valkey://: puts against ``redis-benchmark`` SETs of new keys (``-r``, as
  kvswap writes every value once; 1 client for ``put``, ``parallel`` for ``put_many``) run
  round-robin with the connector on a server flushed before each run, since a server takes
  new 1 MiB values at rates that vary 3x with what its allocator holds; gets against a bare
  RESP socket (:class:`RespSocket`, one GET into a reused buffer per round trip; ``parallel``
  of them for ``get_many``) interleaved with the connector. redis-benchmark's figures run
  apart (SET of new keys, of one key, GET) and the bare socket's SET are recorded beside;
* s3://: the bare clients, obstore (put / get) and boto3 (put_object / 8-way ranged get),
  the better of the two; both are reported, which is how the S3 connector's client was
  chosen;
* mem://: a plain memory copy of the value.

Values up to 4 MiB are also moved in batches of 32 (``put_many`` in create mode, as kvswap
writes, and ``get_many``) against the same ceiling; on Redis/Valkey ``put_many`` moves the
round-robin runs' values (64 of 1 MiB) against redis-benchmark with ``parallel`` clients.

Prints connector / ceiling ratios and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.connectors import Connector, open_connector
from kvswap.testing import servers
from kvswap.uri import parse_size


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin after one warm-up each.

    Interleaving matters on shared machines: the disk and CPUs have slow spells, and a
    connector timed in one block and its ceiling in another would see different ones.
    """
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class FreshKeys:
    """Put ``data`` under a new key each call (kvswap's blobs are written once)."""

    def __init__(self, put: Callable[[str, bytes], object], data: bytes) -> None:
        self.put, self.data, self.keys = put, data, []

    def __call__(self) -> None:
        self.keys.append(f"bench/value-{len(self.keys)}")
        self.put(self.keys[-1], self.data)


#: A ceiling for batches: puts (keys, data) or gets (keys, buffers) the way the bare client
#: would move a batch (several connections at once).
BatchPut = Callable[[Sequence[str], bytes], object]
BatchGet = Callable[[Sequence[str], Sequence[memoryview]], object]


def measure(data: bytes, repeat: int, connector_uri: str,
            ceiling_put: Callable[[str, bytes], object] | None,
            ceiling_get: Callable[[str, memoryview], object] | None,
            batch_ceiling: tuple[BatchPut, BatchGet] | None = None) -> dict[str, dict[str, float]]:
    """Connector and ceiling put/get GB/s, interleaved. Ceilings take (key, data|buffer)."""
    size = len(data)
    buffer = bytearray(size)
    with open_connector(connector_uri) as store:
        puts = {"connector": FreshKeys(store.put, data)}
        if ceiling_put is not None:
            puts["ceiling"] = FreshKeys(ceiling_put, data)
        put_seconds = interleaved(puts, repeat)
        last = puts["connector"].keys[-1]
        gets: dict[str, Callable[[], object]] = {"connector": lambda: store.get_into(last, buffer)}
        if ceiling_get is not None:
            ceiling_last = puts["ceiling"].keys[-1]
            gets["ceiling"] = lambda: ceiling_get(ceiling_last, memoryview(buffer))
        get_seconds = interleaved(gets, repeat)
        store.get_into(last, buffer)
        assert buffer == data, "read back differs"
        store.delete_many(puts["connector"].keys)
        figures = {name: {"put_gbps": gbps(size, put_seconds[name]), "get_gbps": gbps(size, get_seconds[name])}
                   for name in get_seconds}
        if size <= BATCH_MAX:
            figures["batch"] = measure_batch(store, data, max(2, repeat // 10), batch_ceiling)
    return figures


BATCH_MAX, BATCH = 4 << 20, 32


def measure_batch(store: Connector, data: bytes, repeat: int,
                  ceiling: tuple[BatchPut, BatchGet] | None = None) -> dict[str, float]:
    """put_many (create mode, as kvswap writes) and get_many of BATCH values of ``data``; with
    a ``ceiling``, the same batches through it, interleaved (``ceiling_put_gbps``, ...)."""
    rounds: dict[str, list[list[str]]] = {"put": [], "ceiling_put": []}

    def fresh(name: str) -> list[str]:
        rounds[name].append([f"bench/batch-{name}-{len(rounds[name])}-{i}" for i in range(BATCH)])
        return rounds[name][-1]

    puts: dict[str, Callable[[], object]] = {"put": lambda: store.put_many(dict.fromkeys(fresh("put"), data),
                                                                          mode="create")}
    gets: dict[str, Callable[[], object]] = {"get": lambda: store.get_many(rounds["put"][-1])}
    if ceiling is not None:
        buffers = [memoryview(bytearray(len(data))) for _ in range(BATCH)]
        puts["ceiling_put"] = lambda: ceiling[0](fresh("ceiling_put"), data)
        gets["ceiling_get"] = lambda: ceiling[1](rounds["ceiling_put"][-1], buffers)
    seconds = {**interleaved(puts, repeat), **interleaved(gets, repeat)}
    assert all(bytes(v) == data for v in store.get_many(rounds["put"][-1])), "batch read back differs"
    for keys in rounds["put"]:
        store.delete_many(keys)
    return {f"{name}_gbps": gbps(BATCH * len(data), value) for name, value in seconds.items()}


class RespSocket:
    """The floor of a Redis client: one socket, one command per round trip, RESP written by
    hand (as ``redis-benchmark`` does), the value sent from the caller's buffer and read into
    it. A ceiling to interleave with the connector; not a client for anything else."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def _send(self, *parts: bytes) -> None:
        pieces = [memoryview(b"*%d\r\n" % len(parts))]
        for part in parts:
            pieces += [memoryview(b"$%d\r\n" % len(part)), memoryview(part), memoryview(b"\r\n")]
        while pieces:  # sendmsg may send part of it
            sent = self.sock.sendmsg(pieces)
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces.pop(0))
            if pieces:
                pieces[0] = pieces[0][sent:]

    def set(self, key: str, data: bytes) -> None:
        self._send(b"SET", key.encode(), data)
        if self.reader.readline() != b"+OK\r\n":
            raise RuntimeError("SET failed")

    def flushall(self) -> None:
        self._send(b"FLUSHALL")
        if self.reader.readline() != b"+OK\r\n":
            raise RuntimeError("FLUSHALL failed")

    def get_into(self, key: str, buffer: memoryview) -> None:
        self._send(b"GET", key.encode())
        length = int(self.reader.readline()[1:])
        if length != len(buffer) or self.reader.readinto(buffer) != length or self.reader.read(2) != b"\r\n":
            raise RuntimeError("GET returned another length")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def resp_lanes(clients: list[RespSocket]) -> tuple[BatchPut, BatchGet]:
    """Batch ceilings over ``clients``: each socket moves its share of the keys, all at once."""
    def spread(work: Callable[[RespSocket, int], None], count: int) -> None:
        def lane(number: int) -> None:
            for i in range(number, count, len(clients)):
                work(clients[number], i)

        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(lane, range(len(clients))))

    def put(keys: Sequence[str], data: bytes) -> None:
        spread(lambda client, i: client.set(keys[i], data), len(keys))

    def get(keys: Sequence[str], buffers: Sequence[memoryview]) -> None:
        spread(lambda client, i: client.get_into(keys[i], buffers[i]), len(keys))

    return put, get


def plain_file_ops(directory: Path) -> tuple[Callable, Callable]:
    """Plain fresh files: write, flush, fsync, close; read with readinto."""
    def put(key: str, data: bytes) -> None:
        with open(directory / key.replace("/", "-"), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def get(key: str, buffer: memoryview) -> None:
        with open(directory / key.replace("/", "-"), "rb", buffering=0) as handle:
            handle.readinto(buffer)

    return put, get


def redis_benchmark(port: int, size: int, requests: int, clients: int, *arguments: str) -> dict[str, float]:
    """GB/s by command (``SET``, ``GET``) of one redis-benchmark run of ``requests`` commands with
    ``size``-byte values from ``clients`` clients, by its own clock (its start-up not counted)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark not found (apt-get install redis-tools)")
    out = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), "-d", str(size), "-n", str(requests),
                          "-c", str(clients), "-q", *arguments],
                         capture_output=True, text=True, timeout=600, check=True).stdout.replace("\r", "\n")
    return {op: float(rate) * size / 1e9 for op, rate in re.findall(r"(SET|GET): ([\d.]+) requests per second", out)}


def redis_benchmark_ceiling(port: int, size: int, clients: list[int], bare: RespSocket) -> dict[str, float]:
    """redis-benchmark's GB/s with ``size``-byte values, each the best of ``clients``.

    ``put_gbps``: SET under a new key each time (``-r``), as kvswap writes every value once,
    so the server allocates (and the kernel faults in) fresh memory for each value.
    ``put_one_key_gbps``: plain ``-t set`` sets one key over and over, the server reusing
    that value's memory (the figure redis-benchmark prints by default). ``get_gbps``: GET of
    that one existing key. The keys are flushed after each run."""
    best = {"put_gbps": 0.0, "put_one_key_gbps": 0.0, "get_gbps": 0.0}
    requests = max(16, min(2000, (2 << 30) // size))
    runs = ((["-t", "set", "-r", str(requests * 1000)], {"SET": "put_gbps"}),
            (["-t", "set,get"], {"SET": "put_one_key_gbps", "GET": "get_gbps"}))
    for count in clients:
        for arguments, fields in runs:
            rates = redis_benchmark(port, size, requests, count, *arguments)
            bare.flushall()
            for op, field in fields.items():
                best[field] = max(best[field], rates[op])
    return best


def redis_benchmark_set(port: int, size: int, clients: int, count: int) -> float:
    """GB/s of ``count`` redis-benchmark SETs under new keys (``-r``) from ``clients`` clients."""
    return redis_benchmark(port, size, count, clients, "-t", "set", "-r", str(count * 1000))["SET"]


def redis_put_rounds(store: Connector, bare: RespSocket, port: int, data: bytes, parallel: int,
                     rounds: int) -> dict[str, float]:
    """Median GB/s of ``put`` (one value after another) and ``put_many`` against redis-benchmark's
    SET of new keys from 1 and from ``parallel`` clients, the four run round-robin with the
    server flushed before each round: each meets the server in the same state (how fast a
    server takes new values depends on what its allocator holds)."""
    size, count = len(data), max(4, min(64, (64 << 20) // len(data)))
    serial = iter(range(1 << 30))

    def fresh() -> list[str]:
        return [f"bench/rounds-{next(serial)}" for _ in range(count)]

    def timed(move: Callable[[list[str]], object]) -> float:
        keys = fresh()
        start = time.perf_counter()
        move(keys)
        return gbps(count * size, time.perf_counter() - start)

    runs: dict[str, Callable[[], float]] = {
        "put_gbps": lambda: timed(lambda keys: [store.put(key, data, mode="create") for key in keys]),
        "ceiling_put_gbps": lambda: redis_benchmark_set(port, size, 1, count),
        "put_many_gbps": lambda: timed(lambda keys: store.put_many(dict.fromkeys(keys, data), mode="create")),
        "ceiling_put_many_gbps": lambda: redis_benchmark_set(port, size, parallel, count),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_number in range(rounds + 1):  # the first round warms up
        for name, run in runs.items():
            bare.flushall()
            rate = run()
            if round_number:
                samples[name].append(rate)
    bare.flushall()
    return {"values": count, **{name: statistics.median(values) for name, values in samples.items()}}


def measure_redis(row: dict, uri: str, data: bytes, repeat: int, rounds: int, parallel: int) -> dict:
    """A Redis/Valkey row's figures: gets against bare RESP sockets (interleaved), puts against
    redis-benchmark runs round-robin with the connector (:func:`redis_put_rounds`); ``row``
    gets the bare sockets' put figures and redis-benchmark's own, run apart, for reference."""
    port = int(uri.rsplit(":", 1)[1].split("/")[0])
    clients = [RespSocket(port) for _ in range(parallel)]
    try:
        figures = measure(data, repeat, f"{uri}?parallel={parallel}", clients[0].set, clients[0].get_into,
                          resp_lanes(clients))
        with open_connector(f"{uri}?parallel={parallel}") as store:
            puts = redis_put_rounds(store, clients[0], port, data, parallel, rounds)
        row["redis_benchmark"] = redis_benchmark_ceiling(port, len(data), [1, parallel], clients[0])
    finally:
        for client in clients:
            client.close()
    row["bare_socket_put_gbps"] = {"one": figures["ceiling"]["put_gbps"],
                                   "lanes": figures.get("batch", {}).get("ceiling_put_gbps")}
    figures["connector"]["put_gbps"] = puts["put_gbps"]
    figures["ceiling"]["put_gbps"] = puts["ceiling_put_gbps"]
    if "batch" in figures:
        figures["batch"].update(put_gbps=puts["put_many_gbps"], ceiling_put_gbps=puts["ceiling_put_many_gbps"],
                                put_values=puts["values"])
    row["ceiling_what"] = (
        f"put: redis-benchmark SET of new keys from 1 client (put_many: {parallel} clients), run round-robin "
        "with the connector, the server flushed before each run; get: a bare RESP socket's GET into the "
        f"buffer, interleaved (get_many: {parallel} such sockets at once)")
    return figures


def s3_bare_ops(port: int) -> tuple[Callable, Callable]:
    """The bare obstore client: one put (it chooses multipart itself), one get."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(servers.S3_BUCKET, endpoint=f"http://127.0.0.1:{port}", region="us-east-1",
                    access_key_id=servers.S3_ACCESS_KEY, secret_access_key=servers.S3_SECRET_KEY,
                    client_options={"allow_http": True})

    def get(key: str, buffer: memoryview) -> None:
        buffer[:] = memoryview(obstore.get(store, f"bare/{key}").bytes())

    return (lambda key, data: obstore.put(store, f"bare/{key}", data)), get


def boto3_figures(port: int, data: bytes, repeat: int) -> dict[str, float]:
    """boto3 put_object and an 8-way ranged get, for choosing the S3 client."""
    client = servers.s3_client(port)
    bucket, key, size = servers.S3_BUCKET, "bench/boto3", len(data)
    step = max(1 << 20, -(-size // 8))
    buffer = bytearray(size)

    def ranged_get() -> None:
        def fetch(start: int) -> None:
            end = min(start + step, size) - 1
            body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")["Body"].read()
            buffer[start:start + len(body)] = body

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fetch, range(0, size, step)))

    seconds = interleaved({"put": lambda: client.put_object(Bucket=bucket, Key=key, Body=data)}, repeat)
    seconds.update(interleaved({"get": ranged_get}, repeat))
    return {"put_gbps": gbps(size, seconds["put"]), "get_gbps": gbps(size, seconds["get"])}


def memory_ops() -> tuple[Callable, Callable]:
    """put: copy into new memory (as a store must); get: copy into the buffer."""
    kept: dict[str, bytes] = {}

    def put(key: str, data: bytes) -> None:
        kept[key] = bytes(memoryview(data))

    def get(key: str, buffer: memoryview) -> None:
        buffer[:] = kept[key]

    return put, get


def print_row(row: dict) -> None:
    """One backend and size: connector / ceiling for put and get, then its batch figures."""
    c, k, r = row["connector"], row["ceiling"], row["ratio"]
    bare = row.get("bare_clients")
    print(f"{row['backend']:8} {row['size'] >> 20:>4} MiB  put {c['put_gbps']:6.2f} GB/s / {k['put_gbps']:6.2f} = "
          f"{r['put_gbps']:5.2f}   get {c['get_gbps']:6.2f} GB/s / {k['get_gbps']:6.2f} = {r['get_gbps']:5.2f}"
          + (f"   [obstore put {bare['obstore']['put_gbps']:.2f} get {bare['obstore']['get_gbps']:.2f};"
             f" boto3 put {bare['boto3']['put_gbps']:.2f} get {bare['boto3']['get_gbps']:.2f}]" if bare else "")
          , flush=True)
    if "batch" in row:
        b, br = row["batch"], row["batch_ratio"]
        lanes = (f"   (its ceilings: put {b['ceiling_put_gbps']:.2f}, get {b['ceiling_get_gbps']:.2f})"
                 if "ceiling_put_gbps" in b else "")
        print(f"{'':8} {'':>4}      batches: put_many of {b.get('put_values', BATCH)} {b['put_gbps']:6.2f} GB/s = "
              f"{br['put_gbps']:5.2f}   get_many of {BATCH} {b['get_gbps']:6.2f} GB/s = {br['get_gbps']:5.2f}{lanes}",
              flush=True)
    if "redis_benchmark" in row:
        rb = row["redis_benchmark"]
        bare = row["bare_socket_put_gbps"]
        print(f"{'':8} {'':>4}      for reference: a bare RESP socket's SET {bare['one']:.2f}"
              + (f" ({bare['lanes']:.2f} on several at once)" if bare["lanes"] else "")
              + f"; redis-benchmark run apart: SET of new keys {rb['put_gbps']:.2f}, of one key "
              f"{rb['put_one_key_gbps']:.2f}, GET {rb['get_gbps']:.2f} GB/s", flush=True)


def main() -> int:
    stop_servers_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1MiB,64MiB")
    parser.add_argument("--only", default="file,juicefs,redis,valkey,s3,mem")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    backends = args.only.split(",")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    state = Path(tempfile.mkdtemp(prefix="kvswap-bench-"))
    needed = tuple(n for n in ("redis", "valkey", "s3", "juicefs") if n in backends)
    env = servers.up(state / "servers", needed)
    rows = []
    try:
        for size in sizes:
            data = os.urandom(size)
            repeat = args.repeat if size >= 16 << 20 else args.repeat * 10
            for backend in backends:
                row: dict = {"backend": backend, "size": size}
                parallel = 4
                if backend in ("file", "juicefs"):
                    root = state / "file" if backend == "file" else Path(env["KVSWAP_TEST_JUICEFS_DIR"])
                    (root / "plain").mkdir(parents=True, exist_ok=True)
                    figures = measure(data, repeat, f"file://{root}/kvswap", *plain_file_ops(root / "plain"))
                    row["ceiling_what"] = "plain fresh file write+fsync / readinto"
                elif backend in ("redis", "valkey"):
                    figures = measure_redis(row, env[f"KVSWAP_TEST_{backend.upper()}_URI"], data, repeat,
                                            args.repeat, parallel)
                elif backend == "s3":
                    port = int(env["KVSWAP_TEST_S3_ENDPOINT"].rsplit(":", 1)[1])
                    figures = measure(data, repeat, env["KVSWAP_TEST_S3_URI"], *s3_bare_ops(port))
                    bare = {"obstore": figures["ceiling"], "boto3": boto3_figures(port, data, repeat)}
                    row["bare_clients"] = bare
                    figures["ceiling"] = {f: max(bare["obstore"][f], bare["boto3"][f])
                                          for f in ("put_gbps", "get_gbps")}
                    row["ceiling_what"] = "bare obstore put/get or boto3 put_object/8-way ranged get, the better"
                elif backend == "mem":
                    figures = measure(data, repeat, "mem://", *memory_ops())
                    row["ceiling_what"] = "copy into new memory (put) / into a buffer (get)"
                else:
                    raise SystemExit(f"unknown backend {backend}")
                row["connector"], row["ceiling"] = figures["connector"], figures["ceiling"]
                row["ratio"] = {f: row["connector"][f] / row["ceiling"][f] for f in ("put_gbps", "get_gbps")}
                if "batch" in figures:
                    batch = row["batch"] = figures["batch"]
                    row["batch_ratio"] = {f: batch[f] / batch.get(f"ceiling_{f}", row["ceiling"][f])
                                          for f in ("put_gbps", "get_gbps")}
                rows.append(row)
                print_row(row)
    finally:
        servers.down(state / "servers")
        shutil.rmtree(state, ignore_errors=True)
    write_record(args.out, "connectors", {"benchmark": "connectors", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
