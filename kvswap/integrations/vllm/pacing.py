"""What the worker half knows of its stores and its engine, to pace its jobs: which stores
stopped answering (paused for a while), how fast the engine prefills (what a fetch is
weighed against), and pinned host memory taken once at start.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvswap.session_cache.pinned import PinnedBlocks

if TYPE_CHECKING:
    from kvswap.meta import Entry
    from kvswap.session_cache.store import SessionStore

log = logging.getLogger("vllm.kvswap")

#: Steps of at least this many tokens are timed: the engine's prefill speed, what a fetch is weighed against.
TIMED_TOKENS = 512
#: Pinned host memory taken at start beside the host tier's own bytes, for the saves and reads
#: in flight (pinning runs at a few GB/s and holds the driver: a save or fetch must not pay for
#: it while the model runs).
WARM_PINNED_BYTES = 2 << 30
#: A blob's bytes beyond its entry's KV (header, token ids), which a block also holds.
BLOB_SLACK = 1 << 20


class StoreHealth:
    """Stores that failed recently are not asked again until ``pause`` seconds have passed
    (then one job tries; it fails again or they are back)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()

    def down(self, location: str) -> None:
        with self._lock:
            if location not in self._down:
                log.warning("kvswap: store %s is not answering; served as misses for %.0f s", location, self.pause)
            self._down[location] = time.monotonic() + self.pause

    def up(self, location: str) -> None:
        with self._lock:
            if self._down.pop(location, None) is not None:
                log.info("kvswap: store %s answers again", location)

    def is_down(self, location: str) -> bool:
        with self._lock:
            until = self._down.get(location)
            return until is not None and time.monotonic() < until


class ForwardClock:
    """The engine's prefill speed: the time of steps that compute at least TIMED_TOKENS
    tokens (on a GPU by CUDA events around the step's forward; on the CPU, whose forward runs
    between ``start_load_kv`` and ``get_finished``, by the wall clock), per token."""

    def __init__(self) -> None:
        self.seconds_per_token: float | None = None
        self._pending: list[tuple[Any, Any, int]] = []  # CUDA events of timed steps not yet done
        self._began: tuple[Any, int] | None = None

    def start(self, tokens: int, cuda: bool) -> None:
        self._began = None
        if tokens < TIMED_TOKENS:
            return
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._began = (event, tokens)
        else:
            self._began = (time.perf_counter(), tokens)

    def stop(self) -> None:
        if self._began is not None:
            began, tokens = self._began
            self._began = None
            if isinstance(began, float):
                self._add((time.perf_counter() - began) / tokens)
            else:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((began, end, tokens))
        while self._pending and self._pending[0][1].query():
            began, end, tokens = self._pending.pop(0)
            self._add(began.elapsed_time(end) / 1e3 / tokens)

    def _add(self, per_token: float) -> None:
        old = self.seconds_per_token
        self.seconds_per_token = per_token if old is None else 0.5 * old + 0.5 * per_token


#: A store's throughput is sampled once its reads have kept it busy this long (seconds).
RATE_SAMPLE_SECONDS = 0.05


@dataclasses.dataclass
class _Busy:
    """One store's reads in flight and what they moved since the last sample."""

    reads: int = 0
    pending: int = 0  # bytes planned by the reads in flight
    changed: float = 0.0  # when ``reads`` last changed
    busy: float = 0.0  # seconds with a read in flight since the last sample
    moved: int = 0  # bytes read since the last sample


