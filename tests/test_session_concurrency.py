"""One session's slow storage never stalls the rest; a long request keeps its lease."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from test_session_reuse import DEVICE, LAYOUT, MODEL, TOKENIZER

from kvswap.connectors import open_connector
from kvswap.engine import Engine
from kvswap.meta import open_meta_store
from kvswap.session_cache import PagedKVPool, SessionBusyError, SessionCache
from kvswap.testing.connector_suite import env_or_skip
from kvswap.workload import first_prompt


def test_a_swap_in_stuck_on_a_paused_server_does_not_stall_other_sessions() -> None:
    uri = env_or_skip("KVSWAP_TEST_VALKEY_URI")
    import redis

    unique = f"cc{uuid.uuid4().hex[:8]}"
    cache = SessionCache(PagedKVPool(LAYOUT, 64, 16, DEVICE), open_meta_store("memkv://"),
                         [open_connector(f"{uri}?prefix={unique}:&timeout=10")], host_bytes=64 << 20,
                         recompute_when_faster=False)
    engine = Engine(MODEL, cache)
    slow, fast = first_prompt(TOKENIZER, 1, words=30), first_prompt(TOKENIZER, 2, words=30)
    slow += engine.generate("slow", slow, 4).tokens
    fast += engine.generate("fast", fast, 4).tokens
    cache.swap_out("slow", to_store=True)  # in Valkey now; "fast" stays in HBM
    server = redis.Redis.from_url(uri.replace("valkey://", "redis://"))
    server.execute_command("CLIENT", "PAUSE", 3000, "ALL")  # a real server that stops answering for 3 s
    began = time.monotonic()
    result: dict = {}
    stuck = threading.Thread(target=lambda: result.update(reply=engine.generate("slow", slow + [32], 3)))
    stuck.start()
    time.sleep(0.5)  # the swap-in is now waiting on the paused server
    try:
        assert stuck.is_alive()
        assert cache.local_state("slow").pinned
        with pytest.raises(SessionBusyError):
            cache.drop("slow")  # claimed by its request: refused at once, not queued
        assert cache.local_state("fast").hbm_tokens == len(fast) - 1
        assert engine.generate("fast", fast + [33], 3).cached == len(fast) - 1  # another session is served
        cache.swap_out("fast")  # to the host tier: no server needed
        assert cache.local_state("fast").host_tokens == len(fast) + 1 + 3 - 1
        assert time.monotonic() - began < 2.5, "other sessions waited for the paused server"
    finally:
        stuck.join(30)
        server.close()
    assert result["reply"].cached == len(slow) - 1 and time.monotonic() - began >= 2.5


def test_a_request_longer_than_the_lease_keeps_it() -> None:
    meta = f"memkv://lease-{uuid.uuid4().hex[:6]}"
    store = f"mem://lease-{uuid.uuid4().hex[:6]}"
    one = SessionCache(PagedKVPool(LAYOUT, 32, 16, DEVICE), open_meta_store(meta), [open_connector(store)],
                       instance_id="one", lease_ttl=0.6)
    two = SessionCache(PagedKVPool(LAYOUT, 32, 16, DEVICE), open_meta_store(meta), [open_connector(store)],
                       instance_id="two", lease_ttl=0.6)
    tokens = first_prompt(TOKENIZER, 5)
    handle = one.open("long", tokens)
    try:
        deadline = time.monotonic() + 2.5  # four lease lifetimes
        while time.monotonic() < deadline:
            with pytest.raises(SessionBusyError, match="leased by 'one'"):
                two.open("long", tokens)
            time.sleep(0.1)
    finally:
        handle.close()
    two.open("long", tokens).close()  # released at close: the other instance gets it at once
    one.close()
    two.close()
