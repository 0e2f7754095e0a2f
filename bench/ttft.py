"""Time to first token of a follow-up turn: history swapped in from each tier vs recomputed.

    python bench/ttft.py [--model llama-8b] [--device cuda] [--histories 4096,16384,32768]
                         [--follow 128] [--tiers host,file]

For each history length a session's history (random token ids) is prefilled once, swapped
out to a tier, and then a follow-up turn of ``--follow`` new tokens is timed from the
request to its first token (swap-in, verification and the prefill of the new tokens
included). The baseline, timed in the same run, is the same request on an empty session:
the whole history plus the follow-up recomputed. The model is a Llama with random weights
(bf16 on GPU); only its shapes matter for time. For the file tier the page cache is
dropped before the read when the machine allows it (reported); ``file-warm`` reads what
was just written, from the page cache.

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
from pathlib import Path

import torch
from _record import RESULTS, write_record

from kvswap.connectors import open_connector
from kvswap.engine import Engine, build_model
from kvswap.meta import open_meta_store
from kvswap.session_cache import PagedKVPool, SessionCache


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--histories", default="4096,16384,32768")
    parser.add_argument("--follow", type=int, default=128)
    parser.add_argument("--tiers", default="host,file,file-warm",
                        help="host, file (page cache dropped first), file-warm (just written, cached)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the file tier writes (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    histories = [int(h) for h in args.histories.split(",")]
    tiers = args.tiers.split(",")
    model, layout = build_model(args.model, dtype=dtype, device=device)
    longest = max(histories) + args.follow + 16
    pool = PagedKVPool(layout, num_blocks=2 * (-(-longest // 16)) + 8, block_size=16, device=device)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="kvswap-ttft-"))
    stores = [open_connector(f"file://{workdir}/kv")] if {"file", "file-warm"} & set(tiers) else []
    cache = SessionCache(pool, open_meta_store("memkv://"), stores, host_bytes=longest * layout.token_bytes + 1,
                         lease_ttl=None, recompute_when_faster=False)
    engine = Engine(model, cache)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"bench/ttft.py on {device_name}: {args.model} ({dtype}), KV {layout.token_bytes / 1024:.0f} KiB/token, "
          f"follow-up {args.follow} tokens, pool {pool.nbytes / 2**30:.1f} GiB")
    engine.generate("warm-up", [rng.randrange(vocab) for _ in range(512)], 2)
    cache.drop("warm-up")
    rows = []
    try:
        for history_len in histories:
            history = [rng.randrange(vocab) for _ in range(history_len)]
            follow = [rng.randrange(vocab) for _ in range(args.follow)]
            request = history + follow
            recompute, baseline_tokens = [], None
            for i in range(args.repeat):
                got = engine.generate(f"recompute-{history_len}-{i}", request, 1)
                assert got.cached == 0
                recompute.append(got.ttft)
                baseline_tokens = got.tokens
                cache.drop(f"recompute-{history_len}-{i}")
            row = {"history": history_len, "follow": args.follow, "kv_bytes": history_len * layout.token_bytes,
                   "recompute_ttft_s": statistics.median(recompute)}
            print(f"\nhistory {history_len} tokens ({history_len * layout.token_bytes / 2**30:.2f} GiB of KV): "
                  f"recompute TTFT {row['recompute_ttft_s'] * 1e3:.1f} ms")
            for tier in tiers:
                times, same, cold = [], True, None
                for i in range(args.repeat):
                    session = f"{tier}-{history_len}-{i}"
                    engine.generate(session, history, 1)  # prefill the history (untimed)
                    cache.swap_out(session, to_store=tier != "host")
                    if tier == "file":
                        cold = drop_page_cache()
                    elif tier == "file-warm":
                        cold = False
                    got = engine.generate(session, request, 1)
                    assert got.cached == history_len, (tier, got.cached)
                    times.append(got.ttft)
                    same = same and got.tokens == baseline_tokens
                    cache.drop(session)
                ttft = statistics.median(times)
                row[tier] = {"ttft_s": ttft, "speedup": row["recompute_ttft_s"] / ttft, "same_first_token": same}
                if tier.startswith("file"):
                    row[tier]["page_cache_dropped"] = cold
                note = ("" if not tier.startswith("file")
                        else " (page cache dropped)" if cold else " (page cache warm)")
                print(f"  {tier:<5} TTFT {ttft * 1e3:7.1f} ms  speedup {row[tier]['speedup']:5.1f}x{note}"
                      f"  same first token as recompute: {same}")
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
