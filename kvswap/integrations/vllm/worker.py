"""The connector's worker half: vLLM's KV memory, and the fetch, load and save jobs that move it.

It holds no meta store: the scheduler half plans and commits; this half only reads and writes
blobs (:class:`~kvswap.session_cache.store.SessionStore` opened for data only) and moves KV
between them and vLLM's blocks (:mod:`.kv_cache` on the CPU, :mod:`.gpu` on a GPU).

* A **fetch** reads and verifies a session's entries into host memory (pinned on a GPU; the
  host tier, ``host_bytes``, serves recent spans without a read) and holds them for the load.
* A **load** copies fetched tokens into the blocks vLLM allocated: on a GPU, on kvswap's own
  stream after the forwards already queued, reported finished when its copies are done.
* A **save** gathers a finished request's new tokens into host memory (on a GPU: after the
  forward that wrote them), reports the blocks free as soon as that copy is done, then writes
  the blobs and reports what it wrote, for the scheduler to commit.

Every job has a deadline; one that misses it is reported failed and abandoned (its late
results are dropped, its late blobs deleted), and the store it waited on is not asked again
for ``timeout`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any

import torch

from kvswap.errors import ConfigError, KVSwapError
from kvswap.integrations.vllm import outcomes, pacing
from kvswap.integrations.vllm.config import ConnectorConfig, kv_layout, kv_scales, kv_share, tp_rank, value_dtype
from kvswap.integrations.vllm.jobs import FetchJob, KVSwapConnectorMetadata, KVSwapWorkerMetadata, LoadJob, SaveJob
from kvswap.integrations.vllm.kv_cache import PagedKV, as_held, layer_writer
from kvswap.integrations.vllm.outcomes import Fetched, Held, Saved
from kvswap.integrations.vllm.pacing import ForwardClock, StoreHealth, StoreRates, bytes_by_location
from kvswap.session_cache.base import UNWRITTEN, SwapError
from kvswap.session_cache.ranks import rank_key, rank_view
from kvswap.session_cache.store import SessionStore
from kvswap.session_cache.tiers import Span, StoredState

log = logging.getLogger("vllm.kvswap")

#: Fetched KV not loaded or released within this many seconds is dropped (a lost release).
HOLD_SECONDS = 300.0
#: A store whose bandwidth was last measured longer ago than this (seconds) is read again in
#: the background when a fetch from it is skipped as slower than recomputing (a slow first read
#: must not keep it skipped for good); the probe reads at most PROBE_BYTES.
PROBE_AFTER, PROBE_BYTES = 30.0, 256 << 20
START_PROBE_BYTES = 64 << 20  # what each store is measured with at start (written, read, deleted)
#: How long a step with no forward waits for a load's copies to finish (seconds).
IDLE_WAIT = 0.002


@dataclasses.dataclass
class _Job:
    """A job running on a thread: its deadline, and whether it was abandoned (late)."""

    request_id: str
    deadline: float
    future: concurrent.futures.Future[Any] | None = None
    abandoned: bool = False
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)  # loads: done; saves: blocks out
    locations: tuple[str, ...] = ()  # the stores it waits on
    event: Any = None  # a GPU load: done when this CUDA event is
    keep: Any = None  # what must live until then (the host spans a GPU load copies from)


class WorkerSide:
    """The worker half of :class:`~kvswap.integrations.vllm.connector.KVSwapConnector`."""

    def __init__(self, vllm_config: Any, config: ConnectorConfig, block_size: int) -> None:
        self._vllm_config = vllm_config
        self.config = config
        self.block_size = block_size
        self.health = StoreHealth(config.timeout)
        self.kv: PagedKV | None = None
        self.store: SessionStore | None = None
        self.gpu: Any = None
        self._threads = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kvswap-job")
        self._copier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvswap-copy")  # GPU saves
        self._lock = threading.Lock()
        self._fetches: dict[str, _Job] = {}
        self._held: dict[str, tuple[list[Span], float]] = {}  # fetched, waiting for their load
        self._loads: dict[str, _Job] = {}
        self._saves: dict[str, _Job] = {}  # until their blocks are copied out
        self._writing: dict[str, tuple[SaveJob, _Job]] = {}  # then until their blobs are written
        self._fetched: dict[str, Fetched] = {}
        self._saved: dict[str, Saved] = {}
        self._held_saves: dict[str, Held] = {}
        self._load_errors: set[int] = set()
        self._received: set[str] = set()
        self._sent: set[str] = set()
        self.rates = StoreRates()  # each store's throughput, from the reads that kept it busy
        self._probing: set[str] = set()
        self.clock = ForwardClock()
        self._idle = False  # this step runs no forward
        self._capturing = False  # this step is vLLM capturing a CUDA graph
        self.rank = 0  # this worker's tensor-parallel rank (its reports are by rank)
        self.share, self.shares, self.writes = 0, 1, True  # its share of the KV heads (see config.kv_share)

    # ---- registration ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = kv_layout(self._vllm_config, self.config)
        self.rank = tp_rank(self._vllm_config.parallel_config)
        self.share, self.shares, self.writes = kv_share(self._vllm_config)
        if layout.itemsize == 1 and any(t.device.type != "cpu" for t in kv_caches.values()):
            raise ConfigError("kvswap's fp8 KV has run on vLLM's CPU backend only; on a GPU it is not supported yet "
                              "(use kv_cache_dtype auto)")
        self.kv = PagedKV.register(kv_caches, lambda name: layer_writer(self._vllm_config, name),
                                   num_layers=layout.num_layers, heads=layout.num_kv_heads, head_dim=layout.head_dim,
                                   dtype=layout.torch_dtype, block_size=self.block_size,
                                   values=value_dtype(self._vllm_config))
        if layout.itemsize == 1:
            layout = dataclasses.replace(layout, kv_scales=kv_scales(self._vllm_config, kv_caches))
        self.store = self.config.stack.open(layout, with_meta=False, minimum_entry_tokens=self.block_size)
        if self.kv.device.type == "cuda":
            from kvswap.integrations.vllm.gpu import GPUMover

            # Now, on this thread: vLLM captures its CUDA graphs next, and pinning host memory
            # on another thread meanwhile would invalidate the capture.
            pinned = pacing.pinned_blocks(self.config.stack.entry_bytes, self.config.stack.span_cache_bytes)
            self.store.use_pinned(pinned)
            self.gpu = GPUMover(self.kv, pinned)
        if self.config.recompute_when_faster:  # CPU work only: safe beside vLLM's graph capture
            self._threads.submit(pacing.measure_stores, self.store, START_PROBE_BYTES, self.rates)
        log.info("kvswap worker: %s on %s, blocks of %d tokens %d elements apart, pages %s", layout.fingerprint,
                 self.kv.device, self.block_size, self.kv.block_stride,
                 "strided" if self.kv.pages is not None else "element-mapped")

    # ---- each step ------------------------------------------------------------------------------

    def begin(self, meta: KVSwapConnectorMetadata) -> None:
        """A step begins (vLLM binds its connector metadata, before the forward in every
        version): time it when it computes enough tokens; a step of no tokens has no forward."""
        self._capturing = self.gpu is not None and torch.cuda.is_current_stream_capturing()
        if self._capturing:  # vLLM captures a CUDA graph: no event may be queried or waited on now
            return
        self._idle = meta.step_tokens == 0
        self.clock.start(meta.step_tokens, self.gpu is not None)

    def start(self, meta: KVSwapConnectorMetadata) -> None:
        """Start this step's jobs (vLLM's ``start_load_kv``: before the step's forward, or after
        it for asynchronous loads on vLLM >= 0.34; either order is safe, as the copies wait for
        an event recorded on the compute stream now)."""
        after = self._compute_done() if (meta.loads or meta.saves) else None
        with self._lock:
            for request_id in meta.releases:
                self._held.pop(request_id, None)
                job = self._fetches.pop(request_id, None)
                if job is not None:
                    job.abandoned = True
        for fetch in meta.fetches:
            self._start_fetch(fetch)
        for load in meta.loads:
            self._start_load(load, after)
        for save in meta.saves:
            self._start_save(save, after)

    def finished(self) -> tuple[set[str] | None, set[str] | None]:
        """(saves whose blocks may be freed, loads done) since the last call; jobs past their
        deadline are reported failed here."""
        if self._capturing:  # a step of vLLM's CUDA graph capture: nothing of kvswap's runs in it
            return None, None
        self.clock.stop()
        if self._idle and self.gpu is not None:
            self._wait_for_loads(IDLE_WAIT)
        now = time.monotonic()
        with self._lock:
            for request_id, job in list(self._fetches.items()):
                if job.future is None or job.future.done() or now < job.deadline:
                    continue
                job.abandoned = True
                del self._fetches[request_id]
                self._fetched[request_id] = Fetched(0, reason=outcomes.FETCH_TIMED_OUT)
                for location in job.locations:
                    self.health.down(location)
            for request_id, job in list(self._loads.items()):
                if job.event is not None and job.event.query():
                    job.ready.set()
                if job.ready.is_set():
                    del self._loads[request_id]
                    self._received.add(request_id)
            for request_id, job in list(self._saves.items()):
                if job.ready.is_set():  # the blocks are copied out: vLLM may reuse them
                    del self._saves[request_id]
                    self._sent.add(request_id)
            for request_id, (save, job) in list(self._writing.items()):
                if now >= job.deadline:
                    job.abandoned = True
                    del self._writing[request_id]
                    self._saved[request_id] = Saved(None, f"timed out after {save.seconds:.1f} s")
                    for location in job.locations:
                        self.health.down(location)
            for request_id, (_, since) in list(self._held.items()):
                if now - since > HOLD_SECONDS:
                    del self._held[request_id]
            sent, received = self._sent, self._received
            self._sent, self._received = set(), set()
        return sent or None, received or None

    def load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def worker_meta(self) -> KVSwapWorkerMetadata | None:
        with self._lock:
            if not self._fetched and not self._saved and not self._held_saves:
                return None
            meta = KVSwapWorkerMetadata({r: {self.rank: f} for r, f in self._fetched.items()},
                                        {r: {self.rank: s} for r, s in self._saved.items()},
                                        {r: {self.rank: h} for r, h in self._held_saves.items()})
            self._fetched, self._saved, self._held_saves = {}, {}, {}
        return meta

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._copier.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    # ---- fetches --------------------------------------------------------------------------------

    def _start_fetch(self, fetch: FetchJob) -> None:
        fetch = dataclasses.replace(fetch, entries=[rank_view(e, self.share, self.shares) for e in fetch.entries])
        job = _Job(fetch.request_id, time.monotonic() + fetch.seconds)
        with self._lock:
            self._fetches[fetch.request_id] = job
        spans = self._store().spans
        if all(entry.key in spans for entry in fetch.entries if entry.token_end > fetch.start):
            self._fetch(fetch, job)  # all in the host tier: no I/O, answered in this very step
            return
        job.future = self._threads.submit(self._fetch, fetch, job)

    def _fetch(self, fetch: FetchJob, job: _Job) -> None:
        spans, result = self._read(fetch, job)
        with self._lock:
            if job.abandoned or self._fetches.get(fetch.request_id) is not job:
                return
            del self._fetches[fetch.request_id]
            if result.end > fetch.start:
                self._held[fetch.request_id] = (spans, time.monotonic())
            self._fetched[fetch.request_id] = result

    def _read(self, fetch: FetchJob, job: _Job) -> tuple[list[Span], Fetched]:
        """Read and verify what the job asks; what arrived and what stopped it."""
        store = self._store()
        plan = store.plan_of(fetch.entries)
        waiting = [(entry, tier) for entry, tier in plan.entries
                   if entry.token_end > fetch.start and entry.key not in store.spans]  # read from a store
        gone = next((entry.token_offset for entry, _ in waiting if entry.checksum == UNWRITTEN), None)
        if gone is not None:  # a save's unwritten entries whose write failed: no store holds them
            if gone <= fetch.start:
                return [], Fetched(fetch.start, reason=outcomes.NOT_HELD)
            fetch = dataclasses.replace(fetch, end=min(fetch.end, gone))
            waiting = [(entry, tier) for entry, tier in waiting if entry.token_offset < gone]
        locations = {tier.location for _, tier in waiting}  # a store down matters only when read from
        job.locations = tuple(locations)
        if any(self.health.is_down(location) for location in locations):
            return [], Fetched(fetch.start, reason=outcomes.STORE_NOT_ANSWERING)
        planned = bytes_by_location((tier.location, entry.size) for entry, tier in waiting)
        if self.config.recompute_when_faster and self._slower(fetch, planned, waiting):
            return [], Fetched(fetch.start, reason=outcomes.SLOWER_THAN_RECOMPUTE)
        self.rates.started(planned)
        spans: list[Span] = []
        began = time.perf_counter()
        end = fetch.start
        try:
            for span in store.read(fetch.session, plan, fetch.tokens, limit=fetch.end, start=fetch.start,
                                   pin=self.gpu is not None, root=fetch.root or None):
                if job.abandoned:
                    break
                spans.append(span)
                end = min(fetch.end, span.entry.token_offset + span.take)
        except Exception as exc:  # noqa: BLE001 - a fetch that fails is a miss for what did not arrive
            log.warning("kvswap: fetching session %r stopped at token %d: %s", fetch.session, end, exc)
            plan.failure = plan.failure or exc
        seconds = time.perf_counter() - began
        self.rates.finished(planned, bytes_by_location((s.entry.connector, s.entry.size) for s in spans
                                                       if not s.cached))
        if plan.failure is not None and plan.damaged_at is None:
            for location in locations:
                self.health.down(location)
        elif spans:
            for location in locations:
                self.health.up(location)
        cached = [span.cached for span in spans]
        source = "host" if cached and all(cached) else "store" if not any(cached) else "host+store"
        damaged = plan.damaged_at
        return spans, Fetched(end, source=source if spans else "", damaged_at=damaged,
                              rejected=max(0, fetch.end - damaged) if damaged is not None else 0,
                              reason=str(plan.failure or ""), nbytes=sum(s.entry.size for s in spans if not s.cached),
                              seconds=seconds, share=self.share,
                              checksums=[span.checksum for span in spans] if self.shares > 1 else [])

    def _slower(self, fetch: FetchJob, planned: dict[str, int], waiting: list[Any]) -> bool:
        """Whether reading ``waiting`` (the fetch's entries not in the host tier, ``planned``
        bytes from each store) is predicted to take longer than recomputing the fetch's tokens:
        each store's throughput, behind the reads already in flight, against the engine's
        measured prefill speed. Then a store not measured lately is probed in the background,
        so that a slow measurement does not keep it skipped for good."""
        per_token = self.clock.seconds_per_token
        if per_token is None or not planned:
            return False
        seconds = 0.0
        for location, nbytes in planned.items():
            predicted = self.rates.seconds(location, nbytes)
            if predicted is None:
                return False
            seconds += predicted
        if seconds <= (fetch.end - fetch.start) * per_token:
            return False
        with self._lock:
            stale = self.rates.stale(planned, PROBE_AFTER) - self._probing
            self._probing |= stale
        if stale:
            self._threads.submit(self._probe, fetch.session, [(e, t) for e, t in waiting if t.location in stale])
        return True

    def _probe(self, session: str, planned: list[Any]) -> None:
        """Measure the stores of ``planned`` entries again (nobody waits for the read)."""
        try:
            pacing.probe_entries(self._store(), session, [entry for entry, _ in planned], PROBE_BYTES, self.rates)
        finally:
            with self._lock:
                self._probing -= {tier.location for _, tier in planned}

    def _wait_for_loads(self, timeout: float) -> None:
        """A step with no forward: wait up to ``timeout`` for the GPU loads in flight, so the
        one that finishes is reported now rather than a spin of the engine loop later."""
        deadline = time.monotonic() + timeout
        with self._lock:
            events = [job.event for job in self._loads.values() if job.event is not None]
        while events and time.monotonic() < deadline:
            if any(event.query() for event in events):
                return
            time.sleep(0.0001)

    # ---- loads ----------------------------------------------------------------------------------

    def _start_load(self, load: LoadJob, after: Any) -> None:
        with self._lock:
            spans = self._held.pop(load.request_id, ([], 0.0))[0]
        pieces = [(span.kv, span.entry.token_offset, max(load.start, span.entry.token_offset),
                   min(load.end, span.entry.token_offset + span.take)) for span in spans]
        pieces = [piece for piece in pieces if piece[3] > piece[2]]
        job = _Job(load.request_id, float("inf"))
        covered = sum(high - low for _, _, low, high in pieces)
        if covered != load.end - load.start:  # nothing promised may be missing: recompute it
            log.warning("kvswap: request %s: %d of %d tokens to load are not held", load.request_id, covered,
                        load.end - load.start)
            self._fail_load(load, job)
            return
        if self.gpu is not None:
            job.event, job.keep = self.gpu.load(pieces, load.block_ids, after), pieces  # spans live until done
            with self._lock:
                self._loads[load.request_id] = job
            return
        with self._lock:
            self._loads[load.request_id] = job
        job.future = self._threads.submit(self._scatter, load, pieces, job)

    def _scatter(self, load: LoadJob, pieces: list[tuple[torch.Tensor, int, int, int]], job: _Job) -> None:
        assert self.kv is not None
        try:
            for kv, offset, low, high in pieces:
                self.kv.scatter(as_held(kv[:, :, low - offset:high - offset]), load.block_ids, low)
        except Exception:
            log.exception("kvswap: loading request %s into its blocks failed", load.request_id)
            self._fail_load(load, job)
        job.ready.set()

    def _fail_load(self, load: LoadJob, job: _Job) -> None:
        first, last = load.start // self.block_size, -(-load.end // self.block_size)
        with self._lock:
            self._load_errors.update(load.block_ids[first:last])
            self._loads[load.request_id] = job
        job.ready.set()

    # ---- saves ----------------------------------------------------------------------------------

    def _start_save(self, save: SaveJob, after: Any) -> None:
        store = self._store()
        job = _Job(save.request_id, time.monotonic() + save.seconds, locations=(store.stores[0].location,))
        with self._lock:
            self._saves[save.request_id] = job
        if not self.writes:  # another rank holds the same KV heads and writes them
            self._report_save(save, job, Saved([], replica=True))
            job.ready.set()
            return
        if self.health.is_down(store.stores[0].location):
            self._report_save(save, job, Saved(None, outcomes.STORE_NOT_ANSWERING))
            job.ready.set()
            return
        chunks = [(start, min(start + store.entry_tokens, len(save.tokens)))
                  for start in range(save.base, len(save.tokens), store.entry_tokens)]
        job.future = (self._copier if self.gpu is not None else self._threads).submit(self._save, save, job, chunks,
                                                                                       after)

    def _save(self, save: SaveJob, job: _Job, chunks: list[tuple[int, int]], after: Any) -> None:
        """Copy the request's KV out of its blocks, then write it. On a GPU this runs on the copy
        thread, which only pins host memory, launches the gather and waits for it (none of it on
        the engine's thread: pinning a GiB takes a fraction of a second), and hands the write to
        the job threads."""
        try:
            if self.gpu is not None:
                views, event = self.gpu.save(save.block_ids, chunks, after)
                event.synchronize()
            else:
                views = [self._gather(save.block_ids, start, stop) for start, stop in chunks]
        except Exception as exc:  # a save that fails is a later miss, never a failed request
            log.exception("kvswap: copying session %r out of its blocks failed", save.session)
            self._report_save(save, job, Saved(None, f"gather failed: {exc}"))
            return
        finally:
            job.ready.set()  # the blocks are no longer read
        if self.gpu is not None:
            job.future = self._threads.submit(self._write, save, job, chunks, views)
        else:
            self._write(save, job, chunks, views)

    def _write(self, save: SaveJob, job: _Job, chunks: list[tuple[int, int]], views: list[torch.Tensor]) -> None:
        store = self._store()
        with self._lock:
            if not job.abandoned:
                self._writing[save.request_id] = (save, job)
        spans = dict(zip(chunks, views))
        stored = StoredState(entries=[(save.base, save.base_hash)])  # base 0: the chain's root, the scheduler's
        began = time.perf_counter()
        try:
            specs = store.write_blobs(save.session, stored, save.tokens, lambda a, b: spans[(a, b)],
                                      lambda a, b: rank_key(store.stores[0].new_key(save.session, a, b, save.stamp),
                                                            self.share),
                                      held=lambda specs: self._report_held(save, job, specs))
        except SwapError as exc:
            self.health.down(store.stores[0].location)
            self._report_save(save, job, Saved(None, str(exc)))
            return
        self.health.up(store.stores[0].location)
        if not self._report_save(save, job, Saved(specs, nbytes=sum(s.size for s in specs),
                                                  seconds=time.perf_counter() - began)):
            store.delete_blobs(specs)  # too late: nothing will point at them

    def _report_held(self, save: SaveJob, job: _Job, specs: list[Any]) -> None:
        """The save's KV is in the host tier, unwritten: tell the scheduler (before the blobs are)."""
        with self._lock:
            if not job.abandoned:
                self._held_saves[save.request_id] = Held(specs)

    def _gather(self, block_ids: list[int], start: int, stop: int) -> torch.Tensor:
        assert self.kv is not None
        layout = self._store().layout
        out = torch.empty(layout.span_shape(stop - start), dtype=layout.torch_dtype)
        self.kv.gather(block_ids, start, stop, as_held(out))
        return out

    def _report_save(self, save: SaveJob, job: _Job, saved: Saved) -> bool:
        """Report a save's outcome; False if it missed its deadline (reported as such already)."""
        with self._lock:
            self._writing.pop(save.request_id, None)
            if job.abandoned:
                return False
            job.abandoned = True  # reported once
            self._saved[save.request_id] = saved
        if saved.specs is None:
            log.warning("kvswap: session %r not saved (its next turn recomputes): %s", save.session, saved.reason)
        return True

    # ---- helpers --------------------------------------------------------------------------------

    def _store(self) -> SessionStore:
        if self.store is None:
            raise KVSwapError("kvswap's worker has no KV registered yet")
        return self.store

    def _compute_done(self) -> Any:
        """An event after the work queued so far on the compute stream (None on the CPU)."""
        if self.gpu is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.gpu.device))
        return event


__all__ = ["WorkerSide"]
