"""Greedy generation for chat sessions, reusing each session's KV through the session cache."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from kvswap.engine.paged_cache import PagedCache
from kvswap.session_cache.manager import SessionCache


@dataclasses.dataclass
class Generation:
    """One turn's result. ``cached`` history tokens were reused, ``computed`` were prefilled;
    ``logits`` (when asked for) are the float32 logits that chose each new token."""

    tokens: list[int]
    cached: int
    computed: int
    ttft: float  # seconds from the request to its first new token, swap-in included
    seconds: float
    logits: torch.Tensor | None = None


class Engine:
    """A causal LM plus a session cache over its pool. One request at a time."""

    def __init__(self, model: Any, cache: SessionCache) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.pool.device

    @torch.inference_mode()
    def generate(self, session_id: str, tokens: Sequence[int], max_new_tokens: int, *,
                 stop_tokens: Collection[int] = (), return_logits: bool = False,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Continue ``tokens`` (the whole conversation so far) by up to ``max_new_tokens``.

        The session's KV for the longest verified prefix is reused; the rest is computed and
        the KV of everything but the last new token stays with the session for its next turn.
        Generation ends after ``max_new_tokens`` or a token of ``stop_tokens`` (which is kept).
        ``on_token(t)`` is called with each new token as soon as it is chosen (streaming).
        """
        if not tokens or max_new_tokens < 1:
            raise ValueError("generate needs at least one token and max_new_tokens >= 1")
        began = time.perf_counter()
        with self.cache.open(session_id, tokens) as handle:
            cached = handle.cached
            handle.reserve(len(tokens) + max_new_tokens - 1)
            past = PagedCache(self.cache.pool, handle.blocks, cached, handle.layer_events)
            prefill_began = time.perf_counter()
            logits = self._forward(tokens[cached:], past)
            self._sync()
            self.cache.observe_prefill(len(tokens) - cached, time.perf_counter() - prefill_began)
            new, first_at, kept = self._decode(logits, past, max_new_tokens, stop_tokens, return_logits, on_token)
            handle.commit(list(tokens) + new[:-1])
        return Generation(new, cached, len(tokens) - cached, first_at - began, time.perf_counter() - began,
                          torch.stack(kept) if return_logits else None)

    @torch.inference_mode()
    def generate_uncached(self, tokens: Sequence[int], max_new_tokens: int, *, stop_tokens: Collection[int] = (),
                          return_logits: bool = False, on_token: Callable[[int], None] | None = None) -> Generation:
        """The reference: recompute everything with transformers' own DynamicCache, no kvswap."""
        from transformers import DynamicCache

        began = time.perf_counter()
        past = DynamicCache(config=self.model.config)
        logits = self._forward(tokens, past)
        new, first_at, kept = self._decode(logits, past, max_new_tokens, stop_tokens, return_logits, on_token)
        return Generation(new, 0, len(tokens), first_at - began, time.perf_counter() - began,
                          torch.stack(kept) if return_logits else None)

    def _forward(self, tokens: Sequence[int], past: object) -> torch.Tensor:
        ids = torch.tensor([list(tokens)], dtype=torch.int64, device=self.device)
        return self.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1).logits[0, -1]

    def _decode(self, logits: torch.Tensor, past: object, max_new_tokens: int, stop_tokens: Collection[int],
                return_logits: bool, on_token: Callable[[int], None] | None = None,
                ) -> tuple[list[int], float, list[torch.Tensor]]:
        """Greedy tokens, the time the first was chosen, and (if asked) each step's logits."""
        new: list[int] = []
        kept: list[torch.Tensor] = []
        first_at = 0.0
        while True:
            token = int(torch.argmax(logits))
            if not new:
                first_at = time.perf_counter()
            new.append(token)
            if on_token is not None:
                on_token(token)
            if return_logits:
                kept.append(logits.float().cpu())
            if len(new) >= max_new_tokens or token in stop_tokens:
                return new, first_at, kept
            logits = self._forward([token], past)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
