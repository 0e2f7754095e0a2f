"""The meta half of a write: recording a turn's written blobs, when meta may have moved.

A turn's save is planned against the session as meta held it at the turn's lookup. By the
time its blobs are written, another instance may have saved a turn of the same session, or
damaged entries may have been dropped: the compare-and-swap on the session's version fails.
That is not a conflict when what meta holds still agrees with this turn's tokens: meta is read
again, what of it agrees is kept, and what this turn adds beyond it is appended (data first,
then a compare-and-swap on the fresh version). Only when meta holds another history (another
turn of the session won) is the save given up. Blobs that no entry will name are deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from kvswap.errors import AlreadyExistsError, KVSwapError, NotFoundError, VersionConflictError
from kvswap.meta import InvalidEntryError
from kvswap.session_cache.base import SwapError, chain_hash, root_hash
from kvswap.session_cache.tiers import StoredState

if TYPE_CHECKING:
    from kvswap.meta import Entry, EntrySpec
    from kvswap.session_cache.store import SessionStore

#: How often a commit reads meta again after losing a compare-and-swap before it gives up.
COMMIT_ATTEMPTS = 4

#: What a commit did: appended; found it all stored already; found another history.
CommitOutcome = Literal["saved", "stored", "diverged"]


def commit(store: SessionStore, session_id: str, stored: StoredState, tokens: Sequence[int],
           specs: Sequence[EntrySpec]) -> CommitOutcome:
    """Append ``specs`` (blobs written for ``tokens``, in token order) after ``stored``, one
    compare-and-swap each, updating ``stored``; rebase when meta moved (module docstring).
    SwapError if meta failed (then meta points only at complete blobs)."""
    pending = list(specs)
    in_flight: EntrySpec | None = None
    try:
        for _ in range(COMMIT_ATTEMPTS):
            try:
                prepare(store, session_id, stored)
                while pending:
                    assert stored.version is not None  # prepare() made the session
                    in_flight = pending[0]
                    session, _ = store.meta.append(session_id, stored.version, in_flight)
                    in_flight = None
                    spec = pending.pop(0)
                    stored.version, stored.meta_total = session.version, session.total_tokens
                    stored.entries.append((spec.token_end, spec.prefix_hash))
                return "saved"
            except (VersionConflictError, AlreadyExistsError, InvalidEntryError):
                in_flight = None  # a conflict appended nothing (nor an entry that does not follow meta's last)
                outcome, pending = _rebase(store, session_id, stored, tokens, pending)
                if outcome is not None:
                    return outcome
        raise VersionConflictError(f"session {session_id!r} kept changing under {COMMIT_ATTEMPTS} commits")
    except KVSwapError as exc:
        # A failure other than a conflict may have landed unseen: gc keeps that blob.
        pending = [spec for spec in pending if spec is not in_flight]
        raise SwapError(f"could not record session {session_id!r} in meta: {exc}") from exc
    finally:
        store.delete_blobs(pending)


def prepare(store: SessionStore, session_id: str, stored: StoredState) -> None:
    """Make the meta record ready for an append at ``stored.tokens``: create it (AlreadyExistsError:
    another instance made it meanwhile, and the commit rebases), adopt it for this model, or
    truncate entries beyond the history the turn kept."""
    meta = store.meta
    if stored.version is None and stored.entries:  # built on entries meta never had (an earlier save that failed)
        raise VersionConflictError(f"session {session_id!r} does not hold the history this save builds on")
    if stored.version is None:
        session = meta.create(session_id, store.fingerprint, ttl=store.session_ttl)
        stored.version, stored.meta_total, stored.entries = session.version, 0, []
    if not stored.fingerprint_ok:
        session = meta.update(session_id, stored.version, fingerprint=store.fingerprint)
        session, removed = meta.truncate(session_id, session.version, 0)
        store.delete_blobs(removed)
        stored.version, stored.meta_total, stored.entries, stored.fingerprint_ok = session.version, 0, [], True
    if stored.meta_total > stored.tokens:
        session, removed = meta.truncate(session_id, stored.version, stored.tokens)
        store.delete_blobs(removed)
        stored.version, stored.meta_total = session.version, session.total_tokens
        stored.keep_up_to(session.total_tokens)


def _rebase(store: SessionStore, session_id: str, stored: StoredState, tokens: Sequence[int],
            pending: list[EntrySpec]) -> tuple[CommitOutcome | None, list[EntrySpec]]:
    """After a conflict: read meta again and set ``stored`` to what of it agrees with
    ``tokens``, up to where ``pending`` can follow. Returns (an outcome, when there is nothing
    left to append; None to try again) and the specs still to append."""
    if not pending:
        return "stored", pending
    try:
        record, entries = store.meta.read(session_id)
    except NotFoundError:
        record, entries = None, []  # deleted meanwhile: ours may start it anew
    fresh = store.state_of(record)
    previous = root_hash(store.fingerprint)
    if fresh.fingerprint_ok:
        for entry in entries:
            if not well_formed(entry, fresh.tokens) or entry.token_end > len(tokens):
                break
            following = chain_hash(previous, tokens[entry.token_offset:entry.token_end])
            if following != entry.prefix_hash:
                return "diverged", pending
            fresh.entries.append((entry.token_end, following))
            previous = following
    if record is not None and fresh.fingerprint_ok and record.total_tokens >= pending[-1].token_end:
        return "stored", pending  # nothing of ours is new (or the rest is another turn's, longer)
    starts = {spec.token_offset: index for index, spec in enumerate(pending)}
    while fresh.entries and fresh.tokens not in starts:
        fresh.entries.pop()  # the stored tail ends inside one of our entries: ours replace it
    if fresh.tokens not in starts:
        return "diverged", pending  # no stored boundary ours can follow
    first = starts[fresh.tokens]
    store.delete_blobs(pending[:first])
    stored.version, stored.meta_total, stored.fingerprint_ok = fresh.version, fresh.meta_total, fresh.fingerprint_ok
    stored.entries = fresh.entries
    return None, pending[first:]


def well_formed(entry: Entry, position: int) -> bool:
    """An entry meta handed back is usable: typed fields, contiguous with what precedes it."""
    return (type(entry.token_offset) is int and type(entry.token_length) is int and type(entry.size) is int
            and entry.token_offset == position and entry.token_length > 0 and entry.size > 0
            and isinstance(entry.key, str) and isinstance(entry.connector, str)
            and isinstance(entry.checksum, str) and isinstance(entry.prefix_hash, str))
