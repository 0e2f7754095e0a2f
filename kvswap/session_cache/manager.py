"""The LRU session manager: which sessions' KV is in HBM, and swapping the rest in and out.

A request opens its session with :meth:`SessionCache.open`, which pins it, brings back the
longest verified prefix of its history (from HBM, the host tier or a store) and returns a
:class:`SessionHandle`. The engine reserves blocks for what it will compute, runs the
model on the handle's blocks, commits the tokens whose KV it wrote, and closes the
handle. Unpinned sessions stay resident in LRU order until blocks run short; then the
least recently used are swapped out.

Rules that keep reuse correct:

* **Data first, meta second.** A span is written as a blob (create-only), then appended to
  the meta store with a compare-and-swap on the session version. KV leaves HBM only after
  its tokens are stored (or copied to the host tier); a failed store leaves the session
  resident and raises :class:`SwapError`.
* **Verify before use.** Every stored span is checked (blob checksum = meta checksum,
  fingerprint, offsets, the chained prefix hash over the blob's own tokens) and its tokens
  are compared with the request's; only the longest verified common prefix is reused.
  Corrupt or missing blobs are a miss, and their entries (and all after them) are dropped
  from meta.
* **One writer per session.** With ``lease_ttl`` set, opening takes the session's lease in
  the meta store under this instance's id; another instance gets :class:`SessionBusyError`
  until it is released (at close) or expires. A session whose meta version moved on since
  this instance last wrote it (another instance served it) is reloaded from meta, never
  served from a stale local copy.

Policies: ``write-back`` stores a session when it is evicted (to the host tier if there is
room, else to the store; the host tier writes to the store when it evicts); ``write-through``
stores each turn's new tokens when the handle closes, which stateless instances behind a
load balancer need. One lock serialises the manager; swaps run under it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from kvswap.errors import AlreadyExistsError, BackendUnavailableError, IntegrityError, KVSwapError, NotFoundError, \
    VersionConflictError
from kvswap.meta.base import Entry, LeaseError, MetaStore, Session, validate_session_id
from kvswap.session_cache.base import (
    KVPool,
    OutOfBlocksError,
    SessionBusyError,
    SwapError,
    chain_hash,
    common_prefix,
    root_hash,
)
from kvswap.session_cache.tiers import HostCopy, HostTier, StoredState, StoreTier
from kvswap.session_cache.transfer import KVMover

if TYPE_CHECKING:
    import torch

    from kvswap.connectors.base import Connector

log = logging.getLogger("kvswap.session_cache")

Policy = Literal["write-back", "write-through"]


@dataclasses.dataclass
class CacheStats:
    """Counters since the cache was made. Times are seconds, sizes bytes."""

    requests: int = 0
    hbm_hits: int = 0  # reused KV that never left HBM
    host_hits: int = 0
    store_hits: int = 0
    misses: int = 0  # requests with history but nothing reusable
    reused_tokens: int = 0
    swapped_in_tokens: int = 0
    swap_outs: int = 0
    swap_out_bytes: int = 0
    swap_out_seconds: float = 0.0
    swap_in_bytes: int = 0
    swap_in_seconds: float = 0.0
    store_errors: int = 0
    dropped_entries: int = 0
    skipped_slower_than_recompute: int = 0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LocalState:
    """What this instance holds of one session (``SessionCache.local_state``)."""

    hbm_tokens: int = 0
    hbm_blocks: int = 0
    host_tokens: int = 0
    pinned: bool = False


@dataclasses.dataclass
class _Resident:
    tokens: list[int]  # ids whose KV the blocks hold, position by position
    blocks: list[int]
    stored: StoredState
    pins: int = 0
    pending: tuple[list, torch.Tensor] | None = None  # per-layer copy events, and their source


class SessionCache:
    """Sessions' KV in one :class:`KVPool`, spilled to a host tier and stores.

    ``stores`` are connector-backed tiers; new spans are written to the first, entries
    naming any of them are read. ``meta`` records where spans are (shared between
    instances when it is a server). ``host_bytes`` bounds the host tier (0: none).
    A span longer than ``entry_bytes`` is stored as several entries, written (and later read)
    in parallel by ``io_threads`` threads, overlapping with device copies.
    ``recompute_when_faster``: skip loading from a store when its observed read bandwidth
    predicts a longer load than the engine's observed prefill rate would take to recompute.
    """

    def __init__(self, pool: KVPool, meta: MetaStore, stores: Sequence[Connector] = (), *,
                 host_bytes: int = 0, policy: Policy = "write-back", instance_id: str | None = None,
                 lease_ttl: float | None = 30.0, session_ttl: float | None = None, key_prefix: str = "kv",
                 io_threads: int = 8, entry_bytes: int = 256 << 20, gc_grace: float = 600.0,
                 recompute_when_faster: bool = True) -> None:
        if policy not in ("write-back", "write-through"):
            raise ValueError(f"policy must be 'write-back' or 'write-through', not {policy!r}")
        if policy == "write-through" and not stores:
            raise ValueError("write-through needs a store")
        self.pool = pool
        self.layout = pool.layout
        self.fingerprint = pool.layout.fingerprint
        self.meta = meta
        self.stores = [StoreTier(c, pool.layout, key_prefix) for c in stores]
        self.host = HostTier(host_bytes)
        self.policy = policy
        self.instance_id = instance_id or f"kvswap-{uuid.uuid4().hex[:12]}"
        self.lease_ttl = lease_ttl
        self.session_ttl = session_ttl
        self.gc_grace = gc_grace
        self.stats = CacheStats()
        self.mover = KVMover(pool)
        self._resident: collections.OrderedDict[str, _Resident] = collections.OrderedDict()  # LRU first
        self._lock = threading.RLock()
        self.entry_tokens = max(pool.block_size, entry_bytes // pool.layout.token_bytes)
        self._io = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="kvswap-io")
        self.recompute_when_faster = recompute_when_faster
        self._recompute_rate: float | None = None  # tokens/s the engine prefills, as observed

    def __repr__(self) -> str:
        return (f"SessionCache({self.fingerprint!r}, resident={len(self._resident)}, host={len(self.host)}, "
                f"stores={[s.location for s in self.stores]}, policy={self.policy!r})")

    def close(self) -> None:
        self._io.shutdown(wait=True)

    # ---- requests ---------------------------------------------------------------------

    def open(self, session_id: str, tokens: Sequence[int]) -> SessionHandle:
        """Pin ``session_id`` and bring back the KV of the longest verified prefix of ``tokens``.

        ``handle.cached`` tokens are reusable (at most ``len(tokens) - 1``: the last token is
        always computed, for its logits). SessionBusyError if the session is already open
        here or leased by another instance.
        """
        validate_session_id(session_id)
        tokens = list(tokens)
        with self._lock:
            self.stats.requests += 1
            resident = self._resident.get(session_id)
            if resident is not None and resident.pins:
                raise SessionBusyError(f"session {session_id!r} is already open on this instance")
            record = self._lease(session_id)
            try:
                resident, source = self._sync_local(session_id, record, tokens)
                if resident is None:
                    resident, source = self._bring_back(session_id, record, tokens), "store"
            except BaseException:
                self._release_lease(session_id)
                raise
            match = common_prefix(resident.tokens, tokens)
            self._cut(resident, match)
            cached = min(match, max(len(tokens) - 1, 0))
            if cached:
                self.stats.reused_tokens += cached
                setattr(self.stats, f"{source}_hits", getattr(self.stats, f"{source}_hits") + 1)
            elif record is not None and record.total_tokens:
                self.stats.misses += 1
            resident.pins += 1
            self._resident[session_id] = resident
            self._resident.move_to_end(session_id)
            return SessionHandle(self, session_id, resident, cached)

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
                              len(copy.tokens) if copy else 0, bool(resident and resident.pins))

    def swap_out(self, session_id: str, *, to_store: bool = False) -> None:
        """Move an unpinned session out of HBM (to the host tier if it fits and ``to_store`` is
        false, else to the first store). With ``to_store``, a host-tier copy is stored and leaves
        the host tier too. No-op if this instance does not hold the session."""
        with self._lock:
            resident = self._resident.get(session_id)
            if resident is None:
                copy = self.host.peek(session_id) if to_store else None
                if copy is not None:
                    if copy.stored.tokens < len(copy.tokens):
                        if not self.stores:
                            raise SwapError(f"session {session_id!r}: no store to move its host copy to")
                        self._store_host_copy(session_id, copy)
                    self.host.pop(session_id)
                return
            if resident.pins:
                raise SessionBusyError(f"session {session_id!r} is in use")
            self._evict(session_id, resident, to_store=to_store)

    def flush(self) -> int:
        """Store every unpinned session (HBM and host tier) and empty HBM of them: what a
        graceful shutdown calls. Returns how many sessions were stored; SwapError on the first
        that cannot be (the rest stay where they are)."""
        with self._lock:
            count = 0
            for session_id, resident in list(self._resident.items()):
                if not resident.pins:
                    self._evict(session_id, resident, to_store=bool(self.stores))
                    count += 1
            for session_id in self.host.oldest():
                copy = self.host.peek(session_id)
                if self.stores and copy.stored.tokens < len(copy.tokens):
                    self._store_host_copy(session_id, copy)
                    count += 1
            return count

    def prefetch(self, session_id: str) -> int:
        """Bring a stored session into HBM ahead of its request; returns the tokens resident."""
        with self._lock:
            if session_id in self._resident:
                return len(self._resident[session_id].tokens)
            try:
                record = self.meta.get(session_id)
            except NotFoundError:
                record = None
            resident, _ = self._sync_local(session_id, record, None)
            if resident is None:
                resident = self._bring_back(session_id, record, None)
            if not resident.tokens:
                self.pool.free(resident.blocks)
                return 0
            self._resident[session_id] = resident
            self._resident.move_to_end(session_id)
            return len(resident.tokens)

    def drop(self, session_id: str) -> bool:
        """Forget a session everywhere: HBM, host tier, meta and stored blobs. True if it existed."""
        with self._lock:
            resident = self._resident.get(session_id)
            if resident is not None and resident.pins:
                raise SessionBusyError(f"session {session_id!r} is in use")
            found = False
            if resident is not None:
                self._release_blocks(session_id)
                found = True
            found = self.host.pop(session_id) is not None or found
            try:
                entries = self.meta.delete(session_id)
            except NotFoundError:
                return found
            self._delete_blobs(entries)
            return True

    def gc(self) -> dict[str, int]:
        """Delete expired sessions (not open here) and blobs no meta entry points to that are
        older than ``gc_grace`` seconds. Returns counts."""
        removed_sessions = removed_blobs = 0
        with self._lock:
            for session in self.meta.expired():
                if session.id in self._resident and self._resident[session.id].pins:
                    continue
                try:
                    entries = self.meta.delete(session.id, expected_version=session.version)
                except (NotFoundError, VersionConflictError):
                    continue  # touched or removed meanwhile: no longer expired as seen
                self._release_blocks(session.id)
                self.host.pop(session.id)
                self._delete_blobs(entries)
                removed_sessions += 1
        referenced = set()
        cursor = None
        while True:
            page = self.meta.list_sessions(limit=1000, cursor=cursor)
            for session in page.sessions:
                try:
                    referenced.update((e.connector, e.key) for e in self.meta.entries(session.id))
                except NotFoundError:
                    continue
            if page.cursor is None:
                break
            cursor = page.cursor
        horizon = time.time() - self.gc_grace
        for store in self.stores:
            orphans = [key for key in store.connector.list(store.prefix + "/")
                       if (store.location, key) not in referenced
                       and (store.key_time(key) or horizon) < horizon]
            store.connector.delete_many(orphans)
            removed_blobs += len(orphans)
        return {"sessions": removed_sessions, "blobs": removed_blobs}

    # ---- internals: lease and local copies ------------------------------------------------

    def _lease(self, session_id: str) -> Session | None:
        """The session's meta record, leased to this instance when leases are on; created at
        the first request. None only when the meta store has no such session and leases are off."""
        try:
            if self.lease_ttl is None:
                return self.meta.get(session_id)
            try:
                return self.meta.acquire_lease(session_id, self.instance_id, self.lease_ttl)
            except NotFoundError:
                try:
                    self.meta.create(session_id, self.fingerprint, ttl=self.session_ttl)
                except AlreadyExistsError:
                    pass
                return self.meta.acquire_lease(session_id, self.instance_id, self.lease_ttl)
        except LeaseError as exc:
            raise SessionBusyError(f"session {session_id!r} is leased by {exc.owner!r}") from exc
        except NotFoundError:
            return None

    def _release_lease(self, session_id: str) -> None:
        if self.lease_ttl is None:
            return
        try:
            self.meta.release_lease(session_id, self.instance_id)
        except (NotFoundError, BackendUnavailableError) as exc:
            log.warning("could not release the lease of session %r: %s", session_id, exc)

    def _sync_local(self, session_id: str, record: Session | None,
                    tokens: list[int] | None = None) -> tuple[_Resident | None, str]:
        """The resident copy ("hbm"), or one made from the host tier ("host"), if it is still
        current with meta.

        A copy whose recorded meta version differs from the store's was superseded (another
        instance served the session, or it was dropped): it is discarded.
        """
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
        blocks = self._allocate(self.pool.blocks_for(count), exclude=session_id)
        # For a request, the copy overlaps the model's first layers (events); a prefetch waits.
        events = self.mover.scatter(copy.kv[:, :, :count], blocks, 0, per_layer=tokens is not None)
        self._count_in(count * self.layout.token_bytes, time.perf_counter() - began, count)
        copy.stored.keep_up_to(count)
        resident = _Resident(copy.tokens[:count], blocks, copy.stored)
        if events:
            resident.pending = (events, copy.kv)
        self._resident[session_id] = resident
        return resident, "host"

    @staticmethod
    def _current(stored: StoredState, record: Session | None) -> bool:
        return stored.version == (record.version if record is not None else None)

    def _cut(self, resident: _Resident, count: int) -> None:
        """Keep the first ``count`` tokens' KV (the rest no longer matches the request)."""
        if count >= len(resident.tokens):
            return
        del resident.tokens[count:]
        resident.stored.keep_up_to(count)
        self._trim_blocks(resident.blocks, count)

    def _trim_blocks(self, blocks: list[int], num_tokens: int) -> None:
        """Free the blocks beyond those ``num_tokens`` tokens need (in place)."""
        keep = self.pool.blocks_for(num_tokens)
        self.pool.free(blocks[keep:])
        del blocks[keep:]

    def _release_blocks(self, session_id: str) -> None:
        resident = self._resident.pop(session_id, None)
        if resident is not None:
            self.pool.free(resident.blocks)

    def _count_in(self, nbytes: int, seconds: float, tokens: int) -> None:
        self.stats.swap_in_bytes += nbytes
        self.stats.swap_in_seconds += seconds
        self.stats.swapped_in_tokens += tokens

    # ---- internals: blocks and eviction -----------------------------------------------------

    def _allocate(self, count: int, exclude: str) -> list[int]:
        """``count`` blocks, swapping out least recently used unpinned sessions as needed."""
        if count > self.pool.num_blocks:
            raise OutOfBlocksError(f"{count} blocks asked for; the pool has {self.pool.num_blocks}")
        failed: dict[str, SwapError] = {}
        while self.pool.free_blocks < count:
            victim = next((sid for sid, r in self._resident.items()
                           if not r.pins and sid != exclude and sid not in failed), None)
            if victim is None:
                detail = f"; swap-out failed: {next(iter(failed.values()))}" if failed else ""
                raise OutOfBlocksError(f"need {count} blocks, {self.pool.free_blocks} free, and no unpinned "
                                       f"session left to swap out{detail}")
            try:
                self._evict(victim, self._resident[victim])
            except SwapError as exc:
                failed[victim] = exc
        return self.pool.allocate(count)

    def _evict(self, session_id: str, resident: _Resident, to_store: bool = False) -> None:
        """Swap one session out of HBM. SwapError (the session stays resident) if it cannot be stored."""
        began = time.perf_counter()
        count = len(resident.tokens)
        unstored = count - resident.stored.tokens
        nbytes = count * self.layout.token_bytes
        if not to_store and count and self.host.fits(nbytes):
            self._make_host_room(nbytes)
            if self.host.used + nbytes <= self.host.capacity:
                kv = self.mover.host_tensor(count)
                self.mover.gather(resident.blocks, 0, count, kv)
                self.host.put(session_id, HostCopy(resident.tokens, kv, resident.stored))
                unstored = 0
        if unstored > 0:
            if not self.stores:
                raise SwapError(f"session {session_id!r} has {unstored} unstored tokens and nowhere to put them")
            self._store(session_id, resident.stored, resident.tokens, self._gatherer(resident.blocks))
        self._release_blocks(session_id)
        self.stats.swap_outs += 1
        self.stats.swap_out_bytes += nbytes
        self.stats.swap_out_seconds += time.perf_counter() - began

    def _make_host_room(self, nbytes: int) -> None:
        """Evict host copies (storing what is unstored) until ``nbytes`` fit, or nothing more can go."""
        for session_id in self.host.oldest():
            if self.host.used + nbytes <= self.host.capacity:
                return
            copy = self.host.peek(session_id)
            if copy.stored.tokens < len(copy.tokens):
                if not self.stores:
                    continue
                try:
                    self._store_host_copy(session_id, copy)
                except SwapError as exc:
                    log.warning("host tier kept session %r: %s", session_id, exc)
                    continue
            self.host.pop(session_id)

    def _store_host_copy(self, session_id: str, copy: HostCopy) -> None:
        """Store the tokens of a host copy that are not stored yet (SwapError on failure)."""
        self._store(session_id, copy.stored, copy.tokens,
                    lambda start, stop: copy.kv[:, :, start:stop].contiguous())

    # ---- internals: the store path ----------------------------------------------------------

    def _gatherer(self, blocks: list[int]) -> Callable[[int, int], torch.Tensor]:
        def gather(start: int, stop: int) -> torch.Tensor:
            kv = self.mover.host_tensor(stop - start)
            self.mover.gather(blocks, start, stop, kv)
            return kv
        return gather

    def _store(self, session_id: str, stored: StoredState, tokens: Sequence[int],
               fetch: Callable[[int, int], torch.Tensor]) -> None:
        """Store ``tokens[stored.tokens:]`` (``fetch(a, b)`` gives the KV of tokens a..b-1 on the
        host): blobs first, in entries of at most ``entry_tokens``, written in parallel; then
        one meta append per entry, in order (compare-and-swap).

        Updates ``stored`` for every entry appended; raises SwapError on any failure, after
        which meta points only at complete blobs.
        """
        store = self.stores[0]
        writes: list[concurrent.futures.Future] = []
        try:
            self._prepare_meta(session_id, stored)
            previous = stored.entries[-1][1] if stored.entries else root_hash(self.fingerprint)
            for start in range(stored.tokens, len(tokens), self.entry_tokens):
                stop = min(start + self.entry_tokens, len(tokens))
                previous = chain_hash(previous, tokens[start:stop])
                writes.append(self._io.submit(store.write, session_id, fetch(start, stop), tokens[start:stop],
                                              start, previous))
            concurrent.futures.wait(writes)
            specs = [write.result() for write in writes]
        except KVSwapError as exc:
            concurrent.futures.wait(writes)
            self._delete_keys(store, [w.result().key for w in writes if w.exception() is None])
            self.stats.store_errors += 1
            raise SwapError(f"could not store session {session_id!r}: {exc}") from exc
        for index, spec in enumerate(specs):
            try:
                session, _ = self.meta.append(session_id, stored.version, spec)
            except KVSwapError as exc:
                # A conflict appended nothing; another failure may have landed unseen: gc keeps that blob.
                unappended = specs[index:] if isinstance(exc, VersionConflictError) else specs[index + 1:]
                self._delete_keys(store, [s.key for s in unappended])
                self.stats.store_errors += 1
                raise SwapError(f"could not record session {session_id!r} in meta: {exc}") from exc
            stored.version = session.version
            stored.meta_total = session.total_tokens
            stored.entries.append((spec.token_offset + spec.token_length, spec.prefix_hash))

    @staticmethod
    def _delete_keys(store: StoreTier, keys: Sequence[str]) -> None:
        try:
            store.connector.delete_many(keys)
        except KVSwapError as exc:
            log.warning("could not delete %d blobs no entry points to (gc will retry): %s", len(keys), exc)

    def _prepare_meta(self, session_id: str, stored: StoredState) -> None:
        """Make the meta record ready for an append at ``stored.tokens``: create it, adopt it,
        or truncate entries beyond the history we kept."""
        if stored.version is None:
            try:
                session = self.meta.create(session_id, self.fingerprint, ttl=self.session_ttl)
            except AlreadyExistsError:
                session = self.meta.get(session_id)
                if session.total_tokens:  # somebody else's history: ours replaces it
                    session, removed = self.meta.truncate(session_id, session.version, 0)
                    self._delete_blobs(removed)
            stored.version, stored.meta_total, stored.entries = session.version, 0, []
            stored.fingerprint_ok = session.fingerprint == self.fingerprint
        if not stored.fingerprint_ok:
            session = self.meta.update(session_id, stored.version, fingerprint=self.fingerprint)
            session, removed = self.meta.truncate(session_id, session.version, 0)
            self._delete_blobs(removed)
            stored.version, stored.meta_total, stored.entries, stored.fingerprint_ok = session.version, 0, [], True
        if stored.meta_total > stored.tokens:
            session, removed = self.meta.truncate(session_id, stored.version, stored.tokens)
            self._delete_blobs(removed)
            stored.version, stored.meta_total = session.version, session.total_tokens
            stored.keep_up_to(session.total_tokens)

    def _delete_blobs(self, entries: Sequence[Entry]) -> None:
        """Best effort, one batch per store (meta no longer points at them; gc retries what fails)."""
        for store in self.stores:
            keys = [entry.key for entry in entries if entry.connector == store.location]
            if keys:
                self._delete_keys(store, keys)

    def _store_for(self, entry: Entry) -> StoreTier | None:
        return next((s for s in self.stores if s.location == entry.connector), None)

    def _bring_back(self, session_id: str, record: Session | None, tokens: list[int] | None) -> _Resident:
        """A new resident copy holding the longest verified stored prefix (of ``tokens``, if
        given), possibly empty."""
        stored = StoredState()
        if record is not None:
            stored.version, stored.meta_total = record.version, record.total_tokens
            stored.fingerprint_ok = record.fingerprint == self.fingerprint
        resident = _Resident([], [], stored)
        if record is None or not record.total_tokens or not stored.fingerprint_ok or tokens == []:
            return resident
        try:
            entries = self.meta.entries(session_id)
        except NotFoundError:
            return resident
        limit = len(tokens) if tokens is not None else entries[-1].token_end if entries else 0
        plan: list[tuple[Entry, StoreTier]] = []
        for entry in entries:
            store = self._store_for(entry)
            if store is None or entry.token_offset >= limit:
                break
            plan.append((entry, store))
        if not plan or self._slower_than_recompute(plan):
            return resident
        total = min(plan[-1][0].token_end, limit)
        began = time.perf_counter()
        resident.blocks = self._allocate(self.pool.blocks_for(total), exclude=session_id)
        pin = self.mover.cuda
        reads = [self._io.submit(store.read, entry, pin) for entry, store in plan]
        previous, loaded, nbytes = root_hash(self.fingerprint), 0, 0
        in_flight: list[torch.Tensor] = []  # host sources of copies not yet known to be done
        try:
            for (entry, _), future in zip(plan, reads):
                try:
                    kv, span = future.result()
                    if chain_hash(previous, span) != entry.prefix_hash:
                        raise IntegrityError(f"{entry.key!r}: its tokens do not hash to the entry's prefix hash")
                except (IntegrityError, NotFoundError) as exc:
                    log.warning("dropping stored KV of session %r from token %d: %s", session_id,
                                entry.token_offset, exc)
                    self._drop_from(session_id, stored, entry)
                    break
                except KVSwapError as exc:
                    log.warning("store unavailable for session %r: %s", session_id, exc)
                    break
                wanted = span if tokens is None else tokens[entry.token_offset:entry.token_end]
                take = min(common_prefix(span, wanted), total - entry.token_offset)
                # Asynchronous on a GPU: this entry's copy overlaps the wait for the next one.
                self.mover.scatter(kv[:, :, :take], resident.blocks, entry.token_offset, per_layer=True)
                in_flight.append(kv)
                resident.tokens.extend(span[:take])
                loaded += take
                nbytes += entry.size
                if take < len(span):
                    break
                stored.entries.append((entry.token_end, entry.prefix_hash))
                previous = entry.prefix_hash
        except BaseException:
            self.mover.synchronize()
            self.pool.free(resident.blocks)
            raise
        finally:
            for future in reads:
                future.cancel()
            concurrent.futures.wait(reads)
        self.mover.synchronize()
        in_flight.clear()
        self._count_in(nbytes, time.perf_counter() - began, loaded)
        self._trim_blocks(resident.blocks, loaded)
        return resident

    def _slower_than_recompute(self, plan: Sequence[tuple[Entry, StoreTier]]) -> bool:
        if self._recompute_rate is None or not self.recompute_when_faster:
            return False
        per_store: dict[str, int] = {}
        tokens = 0
        for entry, store in plan:
            per_store[store.location] = per_store.get(store.location, 0) + entry.size
            tokens += entry.token_length
        load = 0.0
        for store in {s.location: s for _, s in plan}.values():
            bandwidth = store.read_bandwidth
            if bandwidth is None:
                return False
            load += per_store[store.location] / bandwidth
        if load > tokens / self._recompute_rate:
            self.stats.skipped_slower_than_recompute += 1
            return True
        return False

    def _drop_from(self, session_id: str, stored: StoredState, entry: Entry) -> None:
        """Remove ``entry`` and all after it from meta (their data is bad or gone)."""
        try:
            session, removed = self.meta.truncate(session_id, stored.version, entry.token_offset)
        except KVSwapError as exc:
            log.warning("could not drop bad entries of session %r: %s", session_id, exc)
            return
        stored.version, stored.meta_total = session.version, session.total_tokens
        self.stats.dropped_entries += len(removed)
        self._delete_blobs(removed)

    # ---- internals: handles ----------------------------------------------------------------

    def _reserve(self, session_id: str, resident: _Resident, num_tokens: int) -> None:
        with self._lock:
            need = self.pool.blocks_for(num_tokens) - len(resident.blocks)
            if need > 0:
                resident.blocks.extend(self._allocate(need, exclude=session_id))

    def _finish(self, session_id: str, resident: _Resident) -> None:
        with self._lock:
            if resident.pending is not None:
                self.mover.synchronize()
                resident.pending = None
            try:
                self._trim_blocks(resident.blocks, len(resident.tokens))
                if self.policy == "write-through" and resident.stored.tokens < len(resident.tokens):
                    try:
                        self._store(session_id, resident.stored, resident.tokens, self._gatherer(resident.blocks))
                    except SwapError as exc:
                        log.warning("write-through deferred to eviction: %s", exc)
            finally:
                resident.pins -= 1
                if not resident.tokens:
                    self._release_blocks(session_id)
                self._release_lease(session_id)


