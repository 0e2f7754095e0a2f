"""What the worker half knows of its stores and its engine, to pace its jobs: which stores
stopped answering (paused for a while), how fast the engine prefills (what a fetch is
weighed against), and pinned host memory taken once at start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvswap.session_cache.store import SessionStore

log = logging.getLogger("vllm.kvswap")

#: Steps of at least this many tokens are timed: the engine's prefill speed, what a fetch is weighed against.
TIMED_TOKENS = 512
#: Pinned host memory taken and given back at start beside the host tier's own bytes, in
#: entry-sized blocks that reads and saves reuse (pinning runs at a few GB/s and holds the
#: driver: a save or fetch must not pay for it while the model runs).
WARM_PINNED_BYTES = 2 << 30


class StoreHealth:
    """Stores that failed recently are not asked again until ``pause`` seconds have passed
    (then one job tries; it fails again or they are back)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()

    def down(self, location: str) -> None:
        with self._lock:
            if location not in self._down:
                log.warning("kvswap: store %s is not answering; served as misses for %.0f s", location, self.pause)
            self._down[location] = time.monotonic() + self.pause

    def up(self, location: str) -> None:
        with self._lock:
            if self._down.pop(location, None) is not None:
                log.info("kvswap: store %s answers again", location)

    def is_down(self, location: str) -> bool:
        with self._lock:
            until = self._down.get(location)
            return until is not None and time.monotonic() < until


class ForwardClock:
    """The engine's prefill speed: the time of steps that compute at least TIMED_TOKENS
    tokens (on a GPU by CUDA events around the step's forward; on the CPU, whose forward runs
    between ``start_load_kv`` and ``get_finished``, by the wall clock), per token."""

    def __init__(self) -> None:
        self.seconds_per_token: float | None = None
        self._pending: list[tuple[Any, Any, int]] = []  # CUDA events of timed steps not yet done
        self._began: tuple[Any, int] | None = None

    def start(self, tokens: int, cuda: bool) -> None:
        self._began = None
        if tokens < TIMED_TOKENS:
            return
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._began = (event, tokens)
        else:
            self._began = (time.perf_counter(), tokens)

    def stop(self) -> None:
        if self._began is not None:
            began, tokens = self._began
            self._began = None
            if isinstance(began, float):
                self._add((time.perf_counter() - began) / tokens)
            else:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((began, end, tokens))
        while self._pending and self._pending[0][1].query():
            began, end, tokens = self._pending.pop(0)
            self._add(began.elapsed_time(end) / 1e3 / tokens)

    def _add(self, per_token: float) -> None:
        old = self.seconds_per_token
        self.seconds_per_token = per_token if old is None else 0.5 * old + 0.5 * per_token


def measure_stores(store: SessionStore, nbytes: int, measured: Callable[[set[str], int, float], None]) -> None:
    """At start, each store's read bandwidth (:meth:`SessionStore.probe` of ``nbytes``) told to
    ``measured``, so that the first fetch is weighed against recomputing too (a fresh process
    knew no bandwidth, and loaded its first follow-up from one Valkey slower than recomputing)."""
    for location, rate in store.probe(nbytes).items():
        measured({location}, int(rate), 1.0)
        log.info("kvswap: %s reads at %.2f GB/s (measured at start)", location, rate / 1e9)


def warm_pinned(block_bytes: int, total: int) -> None:
    """Take pinned host memory in blocks of ``block_bytes`` up to ``total``, and give it back
    to PyTorch's pinned-memory cache, where reads and saves of entries find it."""
    began = time.perf_counter()
    blocks = [torch.empty(block_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(total // block_bytes)]
    del blocks
    log.info("kvswap: pinned %.1f GiB of host memory in %.1f s", total / 2**30, time.perf_counter() - began)


__all__ = ["TIMED_TOKENS", "WARM_PINNED_BYTES", "ForwardClock", "StoreHealth", "measure_stores", "warm_pinned"]
