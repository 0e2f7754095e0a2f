"""``KVSwapConnector``: a chat session's KV kept in kvswap's stores across turns, instances and restarts.

Turned on with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVSwapConnector",
        "kv_connector_module_path": "kvswap.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"meta": "postgresql://...", "store": "valkey://..."}}'

A request belongs to a session by its ``session_id`` (the request field or the
``X-Session-ID`` header, which vLLM puts on the request) or ``kv_transfer_params["session_id"]``
(offline ``LLM`` use). A request without one is left alone.

vLLM builds this class once in the scheduler process and once in each worker; it only
forwards to the half of its role: :class:`~.scheduler.SchedulerSide` (lookups, what to fetch,
load and save, the meta commit) and :class:`~.worker.WorkerSide` (vLLM's KV memory and the
jobs that move it). What crosses between them is plain data (:mod:`.jobs`). Everything that
decides what is stored and whether stored KV may be used is kvswap's session-store core
(:class:`~kvswap.session_cache.store.SessionStore`), the same code the reference engine runs.
Each request's outcome comes back in its ``kv_transfer_params`` (``{"kvswap":
{"loaded_tokens", "source", "rejected_tokens", "missed"}}``) and in vLLM's metrics (:mod:`.stats`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvswap.errors import KVSwapError
from kvswap.integrations.vllm.config import ConnectorConfig, check_kv_cache
from kvswap.integrations.vllm.jobs import KVSwapConnectorMetadata, KVSwapWorkerMetadata
from kvswap.integrations.vllm.scheduler import SchedulerSide
from kvswap.integrations.vllm.stats import KVSwapPromMetrics, KVSwapStats
from kvswap.integrations.vllm.worker import WorkerSide
from kvswap.meta import validate_session_id

log = logging.getLogger("vllm.kvswap")  # under vLLM's logger: its handlers show our lines


class KVSwapConnector(KVConnectorBase_V1):
    """kvswap's session store as a vLLM KV connector (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        if kv_cache_config is not None:
            check_kv_cache(kv_cache_config)
        block_size = int(vllm_config.cache_config.block_size)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            # A cache miss must never fail a request: a load that fails is recomputed.
            if transfer.kv_load_failure_policy != "recompute":
                log.info("kvswap: kv_load_failure_policy set to 'recompute' (a failed load is a miss)")
                transfer.kv_load_failure_policy = "recompute"
            self.scheduler = SchedulerSide(vllm_config, config, block_size)
        else:
            self.worker = WorkerSide(vllm_config, config, block_size)

    def _scheduler(self) -> SchedulerSide:
        assert self.scheduler is not None, "a scheduler-side call on a worker's connector"
        return self.scheduler

    def _worker(self) -> WorkerSide:
        assert self.worker is not None, "a worker-side call on the scheduler's connector"
        return self.worker

    # ---- scheduler side -----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        session = session_of(request)
        if session is None:
            return 0, False
        return self._scheduler().matched(request, session, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._scheduler().allocated(request, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._scheduler().build_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        scheduler = self._scheduler()
        scheduler.worker_output(getattr(connector_output, "kv_connector_worker_meta", None))
        scheduler.loads_finished(set(connector_output.finished_recving or ()),
                                 set(connector_output.invalid_block_ids or ()))

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        """vLLM >= 0.34: the tier that supplied a request's loaded tokens, for its metrics."""
        from vllm.v1.metrics.cache_hit_source import CacheHitSource  # only the versions that call this have it

        if num_external_tokens <= 0:
            return {}
        tier = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}.get(
            self._scheduler().hit_tier(request.request_id), CacheHitSource.EXTERNAL_UNSPECIFIED)
        return {tier: num_external_tokens}

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler().finished(request, list(block_ids))

    def reset_cache(self) -> bool | None:
        """``reset_prefix_cache(reset_connector=True)``, what RL frameworks call after a weight
        update: sessions are recorded and found under a new identity from now on."""
        return self.scheduler.reset() if self.scheduler is not None else None

    def has_pending_push_work(self) -> bool:
        return self.scheduler is not None and self.scheduler.writing()

    def get_kv_connector_stats(self) -> KVSwapStats | None:
        if self.scheduler is None:
            return None
        counts = self.scheduler.counters.take()
        return KVSwapStats(data=dict(counts)) if counts else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVSwapStats | None:
        return KVSwapStats(data=dict(data)) if data is not None else KVSwapStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVSwapPromMetrics:
        return KVSwapPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that does not happen is a later miss, not lost data

    def may_load_async(self, request: Any) -> bool:
        """vLLM >= 0.33: requests with a session may load asynchronously (admitted under
        ``--max-num-inflight-kv-loads``); called as requests enter the queue, so it is cheap."""
        return session_of(request, quiet=True) is not None

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """vLLM >= 0.33: no. The worker's GPU moves hold the addresses of vLLM's KV memory, which
        sleep mode remaps; vLLM refuses sleep mode with this connector instead of kvswap writing
        through stale addresses."""
        return False

    # ---- worker side --------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker().register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, KVSwapConnectorMetadata):
            self.worker.begin(connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVSwapConnectorMetadata)
        self._worker().start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads finish before their request is scheduled (asynchronous loads)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # whole turns are saved when they finish, not layer by layer

    def wait_for_save(self) -> None:
        return None  # saves never hold up a step: their blocks stay allocated until copied out

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker().finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker().load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> KVSwapWorkerMetadata | None:
        return self.worker.worker_meta() if self.worker is not None else None

    def shutdown(self) -> None:
        for half in (self.scheduler, self.worker):
            if half is not None:
                half.shutdown()


def session_of(request: Any, *, quiet: bool = False) -> str | None:
    """A request's session: vLLM's ``session_id`` (request field or X-Session-ID header), or
    ``kv_transfer_params["session_id"]``, checked; None when it has none (or an invalid one,
    logged unless ``quiet``). A plain ``str``, not a :class:`~kvswap.meta.SessionId`: it travels
    in vLLM's own messages (the request's ``kv_transfer_params``, which vLLM encodes with msgspec,
    which refuses subclasses of ``str``)."""
    session = getattr(request, "session_id", None)
    if not session:
        params = getattr(request, "kv_transfer_params", None) or {}
        session = params.get("session_id") if isinstance(params, dict) else None
    if not session:
        return None
    try:
        return str(validate_session_id(session))
    except KVSwapError as exc:
        if not quiet:
            log.warning("kvswap: request %s has an unusable session id (served without kvswap): %s",
                        getattr(request, "request_id", "?"), exc)
        return None
