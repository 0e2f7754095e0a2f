"""Making room in HBM and the host tier: the session cache's LRU eviction (a base class of
:class:`~kvswap.session_cache.manager.SessionCache`, which owns the state declared here).

A request first makes room for all its tokens (:meth:`Eviction._make_room`, before its lease
and swap-in), so other sessions' swap-outs do not run inside its swap-in; allocation then
swaps out more only when other requests took the room meanwhile. A session leaves HBM for the
host tier when it fits there (older host copies are stored, or dropped when stored, to make
room), else for the first store; an unstored session with nowhere to go stays (SwapError).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvswap.session_cache.base import KVLayout, KVPool, OutOfBlocksError, SwapError
from kvswap.session_cache.handle import CacheStats, Claims, Resident
from kvswap.session_cache.store import SessionStore
from kvswap.session_cache.tiers import HostCopy, HostTier, StoredState, StoreTier
from kvswap.session_cache.transfer import KVMover

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvswap.session_cache")


class Eviction:
    """Blocks for requests and the LRU swap-outs that free them."""

    pool: KVPool
    layout: KVLayout
    store: SessionStore
    stores: list[StoreTier]
    host: HostTier
    mover: KVMover
    stats: CacheStats
    _resident: collections.OrderedDict[str, Resident]  # least recently used first
    _lock: threading.Lock  # bookkeeping only: never held during I/O
    _claims: Claims

    def _make_room(self, session_id: str, num_tokens: int) -> None:
        """Best effort: free the blocks a request of ``num_tokens`` tokens will need beyond what
        its session holds in HBM, before its lease and swap-in."""
        with self._lock:
            resident = self._resident.get(session_id)
            held = len(resident.blocks) if resident is not None else 0
            want = min(self.pool.blocks_for(num_tokens), self.pool.num_blocks) - held
        with contextlib.suppress(OutOfBlocksError):
            self._swap_out_until(want, exclude=session_id)

    def _allocate(self, count: int, exclude: str) -> list[int]:
        """``count`` blocks, swapping out least recently used unclaimed sessions as needed."""
        if count > self.pool.num_blocks:
            raise OutOfBlocksError(f"{count} blocks asked for; the pool has {self.pool.num_blocks}")
        while True:
            self._swap_out_until(count, exclude)
            with self._lock:
                if self.pool.free_blocks >= count:  # (else another request took them meanwhile)
                    return self.pool.allocate(count)

    def _swap_out_until(self, count: int, exclude: str) -> None:
        """Swap out least recently used unclaimed sessions (not ``exclude``) until ``count``
        blocks are free; OutOfBlocksError when none is left to swap out."""
        failed: dict[str, SwapError] = {}
        while True:
            with self._lock:
                if self.pool.free_blocks >= count:
                    return
                victim = next((sid for sid in self._resident
                               if sid not in self._claims and sid != exclude and sid not in failed), None)
                if victim is None:
                    detail = f"; swap-out failed: {next(iter(failed.values()))}" if failed else ""
                    raise OutOfBlocksError(f"need {count} blocks, {self.pool.free_blocks} free, and no unpinned "
                                           f"session left to swap out{detail}")
                self._claims.take(victim, "being swapped out")
                resident = self._resident[victim]
            try:
                self._evict(victim, resident)
            except SwapError as exc:
                failed[victim] = exc
            finally:
                self._claims.release(victim)

    def _evict(self, session_id: str, resident: Resident, to_store: bool = False) -> None:
        """Swap one claimed session out of HBM. SwapError (the session stays resident) if it
        cannot be stored."""
        began = time.perf_counter()
        count = len(resident.tokens)
        unstored = count - resident.stored.tokens
        nbytes = count * self.layout.token_bytes
        if not to_store and count and self.host.fits(nbytes) and self._make_host_room(nbytes):
            kv = self.mover.host_tensor(count)
            self.mover.gather(resident.blocks, 0, count, kv)
            with self._lock:
                if self.host.used + nbytes <= self.host.capacity:  # nobody took the room meanwhile
                    self.host.put(session_id, HostCopy(resident.tokens, kv, resident.stored))
                    unstored = 0
        if unstored > 0:
            if not self.stores:
                raise SwapError(f"session {session_id!r} has {unstored} unstored tokens and nowhere to put them")
            self._write(session_id, resident.stored, resident.tokens, self.mover.gatherer(resident.blocks))
        with self._lock:
            self._release_blocks(session_id)
            self.stats.swap_outs += 1
            self.stats.swap_out_bytes += nbytes
            self.stats.swap_out_seconds += time.perf_counter() - began

    def _make_host_room(self, nbytes: int) -> bool:
        """Evict host copies (storing what is unstored) until ``nbytes`` fit, or nothing more
        can go; True if they fit."""
        with self._lock:
            order = list(self.host.oldest())
        for session_id in order:
            with self._lock:
                if self.host.used + nbytes <= self.host.capacity:
                    return True
                copy = self.host.peek(session_id)
                if copy is None or session_id in self._claims:
                    continue
                if copy.stored.tokens >= len(copy.tokens):
                    self.host.pop(session_id)
                    continue
                if not self.stores:
                    continue
                self._claims.take(session_id, "being stored")
            try:
                self._store_host_copy(session_id, copy)
            except SwapError as exc:
                log.warning("host tier kept session %r: %s", session_id, exc)
                continue
            finally:
                self._claims.release(session_id)
            with self._lock:
                if self.host.peek(session_id) is copy:
                    self.host.pop(session_id)
        with self._lock:
            return self.host.used + nbytes <= self.host.capacity

    def _store_host_copy(self, session_id: str, copy: HostCopy) -> None:
        """Store the tokens of a host copy that are not stored yet (SwapError on failure)."""
        self._write(session_id, copy.stored, copy.tokens, lambda start, stop: copy.kv[:, :, start:stop].contiguous())

    def _write(self, session_id: str, stored: StoredState, tokens: Sequence[int],
               fetch: Callable[[int, int], torch.Tensor]) -> None:
        try:
            self.store.write(session_id, stored, tokens, fetch)
        except SwapError:
            with self._lock:
                self.stats.store_errors += 1
            raise

    def _trim_blocks(self, blocks: list[int], num_tokens: int) -> None:
        """Free the blocks beyond those ``num_tokens`` tokens need (in place; lock held)."""
        keep = self.pool.blocks_for(num_tokens)
        self.pool.free(blocks[keep:])
        del blocks[keep:]

    def _release_blocks(self, session_id: str) -> None:
        resident = self._resident.pop(session_id, None)
        if resident is not None:
            self.pool.free(resident.blocks)