class SessionHandle:
    """One request's hold on a session (a context manager; close it to unpin).

    ``cached``: how many leading tokens of the request already have their KV in ``blocks``.
    The engine calls :meth:`reserve` before writing KV for positions up to ``num_tokens``,
    and :meth:`commit` with every token whose KV the blocks now hold.
    """

    def __init__(self, cache: SessionCache, session_id: str, resident: _Resident, cached: int) -> None:
        self.cache = cache
        self.session_id = session_id
        self._resident = resident
        self.cached = cached
        self._closed = False

    def __enter__(self) -> SessionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def blocks(self) -> list[int]:
        return self._resident.blocks

    @property
    def layer_events(self) -> list | None:
        """CUDA events, one per layer, that the model must wait on before reading that layer's
        KV (a swap-in still in flight), or None."""
        return self._resident.pending[0] if self._resident.pending else None

    @property
    def tokens(self) -> list[int]:
        return self._resident.tokens

    def reserve(self, num_tokens: int) -> None:
        """Make room for KV of positions ``0..num_tokens-1`` (may swap other sessions out)."""
        self._check_open()
        self.cache._reserve(self.session_id, self._resident, num_tokens)

    def commit(self, tokens: Sequence[int]) -> None:
        """Record that the blocks hold the KV of ``tokens`` (the whole sequence, from 0)."""
        self._check_open()
        tokens = list(tokens)
        if len(tokens) > len(self._resident.blocks) * self.cache.pool.block_size:
            raise ValueError("commit covers more tokens than were reserved")
        kept = common_prefix(self._resident.tokens, tokens)
        if kept < len(self._resident.tokens):
            self._resident.stored.keep_up_to(kept)
        self._resident.tokens = tokens

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.cache._finish(self.session_id, self._resident)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session handle is closed")
