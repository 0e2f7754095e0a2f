"""Keeping the leases of open sessions: a thread that renews them every ``ttl / 3`` seconds,
so a request longer than the lease TTL keeps its session."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvswap.session_cache.store import SessionStore


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
