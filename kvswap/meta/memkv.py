"""``memkv://[name]``: sessions in this process's memory, no dependencies.

Stores opened with the same name share one space (like ``mem://`` connectors); with no name
each store is private. Nothing survives the process: use ``sqlite://`` for that.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from kvswap.errors import AlreadyExistsError
from kvswap.meta import rules
from kvswap.meta.base import MetaStore
from kvswap.meta.records import Entry, EntrySpec, LeaseError, Session, SessionPage
from kvswap.uri import URI


@dataclasses.dataclass
class _Space:
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    sessions: dict[str, Session] = dataclasses.field(default_factory=dict)
    entries: dict[str, list[Entry]] = dataclasses.field(default_factory=dict)
    order: list[bytes] = dataclasses.field(default_factory=list)  # UTF-8 ids, sorted
    ids: list[str] = dataclasses.field(default_factory=list)  # the same ids as str, same order
    leased: set[str] = dataclasses.field(default_factory=set)  # ids whose record names an owner

    def insert(self, session_id: str) -> None:
        encoded = session_id.encode("utf-8")
        position = bisect.bisect_left(self.order, encoded)
        self.order.insert(position, encoded)
        self.ids.insert(position, session_id)

    def remove(self, session_id: str) -> None:
        position = bisect.bisect_left(self.order, session_id.encode("utf-8"))
        del self.order[position], self.ids[position]
        self.leased.discard(session_id)


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


class MemKVMetaStore(MetaStore):
    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        name = (uri.host or "") + uri.path.strip("/")
        if name:
            with _SPACES_LOCK:
                self._space = _SPACES.setdefault(name, _Space())
        else:
            self._space = _Space()

    def _session(self, session_id: str) -> Session:
        """The stored session with its lease cleared if expired (caller holds the lock)."""
        session = self._space.sessions.get(session_id)
        if session is None:
            raise rules.not_found(session_id)
        if session.owner is not None and session.lease_expires is not None and session.lease_expires <= self.now():
            session = session._replace(owner=None, lease_expires=None)
            self._space.sessions[session_id] = session
            self._space.leased.discard(session_id)
        return session

    def _get(self, session_id: str) -> Session:
        with self._space.lock:
            return self._session(session_id)

    def _create(self, session: Session) -> Session:
        session_id = session.id
        with self._space.lock:
            if session_id in self._space.sessions:
                raise AlreadyExistsError(f"session {session_id!r} already exists")
            self._space.sessions[session_id] = session
            self._space.entries[session_id] = []
            self._space.insert(session_id)
        return session

    def _update(self, session_id: str, expected_version: int, fingerprint: str, ttl: float | None,
                attrs: Mapping[str, Any]) -> Session:
        with self._space.lock:
            new = self._updated(self._session(session_id), expected_version, fingerprint, ttl, attrs)
            self._space.sessions[session_id] = new
            return new

    def _append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        with self._space.lock:
            entries = self._space.entries.get(session_id, [])
            new, entry = self._appended(self._session(session_id), expected_version, spec, len(entries))
            entries.append(entry)
            self._space.sessions[session_id] = new
            return new, entry

    def _read(self, session_id: str) -> tuple[Session, list[Entry]]:
        with self._space.lock:
            return self._session(session_id), list(self._space.entries.get(session_id, []))

    def _entries(self, session_id: str) -> list[Entry]:
        with self._space.lock:
            entries = self._space.entries.get(session_id)
            if entries is None:
                raise rules.not_found(session_id)
            return list(entries)

    def _truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        with self._space.lock:
            session = self._session(session_id)
            new, kept, removed = self._truncated(session, expected_version, token_offset,
                                                 self._space.entries[session_id])
            self._space.entries[session_id] = kept
            self._space.sessions[session_id] = new
            return new, removed

    def _delete(self, session_id: str, expected_version: int | None) -> list[Entry]:
        with self._space.lock:
            session = self._session(session_id)
            if expected_version is not None:
                rules.check_version(session, expected_version)
            del self._space.sessions[session_id]
            self._space.remove(session_id)
            return self._space.entries.pop(session_id)

    def _list_sessions(self, after: str | None, wanted: rules.SessionFilter, limit: int) -> SessionPage:
        space = self._space
        with space.lock:
            start = 0 if after is None else bisect.bisect_right(space.order, after.encode("utf-8"))
            if not wanted.any():  # the common case, without a call per session
                ids = space.ids[start:start + limit]
                if not space.leased.isdisjoint(ids):
                    for session_id in space.leased.intersection(ids):
                        self._session(session_id)  # clears leases that expired
                sessions = list(map(space.sessions.__getitem__, ids))
                more = start + limit < len(space.ids)
                return SessionPage(sessions, rules.encode_cursor(ids[-1]) if more else None)
            page: list[Session] = []
            for position in range(start, len(space.ids)):
                session = self._session(space.ids[position])
                if wanted.matches(session):
                    page.append(session)
                if len(page) == limit:
                    more = position + 1 < len(space.ids)
                    return SessionPage(page, rules.encode_cursor(session.id) if more else None)
        return SessionPage(page, None)

    def _expired(self, limit: int) -> list[Session]:
        now = self.now()
        with self._space.lock:
            return [s for s in self._space.sessions.values() if s.is_expired(now)][:limit]

    def _acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        with self._space.lock:
            session = self._session(session_id)
            if session.owner not in (None, owner):
                raise LeaseError(f"session {session_id!r} is leased to {session.owner!r}",
                                 session.owner, session.lease_expires)
            return self._set_lease(session, owner, self.now() + ttl)

    def _renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        with self._space.lock:
            session = self._session(session_id)
            if session.owner != owner:
                raise LeaseError(f"{owner!r} does not hold the lease of session {session_id!r}",
                                 session.owner, session.lease_expires)
            return self._set_lease(session, owner, self.now() + ttl)

    def _release_lease(self, session_id: str, owner: str) -> bool:
        with self._space.lock:
            session = self._session(session_id)
            if session.owner != owner:
                return False
            self._set_lease(session, None, None)
            return True

    def _set_lease(self, session: Session, owner: str | None, expires: float | None) -> Session:
        session = session._replace(owner=owner, lease_expires=expires)
        self._space.sessions[session.id] = session
        if owner is None:
            self._space.leased.discard(session.id)
        else:
            self._space.leased.add(session.id)
        return session
