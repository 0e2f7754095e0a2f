"""What kvswap did inside vLLM, counted by outcome: in vLLM's periodic log line and on its
``/metrics`` (``vllm:kvswap_*_total``), through vLLM's connector-stats hooks.

The scheduler half counts (it sees every lookup, fetch, load, save and commit outcome) and
hands the counts over each step (``get_kv_connector_stats``); vLLM aggregates them and calls
:class:`KVSwapPromMetrics` to add them to its Prometheus counters.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

#: Counter families: key in the stats -> (Prometheus name, help, label of the outcome).
FAMILIES = {
    "lookups": ("vllm:kvswap_lookups_total", "Session lookups that served nothing, by why", "outcome"),
    "tokens loaded": ("vllm:kvswap_loaded_tokens_total", "Tokens kvswap loaded into vLLM's KV, by source", "source"),
    "tokens rejected": ("vllm:kvswap_rejected_tokens_total", "Stored tokens rejected (damaged, missing, foreign)",
                        "outcome"),
    "saves": ("vllm:kvswap_saves_total", "Finished turns' saves, by outcome", "outcome"),
    "bytes fetched": ("vllm:kvswap_fetched_bytes_total", "Bytes read from stores", "source"),
    "bytes saved": ("vllm:kvswap_saved_bytes_total", "Bytes written to stores", "source"),
    "tokens not stored": ("vllm:kvswap_unstored_tokens_total",
                          "Answer tokens not stored: the next turn does not send them again", "reason"),
    "bytes not stored": ("vllm:kvswap_unstored_bytes_total", "Bytes of answer KV not stored", "reason"),
}


class Counters:
    """Thread-safe counts of (family, outcome), taken and reset once per step."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, family: str, outcome: str, amount: int = 1) -> None:
        key = f"{family}|{outcome}"
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + amount

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts


class KVSwapStats(KVConnectorStats):
    """vLLM's stats container for kvswap: ``data`` maps "family|outcome" to a count."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVSwapStats:
        for key, value in (other.data or {}).items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {key.replace("|", ": "): value for key, value in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not self.data


class KVSwapPromMetrics(KVConnectorPromMetrics):
    """kvswap's counters on vLLM's ``/metrics``."""

    def __init__(self, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {family: self._counter_cls(name=name, documentation=text,
                                                    labelnames=[*labelnames, label])
                          for family, (name, text, label) in FAMILIES.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for key, value in transfer_stats_data.items():
            family, _, outcome = key.partition("|")
            counter = self._counters.get(family)
            if counter is not None and value:
                counter.labels(*labels, outcome).inc(value)


def record_op(op: str, session: str, tokens: int, nbytes: int, seconds: float, **more: Any) -> None:
    """One line of JSON per fetch or save to ``$KVSWAP_VLLM_STATS``, when set (the benchmarks read it)."""
    path = os.environ.get("KVSWAP_VLLM_STATS")
    if not path:
        return
    record = {"op": op, "session": session, "tokens": tokens, "bytes": nbytes, "seconds": seconds, "at": time.time(),
              **more}
    with _RECORD_LOCK, open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


_RECORD_LOCK = threading.Lock()
