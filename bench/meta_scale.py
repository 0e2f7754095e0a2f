"""Meta stores as they grow: the time of each operation at 10k, 100k and 1M sessions, and gc.

    python bench/meta_scale.py [--only postgresql,etcd,valkey-cluster] [--sizes 10000,100000,1000000]
                               [--threads 8] [--ops 1000] [--expired 100000]

Starts its own servers on loopback (kvswap.testing.servers: PostgreSQL, a three-member etcd,
a three-primary Valkey cluster). For each backend, sessions are created through the store's
own API (``--threads`` at a time) until each size is reached; at each size, one thread times
``--ops`` of each operation and the median is kept:

* **get**: a random existing session;
* **append**: a compare-and-swap append to one of 100 sessions;
* **page**: ``list_sessions(limit=1000)`` from a random position (the admin listing);
* **entries**: the entries of a random session (each holds one).

Then gc: ``--expired`` sessions are created with a short ttl, and the time to find and
delete all of them (``expired(1000)``, then ``delete`` on ``--gc-threads`` threads, in a
loop, as the session store's gc does) is measured, for at most ``--gc-seconds``; once per
thread count given. The growth ratios (the time per operation at the largest size over the
smallest) say whether a backend's cost grows with its size. JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.meta import EntrySpec, MetaStore, open_meta_store
from kvswap.meta.rules import encode_cursor
from kvswap.testing import servers

SERVERS = {"postgresql": "postgres", "etcd": "etcd-cluster", "valkey-cluster": "valkey-cluster"}


def _uri(kind: str, env: dict[str, str], unique: str) -> str:
    if kind == "postgresql":
        return f"{env['KVSWAP_TEST_POSTGRES_URI']}?table_prefix={unique}_&pool_size=16"
    if kind == "etcd":
        base, _, query = env["KVSWAP_TEST_ETCD_CLUSTER_URI"].partition("?")
        return f"{base.rsplit('/', 1)[0]}/{unique}?{query}&timeout=30"
    return f"{env['KVSWAP_TEST_VALKEY_CLUSTER_URI']}&prefix={unique}:&timeout=30"


def _spec(offset: int) -> EntrySpec:
    return EntrySpec(offset, 16, "file:///bench", f"k{offset}", 1 << 20, "xxh3_128:00", "00")


def _sid(index: int) -> str:
    return f"s{index:07d}"


def _fill(meta: MetaStore, start: int, stop: int, threads: int) -> float:
    """Create sessions ``start..stop-1``, each with one entry; returns seconds."""
    def one(index: int) -> None:
        session = meta.create(_sid(index), "fp")
        meta.append(session.id, session.version, _spec(0))

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(start, stop), chunksize=256))
    return time.perf_counter() - began


def _median_ms(fn: Callable[[], object], ops: int) -> float:
    samples = []
    for _ in range(ops):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e3


def _measure(meta: MetaStore, size: int, ops: int, hot: list[str]) -> dict[str, float]:
    rng = random.Random(size)
    versions = {sid: meta.get(sid).version for sid in hot}

    def append() -> None:
        sid = rng.choice(hot)
        session, _ = meta.append(sid, versions[sid], _spec(meta.get(sid).total_tokens))
        versions[sid] = session.version

    page_ops = max(ops // 10, 20)
    return {
        "get_ms": _median_ms(lambda: meta.get(_sid(rng.randrange(size))), ops),
        "append_ms": _median_ms(append, ops),  # includes the get that learns the offset
        "page_1000_ms": _median_ms(lambda: meta.list_sessions(
            limit=1000, cursor=encode_cursor(_sid(rng.randrange(max(size - 1000, 1))))), page_ops),
        "entries_ms": _median_ms(lambda: meta.entries(_sid(rng.randrange(size))), ops),
    }


def _gc(meta: MetaStore, count: int, threads: int, limit_s: float, deleters: int) -> dict[str, float]:
    prefix = f"x{deleters}-"

    def one(index: int) -> None:
        meta.create(f"{prefix}{index:07d}", "fp", ttl=0.5)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count), chunksize=256))
    created = time.perf_counter() - began
    time.sleep(1.0)
    began, deleted = time.perf_counter(), 0
    with ThreadPoolExecutor(deleters) as pool:
        while time.perf_counter() - began < limit_s:  # a backend that scans every session may not finish
            due = meta.expired(limit=1000)
            if not due:
                break
            deleted += len(list(pool.map(lambda session: meta.delete(session.id), due)))
    seconds = time.perf_counter() - began
    return {"expired": count, "deleted": deleted, "deleters": deleters, "create_s": created, "gc_s": seconds,
            "gc_per_s": deleted / seconds if seconds else 0.0}


def main() -> int:
    stop_servers_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="postgresql,etcd,valkey-cluster")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--expired", type=int, default=100_000)
    parser.add_argument("--cap", default="", help="largest size per backend, like etcd=100000 (fills are slow)")
    parser.add_argument("--gc-seconds", type=float, default=300.0, help="stop gc after this long (reported)")
    parser.add_argument("--gc-threads", default="8", help="deleting threads, one gc per count: like 1,8 "
                        "(the session store deletes io_threads, 8, at a time)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    kinds = args.only.split(",")
    sizes = sorted(map(int, args.sizes.split(",")))
    state = Path(tempfile.mkdtemp(prefix="kvswap-bench-meta-scale-"))
    state.chmod(0o755)
    rows: dict[str, dict] = {}
    try:
        env = servers.up(state, tuple(SERVERS[k] for k in kinds))
        for kind in kinds:
            unique = f"ms{uuid.uuid4().hex[:8]}"
            meta = open_meta_store(_uri(kind, env, unique))
            hot = [f"hot{i:03d}" for i in range(100)]
            for sid in hot:
                meta.create(sid, "fp")
            rows[kind] = {"sizes": {}}
            have = 0
            caps = dict(item.split("=") for item in args.cap.split(",") if item)
            for size in [s for s in sizes if s <= int(caps.get(kind, sizes[-1]))]:
                fill_s = _fill(meta, have, size, args.threads)
                rate = (size - have) / fill_s
                have = size
                row = rows[kind]["sizes"][size] = {"fill_per_s": rate, **_measure(meta, size, args.ops, hot)}
                print(f"{kind:15s} {size:>9,} sessions: filled at {rate:7.0f}/s; get {row['get_ms']:.2f} ms, "
                      f"append {row['append_ms']:.2f} ms, page of 1000 {row['page_1000_ms']:.1f} ms, "
                      f"entries {row['entries_ms']:.2f} ms", flush=True)
            first, last = rows[kind]["sizes"][sizes[0]], rows[kind]["sizes"][have]
            rows[kind]["growth"] = {name: last[name] / first[name] for name in first if name.endswith("_ms")}
            print(f"{kind:15s} {have:,} / {sizes[0]:,}: " + ", ".join(
                f"{name[:-3]} {ratio:.2f}x" for name, ratio in rows[kind]["growth"].items()), flush=True)
            for deleters in map(int, args.gc_threads.split(",") if args.expired else []):
                rows[kind][f"gc_{deleters}"] = gc = _gc(meta, args.expired, args.threads, args.gc_seconds, deleters)
                print(f"{kind:15s} gc of {gc['deleted']:,} of {gc['expired']:,} expired sessions among {have:,}, "
                      f"{deleters} deleting: {gc['gc_s']:.1f} s ({gc['gc_per_s']:.0f}/s)", flush=True)
            meta.close()
    finally:
        servers.down(state)
        shutil.rmtree(state, ignore_errors=True)
    write_record(args.out, "meta-scale", {"sizes": sizes, "threads": args.threads, "ops": args.ops, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
