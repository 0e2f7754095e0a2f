"""Planning a read: which of a session's stored entries a request can use, before any blob
is read (:meth:`SessionStore.plan <kvswap.session_cache.SessionStore.plan>` calls these).

Each entry is checked (well formed, contiguous, on a store this instance has) and the chained
prefix hash of the request's *own* token ids is recomputed over it: an entry is planned only
when the request's tokens hash to it, or (once, at the end) where the request leaves the
stored history inside it. Pure functions of the entries and the tokens: no meta, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvswap.meta import Entry, Session
from kvswap.session_cache.base import chain_hash, root_hash, token_bytes
from kvswap.session_cache.commit import well_formed
from kvswap.session_cache.tiers import Plan, StoredState, StoreTier


def verified(fingerprint: str, stores: Sequence[StoreTier], record: Session | None, stored: StoredState,
             tokens: Sequence[int] | None, entries: Sequence[Entry]) -> tuple[Plan, int | None]:
    """The plan of a request of ``tokens`` (None: everything stored) over ``entries``, and the
    token position of the first malformed entry (None when none is): the plan stops before it,
    and the caller drops it and what follows from meta. ``fingerprint`` is the KV's (the
    chain's root); an entry on a store not in ``stores`` ends the plan (a miss, not damage)."""
    plan = Plan(record, [], 0, False, stored)
    previous, position = root_hash(fingerprint), 0
    data = memoryview(token_bytes(tokens)) if tokens is not None else None  # converted once, not per entry
    tiers = {store.location: store for store in stores}
    malformed_at = None
    for entry in entries:
        if not well_formed(entry, position):
            malformed_at = position
            break
        store = tiers.get(entry.connector)
        if store is None:
            break
        if tokens is None or data is None:
            plan.entries.append((entry, store))
            position = entry.token_end
            continue
        if entry.token_offset >= len(tokens):
            break
        if entry.token_end <= len(tokens):
            following = chain_hash(previous, data[entry.token_offset * 4:entry.token_end * 4])
            if following == entry.prefix_hash:
                plan.entries.append((entry, store))
                plan.matched = entry.token_end
                previous, position = following, entry.token_end
                continue
        plan.entries.append((entry, store))  # the request leaves the stored history in here
        plan.partial = True
        break
    if tokens is None:
        plan.matched = position
    return plan, malformed_at


def as_planned(stores: Sequence[StoreTier], entries: Sequence[Entry], stored: StoredState | None = None) -> Plan:
    """A plan that reads ``entries`` as another process planned them (entries travel, tiers do
    not); an entry naming a store not in ``stores`` ends it."""
    tiers = {store.location: store for store in stores}
    planned: list[tuple[Entry, StoreTier]] = []
    for entry in entries:
        if entry.connector not in tiers:
            break
        planned.append((entry, tiers[entry.connector]))
    return Plan(None, planned, planned[-1][0].token_end if planned else 0, False, stored or StoredState())
