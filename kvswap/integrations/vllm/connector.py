"""``KVSwapConnector``: a chat session's KV kept in kvswap's stores across turns, instances and restarts.

Turned on with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVSwapConnector",
        "kv_connector_module_path": "kvswap.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"meta": "postgresql://...", "store": "valkey://..."}}'

A request belongs to a session by its ``session_id`` (the request field or the
``X-Session-ID`` header, which vLLM puts on the request) or ``kv_transfer_params["session_id"]``
(offline ``LLM`` use). A request without one is left alone. Everything that decides what is
stored and whether stored KV may be used is kvswap's session-store core
(:class:`~kvswap.session_cache.store.SessionStore`), the same code the reference engine runs:

* **Load.** The scheduler asks the core what the session holds for the request's tokens: one
  meta read, each entry checked (well formed, contiguous, a store this instance has, the
  fingerprint) and the chained prefix hash of the request's own tokens recomputed over it;
  where the request leaves the stored history inside an entry, that entry's token ids (a
  small read) tell how far it agrees. vLLM allocates blocks; a worker thread reads the
  entries, verifies every blob (size, checksum, fingerprint, span, token ids) and scatters
  the KV into those blocks. The scheduler step never waits for it (an asynchronous load).
  Whatever fails to load (a store down, a damaged or missing blob: dropped from meta) is
  reported as blocks with load errors and recomputed, never served.
* **Save.** When a request finishes, its KV (prompt and generated tokens, all but the last
  token, whose KV was never computed) beyond what the session already stores is written as
  new entries, data first and meta second (compare-and-swap): the next turn reuses
  everything but its new message. The blocks stay allocated until the write is done
  (``request_finished`` delays their release); the scheduler never waits on storage. The
  session's next request waits in the queue (the scheduler asks again each step) until that
  save lands, for at most :data:`SAVE_WAIT` seconds, so a quick follow-up still finds its
  history. A failed save is logged and costs the next turn a recompute.
* **Identity.** Stored KV names the weights (their content digest, a kvswap save's
  checksums, or ``model_id``), dtype, shape, TP rank and vLLM's version, attention layout
  and block size (:mod:`.kv_cache`): KV of another model or layout is a miss.

Supported: vLLM's CPU attention backend (its ``cpu/LBHNC`` layout), one tensor-parallel rank,
one pipeline stage, full attention. Anything else is refused when the engine starts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvswap.connectors import open_connector
from kvswap.errors import ConfigError, KVSwapError, NotFoundError
from kvswap.integrations.vllm.config import ConnectorConfig, kv_layout
from kvswap.integrations.vllm.kv_cache import VLLMKVCache, engine_writer
from kvswap.meta import Entry, open_meta_store
from kvswap.session_cache.base import SwapError
from kvswap.session_cache.store import SessionStore
from kvswap.session_cache.tiers import Plan, StoredState

log = logging.getLogger("vllm.kvswap")

#: How long the next turn of a session waits for its previous turn's save to land (seconds).
SAVE_WAIT = 30.0  # under vLLM's logger: its handlers show our lines


@dataclasses.dataclass
class LoadJob:
    """Read the session's ``entries`` and put tokens ``start..end-1`` into ``block_ids``."""

    request_id: str
    session: str
    entries: list[Entry]
    start: int
    end: int
    block_ids: list[int]
    tokens: list[int]  # the request's tokens: what every loaded span is checked against


@dataclasses.dataclass
class SaveJob:
    """Store tokens ``stored[-1]..len(tokens)-1`` of a finished request from ``block_ids``."""

    request_id: str
    session: str
    tokens: list[int]
    block_ids: list[int]
    version: int | None
    meta_total: int
    stored: list[tuple[int, str]]  # (token end, prefix hash) of the entries this history extends
    fingerprint_ok: bool


@dataclasses.dataclass
class KVSwapConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = dataclasses.field(default_factory=list)
    saves: list[SaveJob] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Lookup:
    session: str
    plan: Plan
    reusable: int  # tokens of the request the store can give back (verified when loaded)
    tokens: int  # how many request tokens the lookup saw


