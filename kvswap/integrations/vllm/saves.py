"""The saves the connector's scheduler half has sent and not yet committed, and what of a
session this instance holds beyond meta meanwhile.

A save goes: sent to the workers, **held** (every rank's host tier holds its KV, unwritten),
**written** (its blobs are in the store), **committed** (meta points at them). Between held and
committed, the session's next turn does not wait: it is planned over the save's *local*
entries (what the turn built on, then its own, first unwritten, then written), which the
workers serve from their host tiers. Commits of one session run one at a time, in the order
their saves were written, so a turn built on an earlier one's entries finds them in meta (the
commit rebases on what meta holds: :mod:`kvswap.session_cache.commit`). When an earlier save
fails, the later one's commit finds meta without what it built on and gives up ("diverged"):
meta never points at what was not written; and no later turn is planned over the saves in
flight of that session any more (it waits for them, then reads meta), so one failed save does
not take every following turn's save with it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

from kvswap.integrations.vllm.outcomes import Saved
from kvswap.meta import Entry, EntrySpec
from kvswap.session_cache.base import UNWRITTEN
from kvswap.session_cache.tiers import StoredState

#: How many written entries (by key) a save added later still finds settled (its request began
#: before they were written; its entries came unwritten from the plan).
REMEMBERED_WRITES = 4096


@dataclasses.dataclass
class Save:
    """A finished request's save, until committed: the request's ``tokens`` up to the last
    computed one, the ``stored`` state its commit builds on and the ``kept`` entries it builds
    on (plus ``local`` once held: those, then its own)."""

    session: str
    tokens: list[int]
    stored: StoredState
    deadline: float
    kept: list[Entry] = dataclasses.field(default_factory=list)
    committing: bool = False
    local: list[Entry] | None = None
    trusted: bool = True  # False once a save it builds on failed: never planned over
    generation: int = 0  # the scheduler's identity when it was planned (a connector reset starts another)


class InFlightSaves:
    """The scheduler's saves by request id, thread-safe (vLLM's scheduler thread reports;
    kvswap's meta threads commit)."""

    def __init__(self) -> None:
        self._saves: dict[str, Save] = {}
        self._commits: dict[str, list[tuple[str, Save, Saved]]] = {}  # by session: the first one runs
        self._written: collections.OrderedDict[str, EntrySpec] = collections.OrderedDict()  # not known to fail
        self._lock = threading.Lock()

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._saves

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._saves)

    def add(self, request_id: str, save: Save) -> None:
        """A finished request's save; the entries it builds on that were written since its plan
        are taken as written (a later turn may be planned over it)."""
        with self._lock:
            save.kept = [self._as_written(entry) for entry in save.kept]
            self._saves[request_id] = save

    def held(self, request_id: str, specs: list[EntrySpec] | None) -> None:
        """Every rank holds the save's KV unwritten (``specs``; None: the ranks disagree)."""
        with self._lock:
            save = self._saves.get(request_id)
            if save is None or specs is None or save.local is not None or not save.trusted:
                return
            held = {entry.key for other in self._saves.values() if other.session == save.session and other.trusted
                    for entry in other.local or ()}
            if any(entry.checksum == UNWRITTEN and entry.key not in held for entry in save.kept):
                save.trusted = False  # built on a save that failed since
                return
            now = time.time()
            save.local = save.kept + [Entry.of(spec, save.session, len(save.kept) + i, now)
                                      for i, spec in enumerate(specs)]

    def written(self, request_id: str, saved: Saved) -> tuple[Save | None, bool]:
        """Every rank's report of the save came: (the save, whether its commit is to start now;
        False when it queues behind its session's commit in flight). The save is forgotten when
        nothing was written (None, False)."""
        with self._lock:
            save = self._saves.get(request_id)
            if save is None:
                return None, False
            if saved.specs is None:
                del self._saves[request_id]
                self._distrust(save.session)
                return None, False
            save.committing = True
            self._settle(save.session, saved.specs)
            queue = self._commits.setdefault(save.session, [])
            queue.append((request_id, save, saved))
            return save, len(queue) == 1

    def committed(self, request_id: str, session: str, landed: bool = True) -> tuple[str, Save, Saved] | None:
        """A commit ended (``landed``: meta holds its entries): forget its save; the session's
        next commit to start, if any."""
        with self._lock:
            self._saves.pop(request_id, None)
            queue = self._commits.get(session)
            if not queue:  # dropped meanwhile (a connector reset): nothing follows it
                return None
            if not landed:
                self._distrust(session)
                for spec in queue[0][2].specs or ():
                    self._written.pop(spec.key, None)  # a save added later built on these: not trusted
            queue.pop(0)
            if not queue:
                del self._commits[session]
                return None
            return queue[0]

    def _distrust(self, session: str) -> None:
        """A save of ``session`` will not land: later saves built on it will not either, so the
        session's next turn must not be planned over them; it waits for them, then reads meta."""
        for save in self._saves.values():
            if save.session == session:
                save.local, save.trusted = None, False

    def _settle(self, session: str, specs: list[EntrySpec]) -> None:
        """A save's blobs are written: its unwritten entries, wherever a save of ``session``
        holds them, become the written ones (with their checksums)."""
        self._written.update((spec.key, spec) for spec in specs)
        while len(self._written) > REMEMBERED_WRITES:
            self._written.popitem(last=False)
        for save in self._saves.values():
            if save.session == session:
                for entries in (save.kept, save.local or []):
                    entries[:] = [self._as_written(entry) for entry in entries]

    def _as_written(self, entry: Entry) -> Entry:
        spec = self._written.get(entry.key) if entry.checksum == UNWRITTEN else None
        return entry if spec is None else Entry.of(spec, entry.session_id, entry.seq, entry.created)

    def drop_all(self) -> list[EntrySpec]:
        """Forget every save (a connector reset); the specs of those written and not committed,
        whose blobs nothing will point at."""
        with self._lock:
            written = [spec for queue in self._commits.values() for _, _, saved in queue for spec in saved.specs or ()]
            self._saves.clear()
            self._commits.clear()
            return written

    def local(self, session: str) -> tuple[StoredState, list[Entry]] | None:
        """What of ``session`` this instance holds beyond meta (the held save that reaches
        furthest): the state a write over it builds on, and its entries. None when none is held."""
        with self._lock:
            held = [s for s in self._saves.values() if s.session == session and s.local]
            save = max(held, key=lambda s: s.local[-1].token_end if s.local else 0, default=None)
            if save is None or save.local is None:
                return None
            return StoredState(save.stored.version, save.stored.meta_total, [], True), list(save.local)

    def waiting(self, session: str, now: float) -> tuple[bool, list[str]]:
        """(Whether a save of ``session`` is in flight and not held, within its deadline: its
        next turn waits for it; the saves forgotten now, whose report never came by their
        deadline)."""
        with self._lock:
            late = [r for r, s in self._saves.items() if not s.committing and now >= s.deadline]
            for request_id in late:
                del self._saves[request_id]
            return any(s.session == session and now < s.deadline and s.local is None
                       for s in self._saves.values()), late

    def writing(self, now: float) -> bool:
        """Whether a worker is still writing a save (within its deadline)."""
        with self._lock:
            return any(not s.committing and now < s.deadline for s in self._saves.values())


__all__ = ["InFlightSaves", "Save"]
