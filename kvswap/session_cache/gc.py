"""Garbage collection of a session store: expired sessions, and blobs no meta entry points to."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvswap.errors import IntegrityError, NotFoundError, VersionConflictError
from kvswap.session_cache.ranks import entry_key

if TYPE_CHECKING:
    from kvswap.meta import Session
    from kvswap.session_cache.store import SessionStore


def collect(store: SessionStore, in_use: Callable[[str], bool], forget: Callable[[str], None]) -> dict[str, int]:
    """:meth:`SessionStore.gc`: delete expired sessions (but those ``in_use``; ``forget`` is
    told of each one removed), then blobs that no entry points to and that are older than the
    store's ``gc_grace``, and what interrupted writes left in the stores. Returns counts."""
    def remove(session: Session) -> bool:
        if in_use(session.id):
            return False
        try:
            if not store.delete(session.id, expected_version=session.version):
                return False
        except VersionConflictError:
            return False  # touched meanwhile: no longer expired as seen
        forget(session.id)
        return True

    removed_sessions = sum(store.in_parallel(remove, store.meta.expired()))  # meta round trips overlap
    removed_blobs = 0
    referenced: set[tuple[str, str]] = set()
    cursor = None
    while True:
        page = store.meta.list_sessions(limit=1000, cursor=cursor)
        for session in page.sessions:
            try:
                referenced.update((e.connector, e.key) for e in store.meta.entries(session.id))
            except (NotFoundError, IntegrityError):
                continue
        if page.cursor is None:
            break
        cursor = page.cursor
    horizon = time.time() - store.gc_grace
    for tier in store.stores:
        orphans = [key for key in tier.connector.list(tier.prefix + "/")
                   if (tier.location, entry_key(key)) not in referenced
                   and (tier.key_time(key) or horizon) < horizon]
        tier.connector.delete_many(orphans)
        removed_blobs += len(orphans) + tier.connector.collect_garbage(store.gc_grace)
    return {"sessions": removed_sessions, "blobs": removed_blobs}


__all__ = ["collect"]
