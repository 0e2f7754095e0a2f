"""Deterministic multi-turn chat workloads: the demo, the tests and the benchmarks run the same turns."""

from __future__ import annotations

import random

from kvswap.engine.tokenizer import ByteTokenizer

_WORDS = ("kv", "cache", "swap", "session", "token", "layer", "block", "tier", "hbm", "host", "store",
          "prefix", "hash", "lease", "turn", "model", "fast", "exact", "reuse", "again")


def user_turn(session: int, turn: int, words: int = 12) -> str:
    """The user's message of ``turn`` in ``session``: the same text on every run."""
    rng = random.Random(session * 10_007 + turn)
    return f" <s{session} t{turn}> " + " ".join(rng.choice(_WORDS) for _ in range(words))


def first_prompt(tokenizer: ByteTokenizer, session: int, words: int = 12) -> list[int]:
    return tokenizer.encode(user_turn(session, 0, words), bos=True)