class KVSwapConnector(KVConnectorBase_V1):
    """kvswap's session store as a vLLM KV connector (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ConfigError("kvswap's vLLM connector supports one tensor-parallel rank for now")
        # A cache miss must never fail a request: a load that fails is recomputed.
        if role == KVConnectorRole.SCHEDULER and transfer.kv_load_failure_policy != "recompute":
            log.info("kvswap: kv_load_failure_policy set to 'recompute' (a failed load is a miss)")
            transfer.kv_load_failure_policy = "recompute"
        self._store: SessionStore | None = None
        self._writer: Any = None
        self._store_lock = threading.Lock()
        # scheduler side
        self._lookups: dict[str, _Lookup] = {}
        self._saving: dict[str, tuple[str, float]] = {}  # request id -> (session, since): saves in flight
        self._loading: dict[str, tuple[int, set[int]]] = {}  # request id -> (end, blocks) of its load in flight
        self._failed: dict[str, int] = {}  # request id -> where its last load stopped short of
        self._loads: list[LoadJob] = []
        self._saves: list[SaveJob] = []
        # worker side
        self._kv: VLLMKVCache | None = None
        self._jobs = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kvswap-vllm")
        self._done_lock = threading.Lock()
        self._sent: set[str] = set()
        self._received: set[str] = set()
        self._load_errors: set[int] = set()
        self._started: set[tuple[str, str]] = set()

    # ---- the core, built on first use (the layout is resolved late in vLLM's start) ----------

    @property
    def store(self) -> SessionStore:
        with self._store_lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def _open_store(self) -> SessionStore:
        model = self._vllm_config.model_config
        kv_format, self._writer = engine_writer(self._vllm_config, model.dtype, model.get_head_size(), self.block_size)
        kv = kv_layout(self._vllm_config, self.config, kv_format)
        store = SessionStore(open_meta_store(self.config.meta), [open_connector(u) for u in self.config.stores], kv,
                             io_threads=self.config.io_threads,
                             entry_tokens=max(self.block_size, self.config.entry_bytes // kv.token_bytes),
                             session_ttl=self.config.session_ttl, span_cache_bytes=self.config.host_bytes)
        log.info("kvswap connector: %s, meta %s, stores %s", kv.fingerprint, store.meta.uri.render(), store.locations)
        return store

    # ---- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        session = session_of(request)
        if session is None:
            return 0, False
        if self._previous_turn_saving(session):
            return None, False  # ask again next step: the previous turn's KV is on its way to the store
        tokens = list(request.all_token_ids)
        lookup = self._lookups.get(request.request_id)
        failed = self._failed.pop(request.request_id, None)
        if lookup is None or lookup.tokens != len(tokens) or failed is not None:
            # After a failed load, meta no longer holds what failed (the worker dropped it);
            # and the next load must stop short of the last one, so a load never repeats.
            lookup = self._lookup(session, tokens)
            if lookup is None:
                return 0, False
            if failed is not None:
                lookup.reusable = min(lookup.reusable, failed - 1)
            self._lookups[request.request_id] = lookup
        if lookup.reusable <= num_computed_tokens:
            return 0, False
        return lookup.reusable - num_computed_tokens, True

    def _previous_turn_saving(self, session: str) -> bool:
        """Whether a save of this session is still in flight (not for longer than SAVE_WAIT:
        a store that stalls costs the next turn a recompute, not a stall)."""
        now = time.monotonic()
        return any(s == session and now - since < SAVE_WAIT for s, since in self._saving.values())

    def update_connector_output(self, connector_output: Any) -> None:
        for request_id in connector_output.finished_sending or ():
            self._saving.pop(request_id, None)
        invalid = set(connector_output.invalid_block_ids or ())
        for request_id in connector_output.finished_recving or ():
            end, blocks = self._loading.pop(request_id, (0, set()))
            if blocks & invalid:
                self._failed[request_id] = end

    def _lookup(self, session: str, tokens: list[int]) -> _Lookup | None:
        """What the store can give back for these tokens (None: meta unreachable, a miss)."""
        store = self.store
        try:
            try:
                record = store.meta.get(session)
            except NotFoundError:
                record = None
            plan = store.plan(session, record, tokens)
            matched = store.probe(plan, tokens) if self.config.probe_partial else plan.matched
        except KVSwapError as exc:
            log.warning("kvswap: session %r not looked up (a miss): %s", session, exc)
            return None
        # The last token is always computed: its logits choose the next one.
        return _Lookup(session, plan, min(matched, max(len(tokens) - 1, 0)), len(tokens))

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        lookup = self._lookups[request.request_id]
        end = lookup.reusable
        block_ids = list(blocks.get_block_ids()[0])
        self._loads.append(LoadJob(request.request_id, lookup.session, [e for e, _ in lookup.plan.entries],
                                   end - num_external_tokens, end, block_ids, list(request.all_token_ids)))
        self._loading[request.request_id] = (end, set(block_ids))

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = KVSwapConnectorMetadata(self._loads, self._saves)
        self._loads, self._saves = [], []
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        lookup = self._lookups.pop(request.request_id, None)
        self._loading.pop(request.request_id, None)
        self._failed.pop(request.request_id, None)
        if lookup is None:  # no session, or its lookup failed: nothing is known to build on
            return False, None
        tokens = list(request.all_token_ids)
        computed = min(int(request.num_computed_tokens), len(tokens) - 1)  # the last token's KV never was
        plan = lookup.plan
        stored = [(e.token_end, e.prefix_hash) for e, _ in plan.entries if e.token_end <= plan.matched]
        start = stored[-1][0] if stored else 0
        if computed <= start:
            return False, None
        self._saves.append(SaveJob(request.request_id, lookup.session, tokens[:computed], list(block_ids),
                                   plan.stored.version, plan.stored.meta_total, stored, plan.stored.fingerprint_ok))
        self._saving[request.request_id] = (lookup.session, time.monotonic())
        return True, None  # the blocks stay until the worker reports the save done

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that does not happen is a later miss, not lost data

    # ---- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = self.store.layout
        self._kv = VLLMKVCache.register(kv_caches, self._writer, num_layers=layout.num_layers,
                                        heads=layout.num_kv_heads, head_dim=layout.head_dim,
                                        dtype=layout.torch_dtype, block_size=self.block_size)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._bound()
        for job in meta.loads:
            if ("load", job.request_id) not in self._started:
                self._started.add(("load", job.request_id))
                self._jobs.submit(self._load, job)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads finish before their request is scheduled (asynchronous loads)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # whole turns are saved when they finish, not layer by layer

    def wait_for_save(self) -> None:
        meta = self._bound()
        for job in meta.saves:
            if ("save", job.request_id) not in self._started:
                self._started.add(("save", job.request_id))
                self._jobs.submit(self._save, job)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._done_lock:
            sent, received = self._sent, self._received
            self._sent, self._received = set(), set()
        for request_id in sent:
            self._started.discard(("save", request_id))
        for request_id in received:
            self._started.discard(("load", request_id))
        return sent or None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._done_lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self._jobs.shutdown(wait=True)
        if self._store is not None:
            self._store.close()

    def _record(self, kind: str, session: str, tokens: int, began: float) -> None:
        """One line of JSON per load or save to ``$KVSWAP_VLLM_STATS``, when set (benchmarks)."""
        path = os.environ.get("KVSWAP_VLLM_STATS")
        if not path or tokens <= 0:
            return
        record = {"op": kind, "session": session, "tokens": tokens, "bytes": tokens * self.store.layout.token_bytes,
                  "seconds": time.perf_counter() - began, "at": time.time()}
        with self._done_lock, open(path, "a") as out:
            out.write(json.dumps(record) + "\n")

    def _bound(self) -> KVSwapConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVSwapConnectorMetadata)
        return meta

    def _load(self, job: LoadJob) -> None:
        """Read, verify and scatter a load job; what does not arrive is a load error."""
        assert self._kv is not None
        store = self.store
        loaded = job.start
        began = time.perf_counter()
        try:
            tiers = {s.location: s for s in store.stores}
            plan = Plan(None, [(e, tiers[e.connector]) for e in job.entries], 0, False, StoredState())
            for span in store.read(job.session, plan, job.tokens, limit=job.end, start=job.start):
                offset = span.entry.token_offset
                low, high = max(offset, job.start), min(offset + span.take, job.end)
                if high > low:
                    self._kv.scatter(span.kv[:, :, low - offset:high - offset], job.block_ids, low)
                    loaded = high
        except Exception as exc:  # noqa: BLE001 - any failure of a load is a miss for what did not arrive
            log.warning("kvswap: loading session %r stopped at token %d: %s", job.session, loaded, exc)
        self._record("load", job.session, loaded - job.start, began)
        with self._done_lock:
            if loaded < job.end:
                first, last = loaded // self.block_size, -(-job.end // self.block_size)
                self._load_errors.update(job.block_ids[first:last])
            self._received.add(job.request_id)

    def _save(self, job: SaveJob) -> None:
        """Gather a finished request's new tokens and store them (data first, then meta)."""
        assert self._kv is not None
        kv_cache, layout = self._kv, self.store.layout
        stored = StoredState(job.version, job.meta_total, list(job.stored), job.fingerprint_ok)

        def fetch(start: int, stop: int) -> torch.Tensor:
            out = torch.empty(layout.span_shape(stop - start), dtype=layout.torch_dtype)
            kv_cache.gather(job.block_ids, start, stop, out)
            return out

        began = time.perf_counter()
        new_tokens = len(job.tokens) - stored.tokens
        try:
            self.store.write(job.session, stored, job.tokens, fetch)
            self._record("save", job.session, new_tokens, began)
        except SwapError as exc:
            log.warning("kvswap: session %r not saved (the next turn recomputes it): %s", job.session, exc)
        except Exception:
            log.exception("kvswap: saving session %r failed", job.session)
        finally:
            with self._done_lock:
                self._sent.add(job.request_id)


def session_of(request: Any) -> str | None:
    """A request's session: vLLM's ``session_id`` (request field or X-Session-ID header), or
    ``kv_transfer_params["session_id"]``; None when it has none (or an invalid one)."""
    from kvswap.meta import validate_session_id

    session = getattr(request, "session_id", None)
    if not session:
        params = getattr(request, "kv_transfer_params", None) or {}
        session = params.get("session_id") if isinstance(params, dict) else None
    if not session:
        return None
    try:
        return validate_session_id(session)
    except KVSwapError as exc:
        log.warning("kvswap: request %s has an unusable session id (served without kvswap): %s",
                    getattr(request, "request_id", "?"), exc)
        return None


