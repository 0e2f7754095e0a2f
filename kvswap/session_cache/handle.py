"""A request's hold on a session (:class:`SessionHandle`), what the session cache keeps of a
resident session (:class:`Resident`), and the cache's counters and per-session view."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from kvswap.errors import SessionBusyError
from kvswap.session_cache.base import common_prefix
from kvswap.session_cache.tiers import StoredState


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

    def count_in(self, nbytes: int, seconds: float, tokens: int) -> None:
        """One swap-in (HBM from the host tier or a store) of ``tokens`` tokens."""
        self.swap_in_bytes += nbytes
        self.swap_in_seconds += seconds
        self.swapped_in_tokens += tokens


class Claims:
    """Which operation holds each session now: one at a time (a request, a swap, a store...).

    ``take`` and the reads run under the owner's lock, which the caller holds; ``release``
    takes it."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._holders: dict[str, str] = {}

    def take(self, session_id: str, what: str) -> None:
        """Claim the session for ``what``; SessionBusyError if something holds it."""
        holder = self._holders.get(session_id)
        if holder is not None:
            raise SessionBusyError(f"session {session_id!r} is {'already ' if holder == what else ''}{holder}")
        self._holders[session_id] = what

    def release(self, session_id: str) -> None:
        with self._lock:
            self._holders.pop(session_id, None)

    @contextlib.contextmanager
    def held(self, session_id: str) -> Iterator[None]:
        """Release the session's claim (taken before) when the block ends, however it ends."""
        try:
            yield
        finally:
            self.release(session_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._holders

    def holder(self, session_id: str) -> str | None:
        return self._holders.get(session_id)

    def held_for(self, what: str) -> list[str]:
        with self._lock:
            return [session_id for session_id, holder in self._holders.items() if holder == what]


@dataclasses.dataclass(frozen=True)
class LocalState:
    """What this instance holds of one session (``SessionCache.local_state``)."""

    hbm_tokens: int = 0
    hbm_blocks: int = 0
    host_tokens: int = 0
    pinned: bool = False  # a request holds it open


@dataclasses.dataclass
class Resident:
    """What this instance holds of one session in HBM: its tokens' KV sits in ``blocks``."""

    tokens: list[int]  # ids whose KV the blocks hold, position by position
    blocks: list[int]
    stored: StoredState
    pending: tuple[list, object] | None = None  # per-layer copy events, and their sources (kept alive until done)


class HandleOwner(Protocol):
    """What a :class:`SessionHandle` asks of the cache that opened it (``SessionCache``)."""

    def reserve_blocks(self, session_id: str, resident: Resident, num_tokens: int) -> None:
        """Blocks for KV of positions ``0..num_tokens-1`` of the session (may swap others out)."""

    def close_request(self, session_id: str, resident: Resident) -> None:
        """The request is over: trim the blocks, write through if the policy says so, release
        the session's lease and claim."""


class SessionHandle:
    """One request's hold on a session (a context manager; close it to release the claim).

    ``cached``: how many leading tokens of the request already have their KV in ``blocks``.
    The engine calls :meth:`reserve` before writing KV for positions up to ``num_tokens``,
    and :meth:`commit` with every token whose KV the blocks now hold.
    """

    def __init__(self, session_id: str, resident: Resident, cached: int, *, block_size: int,
                 owner: HandleOwner) -> None:
        """``owner``: the cache that opened it, asked for blocks and told when it closes."""
        self.session_id = session_id
        self._block_size = block_size
        self._owner = owner
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

    def wait(self) -> None:
        """Order the current CUDA stream after the swap-in's copies (nothing to do when none
        are in flight). Call it before the model reads :attr:`blocks`, unless it waits on each
        layer's event of :attr:`layer_events` instead (letting later layers' copies overlap
        earlier layers' compute). The last event follows every copy: one stream records them."""
        events = self.layer_events
        if events:
            events[-1].wait()

    @property
    def tokens(self) -> list[int]:
        return self._resident.tokens

    def reserve(self, num_tokens: int) -> None:
        """Make room for KV of positions ``0..num_tokens-1`` (may swap other sessions out)."""
        self._check_open()
        self._owner.reserve_blocks(self.session_id, self._resident, num_tokens)

    def commit(self, tokens: Sequence[int]) -> None:
        """Record that the blocks hold the KV of ``tokens`` (the whole sequence, from 0)."""
        self._check_open()
        tokens = list(tokens)
        if len(tokens) > len(self._resident.blocks) * self._block_size:
            raise ValueError("commit covers more tokens than were reserved")
        kept = common_prefix(self._resident.tokens, tokens)
        if kept < len(self._resident.tokens):
            self._resident.stored.keep_up_to(kept)
        self._resident.tokens = tokens

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner.close_request(self.session_id, self._resident)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session handle is closed")
