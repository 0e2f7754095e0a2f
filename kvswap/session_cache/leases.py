"""Sessions' leases: taking, renewing and releasing one (:class:`SessionLeases`, part of
:class:`~kvswap.session_cache.store.SessionStore`), and a thread that renews those of open
sessions every ``ttl / 3`` seconds, so a request longer than the lease TTL keeps its session."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvswap.errors import AlreadyExistsError, BackendUnavailableError, NotFoundError, SessionBusyError
from kvswap.meta import LeaseError

if TYPE_CHECKING:
    from kvswap.meta import MetaStore, Session
    from kvswap.session_cache.store import SessionStore

log = logging.getLogger("kvswap.session_cache")


class SessionLeases:
    """One instance at a time writes a session: it holds the session's lease in meta."""

    fingerprint: str
    session_ttl: float | None

    @property
    def meta(self) -> MetaStore:
        raise NotImplementedError

    def lease(self, session_id: str, owner: str, ttl: float | None) -> Session | None:
        """The session's record, leased to ``owner`` for ``ttl`` seconds (None: no lease, just
        read it); a session is created at its first leased request. None when meta has no
        such session and leases are off. SessionBusyError if another owner holds the lease."""
        try:
            if ttl is None:
                return self.meta.get(session_id)
            try:
                return self.meta.acquire_lease(session_id, owner, ttl)
            except NotFoundError:
                try:
                    self.meta.create(session_id, self.fingerprint, ttl=self.session_ttl)
                except AlreadyExistsError:
                    pass
                return self.meta.acquire_lease(session_id, owner, ttl)
        except LeaseError as exc:
            raise SessionBusyError(f"session {session_id!r} is leased by {exc.owner!r}") from exc
        except NotFoundError:
            return None

    def renew(self, session_id: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s lease; False (logged) if it was lost or meta is unreachable."""
        try:
            self.meta.renew_lease(session_id, owner, ttl)
            return True
        except (LeaseError, NotFoundError, BackendUnavailableError) as exc:
            log.warning("could not renew the lease of session %r: %s", session_id, exc)
            return False

    def release(self, session_id: str, owner: str) -> None:
        try:
            self.meta.release_lease(session_id, owner)
        except (NotFoundError, BackendUnavailableError) as exc:
            log.warning("could not release the lease of session %r: %s", session_id, exc)


class LeaseRenewer:
    """Renews, for ``owner``, the leases of the sessions ``held()`` names, every ``ttl / 3``
    seconds (nothing at all when ``ttl`` is None). Started at the first request; closed once."""

    def __init__(self, store: SessionStore, owner: str, ttl: float | None, held: Callable[[], list[str]]) -> None:
        self.store, self.owner, self.ttl, self.held = store, owner, ttl, held
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.ttl is None or self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="kvswap-leases")
                self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self.ttl is not None
        while not self._closing.wait(self.ttl / 3):
            for session_id in self.held():
                self.store.renew(session_id, self.owner, self.ttl)
