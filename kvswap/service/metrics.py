"""Prometheus metrics: the instance's state read at scrape time, plus HTTP request timings.

Cache counters come straight from :class:`~kvswap.session_cache.CacheStats` when scraped
(one source of truth, nothing double-counted). Each app has its own registry, so several
instances in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from kvswap.service.instance import AdminInstance, Instance


class InstanceCollector:
    """Gauges and counters of one :class:`Instance`."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance

    def collect(self) -> Iterator[Any]:
        instance = self.instance
        cache, pool, stats = instance.cache, instance.pool, instance.cache.stats
        yield _gauge("kvswap_resident_sessions", "sessions with KV in HBM", len(cache.resident_sessions()))
        yield _gauge("kvswap_host_tier_sessions", "sessions with a copy in the host tier", len(cache.host))
        yield _gauge("kvswap_hbm_blocks", "KV pool blocks", pool.num_blocks)
        yield _gauge("kvswap_hbm_blocks_used", "KV pool blocks in use", pool.num_blocks - pool.free_blocks)
        yield _gauge("kvswap_hbm_bytes", "KV pool bytes",
                     pool.num_blocks * pool.block_size * instance.layout.token_bytes)
        yield _gauge("kvswap_hbm_bytes_used", "KV pool bytes in use",
                     (pool.num_blocks - pool.free_blocks) * pool.block_size * instance.layout.token_bytes)
        yield _gauge("kvswap_host_tier_bytes_used", "host tier bytes in use", cache.host.used)
        yield _counter("kvswap_requests", "requests that opened a session", stats.requests)
        hits = CounterMetricFamily("kvswap_cache_hits", "requests that reused KV, by the tier it came from",
                                   labels=["tier"])
        for tier in ("hbm", "host", "store"):
            hits.add_metric([tier], getattr(stats, f"{tier}_hits"))
        yield hits
        yield _counter("kvswap_cache_misses", "requests with a stored history and nothing reusable", stats.misses)
        yield _counter("kvswap_reused_tokens", "tokens whose KV was reused", stats.reused_tokens)
        yield _counter("kvswap_swapped_in_tokens", "tokens whose KV was swapped in", stats.swapped_in_tokens)
        yield _counter("kvswap_swap_outs", "sessions swapped out of HBM", stats.swap_outs)
        moved = CounterMetricFamily("kvswap_swap_bytes", "KV bytes swapped, by direction", labels=["direction"])
        moved.add_metric(["out"], stats.swap_out_bytes)
        moved.add_metric(["in"], stats.swap_in_bytes)
        yield moved
        spent = CounterMetricFamily("kvswap_swap_seconds", "seconds spent swapping, by direction",
                                    labels=["direction"])
        spent.add_metric(["out"], stats.swap_out_seconds)
        spent.add_metric(["in"], stats.swap_in_seconds)
        yield spent
        yield _counter("kvswap_swap_failures", "stores that failed (the KV stayed where it was)", stats.store_errors)
        yield _counter("kvswap_dropped_entries", "stored spans dropped as corrupt or missing", stats.dropped_entries)
        yield _counter("kvswap_recomputed_faster", "loads skipped because recomputing was predicted faster",
                       stats.skipped_slower_than_recompute)
        yield _gauge("kvswap_model_load_seconds", "seconds to build and load the model at start",
                     instance.model_load_seconds)
        load = instance.loaded.load_stats
        yield _gauge("kvswap_weight_load_bytes", "weight bytes loaded at start", load.bytes if load else 0)
        yield _gauge("kvswap_weight_load_seconds", "seconds the weight load took (0: random weights)",
                     load.seconds if load else 0.0)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class Metrics:
    """One app's registry: the instance collector and the HTTP latency histogram."""

    def __init__(self, instance: Instance | AdminInstance) -> None:
        from kvswap.service.instance import Instance

        self.registry = CollectorRegistry()
        if isinstance(instance, Instance):  # an admin instance holds no cache to report
            self.registry.register(InstanceCollector(instance))
        self.http = Histogram("kvswap_http_request_duration_seconds", "HTTP requests, by route and status",
                              ["method", "route", "status"], registry=self.registry,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))

    def observe(self, method: str, route: str, status: int, began: float) -> None:
        self.http.labels(method, route, str(status)).observe(time.perf_counter() - began)
