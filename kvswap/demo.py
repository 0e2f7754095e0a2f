"""``kvswap demo``: a multi-session chat on embedded defaults, with swaps forced by a small HBM budget.

The instance is assembled as ``kvswap serve`` assembles it (:class:`~kvswap.service.instance.Instance`),
with a pool that holds about ``hbm_sessions`` sessions and a host tier of ``host_sessions``.
Random-weight models chat in byte tokens; a real model (``--model smollm2``) chats in text,
each turn rendered whole with the model's own chat template, as a chat client sends it.
Every turn is also recomputed from scratch without kvswap: the demo fails (exit 1) unless
each reused turn produced exactly the tokens of the recompute, and it reports the time
the reuse saved against that measured recompute.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from kvswap.engine.tokenizer import ByteTokenizer, Tokenizer
from kvswap.errors import ConfigError
from kvswap.session_cache import CacheStats, Policy
from kvswap.workload import first_prompt, user_turn


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

    def check(self) -> None:
        for name in ("sessions", "turns", "max_new_tokens", "words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.hbm_sessions < 1 or self.host_sessions < 0:
            raise ConfigError("--hbm-sessions must be at least 1 and --host-sessions at least 0")
        Policy.parse(self.policy)


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> int:
    """Run the workload; print the report; return 0 if every turn was exact, else 1."""
    from kvswap.service.instance import Instance, ServeConfig
    from kvswap.service.model import load_model

    config.check()
    Path(config.directory).mkdir(parents=True, exist_ok=True)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype, progress=None)
    tokenizer = loaded.tokenizer
    chat: _ByteChat | _TextChat = (_ByteChat(config) if isinstance(tokenizer, ByteTokenizer)
                                   else _TextChat(config, tokenizer))
    largest = chat.largest()
    block = 16
    blocks = max(int(config.hbm_sessions * largest / block), -(-largest // block) + 1)
    instance = Instance(ServeConfig(
        model=config.model, device=config.device, directory=config.directory, meta=config.meta,
        stores=[config.store] if config.store else [], hbm_blocks=blocks, block_size=block,
        host_bytes=int(config.host_sessions * largest * loaded.layout.token_bytes), policy=config.policy,
        max_new_tokens=config.max_new_tokens), loaded=loaded)
    cache, engine = instance.cache, instance.engine
    run = uuid.uuid4().hex[:8]
    echo(f"kvswap demo: {config.sessions} sessions x {config.turns} turns, model {loaded.layout.fingerprint}")
    echo(f"  HBM pool {blocks} blocks x {block} tokens = {instance.pool.nbytes / 2**20:.1f} MiB on "
         f"{instance.pool.device} (~{config.hbm_sessions:g} sessions), host tier "
         f"{cache.host.capacity / 2**20:.1f} MiB, policy {config.policy}")
    echo(f"  meta {cache.meta.uri.render()}, store {cache.stores[0].location}")  # no password shown
    exact = reused_turns = 0
    mismatches: list[str] = []
    cached_ttft = recompute_ttft = 0.0
    stop = tokenizer.stop_ids if chat.stops else frozenset()
    try:
        with tqdm(total=config.sessions * config.turns, desc="turns", unit="turn", leave=False) as progress:
            for turn in range(config.turns):
                for s in range(config.sessions):
                    sid = f"demo-{run}-{s}"
                    tokens = chat.prompt(s)
                    got = engine.generate(sid, tokens, config.max_new_tokens, stop_tokens=stop)
                    ref = engine.generate_uncached(tokens, config.max_new_tokens, stop_tokens=stop)
                    if got.tokens == ref.tokens:
                        exact += 1
                    else:
                        mismatches.append(f"{sid} turn {turn}")
                    if got.cached:
                        reused_turns += 1
                        cached_ttft += got.ttft
                        recompute_ttft += ref.ttft
                    chat.answered(s, turn, got.tokens)
                    progress.update()
        if chat.sample is not None:
            echo(f"  sample          {chat.sample}")
        _report(config, cache.stats, reused_turns, cached_ttft, recompute_ttft, exact, mismatches, echo)
        for s in range(config.sessions):  # leave the directory as small as we found it
            cache.drop(f"demo-{run}-{s}")
    finally:
        instance.close()
    return 0 if not mismatches else 1


class _ByteChat:
    """Byte-token sessions of a random-weight model: generated tokens are kept as they are."""

    stops = False
    sample: str | None = None

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.tokenizer = ByteTokenizer()
        self.history = {s: first_prompt(self.tokenizer, s, config.words) for s in range(config.sessions)}

    def largest(self) -> int:
        turn = len(self.tokenizer.encode(user_turn(0, 1, self.config.words))) + self.config.max_new_tokens
        return len(self.history[0]) + self.config.turns * turn

    def prompt(self, session: int) -> list[int]:
        return self.history[session]

    def answered(self, session: int, turn: int, tokens: list[int]) -> None:
        self.history[session] = (self.history[session] + tokens
                                 + self.tokenizer.encode(user_turn(session, turn + 1, self.config.words)))


class _TextChat:
    """Text sessions of a real model: the transcript is rendered whole each turn with the
    model's chat template (as a chat client sends it), so reuse covers whatever of the
    rendered history tokenizes as it did before."""

    stops = True

    def __init__(self, config: DemoConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.messages = {s: [{"role": "user", "content": _question(s, 0)}] for s in range(config.sessions)}
        self.sample: str | None = None

    def largest(self) -> int:
        turn = len(self.tokenizer.encode(_question(0, 1))) + self.config.max_new_tokens + 16  # + template tokens
        return len(self.prompt(0)) + self.config.turns * turn

    def prompt(self, session: int) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.render_chat(self.messages[session]))

    def answered(self, session: int, turn: int, tokens: list[int]) -> None:
        text = self.tokenizer.decode([t for t in tokens if t not in self.tokenizer.stop_ids])
        if self.sample is None:
            self.sample = f"{self.messages[session][-1]['content']!r} -> {text.strip()!r}"
        self.messages[session] += [{"role": "assistant", "content": text},
                                   {"role": "user", "content": _question(session, turn + 1)}]


_TOPICS = ("the KV cache", "a GPU", "a load balancer", "host memory", "a chat session", "Paris", "the ocean",
           "a library")


def _question(session: int, turn: int) -> str:
    topic = _TOPICS[(session * 3 + turn) % len(_TOPICS)]
    return f"In two sentences, what is {topic}?" if turn == 0 else f"And how does that relate to {topic}?"


def _report(config: DemoConfig, stats: CacheStats, reused_turns: int, cached_ttft: float, recompute_ttft: float,
            exact: int, mismatches: list[str], echo: Callable[[str], None]) -> None:
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


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"
