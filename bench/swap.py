"""Swap-out / swap-in bandwidth of one session per tier, against the limits measured in the same run.

    python bench/swap.py [--sizes 1GiB,4GiB] [--tiers host,file,valkey] [--device cuda]

A session of each size (Llama-3-8B KV shapes, bf16: 128 KiB per token) sits in a paged pool
whose free list was shuffled, so its blocks are scattered as in a busy engine. Measured:

* limits: pinned host->device and device->host copies of the same byte count (one
  contiguous tensor); on CPU, a memory copy;
* host tier: gather into pinned host memory (swap-out) and scatter back (swap-in), through
  the session cache's mover, against those copy limits;
* file / valkey tiers: ``SessionCache.swap_out(to_store=True)`` (gather, checksum, put,
  meta append) and ``prefetch`` (get, verify, scatter), against the connector's own
  put / get_into of the same bytes from pinned memory (its ceiling), measured in the same
  run; and the prefetch again with each entry hashed after its read rather than chunk by
  chunk during it (the gain of streamed verification). Also the xxh3 checksum rate, which
  both directions pay.

Prints the figures and ratios; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash
from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap import blob
from kvswap.connectors import open_connector
from kvswap.session_cache import KVLayout, KVMover, PagedKVPool, SessionCache, StackSettings
from kvswap.testing import servers
from kvswap.uri import parse_size

LAYOUT_8B = dict(model="bench-8b-shapes", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def timed(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``fn`` after one warm-up."""
    fn()
    sync()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_limits(nbytes: int, device: torch.device, repeat: int, sync: Callable[[], None]) -> dict[str, float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    other = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = timed(lambda: other.copy_(host, non_blocking=True), repeat, sync)
    d2h = timed(lambda: host.copy_(other, non_blocking=True), repeat, sync)
    digest = timed(lambda: xxhash.xxh3_128_hexdigest(memoryview(host.numpy())), repeat, sync)
    return {"h2d_gbps": nbytes / h2d / 1e9, "d2h_gbps": nbytes / d2h / 1e9, "xxh3_gbps": nbytes / digest / 1e9}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1GiB,4GiB")
    parser.add_argument("--tiers", default="host,file,valkey")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--entry-bytes", default="256MiB", help="the session cache's entry size (default 256MiB)")
    parser.add_argument("--dir", default=None, help="where the file tier writes (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    stop_servers_on_sigterm()
    args = parse_args()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    tiers = args.tiers.split(",")
    layout = KVLayout(**LAYOUT_8B)
    block = 16
    max_tokens = max(sizes) // layout.token_bytes
    pool = PagedKVPool(layout, num_blocks=2 * max_tokens // block + 16, block_size=block, device=device)
    random.Random(0).shuffle(pool._free)  # scattered blocks, as in a busy engine
    for layer in range(layout.num_layers):
        pool.kv[layer].normal_()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="kvswap-bench-"))
    state = Path(tempfile.mkdtemp(prefix="kvswap-bench-servers-"))
    stores: dict[str, str] = {}
    if "file" in tiers:
        stores["file"] = f"file://{workdir}/kv"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"bench/swap.py on {device_name}; KV {layout.token_bytes // 1024} KiB/token; pool "
          f"{pool.nbytes / 2**30:.1f} GiB in {pool.num_blocks} scattered blocks of {block}")
    rows = []
    try:
        if "valkey" in tiers:
            stores["valkey"] = f"{servers.up(state, ('valkey',))['KVSWAP_TEST_VALKEY_URI']}?timeout=60"
        for size in sizes:
            rows.append(one_size(args, size, pool, "host" in tiers, stores, sync))
    finally:
        servers.down(state)
        shutil.rmtree(state, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_record(args.out, "swap", {"device": device_name, "entry_bytes": parse_size(args.entry_bytes),
                                    "torch": torch.__version__, "layout": LAYOUT_8B, "rows": rows})
    return 0


def one_size(args: argparse.Namespace, size: int, pool: PagedKVPool, host: bool, stores: dict[str, str],
             sync: Callable[[], None]) -> dict[str, Any]:
    """A session of ``size`` bytes: the copy limits, then each tier out and in against them."""
    layout = pool.layout
    tokens = size // layout.token_bytes
    nbytes = tokens * layout.token_bytes
    limits = copy_limits(nbytes, pool.device, args.repeat, sync)
    print(f"\n{nbytes / 2**30:.2f} GiB ({tokens} tokens): limits H2D {limits['h2d_gbps']:.1f} GB/s, "
          f"D2H {limits['d2h_gbps']:.1f} GB/s, xxh3 {limits['xxh3_gbps']:.1f} GB/s")
    row: dict[str, Any] = {"bytes": nbytes, "tokens": tokens, "limits": limits}
    if host:
        mover = KVMover(pool)
        blocks = pool.allocate(pool.blocks_for(tokens))
        out = mover.host_tensor(tokens)
        t_out = timed(functools.partial(mover.gather, blocks, 0, tokens, out), args.repeat, sync)
        t_in = timed(functools.partial(mover.scatter, out, blocks, 0), args.repeat, sync)
        check = mover.host_tensor(tokens)
        mover.gather(blocks, 0, tokens, check)
        assert torch.equal(check, out), "host round trip changed the KV"
        pool.free(blocks)
        del out, check
        row["host"] = {"out_gbps": nbytes / t_out / 1e9, "in_gbps": nbytes / t_in / 1e9,
                       "out_ratio": nbytes / t_out / 1e9 / limits["d2h_gbps"],
                       "in_ratio": nbytes / t_in / 1e9 / limits["h2d_gbps"]}
        print(f"  host    out {row['host']['out_gbps']:6.1f} GB/s ({row['host']['out_ratio']:.2f} of D2H)"
              f"   in {row['host']['in_gbps']:6.1f} GB/s ({row['host']['in_ratio']:.2f} of H2D)")
    for name, uri in stores.items():
        row[name] = r = bench_store(name, uri, pool, tokens, nbytes, args.repeat, sync, parse_size(args.entry_bytes))
        print(f"  {name:<7} out {r['out_gbps']:6.2f} GB/s ({r['out_ratio']:.2f} of put {r['put_gbps']:.2f})"
              f"   in {r['in_gbps']:6.2f} GB/s ({r['in_ratio']:.2f} of get {r['get_gbps']:.2f}; "
              f"{r['streamed_hash_gain']:.2f}x of hashing after each read, {r['in_hash_after_read_gbps']:.2f})")
    return row


def bench_store(name: str, uri: str, pool: PagedKVPool, tokens: int, nbytes: int, repeat: int,
                sync: Callable[[], None], entry_bytes: int) -> dict[str, float]:
    """Session-cache swap-out / prefetch through ``uri`` vs the connector's raw put / get_into."""
    connector = open_connector(uri)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pool.device.type == "cuda")
    raw = memoryview(pinned.numpy())
    put = timed(lambda: connector.put("bench/raw", raw), repeat, sync)
    get = timed(lambda: connector.get_into("bench/raw", raw), repeat, sync)
    connector.delete("bench/raw")
    store = StackSettings("memkv://", (uri,), entry_bytes=entry_bytes).open(pool.layout,
                                                                            minimum_entry_tokens=pool.block_size)
    cache = SessionCache(pool, store=store, lease_ttl=None, recompute_when_faster=False)
    ids = list(range(tokens))
    t_out, t_in = swap_rounds(name, cache, tokens, ids, repeat, sync)
    blob.PARALLEL_CHUNKS = False  # the baseline: each entry read whole, then hashed
    try:
        _, t_in_whole = swap_rounds(name, cache, tokens, ids, repeat, sync)
    finally:
        blob.PARALLEL_CHUNKS = True
    cache.close()
    connector.close()
    result = {"put_gbps": nbytes / put / 1e9, "get_gbps": nbytes / get / 1e9,
              "out_gbps": nbytes / t_out / 1e9, "in_gbps": nbytes / t_in / 1e9,
              "in_hash_after_read_gbps": nbytes / t_in_whole / 1e9}
    result["out_ratio"] = result["out_gbps"] / result["put_gbps"]
    result["in_ratio"] = result["in_gbps"] / result["get_gbps"]
    result["streamed_hash_gain"] = t_in_whole / t_in
    return result


def swap_rounds(name: str, cache: SessionCache, tokens: int, ids: list[int], repeat: int,
                sync: Callable[[], None]) -> tuple[float, float]:
    """Median seconds of a swap-out to the store and of a prefetch back, over ``repeat`` rounds after one."""
    outs, ins = [], []
    for round_ in range(repeat + 1):
        session = f"bench-{name}-{round_}"
        with cache.open(session, ids) as handle:  # a resident session whose blocks hold random KV
            handle.reserve(tokens)
            handle.commit(ids)
        start = time.perf_counter()
        cache.swap_out(session, to_store=True)
        sync()
        outs.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert cache.prefetch(session) == tokens
        sync()
        ins.append(time.perf_counter() - start)
        cache.drop(session)
    return statistics.median(outs[1:]), statistics.median(ins[1:])


if __name__ == "__main__":
    sys.exit(main())
