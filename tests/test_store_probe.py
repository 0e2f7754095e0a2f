"""Measuring a store's read speed (``SessionStore.probe``, what the vLLM worker does at start so
that its first fetch is weighed against recomputing): a figure for every store that answers,
nothing left behind, and a store that is down is left out rather than failing the caller."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from kvswap.connectors import open_connector
from kvswap.session_cache import KVLayout, SessionStore
from kvswap.testing.connector_suite import store_uri

LAYOUT = KVLayout("probe-test", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16")


@pytest.mark.parametrize("kind", ["file", "juicefs", "redis", "valkey", "s3"])
def test_probe_measures_each_store_and_leaves_nothing(kind: str, tmp_path: Path) -> None:
    connector = open_connector(store_uri(kind, f"{tmp_path}/kv", f"pr-{uuid.uuid4().hex[:8]}"))
    store = SessionStore(None, [connector], LAYOUT, entry_tokens=1024, span_cache_bytes=64 << 20)
    try:
        rates = store.probe(8 << 20)  # 8 entries of 1 MiB
        assert list(rates) == [store.stores[0].location]
        assert rates[store.stores[0].location] > 1e6  # bytes/s: loopback and local disks do far more
        assert list(connector.list()) == []  # written, read back and deleted
        assert not store.spans.used  # measured past the span cache
    finally:
        store.close()
        connector.close()


def test_a_store_that_is_down_is_left_out(tmp_path: Path, closed_port: int) -> None:
    down = open_connector(f"valkey://127.0.0.1:{closed_port}/0?timeout=1")
    up = open_connector(f"file://{tmp_path}/kv")
    store = SessionStore(None, [down, up], LAYOUT, entry_tokens=1024)
    try:
        rates = store.probe(2 << 20)
        assert list(rates) == [store.stores[1].location]
        assert list(up.list()) == []
    finally:
        store.close()
        down.close()
        up.close()
