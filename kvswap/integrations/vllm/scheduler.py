"""The connector's scheduler half: what a request's session holds, what to fetch, load and save,
and the meta commit. It never waits for storage: meta reads and commits run on its own
threads with deadlines, and the worker half moves the data.

A request with a session goes through:

1. **lookup** (a thread): one meta read, and the session-store core's plan (each entry
   checked, the chained prefix hash of the request's own tokens recomputed over it). While it
   runs, vLLM is told to ask again next step (the request waits in the queue; others run).
2. **fetch** (the worker): the planned entries beyond vLLM's own prefix-cache hit are read and
   verified into host memory. Only what arrived verified is offered to vLLM, so what vLLM
   reports as cached is what kvswap really served (a damaged or missing entry is never
   promised, then recomputed behind the count's back).
3. **load** (the worker): into the blocks vLLM allocated, asynchronously.
4. **save** (when the request finishes): the worker writes the turn's new tokens (prompt and
   answer but the last token) as blobs; the scheduler then commits them to meta (a
   compare-and-swap; when another instance moved the session meanwhile, the commit appends
   what is missing or finds another history won: :meth:`SessionStore.commit`). The session's
   next request waits until the workers hold the save's KV in their host tiers, then is planned
   over it without waiting for the write or the commit (:mod:`.saves`); without a host tier, it
   waits for the commit, within the save's deadline.

A lookup, fetch or save that misses its deadline is a miss (or a save dropped); a meta store
that failed is not asked again for ``timeout`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any

from kvswap.errors import KVSwapError, NotFoundError
from kvswap.integrations.vllm.answers import NextTurn
from kvswap.integrations.vllm.config import ConnectorConfig, kv_layout, kv_share
from kvswap.integrations.vllm.jobs import (
    FetchJob,
    KVSwapConnectorMetadata,
    KVSwapWorkerMetadata,
    LoadJob,
    SaveJob,
)
from kvswap.integrations.vllm.outcomes import (
    PREFIX_CACHE_SHRANK,
    Fetched,
    Held,
    Saved,
    fetch_outcome,
    merge_fetched,
    merge_held,
    merge_saved,
)
from kvswap.integrations.vllm.saves import InFlightSaves, Save
from kvswap.integrations.vllm.stats import Counters, record_op
from kvswap.session_cache.base import root_hash
from kvswap.session_cache.store import SessionStore
from kvswap.session_cache.tiers import Plan, StoredState, new_stamp

log = logging.getLogger("vllm.kvswap")

#: How long a new request's lookup may hold the scheduler step before it is asked again next step.
LOOKUP_WAIT = 0.002
#: Seconds a fetch or save gets beyond ``timeout`` per byte it moves (a second per 256 MiB).
SECONDS_PER_BYTE = 1.0 / (256 << 20)
#: A worker reports a job's outcome at the end of a step: the scheduler waits this much longer.
REPORT_SLACK = 2.0
#: How often a request's fetch starts again when vLLM's own prefix-cache hit shrank while it ran
#: (other requests took those blocks): then the request recomputes what kvswap holds.
MAX_REFETCHES = 2


@dataclasses.dataclass
class _Request:
    """What the scheduler knows of one request of a session."""

    session: str
    tokens: list[int]
    deadline: float
    lookup: concurrent.futures.Future[Plan] | None = None
    plan: Plan | None = None
    phase: str = "lookup"  # lookup -> fetch -> ready -> loading -> done
    fetch_start: int = 0
    fetch_end: int = 0
    fetched: Fetched | None = None
    ready_end: int = 0
    load_blocks: frozenset[int] = frozenset()
    loaded: int = 0
    source: str = ""
    rejected: int = 0
    missed: str = ""  # why nothing was loaded (a lookup's or fetch's outcome), "" when it loaded or waits
    local: bool = False  # planned over a save this instance holds beyond meta (saves.Save.local)
    refetches: int = 0  # fetches started again because vLLM's prefix cache shrank meanwhile
    marks: dict[str, float] = dataclasses.field(default_factory=dict)  # phase -> monotonic time reached

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, time.monotonic())


class SchedulerSide:
    """The scheduler half of :class:`~kvswap.integrations.vllm.connector.KVSwapConnector`."""

    def __init__(self, vllm_config: Any, config: ConnectorConfig, block_size: int) -> None:
        self._vllm_config = vllm_config
        self.config = config
        self.block_size = block_size
        self.counters = Counters()
        self.layout = kv_layout(vllm_config, config)  # the weights' digest is hashed here, at start, if need be
        self.ranks = self.layout.tp_size  # each job is done once per tensor-parallel rank
        self.shares = kv_share(vllm_config)[1]  # blobs a span has (one per share of the KV heads)
        self._reports: dict[str, dict[str, dict[int, Any]]] = {"fetched": {}, "saved": {}, "held": {}}  # all ranks
        self._store: SessionStore | None = None  # what lookups and commits use (after a reset: a view)
        self._opened: SessionStore | None = None  # what was opened, closed at shutdown
        self._generation = 0  # bumped by each connector reset
        self._model = self.layout.model
        self._root = root_hash(self.layout.session_fingerprint)  # of every session's prefix chain (reset changes it)
        self._store_lock = threading.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kvswap-meta")
        self._requests: dict[str, _Request] = {}
        self._saves = InFlightSaves()
        self._meta_down_until = 0.0
        self._next = KVSwapConnectorMetadata()
        self._threads.submit(self._open_quietly)  # meta and stores open off the scheduler's thread
        self.next_turn: NextTurn | None = None  # set when the chat template rewrites answers sent back
        if config.trim_answers:
            self._threads.submit(self._ask_template, vllm_config)

    def _ask_template(self, vllm_config: Any) -> None:
        self.next_turn = NextTurn.of(vllm_config)

    @property
    def store(self) -> SessionStore:
        """The session-store core over meta (and the stores, for their locations). Opened on
        its own thread at start; called only from kvswap's threads, which wait for it (or open
        it again when the first try failed: meta down at start)."""
        with self._store_lock:
            if self._store is None:
                self._opened = self._store = self.config.stack.open(self.layout)
                log.info("kvswap connector: %s, meta %s, stores %s", self.layout.fingerprint,
                         self._store.meta.uri.render(), self._store.locations)
            return self._store

    def _open_quietly(self) -> None:
        try:
            self.store.meta.get("kvswap-startup-probe")
        except KVSwapError as exc:
            if not isinstance(exc, NotFoundError):
                log.warning("kvswap: meta store not ready at start (requests are misses until it is): %s", exc)

    def reset(self) -> bool:
        """A connector reset (vLLM's ``reset_prefix_cache(reset_connector=True)``, which RL
        frameworks call after updating the weights in place): from now on this instance records
        and finds sessions under a new identity, so KV computed before, here or by any instance
        still on the old weights, is a miss and never reaches the new weights. Lookups and
        fetches in flight end as misses; saves in flight are dropped and their blobs deleted."""
        self._generation += 1  # first: a commit that reads the store after this sees it and drops
        self.layout = dataclasses.replace(self.layout, model=f"{self._model}#reset-{uuid.uuid4().hex[:12]}")
        self._root = root_hash(self.layout.session_fingerprint)
        dropped = self._saves.drop_all()
        self._saves = InFlightSaves()
        with self._store_lock:
            if self._opened is not None:
                self._store = self._opened.for_layout(self.layout)
        for request_id, state in self._requests.items():
            if state.phase in ("fetch", "ready"):
                self._next.releases.append(request_id)
            state.phase, state.plan, state.missed = "done", None, "connector reset"
        if dropped:
            self._threads.submit(self.store.delete_blobs, dropped)
        self.counters.add("resets", "connector")
        log.warning("kvswap: connector reset: sessions are recorded as %s from now on; KV stored before is a miss",
                    self.layout.session_fingerprint)
        return True

    # ---- lookups --------------------------------------------------------------------------------

    def matched(self, request: Any, session: str, num_computed: int) -> tuple[int | None, bool]:
        """vLLM's ``get_num_new_matched_tokens`` for a request of ``session``."""
        now = time.monotonic()
        state = self._requests.get(request.request_id)
        if state is None:
            if self._saving(session, now):
                return None, False  # the previous turn's KV is on its way to the store (within its deadline)
            state = _Request(session, list(request.all_token_ids), now + self.config.timeout)
            state.mark("arrived")
            self._requests[request.request_id] = state
            local = self._saves.local(session)
            if local is not None:  # planned over what this instance holds: no meta read
                state.local = True
                stored, entries = local
                state.lookup = self._threads.submit(self.store.plan_over, session, None, stored, state.tokens, entries)
            elif now < self._meta_down_until:
                state.phase = "done"
                self.counters.add("lookups", "meta not answering")
                return 0, False
            else:
                state.lookup = self._threads.submit(self.store.lookup, session, state.tokens)
            concurrent.futures.wait([state.lookup], timeout=LOOKUP_WAIT)
        return self._advance(request.request_id, state, num_computed, now)

    def _advance(self, request_id: str, state: _Request, num_computed: int, now: float) -> tuple[int | None, bool]:
        if state.phase == "lookup":
            assert state.lookup is not None
            if not state.lookup.done():
                if now < state.deadline:
                    return None, False
                self._meta_failed(f"a lookup took over {self.config.timeout:.1f} s")
                return self._miss(state, "timed out")
            state.mark("looked up")
            try:
                plan = state.plan = state.lookup.result()
            except KVSwapError as exc:
                log.warning("kvswap: session %r not looked up (a miss): %s", state.session, exc)
                self._meta_failed(str(exc))
                return self._miss(state, "meta failed")
            last = len(state.tokens) - 1  # the last token is always computed: its logits pick the next one
            reusable = self._aligned(min(plan.end if plan.partial and self.config.probe_partial else plan.matched,
                                         last))
            if reusable <= num_computed:
                return self._miss(state, "miss" if not plan.entries else "held locally")
            return self._fetch(request_id, state, num_computed, reusable, now)
        if state.phase == "fetch":
            if state.fetched is None:
                if now < state.deadline:
                    return None, False
                self._next.releases.append(request_id)
                return self._miss(state, "fetch timed out")
            fetched = state.fetched
            end = self._aligned(fetched.end)
            if end <= state.fetch_start:
                self._next.releases.append(request_id)
                return self._miss(state, fetch_outcome(fetched))
            if num_computed < state.fetch_start:  # vLLM's prefix cache dropped some of its blocks meanwhile
                self._next.releases.append(request_id)
                if state.refetches >= MAX_REFETCHES:
                    return self._miss(state, PREFIX_CACHE_SHRANK)
                state.refetches += 1  # fetch again from where vLLM's hit ends now (likely from the host tier)
                return self._fetch(request_id, state, num_computed, end, now)
            state.phase, state.ready_end = "ready", end
        if state.phase == "ready":
            if state.ready_end <= num_computed:
                self._next.releases.append(request_id)
                return self._miss(state, "held locally")
            state.mark("promised")
            return state.ready_end - num_computed, True
        return 0, False

    def _fetch(self, request_id: str, state: _Request, start: int, end: int, now: float) -> tuple[None, bool]:
        """Ask the workers to fetch tokens ``start..end-1`` of the request's plan; ask vLLM to wait."""
        assert state.plan is not None
        state.phase, state.fetch_start, state.fetch_end, state.fetched = "fetch", start, end, None
        nbytes = sum(entry.size for entry, _ in state.plan.entries if entry.token_end > start)
        seconds = self.config.timeout + nbytes * SECONDS_PER_BYTE
        state.deadline = now + seconds + REPORT_SLACK
        self._next.fetches.append(FetchJob(request_id, state.session, [entry for entry, _ in state.plan.entries],
                                           start, end, state.tokens[:end], seconds, self._root))
        return None, False

    def _aligned(self, tokens: int) -> int:
        """``tokens`` rounded down to whole blocks with ``whole_blocks`` (as vLLM's own prefix
        cache reuses), else as is."""
        return tokens // self.block_size * self.block_size if self.config.whole_blocks else tokens

    def _miss(self, state: _Request, why: str) -> tuple[int, bool]:
        state.phase, state.missed = "done", why
        self.counters.add("lookups", why)
        return 0, False

    def fetched(self, request_id: str, reports: list[Fetched]) -> None:
        """Every rank's fetch of a request came back (rank order)."""
        state = self._requests.get(request_id)
        if state is None or state.phase != "fetch" or state.plan is None:
            self._next.releases.append(request_id)  # nobody waits for it any more
            return
        fetched = merge_fetched(reports, [entry for entry, _ in state.plan.entries], state.fetch_start,
                                state.fetch_end)
        state.fetched = fetched
        state.mark("fetched")
        state.source, state.rejected = fetched.source, fetched.rejected
        if fetched.rejected:
            self.counters.add("tokens rejected", "damaged or foreign", fetched.rejected)
        if fetched.damaged_at is not None and not state.local:  # (a local plan's is not meta's to drop)
            self._threads.submit(self._drop, state.session, state.plan, fetched.damaged_at)
        if fetched.nbytes:
            self.counters.add("bytes fetched", "store", fetched.nbytes)
        record_op("fetch", state.session, fetched.end - state.fetch_start, fetched.nbytes, fetched.seconds,
                  source=fetched.source, reason=fetched.reason)

    def _drop(self, session: str, plan: Plan, token_offset: int) -> None:
        """Remove damaged entries from meta (and their blobs): the next lookup does not plan them."""
        self.store.drop_from(session, StoredState(plan.stored.version, plan.stored.meta_total, [],
                                                  plan.stored.fingerprint_ok), token_offset)

    def _meta_failed(self, why: str) -> None:
        if time.monotonic() >= self._meta_down_until:
            log.warning("kvswap: meta store not answering (%s); requests are misses for %.0f s", why,
                        self.config.timeout)
        self._meta_down_until = time.monotonic() + self.config.timeout

    # ---- loads ----------------------------------------------------------------------------------

    def allocated(self, request: Any, block_ids: list[int], num_external: int) -> None:
        """vLLM's ``update_state_after_alloc``: blocks for the tokens promised; load them."""
        state = self._requests.get(request.request_id)
        if num_external <= 0 or state is None or state.phase != "ready":
            return
        start = state.ready_end - num_external
        self._next.loads.append(LoadJob(request.request_id, start, state.ready_end, block_ids))
        first, last = start // self.block_size, -(-state.ready_end // self.block_size)
        state.phase, state.loaded, state.load_blocks = "loading", num_external, frozenset(block_ids[first:last])
        state.mark("allocated")

    def hit_tier(self, request_id: str) -> str:
        """Where a request's loaded tokens came from, in vLLM's words: ``host`` (the worker's
        host tier alone), ``disk`` (file stores, local or shared), else ``remote``."""
        state = self._requests.get(request_id)
        if state is None or state.plan is None:
            return "remote"
        if state.source == "host":
            return "host"
        locations = {tier.location for _, tier in state.plan.entries}
        return "disk" if locations and all(loc.startswith("file:") for loc in locations) else "remote"

    def loads_finished(self, request_ids: set[str], invalid_blocks: set[int]) -> None:
        for request_id in request_ids:
            state = self._requests.get(request_id)
            if state is None:
                continue
            state.phase = "done"
            if state.load_blocks & invalid_blocks:
                self.counters.add("tokens loaded", "failed", state.loaded)
                state.loaded = 0
            else:
                self.counters.add("tokens loaded", state.source or "store", state.loaded)
            state.mark("loaded")
            began = state.marks["arrived"]
            record_op("load", state.session, state.loaded, 0, state.marks["loaded"] - began, source=state.source,
                      timeline_ms={phase: round((at - began) * 1e3, 2) for phase, at in state.marks.items()})

    # ---- saves ----------------------------------------------------------------------------------

    def finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's ``request_finished``: save the turn's new tokens; report what was reused."""
        state = self._requests.pop(request.request_id, None)
        self._reports["fetched"].pop(request.request_id, None)
        if state is None:
            return False, None
        if state.phase in ("fetch", "ready"):
            self._next.releases.append(request.request_id)
        report = {"kvswap": {"session": state.session, "loaded_tokens": state.loaded, "source": state.source,
                             "rejected_tokens": state.rejected, "missed": state.missed}}
        log.debug("kvswap: request %s of session %r: %d tokens loaded from %s, %d rejected", request.request_id,
                  state.session, state.loaded, state.source or "nowhere", state.rejected)
        plan = state.plan
        if plan is None or time.monotonic() < self._meta_down_until:
            return False, report  # nothing is known to build on, or meta cannot take it
        tokens = list(request.all_token_ids)
        computed = self._aligned(min(int(request.num_computed_tokens), len(tokens) - 1))  # the last token's: never
        computed = self._sent_again(request, tokens, computed, report["kvswap"])
        # What this turn builds on: the entries it loaded (its own KV beyond them is what it
        # computed), or, when it loaded nothing, those meta holds for its tokens, minus any found damaged.
        damaged = state.fetched.damaged_at if state.fetched is not None else None
        limit = state.ready_end if state.loaded else min(plan.matched, damaged if damaged is not None else plan.matched)
        kept = [(entry.token_end, entry.prefix_hash) for entry, _ in plan.entries if entry.token_end <= limit]
        base, base_hash = kept[-1] if kept else (0, self._root)  # from the start: the chain's root
        if computed <= base:
            return False, report
        nbytes = (computed - base) * self.layout.token_bytes
        seconds = self.config.timeout + nbytes * SECONDS_PER_BYTE
        stored = StoredState(plan.stored.version, plan.stored.meta_total, kept, plan.stored.fingerprint_ok)
        self._saves.add(request.request_id, Save(state.session, tokens[:computed], stored,
                                                 time.monotonic() + seconds + REPORT_SLACK,
                                                 [entry for entry, _ in plan.entries if entry.token_end <= limit],
                                                 generation=self._generation))
        self._next.saves.append(SaveJob(request.request_id, state.session, tokens[:computed], base, base_hash,
                                        list(block_ids), seconds, new_stamp()))
        return True, report  # the blocks stay until the worker has copied them out

    def _sent_again(self, request: Any, tokens: list[int], computed: int, report: dict[str, Any]) -> int:
        """``computed`` cut where the next turn stops sending this turn's answer again (a
        reasoning model's template drops its thinking): KV past that point is never reused."""
        prompt = int(getattr(request, "num_prompt_tokens", 0) or 0)
        if self.next_turn is None or computed <= prompt:
            return computed
        kept = self._aligned(min(computed, prompt + self.next_turn.kept(tokens[prompt:])))
        if kept < computed:
            dropped = report["unstored_tokens"] = computed - kept
            self.counters.add("tokens not stored", "not sent again", dropped)
            self.counters.add("bytes not stored", "not sent again", dropped * self.layout.token_bytes * self.shares)
        return kept

    def saved(self, request_id: str, reports: list[Saved]) -> None:
        """Every rank's save of a request came back (rank order)."""
        saved, orphans = merge_saved(reports)
        if orphans:  # some ranks wrote theirs: nothing will point at them
            self._threads.submit(self.store.delete_blobs, orphans)
        save, first = self._saves.written(request_id, saved)
        if save is None:
            if saved.specs is None:
                self.counters.add("saves", "not written")
            return
        self.counters.add("bytes saved", "store", saved.nbytes)
        record_op("save", save.session, len(save.tokens) - save.stored.tokens, saved.nbytes, saved.seconds)
        if first:  # else it follows the session's commit in flight (which it may build on)
            self._threads.submit(self._commit, request_id, save, saved)

    def held(self, request_id: str, reports: list[Held]) -> None:
        """Every rank holds a save's KV in its host tier, unwritten: the session's next turn
        may be planned over it (:mod:`.saves`)."""
        self._saves.held(request_id, merge_held(reports))

    def _commit(self, request_id: str, save: Save, saved: Saved) -> None:
        assert saved.specs is not None
        store, saves = self.store, self._saves  # read before the generation: reset() bumps it first
        if save.generation != self._generation:  # planned before a connector reset: KV of other weights
            store.delete_blobs(saved.specs)
            self.counters.add("saves", "dropped at reset")
            return
        outcome: str
        try:
            outcome = store.commit(save.session, save.stored, save.tokens, saved.specs)
        except KVSwapError as exc:
            log.warning("kvswap: session %r not recorded in meta (its next turn recomputes): %s", save.session, exc)
            self._meta_failed(str(exc))
            outcome = "meta failed"
        if outcome == "diverged":
            log.warning("kvswap: session %r not saved: another turn of it was stored meanwhile", save.session)
        self.counters.add("saves", outcome)
        following = saves.committed(request_id, save.session, landed=outcome in ("saved", "stored"))
        if following is not None:
            self._threads.submit(self._commit, *following)

    def _saving(self, session: str, now: float) -> bool:
        """Whether a save of ``session`` is in flight and not held (within its deadline);
        saves whose report never came by their deadline are forgotten here (counted as not
        written)."""
        saving, late = self._saves.waiting(session, now)
        for request_id in late:
            self._reports["saved"].pop(request_id, None)
            self._reports["held"].pop(request_id, None)
            self.counters.add("saves", "timed out")
        return saving

    def writing(self) -> bool:
        """Whether a worker is still writing a save: vLLM must keep stepping to hear of it."""
        return self._saves.writing(time.monotonic())

    # ---- each step ------------------------------------------------------------------------------

    def build_meta(self, scheduler_output: Any) -> KVSwapConnectorMetadata:
        meta, self._next = self._next, KVSwapConnectorMetadata()
        meta.step_tokens = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
        if not getattr(scheduler_output, "total_num_scheduled_tokens", 1) and (self._requests or self._saves):
            time.sleep(0.0005)  # an idle engine spins while kvswap's jobs run: let their threads have the GIL
        return meta

    def worker_output(self, worker_meta: Any) -> None:
        if not isinstance(worker_meta, KVSwapWorkerMetadata):
            return
        for request_id, by_rank in worker_meta.fetched.items():
            if (fetched := self._every_rank("fetched", request_id, by_rank)) is not None:
                self.fetched(request_id, fetched)
        for request_id, held_by_rank in worker_meta.held.items():
            if (held := self._every_rank("held", request_id, held_by_rank)) is not None:
                self.held(request_id, held)
        for request_id, saved_by_rank in worker_meta.saved.items():
            if (saved := self._every_rank("saved", request_id, saved_by_rank)) is not None:
                self.saved(request_id, saved)

    def _every_rank(self, kind: str, request_id: str, by_rank: dict[int, Any]) -> list[Any] | None:
        """Every rank's report of a request's job, in rank order, once all of them came (they
        may come in different steps); None until then."""
        waiting = self._requests if kind == "fetched" else self._saves
        if request_id not in waiting:  # gone (finished, or its save timed out): nobody waits for the rest
            if kind == "fetched":
                self._next.releases.append(request_id)
            elif kind == "saved":  # blobs nothing will point at
                self._threads.submit(self.store.delete_blobs, [spec for saved in by_rank.values()
                                                               for spec in saved.specs or ()])
            self._reports[kind].pop(request_id, None)
            return None
        pending = self._reports[kind]
        have = pending.setdefault(request_id, {})
        have.update(by_rank)
        if len(have) < self.ranks:
            return None
        del pending[request_id]
        return [have[rank] for rank in sorted(have)]

    def shutdown(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=False)
        if self._opened is not None:
            self._opened.close()
