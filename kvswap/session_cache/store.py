"""The session-store core: what of a session is stored and verified, and moving its spans.

Every engine meets storage here and nowhere else: the LRU session manager
(:class:`~kvswap.session_cache.SessionCache`, over the reference engine's paged pool) and the
vLLM connector (:mod:`kvswap.integrations.vllm`) both call a :class:`SessionStore`. It knows
the meta store, the stores and the KV layout; it knows nothing of pools or blocks: spans come
in and go out as token-major host tensors ``[layers, 2, tokens, kv_heads, head_dim]``. It holds
no lock of its own and keeps no per-session state; callers keep a :class:`StoredState` per
session and serialise their own use of it.

The rules every engine gets from it:

* **Data first, meta second.** :meth:`SessionStore.write` stores a span's blobs (create-only,
  in parallel), then appends one entry per blob with a compare-and-swap on the session
  version. A failure leaves meta pointing at complete blobs only; a blob that no entry names
  is deleted at once, or by :meth:`SessionStore.gc` after a grace period.
* **Verify before use, in two steps.** :meth:`SessionStore.plan` (one meta read, no blob
  read) checks each entry (well formed, contiguous, a known store, the session's
  fingerprint) and the chained prefix hash of the *request's own tokens* over it: what it
  returns is what the store can give back for this request. :meth:`SessionStore.read` then
  checks each blob against its entry (size, checksum, fingerprint, span, shapes: before any
  buffer is allocated), its token ids against the chain and the request, and only then
  yields the KV. Damage of any kind in any stored byte or meta field ends reuse at that
  entry: it and every entry after it are dropped from meta and their blobs deleted, and the
  caller recomputes from there.
* **Leases.** :meth:`SessionStore.lease` takes a session's lease (creating the session at its
  first request) so that one instance at a time writes it; :meth:`renew` keeps it through
  long requests.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvswap.errors import (
    ConfigError,
    IntegrityError,
    InvalidKeyError,
    KVSwapError,
    NotFoundError,
    UnsupportedFormatError,
)
from kvswap.meta import Entry, EntrySpec, MetaStore, Session
from kvswap.session_cache import planning
from kvswap.session_cache.base import (
    DEFAULT_ENTRY_BYTES,
    UNWRITTEN,
    KVLayout,
    SwapError,
    chain_hash,
    common_prefix,
    entry_tokens_within,
    root_hash,
    token_bytes,
)
from kvswap.session_cache.commit import CommitOutcome, commit
from kvswap.session_cache.gc import collect
from kvswap.session_cache.leases import SessionLeases
from kvswap.session_cache.pinned import PinnedBlocks
from kvswap.session_cache.ranks import blob_keys
from kvswap.session_cache.tiers import Plan, Span, SpanCache, StoredState, StoreTier

if TYPE_CHECKING:
    import torch

    from kvswap.connectors.base import Connector

    HeldSpan = tuple[torch.Tensor, list[int], str, bytes, bool]  # KV, token ids, checksum, ids' bytes, held?

log = logging.getLogger("kvswap.session_cache")

#: What a damaged entry raises when read: a miss, its entry and all after it are dropped.
DAMAGE = (IntegrityError, NotFoundError, InvalidKeyError)

#: Bytes of entries a read keeps in flight beyond the one it waits for (at least one entry):
#: large entries are read (their chunks in parallel) about one after another, so the first
#: is ready early and its copy to the device overlaps the reads of the rest.
READ_AHEAD_BYTES = 512 << 20


class SessionStore(SessionLeases):
    """Sessions' spans in ``stores`` (new spans go to the first; entries naming any are read),
    recorded in ``meta``, for KV of ``layout``.

    A span longer than ``entry_tokens`` is stored as several entries, written (and later
    read) in parallel by ``io_threads`` threads. ``session_ttl`` is given to sessions this
    store creates; ``gc_grace`` spares young blobs that no entry names yet (their append may
    still be on its way). With ``layout`` None the store is for administration (listing,
    deleting, gc) of sessions that engines wrote: it moves no KV; with ``meta`` None it moves
    data only (reads and writes blobs; a damaged entry is reported in the plan, not dropped).
    ``owns_backends``: :meth:`close` closes ``meta`` and the connectors too (``StackSettings.open``'s).
    """

    def __init__(self, meta: MetaStore | None, stores: Sequence[Connector], layout: KVLayout | None, *,
                 key_prefix: str = "kv", io_threads: int = 8, entry_tokens: int | None = None,
                 session_ttl: float | None = None, gc_grace: float = 600.0, span_cache_bytes: int = 0,
                 owns_backends: bool = False) -> None:
        self.owns_backends = owns_backends
        self._meta = meta
        self._layout = layout
        self.fingerprint = layout.session_fingerprint if layout is not None else ""
        self.stores = [StoreTier(c, layout, key_prefix) for c in stores]
        self.entry_tokens = entry_tokens or (entry_tokens_within(DEFAULT_ENTRY_BYTES, layout)
                                             if layout is not None else 1)
        self.session_ttl = session_ttl
        self.gc_grace = gc_grace
        self.dropped_entries = 0
        self.spans = SpanCache(span_cache_bytes)
        self.pinned: PinnedBlocks | None = None  # pinned reads (``pin=True``) take their buffers here (use_pinned)
        self._io = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="kvswap-io")

    def for_layout(self, layout: KVLayout) -> SessionStore:
        """This store's meta, connectors and threads under ``layout``'s session fingerprint (a
        vLLM connector reset after a weight update: sessions recorded before are misses). The
        view owns nothing: close this store, not the view."""
        view = copy.copy(self)
        view._layout, view.fingerprint, view.owns_backends = layout, layout.session_fingerprint, False
        return view

    def use_pinned(self, blocks: PinnedBlocks) -> None:
        """Pinned reads take their buffers from ``blocks`` (else each is pinned when read), and
        the host tier counts the whole block each span it keeps holds (so it keeps at most its
        bytes of blocks, and the other blocks stay free for reads and saves in flight)."""
        self.pinned = blocks
        self.spans.footprint = blocks.footprint

    def __repr__(self) -> str:
        meta = self._meta.uri.render() if self._meta is not None else None
        return f"SessionStore({self.fingerprint!r}, meta={meta!r}, stores={self.locations})"

    @property
    def meta(self) -> MetaStore:
        """The meta store (ConfigError for a data-only store: an engine's worker that moves KV
        and leaves meta to its scheduler)."""
        if self._meta is None:
            raise ConfigError("this session store moves data only: it has no meta store")
        return self._meta

    @property
    def layout(self) -> KVLayout:
        """The KV this store moves (ConfigError for a store opened for administration only)."""
        if self._layout is None:
            raise ConfigError("this session store was opened for administration only: it moves no KV")
        return self._layout

    @property
    def locations(self) -> list[str]:
        return [s.location for s in self.stores]

    def check(self) -> None:
        """One round trip to meta and to each store: BackendUnavailableError (or ConfigError,
        for credentials) now, at startup, rather than at the first swap."""
        try:
            self.meta.get("kvswap-startup-probe")
        except NotFoundError:
            pass
        for store in self.stores:
            store.connector.exists(f"{store.prefix}/kvswap-startup-probe")

    def close(self, *, backends: bool | None = None) -> None:
        """Wait for I/O in flight and stop the I/O threads; close the meta store and the
        connectors too if this store owns them (``backends`` overrides), else they stay open."""
        self._io.shutdown(wait=True)
        if self.owns_backends if backends is None else backends:
            if self._meta is not None:
                self._meta.close()
            for tier in self.stores:
                tier.connector.close()

    # ---- reading: plan, then read -----------------------------------------------------------

    def state_of(self, record: Session | None) -> StoredState:
        """A fresh :class:`StoredState` for a session as meta recorded it."""
        stored = StoredState()
        if record is not None:
            stored.version, stored.meta_total = record.version, record.total_tokens
            stored.fingerprint_ok = record.fingerprint == self.fingerprint
        return stored

    def lookup(self, session_id: str, tokens: Sequence[int] | None) -> Plan:
        """:meth:`plan` for a request of ``tokens`` from one meta round trip (the session and
        its entries together). BackendUnavailableError if meta does not answer."""
        try:
            record, entries = self.meta.read(session_id)
        except NotFoundError:
            return self.plan(session_id, None, tokens)
        except IntegrityError:  # the entries do not decode: plan() reads the record alone and drops them
            return self.plan(session_id, self.meta.get(session_id), tokens)
        return self.plan(session_id, record, tokens, entries)

    def plan(self, session_id: str, record: Session | None, tokens: Sequence[int] | None,
             entries: Sequence[Entry] | None = None) -> Plan:
        """What to read for a request of ``tokens`` (None: everything stored) in session
        ``session_id`` whose meta record is ``record`` (and whose ``entries`` meta holds, read
        here when not given): no blob read. Malformed or non-contiguous entries are dropped
        from meta here."""
        stored = self.state_of(record)
        if record is None or not record.total_tokens or not stored.fingerprint_ok or tokens == []:
            return Plan(record, [], 0, False, stored)
        if entries is None:
            try:
                entries = self.meta.entries(session_id)
            except NotFoundError:
                return Plan(record, [], 0, False, stored)
            except IntegrityError as exc:  # meta cannot even decode them: nothing of it is usable
                log.warning("session %r: its entries are unreadable (%s); dropping them", session_id, exc)
                self.drop_from(session_id, stored, 0)
                return Plan(record, [], 0, False, stored)
        return self.plan_over(session_id, record, stored, tokens, entries)

    def plan_over(self, session_id: str, record: Session | None, stored: StoredState, tokens: Sequence[int] | None,
                  entries: Sequence[Entry]) -> Plan:
        """:meth:`plan` over ``entries`` as given: meta's, or ones this process knows beyond
        meta (a save it holds, unwritten), with ``stored`` the state its next write builds on."""
        plan, malformed_at = planning.verified(self.fingerprint, self.stores, record, stored, tokens, entries)
        if malformed_at is not None:
            log.warning("session %r: a malformed entry at token %d; dropping it and what follows",
                        session_id, malformed_at)
            self.drop_from(session_id, stored, malformed_at)
        return plan

    def plan_of(self, entries: Sequence[Entry], stored: StoredState | None = None) -> Plan:
        """A plan that reads ``entries`` (as another process planned them: entries travel, tiers
        do not); entries naming a store this instance does not have end it."""
        return planning.as_planned(self.stores, entries, stored)

    def read(self, session_id: str, plan: Plan, tokens: Sequence[int] | None, *, limit: int | None = None,
             start: int = 0, pin: bool = False, root: str | None = None) -> Iterator[Span]:
        """Read the plan's entries (in parallel, within ``READ_AHEAD_BYTES`` beyond the one waited
        for; those in the host tier at once; yielded in order), each verified against its entry,
        the prefix-hash chain and ``tokens`` (None: taken as stored), up to ``limit`` tokens.
        Entries that end by ``start`` are not read (the caller holds those tokens; with ``tokens``
        given, :meth:`plan` verified them by hash). Stops at the first entry that is damaged
        (dropped from meta with all after it: ``plan.stored`` follows), unavailable (kept), or
        diverges from ``tokens``. Closing the iterator early cancels the reads not yet started.
        ``root``: the chain's root when it is not this store's (a vLLM scheduler's, after a reset)."""
        if start and tokens is None:
            raise ValueError("reading from a start position needs the request's tokens")
        held = [entry for entry, _ in plan.entries if entry.token_end <= start]
        wanted = [(e, s) for e, s in plan.entries[len(held):] if limit is None or e.token_offset < limit]
        reads: list[concurrent.futures.Future[HeldSpan] | HeldSpan] = []  # a future, or a span of the host tier
        charged: list[int] = []  # each read's bytes against the read-ahead budget (0: from the host tier)
        reading = 0  # bytes of the store reads started and not yet waited for
        own = memoryview(token_bytes(tokens)) if tokens is not None else None  # converted once, not per entry

        def read_ahead(waiting: int) -> None:  # start reads from entry ``waiting`` on, within the budget
            nonlocal reading
            while len(reads) < len(wanted):
                entry, store = wanted[len(reads)]
                if (held_span := self.spans.get(entry.key)) is not None:  # in the host tier: no I/O, no thread
                    reads.append((*held_span, True))
                    charged.append(0)
                    continue
                if len(reads) > waiting and reading + entry.size > READ_AHEAD_BYTES:
                    return
                reads.append(self._io.submit(self._read_entry, entry, store, pin))
                charged.append(entry.size)
                reading += entry.size

        previous = held[-1].prefix_hash if held else root or root_hash(self.fingerprint)
        plan.stored.entries.extend((entry.token_end, entry.prefix_hash) for entry in held)
        try:
            for position, (entry, _) in enumerate(wanted):
                read_ahead(position)
                try:
                    read = reads[position]
                    kv, span, checksum, stored_ids, cached = read if isinstance(read, tuple) else read.result()
                    reading -= charged[position]
                    read_ahead(position + 1)
                    if chain_hash(previous, stored_ids) != entry.prefix_hash:
                        raise IntegrityError(f"{entry.key!r}: its tokens do not hash to the entry's prefix hash")
                except UnsupportedFormatError as exc:  # a newer kvswap's data: a miss here, kept for it
                    log.warning("session %r: KV from %d kept, unreadable: %s", session_id, entry.token_offset, exc)
                    plan.failure = exc
                    return
                except DAMAGE as exc:
                    plan.damaged_at, plan.failure = entry.token_offset, exc
                    if self._meta is None:  # a data-only store: its caller drops them from meta
                        log.warning("session %r: stored KV from token %d is damaged: %s", session_id,
                                    entry.token_offset, exc)
                        return
                    log.warning("dropping stored KV of session %r from token %d: %s", session_id,
                                entry.token_offset, exc)
                    self.drop_from(session_id, plan.stored, entry.token_offset)
                    return
                except KVSwapError as exc:
                    log.warning("store unavailable for session %r: %s", session_id, exc)
                    plan.failure = exc
                    return
                take = len(span) if own is None else common_prefix(stored_ids, own[entry.token_offset * 4:])
                if limit is not None:
                    take = min(take, limit - entry.token_offset)
                yield Span(entry, kv, span, take, cached, checksum)
                if take < len(span):
                    return
                plan.stored.entries.append((entry.token_end, entry.prefix_hash))
                previous = entry.prefix_hash
        finally:
            futures = [read for read in reads if not isinstance(read, tuple)]
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)

    def _read_entry(self, entry: Entry, store: StoreTier, pin: bool) -> HeldSpan:
        cached = self.spans.get(entry.key)
        if cached is not None:
            return (*cached, True)
        kv, tokens, checksum = store.read(entry, self._pinned_buffer if pin else None)
        ids = token_bytes(tokens)  # here, on an I/O thread, not in the reader's loop
        self.spans.put(entry.key, kv, tokens, checksum, ids)
        return kv, tokens, checksum, ids, False

    def _pinned_buffer(self, nbytes: int) -> torch.Tensor:
        """A pinned read buffer: lent by :attr:`pinned` where the worker set it, else pinned now."""
        if self.pinned is not None:
            return self.pinned.bytes(nbytes)
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def drop_from(self, session_id: str, stored: StoredState, token_offset: int) -> None:
        """Remove every entry ending after ``token_offset`` from meta (their data is bad or
        gone) and delete their blobs. Best effort: a failure is logged, a later read retries."""
        try:
            if stored.version is None:
                stored.version = self.meta.get(session_id).version
            session, removed = self.meta.truncate(session_id, stored.version, token_offset)
        except KVSwapError as exc:
            log.warning("could not drop bad entries of session %r: %s", session_id, exc)
            return
        stored.version, stored.meta_total = session.version, session.total_tokens
        stored.keep_up_to(session.total_tokens)
        self.dropped_entries += len(removed)
        self.delete_blobs(removed)

    def slower_than_recompute(self, plan: Plan, tokens_per_second: float | None) -> bool:
        """True if reading the plan is predicted to take longer than recomputing its tokens
        at ``tokens_per_second`` (each store's read bandwidth as observed so far)."""
        if tokens_per_second is None or not plan.entries:
            return False
        load = 0.0
        for entry, store in plan.entries:
            bandwidth = store.read_bandwidth
            if bandwidth is None:
                return False
            load += entry.size / bandwidth
        return load > plan.end / tokens_per_second

    # ---- writing ------------------------------------------------------------------------------

    def write(self, session_id: str, stored: StoredState, tokens: Sequence[int],
              fetch: Callable[[int, int], torch.Tensor]) -> int:
        """Store ``tokens[stored.tokens:]`` and record it: :meth:`write_blobs`, then
        :meth:`commit`. Returns the bytes written; SwapError if they could not be stored or
        recorded (meta then points only at complete blobs)."""
        specs = self.write_blobs(session_id, stored, tokens, fetch)
        if self.commit(session_id, stored, tokens, specs) == "diverged":
            raise SwapError(f"session {session_id!r} was not saved: its stored history diverged from this one")
        return sum(spec.size for spec in specs)

    def write_blobs(self, session_id: str, stored: StoredState, tokens: Sequence[int],
                    fetch: Callable[[int, int], torch.Tensor],
                    keys: Callable[[int, int], str] | None = None,
                    held: Callable[[list[EntrySpec]], None] | None = None) -> list[EntrySpec]:
        """The data half of a write: store ``tokens[stored.tokens:]`` (``fetch(a, b)`` gives the
        KV of tokens a..b-1 as a host tensor) as blobs of at most ``entry_tokens`` tokens,
        written in parallel (create-only; ``keys(a, b)`` names them, default: new keys). Returns
        the entries to :meth:`commit`, in token order. SwapError on any failure, after deleting
        what was written.

        With ``held``, the spans go into the host tier first, unwritten (kept there until
        written), and ``held`` gets the entries they will be (checksum :data:`UNWRITTEN`, size
        the KV's bytes) before any blob is written: this process can serve them at once.
        Not called when the host tier cannot hold them."""
        store = self.stores[0]
        writes: list[concurrent.futures.Future[EntrySpec]] = []
        spans: list[tuple[torch.Tensor, list[int]]] = []
        promised: list[EntrySpec] = []  # the unwritten entries the host tier holds
        try:
            previous = stored.entries[-1][1] if stored.entries else root_hash(self.fingerprint)
            for start in range(stored.tokens, len(tokens), self.entry_tokens):
                stop = min(start + self.entry_tokens, len(tokens))
                previous = chain_hash(previous, tokens[start:stop])
                key = keys(start, stop) if keys is not None else store.new_key(session_id, start, stop)
                kv = fetch(start, stop)
                spans.append((kv, list(tokens[start:stop])))
                if held is not None and self.spans.put(key, kv, spans[-1][1], UNWRITTEN, unwritten=True):
                    promised.append(EntrySpec(start, stop - start, store.location, key,
                                              kv.nbytes, UNWRITTEN, previous))
                writes.append(self._io.submit(store.write, session_id, kv, tokens[start:stop], start, previous, key))
            if held is not None and promised and len(promised) == len(spans):
                held(promised)
            concurrent.futures.wait(writes)
            specs = [write.result() for write in writes]
        except KVSwapError as exc:
            concurrent.futures.wait(writes)
            self._delete_keys(store, [w.result().key for w in writes if w.exception() is None])
            for spec in promised:
                self.spans.discard(spec.key)
            raise SwapError(f"could not store session {session_id!r}: {exc}") from exc
        for spec, (kv, span) in zip(specs, spans):
            self.spans.put(spec.key, kv, span, spec.checksum)
        return specs

    def commit(self, session_id: str, stored: StoredState, tokens: Sequence[int],
               specs: Sequence[EntrySpec]) -> CommitOutcome:
        """The meta half of a write: append ``specs`` (blobs :meth:`write_blobs` wrote for
        ``tokens``) after ``stored``, one compare-and-swap each, and update ``stored``; when meta
        moved since ``stored`` was read, rebase on it (:func:`~kvswap.session_cache.commit.commit`).
        Returns "saved", "stored" (meta already held all of it) or "diverged" (another history
        won: nothing appended). Blobs not appended are deleted. SwapError if meta failed."""
        return commit(self, session_id, stored, tokens, specs)

    def probe(self, nbytes: int) -> dict[str, float]:
        """Each store's read bandwidth in bytes/s, measured now as a fetch reads: about
        ``nbytes`` of whole entries written to it, read back in parallel and deleted (past
        the span cache: the store's own speed). A store that fails is left out (logged)."""
        import torch

        layout = self.layout
        kv = torch.zeros(layout.span_shape(self.entry_tokens), dtype=layout.torch_dtype)
        count = max(1, nbytes // (self.entry_tokens * layout.token_bytes))
        session, tokens = f"kvswap-probe-{time.time_ns()}", [0] * self.entry_tokens
        rates: dict[str, float] = {}
        for store in self.stores:
            writes = [self._io.submit(store.write, session, kv, tokens, i * self.entry_tokens, "probe")
                      for i in range(count)]
            concurrent.futures.wait(writes)
            written = [write.result() for write in writes if write.exception() is None]
            try:
                for write in writes:
                    write.result()  # the first write that failed fails the measurement
                began = time.perf_counter()
                reads = [self._io.submit(store.read, Entry.of(spec, session, i, 0.0)) for i, spec in enumerate(written)]
                for read in reads:
                    read.result()
                rates[store.location] = sum(spec.size for spec in written) / (time.perf_counter() - began)
            except Exception as exc:  # noqa: BLE001 - a store that cannot be measured is not measured
                log.warning("could not measure how fast %s reads: %s", store.location, exc)
            finally:
                self._delete_keys(store, [key for spec in written for key in blob_keys(spec)])
        return rates

    # ---- deleting -----------------------------------------------------------------------------

    def delete(self, session_id: str, expected_version: int | None = None) -> bool:
        """Delete the session from meta and its blobs; False if meta had no such session.
        VersionConflictError with ``expected_version`` if it moved on."""
        try:
            entries = self.meta.delete(session_id, expected_version=expected_version)
        except NotFoundError:
            return False
        self.delete_blobs(entries)
        return True

    def delete_blobs(self, entries: Sequence[EntrySpec | Entry]) -> None:
        """Best effort, one batch per store (meta no longer points at them; gc retries what fails)."""
        for store in self.stores:
            keys = [key for entry in entries if entry.connector == store.location and isinstance(entry.key, str)
                    for key in blob_keys(entry)]
            if keys:
                self._delete_keys(store, keys)

    @staticmethod
    def _delete_keys(store: StoreTier, keys: Sequence[str]) -> None:
        try:
            store.connector.delete_many(keys)
        except KVSwapError as exc:
            log.warning("could not delete %d blobs no entry points to (gc will retry): %s", len(keys), exc)

    def in_parallel(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``function`` over ``items`` on the store's I/O threads, results in order."""
        return self._io.map(function, items)

    def gc(self, in_use: Callable[[str], bool] = lambda session_id: False,
           forget: Callable[[str], None] = lambda session_id: None) -> dict[str, int]:
        """Delete expired sessions, ``io_threads`` at a time (except those ``in_use``;
        ``forget(id)``, which must be thread-safe, is told of each one removed), blobs that no
        meta entry points to and that are older than ``gc_grace`` seconds, and what
        interrupted writes left in the stores (counted with the blobs). Returns counts
        (:func:`~kvswap.session_cache.gc.collect`)."""
        return collect(self, in_use, forget)