class StoreRates:
    """Each store's throughput: bytes its reads moved per second that any read was in flight
    (so 32 reads sharing a store at once measure the store, not a 32nd of it), a moving average
    of samples of at least RATE_SAMPLE_SECONDS of busy time; and how long a new read of a
    store would take behind the reads already in flight."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._rates: dict[str, tuple[float, float]] = {}  # store -> (bytes/s, when sampled)
        self._busy: dict[str, _Busy] = {}
        self._lock = threading.Lock()

    def started(self, planned: Mapping[str, int]) -> None:
        """A read of ``planned[location]`` bytes from each location began."""
        with self._lock:
            now = self._clock()
            for location, nbytes in planned.items():
                busy = self._busy.setdefault(location, _Busy(changed=now))
                self._advance(busy, now)
                busy.reads += 1
                busy.pending += nbytes

    def finished(self, planned: Mapping[str, int], moved: Mapping[str, int]) -> None:
        """A read that :meth:`started` with ``planned`` ended, having read ``moved[location]``
        bytes from each location."""
        with self._lock:
            now = self._clock()
            for location, nbytes in planned.items():
                busy = self._busy.get(location)
                if busy is None or busy.reads == 0:
                    continue
                self._advance(busy, now)
                busy.reads -= 1
                busy.pending = max(0, busy.pending - nbytes)
                busy.moved += moved.get(location, 0)
                if busy.busy >= RATE_SAMPLE_SECONDS or (busy.reads == 0 and busy.busy > 0 and busy.moved):
                    self._sample(location, busy.moved / busy.busy, now)
                    busy.busy, busy.moved = 0.0, 0

    def measured(self, location: str, rate: float) -> None:
        """A throughput measured apart (at start: :func:`measure_stores`)."""
        with self._lock:
            self._sample(location, rate, self._clock())

    def seconds(self, location: str, nbytes: int) -> float | None:
        """How long reading ``nbytes`` from ``location`` would take now, behind the reads in
        flight; None if its throughput was never measured."""
        with self._lock:
            rate = self._rates.get(location)
            if rate is None:
                return None
            busy = self._busy.get(location)
            return ((busy.pending if busy is not None else 0) + nbytes) / rate[0]

    def stale(self, locations: Iterable[str], after: float) -> set[str]:
        """Those of ``locations`` not sampled in the last ``after`` seconds."""
        now = self._clock()
        with self._lock:
            return {loc for loc in locations if loc in self._rates and now - self._rates[loc][1] > after}

    @staticmethod
    def _advance(busy: _Busy, now: float) -> None:
        if busy.reads:
            busy.busy += now - busy.changed
        busy.changed = now

    def _sample(self, location: str, rate: float, now: float) -> None:
        if rate <= 0:
            return
        old = self._rates.get(location)
        self._rates[location] = (rate if old is None else 0.5 * old[0] + 0.5 * rate, now)


def bytes_by_location(sized: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The bytes of ``(location, nbytes)`` pairs, summed per location."""
    total: dict[str, int] = {}
    for location, nbytes in sized:
        total[location] = total.get(location, 0) + nbytes
    return total


def measure_stores(store: SessionStore, nbytes: int, rates: StoreRates) -> None:
    """At start, each store's read bandwidth (:meth:`SessionStore.probe` of ``nbytes``) told to
    ``rates``, so that the first fetch is weighed against recomputing too (a fresh process
    knew no bandwidth, and loaded its first follow-up from one Valkey slower than recomputing)."""
    for location, rate in store.probe(nbytes).items():
        rates.measured(location, rate)
        log.info("kvswap: %s reads at %.2f GB/s (measured at start)", location, rate / 1e9)


def probe_entries(store: SessionStore, session: str, entries: Sequence[Entry], limit: int, rates: StoreRates) -> None:
    """Read the first ``entries`` of a session, up to ``limit`` bytes (at least one), to
    measure their stores again (what the read moved, told to ``rates``)."""
    chosen, total = [], 0
    for entry in entries:
        if total and total + entry.size > limit:
            break
        chosen.append(entry)
        total += entry.size
    reading = bytes_by_location((entry.connector, entry.size) for entry in chosen)
    rates.started(reading)
    moved: dict[str, int] = {}
    try:
        moved = bytes_by_location((span.entry.connector, span.entry.size)
                                  for span in store.read(session, store.plan_of(chosen), None) if not span.cached)
    except Exception as exc:  # noqa: BLE001 - a probe that fails measures nothing
        log.info("kvswap: probing %s failed: %s", sorted(reading), exc)
    finally:
        rates.finished(reading, moved)


def pinned_blocks(entry_bytes: int, host_bytes: int) -> PinnedBlocks:
    """The worker's pinned host memory: ``host_bytes`` (the host tier's) plus
    WARM_PINNED_BYTES, three quarters in blocks that hold an entry's KV or its whole blob, a
    quarter in blocks a quarter of that, where saves gather and fetches read
    (:class:`~kvswap.session_cache.pinned.PinnedBlocks`)."""
    total = host_bytes + WARM_PINNED_BYTES
    whole, quarter = entry_bytes + BLOB_SLACK, entry_bytes // 4 + BLOB_SLACK  # a turn's last span is often short
    return PinnedBlocks([(whole, max(1, total * 3 // 4 // whole)), (quarter, total // 4 // quarter)])


__all__ = ["TIMED_TOKENS", "WARM_PINNED_BYTES", "ForwardClock", "StoreHealth", "StoreRates", "bytes_by_location",
           "measure_stores", "pinned_blocks", "probe_entries"]
