"""The LRU session manager: which sessions' KV is in HBM, and swapping the rest in and out.

A request opens its session with :meth:`SessionCache.open`, which claims it, brings back the
longest verified prefix of its history (from HBM, the host tier or a store) and returns a
:class:`SessionHandle`. The engine reserves blocks for what it will compute, runs the model on
the handle's blocks, commits the tokens whose KV it wrote, and closes the handle. Unclaimed
sessions stay resident in LRU order until blocks run short; then the least recently used are
swapped out. What is stored and verified is the session-store core's
(:class:`~kvswap.session_cache.store.SessionStore`, shared with the vLLM connector); this
module adds the pool, the host tier and the LRU order.

Concurrency (one lock for bookkeeping, never held during I/O; operations *claim* their
session), leases (taken at open, renewed by :class:`~kvswap.session_cache.leases.LeaseRenewer`)
and the write-back / write-through policies: docs/session-cache.md.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvswap.connectors.base import Connector
from kvswap.meta import MetaStore, Session, validate_session_id
from kvswap.session_cache.base import (
    DEFAULT_ENTRY_BYTES,
    KVPool,
    Policy,
    SwapError,
    common_prefix,
    entry_tokens_within,
)
from kvswap.session_cache.eviction import Eviction
from kvswap.session_cache.handle import CacheStats, Claims, LocalState, Resident, SessionHandle
from kvswap.session_cache.leases import LeaseRenewer
from kvswap.session_cache.store import SessionStore
from kvswap.session_cache.tiers import HostTier, StoredState
from kvswap.session_cache.transfer import KVMover

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvswap.session_cache")


_REQUEST = "open on this instance"  # what a request's claim says


class SessionCache(Eviction):
    """Sessions' KV in one :class:`KVPool`, spilled to a host tier and stores.

    ``stores`` are connector-backed tiers; new spans are written to the first, entries naming
    any of them are read. ``meta`` records where spans are (shared between instances when it is
    a server); ``store``, a session store opened by :meth:`StackSettings.open`, replaces both.
    ``host_bytes`` bounds the host tier (0: none). A span longer than ``entry_bytes`` is stored
    as several entries, written and read in parallel by ``io_threads`` threads.
    ``recompute_when_faster``: skip loading from a store when its observed read bandwidth
    predicts a longer load than the engine's observed prefill rate would take to recompute.
    """

    def __init__(self, pool: KVPool, meta: MetaStore | None = None, stores: Sequence[Connector] = (), *,
                 store: SessionStore | None = None, host_bytes: int = 0, policy: Policy | str = Policy.WRITE_BACK,
                 instance_id: str | None = None, lease_ttl: float | None = 30.0, session_ttl: float | None = None,
                 key_prefix: str = "kv", io_threads: int = 8, entry_bytes: int = DEFAULT_ENTRY_BYTES,
                 gc_grace: float = 600.0, recompute_when_faster: bool = True) -> None:
        policy = Policy.parse(policy)
        if lease_ttl is not None and lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive (or None: no leases)")
        self.pool = pool
        self.layout = pool.layout
        self.fingerprint = pool.layout.fingerprint
        self.store = store or SessionStore(meta, stores, pool.layout, key_prefix=key_prefix, io_threads=io_threads,
                                           entry_tokens=entry_tokens_within(entry_bytes, pool.layout, pool.block_size),
                                           session_ttl=session_ttl, gc_grace=gc_grace)
        if policy is Policy.WRITE_THROUGH and not self.store.stores:
            raise ValueError("write-through needs a store")
        self.meta = self.store.meta
        self.stores = self.store.stores
        self.host = HostTier(host_bytes)
        self.policy = policy
        self.instance_id = instance_id or f"kvswap-{uuid.uuid4().hex[:12]}"
        self.lease_ttl = lease_ttl
        self.stats = CacheStats()
        self.mover = KVMover(pool)
        self.recompute_when_faster = recompute_when_faster
        self._recompute_rate: float | None = None  # tokens/s the engine prefills, as observed
        self._resident: collections.OrderedDict[str, Resident] = collections.OrderedDict()  # LRU first
        self._lock = threading.Lock()  # bookkeeping only: never held during I/O
        self._claims = Claims(self._lock)  # what holds each session now
        self._renewer = LeaseRenewer(self.store, self.instance_id, lease_ttl, lambda: self._claims.held_for(_REQUEST))

    def __repr__(self) -> str:
        return (f"SessionCache({self.fingerprint!r}, resident={len(self._resident)}, host={len(self.host)}, "
                f"stores={self.store.locations}, policy={self.policy!r})")

    @property
    def session_ttl(self) -> float | None:
        return self.store.session_ttl

    def close(self, *, backends: bool | None = None) -> None:
        """Stop lease renewals and the I/O threads; close meta and the connectors too if the
        session store owns them (``backends`` overrides)."""
        self._renewer.close()
        self.store.close(backends=backends)

    # ---- requests ---------------------------------------------------------------------

    def open(self, session_id: str, tokens: Sequence[int]) -> SessionHandle:
        """Claim ``session_id`` and bring back the KV of the longest verified prefix of ``tokens``.

        ``handle.cached`` tokens are reusable (at most ``len(tokens) - 1``: the last token is
        always computed, for its logits). SessionBusyError if the session is already open
        or being moved here, or leased by another instance.
        """
        session_id = validate_session_id(session_id)
        tokens = list(tokens)
        with self._lock:
            self.stats.requests += 1
            self._claims.take(session_id, _REQUEST)
        try:
            self._make_room(session_id, len(tokens))  # other sessions' swap-outs: here, not inside the swap-in
            record = self.store.lease(session_id, self.instance_id, self.lease_ttl)
            try:
                resident, source = self._sync_local(session_id, record, tokens)
                if resident is None:
                    resident, source = self._bring_back(session_id, record, tokens), "store"
            except BaseException:
                self._release_lease(session_id)
                raise
        except BaseException:
            self._claims.release(session_id)
            raise
        self._renewer.start()
        with self._lock:
            match = common_prefix(resident.tokens, tokens)
            self._cut(resident, match)
            cached = min(match, max(len(tokens) - 1, 0))
            if cached:
                self.stats.reused_tokens += cached
                setattr(self.stats, f"{source}_hits", getattr(self.stats, f"{source}_hits") + 1)
            elif record is not None and record.total_tokens:
                self.stats.misses += 1
            self._resident[session_id] = resident
            self._resident.move_to_end(session_id)
        return SessionHandle(session_id, resident, cached, block_size=self.pool.block_size, owner=self)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine reports a prefill; the rate decides when loading is slower than recomputing."""
        if tokens >= 64 and seconds > 0:
            rate = tokens / seconds
            self._recompute_rate = rate if self._recompute_rate is None else 0.7 * self._recompute_rate + 0.3 * rate

    # ---- admin --------------------------------------------------------------------------

    def resident_sessions(self) -> list[str]:
        """Sessions in HBM, least recently used first."""
        with self._lock:
            return list(self._resident)

    def local_state(self, session_id: str) -> LocalState:
        """Tokens of ``session_id`` in HBM and in the host tier here, and whether a request has it open."""
        with self._lock:
            resident = self._resident.get(session_id)
            copy = self.host.peek(session_id)
            return LocalState(len(resident.tokens) if resident else 0, len(resident.blocks) if resident else 0,
                              len(copy.tokens) if copy else 0, self._claims.holder(session_id) == _REQUEST)

    def swap_out(self, session_id: str, *, to_store: bool = False) -> None:
        """Move a session out of HBM (to the host tier if it fits and ``to_store`` is false,
        else to the first store). With ``to_store``, a host-tier copy is stored and leaves the
        host tier too. No-op if this instance does not hold the session; SessionBusyError
        if a request (or another move) holds it."""
        with self._lock:
            resident = self._resident.get(session_id)
            copy = self.host.peek(session_id) if to_store else None
            if resident is None and copy is None:
                return
            self._claims.take(session_id, "being swapped out")
        with self._claims.held(session_id):
            if resident is not None:
                self._evict(session_id, resident, to_store=to_store)
            elif copy is not None:
                if copy.stored.tokens < len(copy.tokens):
                    if not self.stores:
                        raise SwapError(f"session {session_id!r}: no store to move its host copy to")
                    self._store_host_copy(session_id, copy)
                with self._lock:
                    self.host.pop(session_id)

    def flush(self) -> int:
        """Store every unclaimed session (HBM and host tier) and empty HBM of them: what a
        graceful shutdown calls. Returns how many sessions were stored; SwapError on the first
        that cannot be (the rest stay where they are)."""
        count = 0
        for session_id in self.resident_sessions():
            with self._lock:
                resident = self._resident.get(session_id)
                if resident is None or session_id in self._claims:
                    continue
                self._claims.take(session_id, "being stored")
            with self._claims.held(session_id):
                self._evict(session_id, resident, to_store=bool(self.stores))
                count += 1
        if not self.stores:
            return count
        with self._lock:
            order = list(self.host.oldest())
        for session_id in order:
            with self._lock:
                copy = self.host.peek(session_id)
                if copy is None or session_id in self._claims or copy.stored.tokens >= len(copy.tokens):
                    continue
                self._claims.take(session_id, "being stored")
            with self._claims.held(session_id):
                self._store_host_copy(session_id, copy)
                count += 1
        return count

    def prefetch(self, session_id: str) -> int:
        """Bring a stored session into HBM ahead of its request; returns the tokens resident."""
        with self._lock:
            if session_id in self._resident:
                return len(self._resident[session_id].tokens)
            self._claims.take(session_id, "being prefetched")
        with self._claims.held(session_id):
            record = self.store.lease(session_id, self.instance_id, None)
            resident, _ = self._sync_local(session_id, record, None)
            if resident is None:
                resident = self._bring_back(session_id, record, None)
            with self._lock:
                if not resident.tokens:
                    self.pool.free(resident.blocks)
                    return 0
                self._resident[session_id] = resident
                self._resident.move_to_end(session_id)
                return len(resident.tokens)

    def drop(self, session_id: str) -> bool:
        """Forget a session everywhere: HBM, host tier, meta and stored blobs. True if it existed."""
        with self._lock:
            self._claims.take(session_id, "in use")
            found = session_id in self._resident
            self._release_blocks(session_id)
            found = self.host.pop(session_id) is not None or found
        with self._claims.held(session_id):
            return self.store.delete(session_id) or found

    def gc(self) -> dict[str, int]:
        """Delete expired sessions (not in use here), blobs no meta entry points to that are
        older than ``gc_grace`` seconds, and what interrupted writes left behind. Returns counts."""
        return self.store.gc(in_use=lambda session_id: session_id in self._claims, forget=self._forget)

    # ---- claims and leases ----------------------------------------------------------------

    def _forget(self, session_id: str) -> None:
        """Drop local copies of a session that gc deleted (unless something claimed it since)."""
        with self._lock:
            if session_id not in self._claims:
                self._release_blocks(session_id)
                self.host.pop(session_id)

    def _release_lease(self, session_id: str) -> None:
        if self.lease_ttl is not None:
            self.store.release(session_id, self.instance_id)

    # ---- local copies ------------------------------------------------------------------------

    def _sync_local(self, session_id: str, record: Session | None,
                    tokens: list[int] | None = None) -> tuple[Resident | None, str]:
        """The resident copy ("hbm"), or one made from the host tier ("host"), if it is still
        current with meta. The caller holds the session's claim.

        A copy whose recorded meta version differs from the store's was superseded (another
        instance served the session, or it was dropped): it is discarded.
        """
        with self._lock:
            resident = self._resident.get(session_id)
            if resident is not None and not self._current(resident.stored, record):
                self._release_blocks(session_id)
                resident = None
            if resident is not None:
                return resident, "hbm"
            copy = self.host.pop(session_id)
        if copy is None or not self._current(copy.stored, record):
            return None, "store"
        count = len(copy.tokens) if tokens is None else common_prefix(copy.tokens, tokens)
        began = time.perf_counter()
        try:
            blocks = self._allocate(self.pool.blocks_for(count), exclude=session_id)
        except BaseException:
            with self._lock:
                self.host.put(session_id, copy)  # not lost: it may hold the only copy of unstored KV
            raise
        # For a request, the copy overlaps the model's first layers (events); a prefetch waits.
        events = self.mover.scatter(copy.kv[:, :, :count], blocks, 0, per_layer=tokens is not None)
        copy.stored.keep_up_to(count)
        resident = Resident(copy.tokens[:count], blocks, copy.stored)
        if events:
            resident.pending = (events, copy.kv)
        with self._lock:
            self.stats.count_in(count * self.layout.token_bytes, time.perf_counter() - began, count)
            self._resident[session_id] = resident
        return resident, "host"

    @staticmethod
    def _current(stored: StoredState, record: Session | None) -> bool:
        return stored.version == (record.version if record is not None else None)

    def _cut(self, resident: Resident, count: int) -> None:
        """Keep the first ``count`` tokens' KV (the rest no longer matches the request)."""
        if count >= len(resident.tokens):
            return
        del resident.tokens[count:]
        resident.stored.keep_up_to(count)
        self._trim_blocks(resident.blocks, count)

    # ---- the store path -----------------------------------------------------------------------

    def _bring_back(self, session_id: str, record: Session | None, tokens: list[int] | None) -> Resident:
        """A new resident copy holding the longest verified stored prefix (of ``tokens``, if
        given), possibly empty. The caller holds the session's claim."""
        plan = self.store.plan(session_id, record, tokens)
        resident = Resident([], [], plan.stored)
        if not plan.entries:
            self._note_drops()
            return resident
        if self.recompute_when_faster and self.store.slower_than_recompute(plan, self._recompute_rate):
            with self._lock:
                self.stats.skipped_slower_than_recompute += 1
            return resident
        total = plan.end if tokens is None else min(plan.end, len(tokens))
        began = time.perf_counter()
        resident.blocks = self._allocate(self.pool.blocks_for(total), exclude=session_id)
        loaded = nbytes = 0
        in_flight: list[torch.Tensor] = []  # host sources of copies not yet known to be done
        events = None
        try:
            for span in self.store.read(session_id, plan, tokens, limit=total, pin=self.mover.cuda):
                # Asynchronous on a GPU: this entry's copy overlaps the wait for the next one.
                events = self.mover.scatter(span.kv[:, :, :span.take], resident.blocks, span.entry.token_offset,
                                            per_layer=True)
                in_flight.append(span.kv)
                resident.tokens.extend(span.tokens[:span.take])
                loaded += span.take
                nbytes += span.entry.size
        except BaseException:
            self.mover.synchronize()
            with self._lock:
                self.pool.free(resident.blocks)
            raise
        if tokens is not None and events:
            # A request: the model waits per layer on the last entry's events, which the
            # scatter stream records after every earlier entry's copies (all verified already).
            resident.pending = (events, in_flight)
        else:
            self.mover.synchronize()
        with self._lock:
            self.stats.count_in(nbytes, time.perf_counter() - began, loaded)
            self._trim_blocks(resident.blocks, loaded)
        self._note_drops()
        return resident

    def _note_drops(self) -> None:
        with self._lock:
            self.stats.dropped_entries = self.store.dropped_entries

    # ---- handles ---------------------------------------------------------------------------

    def reserve_blocks(self, session_id: str, resident: Resident, num_tokens: int) -> None:
        """A handle's :meth:`SessionHandle.reserve` (:class:`HandleOwner`)."""
        need = self.pool.blocks_for(num_tokens) - len(resident.blocks)
        if need > 0:
            resident.blocks.extend(self._allocate(need, exclude=session_id))

    def close_request(self, session_id: str, resident: Resident) -> None:
        """A handle's :meth:`SessionHandle.close` (:class:`HandleOwner`)."""
        try:
            if resident.pending is not None:
                self.mover.synchronize()
                resident.pending = None
            with self._lock:
                self._trim_blocks(resident.blocks, len(resident.tokens))
            if self.policy is Policy.WRITE_THROUGH and resident.stored.tokens < len(resident.tokens):
                try:
                    self._write(session_id, resident.stored, resident.tokens, self.mover.gatherer(resident.blocks))
                except SwapError as exc:
                    log.warning("write-through deferred to eviction: %s", exc)
        finally:
            with self._lock:
                if not resident.tokens:
                    self._release_blocks(session_id)
            # Before the claim goes: a later request here renews the lease under the same owner.
            self._release_lease(session_id)
            self._claims.release(session_id)
