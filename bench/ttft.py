"""Time to first token of a follow-up turn: history swapped in from each tier vs recomputed.

    python bench/ttft.py [--model llama-8b] [--device cuda] [--histories 4096,16384,32768]
                         [--follow 128] [--tiers host,file]

For each history length a session's history (random token ids) is prefilled once, swapped
out to a tier, and then a follow-up turn of ``--follow`` new tokens is timed from the
request to its first token (swap-in, verification and the prefill of the new tokens
included). The baseline, timed in the same run, is the same request on an empty session:
the whole history plus the follow-up recomputed. The model is a Llama with random weights
(bf16 on GPU); only its shapes matter for time. ``hbm-dma`` (GPU only) is the HBM hit with an
unrelated pinned host->device copy of the history's bytes running beside it on another
stream: what any swap-in that overlaps the turn costs the engine on this host, whoever
copies. For the file tier the page cache is dropped before the read when the machine
allows it (reported); ``file-warm`` reads what was just written, from the page cache.

Prints TTFTs and recompute/tier speedups; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.engine import Engine, build_model
from kvswap.session_cache import PagedKVPool, SessionCache, StackSettings


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def spread(samples: list[float]) -> float:
    return max(samples) - min(samples)


def h2d_bandwidth(nbytes: int, device: torch.device) -> float | None:
    """Bytes/s of one pinned host->device copy of ``nbytes`` (median of 3), None on a CPU."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    samples = []
    for _ in range(4):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    del host, target
    return nbytes / statistics.median(samples[1:])


