"""``kvswap demo``: a multi-session chat on embedded defaults, with swaps forced by a small HBM budget.

Every turn is also recomputed from scratch without kvswap: the demo fails (exit 1) unless
each reused turn produced exactly the tokens of the recompute, and it reports the time
the reuse saved against that measured recompute.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from tqdm import tqdm

from kvswap.connectors import open_connector
from kvswap.engine import ByteTokenizer, Engine, build_model
from kvswap.meta import open_meta_store
from kvswap.session_cache import PagedKVPool, SessionCache
from kvswap.testing.chat import first_prompt, user_turn


@dataclasses.dataclass
class DemoConfig:
    sessions: int = 8
    turns: int = 4
    max_new_tokens: int = 24
    words: int = 40  # per user turn
    model: str = "small"
    device: str = "cpu"
    dtype: str = "float32"
    hbm_sessions: float = 3.0  # the pool holds about this many sessions at their largest
    host_sessions: float = 2.0  # the host tier, likewise (0: no host tier)
    policy: str = "write-back"
    directory: str = "/tmp/kvswap-demo"
    meta: str | None = None  # default: sqlite:///<directory>/meta.db
    store: str | None = None  # default: file://<directory>/kv


def run_demo(config: DemoConfig, echo=print) -> int:
    """Run the workload; print the report; return 0 if every turn was exact, else 1."""
    tokenizer = ByteTokenizer()
    Path(config.directory).mkdir(parents=True, exist_ok=True)
    meta_uri = config.meta or f"sqlite:///{config.directory}/meta.db"
    store_uri = config.store or f"file://{config.directory}/kv"
    model, layout = build_model(config.model, dtype=config.dtype, device=config.device)
    turn_tokens = len(tokenizer.encode(user_turn(0, 1, config.words))) + config.max_new_tokens
    largest = len(first_prompt(tokenizer, 0, config.words)) + config.turns * turn_tokens
    block = 16
    blocks = max(int(config.hbm_sessions * largest / block), -(-largest // block) + 1)
    pool = PagedKVPool(layout, blocks, block, config.device)
    host_bytes = int(config.host_sessions * largest * layout.token_bytes)
    cache = SessionCache(pool, open_meta_store(meta_uri), [open_connector(store_uri)], host_bytes=host_bytes,
                         policy=config.policy)
    engine = Engine(model, cache)
    run = uuid.uuid4().hex[:8]
    echo(f"kvswap demo: {config.sessions} sessions x {config.turns} turns, model {layout.fingerprint}")
    echo(f"  HBM pool {blocks} blocks x {block} tokens = {pool.nbytes / 2**20:.1f} MiB on {pool.device} "
         f"(~{config.hbm_sessions:g} sessions), host tier {host_bytes / 2**20:.1f} MiB, policy {config.policy}")
    echo(f"  meta {meta_uri}, store {store_uri}")
    history = {s: first_prompt(tokenizer, s, config.words) for s in range(config.sessions)}
    exact = reused_turns = 0
    mismatches: list[str] = []
    cached_ttft = recompute_ttft = 0.0
    with tqdm(total=config.sessions * config.turns, desc="turns", unit="turn", leave=False) as progress:
        for turn in range(config.turns):
            for s in range(config.sessions):
                sid = f"demo-{run}-{s}"
                got = engine.generate(sid, history[s], config.max_new_tokens)
                ref = engine.generate_uncached(history[s], config.max_new_tokens)
                if got.tokens == ref.tokens:
                    exact += 1
                else:
                    mismatches.append(f"{sid} turn {turn}")
                if got.cached:
                    reused_turns += 1
                    cached_ttft += got.ttft
                    recompute_ttft += ref.ttft
                history[s] = history[s] + got.tokens + tokenizer.encode(user_turn(s, turn + 1, config.words))
                progress.update()
    stats = cache.stats
    total = config.sessions * config.turns
    later = total - config.sessions
    saved = recompute_ttft - cached_ttft
    moved = stats.swap_out_bytes + stats.swap_in_bytes
    seconds = stats.swap_out_seconds + stats.swap_in_seconds
    echo(f"  hit rate        {reused_turns}/{later} follow-up turns reused their history "
         f"(HBM {stats.hbm_hits}, host {stats.host_hits}, store {stats.store_hits}; "
         f"{stats.skipped_slower_than_recompute} recomputed because loading was predicted slower)")
    echo(f"  tokens          {stats.reused_tokens} reused, {stats.swapped_in_tokens} swapped in")
    echo(f"  swaps           {stats.swap_outs} out; {moved / 2**20:.2f} MiB moved "
         f"({stats.swap_out_bytes / 2**20:.2f} out, {stats.swap_in_bytes / 2**20:.2f} in)")
    if seconds:
        echo(f"  swap bandwidth  out {_rate(stats.swap_out_bytes, stats.swap_out_seconds)}, "
             f"in {_rate(stats.swap_in_bytes, stats.swap_in_seconds)}")
    if reused_turns:
        echo(f"  time to first token on reused turns: {cached_ttft * 1e3 / reused_turns:.1f} ms with kvswap vs "
             f"{recompute_ttft * 1e3 / reused_turns:.1f} ms recomputing; {saved * 1e3:.0f} ms saved in all")
    echo(f"  exactness       {exact}/{total} turns produced the same tokens as recomputing"
         + ("" if not mismatches else f"; MISMATCH: {', '.join(mismatches)}"))
    echo(f"  errors          {stats.store_errors} store errors, {stats.dropped_entries} dropped entries")
    for s in range(config.sessions):  # leave the directory as small as we found it
        cache.drop(f"demo-{run}-{s}")
    cache.close()
    return 0 if not mismatches else 1


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"