class BesideCopy:
    """A pinned host->device copy of ``nbytes`` on a side stream, started on demand and left
    running: the DMA traffic of a swap-in, with nothing of kvswap's in it."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device)

    def start(self) -> None:
        torch.cuda.synchronize()
        with torch.cuda.stream(self.stream):
            self.target.copy_(self.host, non_blocking=True)


def time_tier(engine: Engine, cache: SessionCache, tier: str, history: list[int], request: list[int], repeat: int,
              beside: BesideCopy | None) -> tuple[list[float], list[list[int]], bool | None]:
    """``repeat`` follow-ups of ``request`` with ``history`` prefilled and then put where ``tier``
    says (each must reuse the whole history; "recompute": nothing prefilled, nothing reused):
    their TTFTs, their tokens, and whether the page cache was dropped (None: not a file tier)."""
    times: list[float] = []
    answers: list[list[int]] = []
    cold = None
    for i in range(repeat):
        session = f"{tier}-{len(history)}-{i}"
        if tier != "recompute":
            engine.generate(session, history, 1)  # prefill the history (untimed)
        if tier == "hbm-dma" and beside is not None:
            beside.start()
        elif tier not in ("hbm", "hbm-dma", "recompute"):
            cache.swap_out(session, to_store=tier != "host")
        if tier == "file":
            cold = drop_page_cache()
        elif tier == "file-warm":
            cold = False
        got = engine.generate(session, request, 1)
        assert got.cached == (0 if tier == "recompute" else len(history)), (tier, got.cached)
        times.append(got.ttft)
        answers.append(got.tokens)
        cache.drop(session)
    return times, answers, cold


def report(row: dict, tier: str, times: list[float], same: bool, cold: bool | None, h2d: float | None) -> None:
    """Put ``tier``'s median TTFT, spread and speedups into ``row`` (over the HBM hit and the hit
    beside a copy when those were timed first) and print them."""
    ttft = statistics.median(times)
    row[tier] = {"ttft_s": ttft, "spread_s": spread(times), "speedup": row["recompute_ttft_s"] / ttft,
                 "same_first_token": same}
    over = ""
    if tier != "hbm" and "hbm" in row:
        extra = ttft - row["hbm"]["ttft_s"]
        row[tier]["over_hit_s"] = extra
        over = f"  +{extra * 1e3:6.1f} ms over a hit"
        if h2d:
            row[tier]["over_hit_per_copy"] = extra / (row["kv_bytes"] / h2d)
            over += f" ({row[tier]['over_hit_per_copy']:.2f}x the copy at H2D speed)"
        if tier != "hbm-dma" and "hbm-dma" in row:
            row[tier]["over_hit_beside_copy_s"] = ttft - row["hbm-dma"]["ttft_s"]
            over += f", {row[tier]['over_hit_beside_copy_s'] * 1e3:+.1f} over a hit beside a copy"
    if cold is not None:
        row[tier]["page_cache_dropped"] = cold
    note = "" if cold is None else " (page cache dropped)" if cold else " (page cache warm)"
    print(f"  {tier:<9} TTFT {ttft * 1e3:7.1f} ms (spread {spread(times) * 1e3:.1f})  speedup "
          f"{row[tier]['speedup']:5.1f}x{over}{note}  same first token as recompute: {same}")


def profile_turn(engine: Engine, cache: SessionCache, tier: str, session: str, history: list[int],
                 request: list[int]) -> None:
    """One follow-up from ``tier`` (host or file-warm) under torch.profiler: where its time goes, by op and by
    kvswap's own steps (wrapped in record_function ranges here, not in the library)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def ranged(obj: object, name: str) -> None:
        method = getattr(obj, name)

        def wrapper(*a: object, **k: object) -> object:
            with record_function(f"kvswap.{type(obj).__name__}.{name}"):
                return method(*a, **k)
        setattr(obj, name, wrapper)

    engine.generate(session, history, 1)
    cache.swap_out(session, to_store=tier != "host")
    steps = ((cache, "open"), (cache, "_sync_local"), (cache, "_bring_back"), (cache, "_allocate"),
             (cache.mover, "scatter"), (cache.mover, "synchronize"), (cache.store, "plan"),
             (cache.store, "_read_entry"), (cache, "_finish"), (engine, "_forward"), (engine, "_decode"))
    for obj, name in steps:
        ranged(obj, name)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        with profile(activities=activities) as prof:
            got = engine.generate(session, request, 1)
    finally:
        for obj, name in steps:
            delattr(obj, name)
    cache.drop(session)
    print(f"  profile of one {tier} follow-up (TTFT {got.ttft * 1e3:.1f} ms under the profiler):")
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50)
    print("\n".join("    " + line for line in table.splitlines()))
    if torch.cuda.is_available():
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50)
        print("\n".join("    " + line for line in table.splitlines()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--histories", default="4096,16384,32768")
    parser.add_argument("--follow", type=int, default=128)
    parser.add_argument("--tiers", default="hbm,hbm-dma,host,file,file-warm",
                        help="hbm (history still resident: the floor), hbm-dma (the same beside an unrelated copy of "
                             "the history's bytes to the GPU; GPU only), host, file (page cache dropped first), "
                             "file-warm (just written, cached)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one host and one file-warm follow-up per history (torch.profiler, top ops)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the file tier writes (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    stop_servers_on_sigterm()
    args = parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    histories = [int(h) for h in args.histories.split(",")]
    tiers = [t for t in args.tiers.split(",") if t != "hbm-dma" or device.type == "cuda"]
    model, layout = build_model(args.model, dtype=dtype, device=device)
    longest = max(histories) + args.follow + 16
    pool = PagedKVPool(layout, num_blocks=2 * (-(-longest // 16)) + 8, block_size=16, device=device)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="kvswap-ttft-"))
    stores = (f"file://{workdir}/kv",) if {"file", "file-warm"} & set(tiers) else ()
    cache = SessionCache(pool, store=StackSettings("memkv://", stores).open(layout, minimum_entry_tokens=16),
                         host_bytes=longest * layout.token_bytes + 1, lease_ttl=None, recompute_when_faster=False)
    engine = Engine(model, cache)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"bench/ttft.py on {device_name}: {args.model} ({dtype}), KV {layout.token_bytes / 1024:.0f} KiB/token, "
          f"follow-up {args.follow} tokens, pool {pool.nbytes / 2**30:.1f} GiB")
    engine.generate("warm-up", [rng.randrange(vocab) for _ in range(512)], 2)
    cache.drop("warm-up")
    h2d = h2d_bandwidth(longest * layout.token_bytes, device)
    if h2d:
        print(f"pinned host->device copy of {longest * layout.token_bytes / 2**30:.2f} GiB: {h2d / 1e9:.1f} GB/s")
    rows = []
    try:
        for history_len in histories:
            history = [rng.randrange(vocab) for _ in range(history_len)]
            follow = [rng.randrange(vocab) for _ in range(args.follow)]
            request = history + follow
            recompute, answers, _ = time_tier(engine, cache, "recompute", history, request, args.repeat, None)
            baseline_tokens = answers[-1]
            kv_bytes = history_len * layout.token_bytes
            row = {"history": history_len, "follow": args.follow, "kv_bytes": kv_bytes,
                   "recompute_ttft_s": statistics.median(recompute), "recompute_spread_s": spread(recompute),
                   "h2d_gbps": h2d / 1e9 if h2d else None}
            print(f"\nhistory {history_len} tokens ({history_len * layout.token_bytes / 2**30:.2f} GiB of KV): "
                  f"recompute TTFT {row['recompute_ttft_s'] * 1e3:.1f} ms")
            beside = BesideCopy(kv_bytes, device) if "hbm-dma" in tiers else None
            for tier in tiers:
                times, answers, cold = time_tier(engine, cache, tier, history, request, args.repeat, beside)
                report(row, tier, times, all(tokens == baseline_tokens for tokens in answers), cold, h2d)
            for tier in [t for t in ("host", "file-warm") if args.profile and t in tiers]:
                profile_turn(engine, cache, tier, f"profiled-{tier}-{history_len}", history, request)
            rows.append(row)
    finally:
        cache.close()
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_record(args.out, f"ttft-{args.model}-{device.type}", {"device": device_name, "model": args.model,
                                                                 "dtype": dtype, "torch": torch.__version__,
                                                                 "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
