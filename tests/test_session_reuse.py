"""Reuse is exact: KV swapped out to every tier and back gives the tokens of recomputing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvswap.connectors import open_connector
from kvswap.engine import ByteTokenizer, Engine, build_model
from kvswap.errors import ConfigError, InvalidKeyError
from kvswap.meta import open_meta_store
from kvswap.session_cache import OutOfBlocksError, PagedKVPool, Policy, SessionCache, SessionStore
from kvswap.testing.connector_suite import store_uri
from kvswap.workload import first_prompt, user_turn

TOKENIZER = ByteTokenizer()
DEVICE = os.environ.get("KVSWAP_TEST_DEVICE", "cpu")  # "cuda" runs the pool and model on the GPU
MODEL, LAYOUT = build_model("tiny", device=DEVICE)


def _store_uri(kind: str, tmp_path: Path, unique: str) -> str | None:
    if kind == "host":
        return None
    if kind == "mem":
        return f"mem://{unique}"
    return store_uri(kind, f"{tmp_path}/kv", unique, "&chunk_size=64KiB")


TIERS = ["host", "mem", "file", "juicefs", "redis", "valkey", "s3"]


def make_cache(store: str | None, *, blocks: int, host_bytes: int = 0, policy: str = "write-back",
               meta: str = "memkv://", **options: object) -> SessionCache:
    pool = PagedKVPool(LAYOUT, blocks, block_size=16, device=DEVICE)
    stores = [open_connector(store)] if store else []
    return SessionCache(pool, open_meta_store(meta), stores, host_bytes=host_bytes, policy=policy,
                        recompute_when_faster=False, **options)


def converse(engine: Engine, sessions: int, turns: int, max_new: int = 12) -> list[list]:
    """Round-robin turns; every turn is checked against a recompute. Returns per-turn records."""
    history = {s: first_prompt(TOKENIZER, s) for s in range(sessions)}
    records = []
    for turn in range(turns):
        for s in range(sessions):
            got = engine.generate(f"chat-{s}", history[s], max_new, return_logits=True)
            ref = engine.generate_uncached(history[s], max_new, return_logits=True)
            assert got.tokens == ref.tokens, f"session {s} turn {turn}: {got.tokens} != {ref.tokens}"
            torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
            records.append([s, turn, got.cached, got.computed, got.tokens, got.logits])
            history[s] = history[s] + got.tokens + TOKENIZER.encode(user_turn(s, turn + 1))
    return records


@pytest.mark.parametrize("tier", TIERS)
def test_swapped_conversations_are_exact(tier: str, tmp_path: Path, unique: str) -> None:
    store = _store_uri(tier, tmp_path, unique)
    # 4 sessions of up to ~190 tokens (12 blocks each) in 20 blocks: every turn swaps others out.
    cache = make_cache(store, blocks=20, host_bytes=(1 << 30) if tier == "host" else 0)
    records = converse(Engine(MODEL, cache), sessions=4, turns=3)
    stats = cache.stats
    source = "host_hits" if tier == "host" else "store_hits"
    assert getattr(stats, source) >= 8 and stats.hbm_hits == 0, stats
    assert stats.swap_outs >= 8 and stats.store_errors == 0 and stats.dropped_entries == 0
    # Every later turn reused its whole history but the last token.
    for s, turn, cached, computed, *_ in records:
        if turn:
            assert cached > 0 and computed == len(TOKENIZER.encode(user_turn(s, turn))) + 1
    # Swapped KV is bit-identical to KV that never left the pool.
    resident = converse(Engine(MODEL, make_cache(None, blocks=200)), sessions=4, turns=3)
    for swapped, kept in zip(records, resident):
        assert swapped[4] == kept[4] and torch.equal(swapped[5], kept[5])


def test_write_through_stores_every_turn_and_host_tier_spills_to_store(tmp_path: Path) -> None:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=20, host_bytes=LAYOUT.token_bytes * 300,
                       policy="write-through")
    converse(Engine(MODEL, cache), sessions=4, turns=3)
    for s in range(4):
        session = cache.meta.get(f"chat-{s}")
        entries = cache.meta.entries(f"chat-{s}")
        assert len(entries) == 3 and session.total_tokens == entries[-1].token_end  # one entry per turn
    assert cache.stats.host_hits > 0 and cache.stats.store_hits > 0


def test_a_turn_checks_its_session_id_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The id rule runs where the id enters (the cache's open); the lease, meta reads, the commit
    and the store take the checked :class:`SessionId` as it is."""
    from kvswap.meta import rules

    checked: list[object] = []
    check = rules._check_session_id
    monkeypatch.setattr(rules, "_check_session_id", lambda session_id: (checked.append(session_id), check(session_id)))
    stack = {"meta": f"sqlite:///{tmp_path}/meta.db", "policy": "write-through"}
    prompt = first_prompt(TOKENIZER, 0)
    first = Engine(MODEL, make_cache(f"file://{tmp_path}/kv", blocks=40, **stack)).generate("chat-0", prompt, 8)
    checked.clear()
    rules._checked_id.cache_clear()  # ids seen lately skip the rule: count this turn's from a cold cache
    fresh = make_cache(f"file://{tmp_path}/kv", blocks=40, **stack)  # its turn reads meta and the store
    follow_up = prompt + first.tokens + TOKENIZER.encode(user_turn(0, 1))
    turn = Engine(MODEL, fresh).generate("chat-0", follow_up, 8)
    assert turn.cached == len(prompt) + len(first.tokens) - 1 and fresh.stats.store_hits == 1
    assert checked == ["chat-0"] and len(fresh.meta.entries("chat-0")) == 2
    with pytest.raises(InvalidKeyError):
        rules.SessionId("chat\x00")


def test_a_policy_is_one_of_two_names() -> None:
    assert make_cache("mem://policy", blocks=4, policy="write-through").policy is Policy.WRITE_THROUGH
    with pytest.raises(ConfigError, match="write-back or write-through"):
        make_cache(None, blocks=4, policy="write-thru")


def test_long_spans_are_split_into_entries_written_and_read_in_parallel(tmp_path: Path) -> None:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=20, entry_bytes=(LAYOUT.token_bytes + 4) * 32 + 1)
    converse(Engine(MODEL, cache), sessions=3, turns=3)
    entries = cache.meta.entries("chat-0")
    assert len(entries) > 6 and max(e.token_length for e in entries) == 32
    assert [e.token_offset for e in entries[1:]] == [e.token_end for e in entries[:-1]]
    assert cache.stats.store_hits >= 5


@pytest.mark.parametrize("tier", ["host", "file"])
def test_a_handle_waits_for_its_copies_before_the_blocks_are_read(tier: str, tmp_path: Path) -> None:
    """On a GPU a swap-in returns with its copies in flight (the model waits per layer); an
    engine that reads the blocks whole calls handle.wait() first, and finds the KV it left."""
    cache = make_cache(f"file://{tmp_path}/kv", blocks=40, host_bytes=(1 << 30) if tier == "host" else 0,
                       entry_bytes=(LAYOUT.token_bytes + 4) * 32 + 1)  # a store swap-in of several entries
    engine = Engine(MODEL, cache)
    tokens = first_prompt(TOKENIZER, 5)
    engine.generate("waits", tokens, 1)
    with cache.open("waits", tokens + [33]) as handle:
        before = cache.mover.gatherer(handle.blocks)(0, len(tokens))
    cache.swap_out("waits", to_store=tier != "host")
    with cache.open("waits", tokens + [33]) as handle:
        assert handle.cached == len(tokens)
        assert (handle.layer_events is not None) == (DEVICE == "cuda")  # copies still in flight on a GPU
        handle.wait()
        after = cache.mover.gatherer(handle.blocks)(0, len(tokens))
    assert torch.equal(before, after)
    assert cache.stats.host_hits + cache.stats.store_hits == 1


def test_edited_history_reuses_only_the_matching_prefix(tmp_path: Path) -> None:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=40)
    engine = Engine(MODEL, cache)
    tokens = first_prompt(TOKENIZER, 1, words=30)
    first = engine.generate("edit", tokens, 10)
    history = tokens + first.tokens
    cache.swap_out("edit", to_store=True)
    assert cache.resident_sessions() == [] and len(cache.meta.entries("edit")) == 1
    edited = list(history)
    edited[57] = (edited[57] + 1) % 256  # inside the one stored entry
    again = engine.generate("edit", edited + TOKENIZER.encode(" more"), 10, return_logits=True)
    reference = engine.generate_uncached(edited + TOKENIZER.encode(" more"), 10, return_logits=True)
    assert again.cached == 57 and again.tokens == reference.tokens
    torch.testing.assert_close(again.logits, reference.logits, rtol=1e-4, atol=1e-4)
    # The stale entry is replaced when the session is stored again: meta never claims tokens it lost.
    cache.swap_out("edit", to_store=True)
    entries = cache.meta.entries("edit")
    assert entries[0].token_offset == 0 and cache.meta.get("edit").total_tokens == entries[-1].token_end
    third = engine.generate("edit", edited + TOKENIZER.encode(" more") + again.tokens, 5)
    assert third.cached == len(edited) + 5 + len(again.tokens) - 1
    # Editing the very first token leaves nothing to reuse.
    cache.swap_out("edit", to_store=True)
    assert engine.generate("edit", [7] + edited[1:], 3).cached == 0


def test_pinned_sessions_stay_resident_under_pressure(tmp_path: Path) -> None:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=24)
    engine = Engine(MODEL, cache)
    engine.generate("pinned", first_prompt(TOKENIZER, 99), 8)
    pinned_tokens = first_prompt(TOKENIZER, 99)
    handle = cache.open("pinned", pinned_tokens + [1])
    snapshot = [cache.pool.kv[:, :, b * 16:(b + 1) * 16].clone() for b in handle.blocks]
    try:
        converse(engine, sessions=5, turns=2)  # many more sessions than fit beside it
        assert "pinned" in cache.resident_sessions()
        for block, before in zip(handle.blocks, snapshot):
            assert torch.equal(cache.pool.kv[:, :, block * 16:(block + 1) * 16], before)
        # With everything pinned, a request that cannot fit fails clearly instead of evicting.
        with pytest.raises(OutOfBlocksError, match="no unpinned session"):
            engine.generate("huge", list(range(250)) + list(range(60)), 4)  # 20 of 24 blocks
    finally:
        handle.close()
    # The hold matched the history up to its own last token and committed nothing new.
    assert engine.generate("pinned", pinned_tokens + [1, 2], 4).cached == len(pinned_tokens)


def test_a_request_makes_room_before_its_lease_and_swap_in(tmp_path: Path) -> None:
    """Another session's swap-out runs before the request takes its lease and swaps in, not inside."""
    resident_at_lease: dict[str, list[str]] = {}

    class Recording(SessionStore):
        def lease(self, session_id: str, owner: str, ttl: float | None) -> Any:
            resident_at_lease[session_id] = cache.resident_sessions()
            return super().lease(session_id, owner, ttl)

    store = Recording(open_meta_store("memkv://"), [open_connector(f"file://{tmp_path}/kv")], LAYOUT,
                      entry_tokens=64, owns_backends=True)
    cache = SessionCache(PagedKVPool(LAYOUT, 20, block_size=16, device=DEVICE), store=store,
                         recompute_when_faster=False)
    engine = Engine(MODEL, cache)
    engine.generate("a", list(range(1, 150)), 4)  # 10 of 20 blocks
    prompt = list(range(2, 250))  # 16 blocks: "a" must go
    got = engine.generate("b", prompt, 4)
    assert resident_at_lease["b"] == [] and cache.resident_sessions() == ["b"]
    assert got.tokens == engine.generate_uncached(prompt, 4).tokens
    assert engine.generate("a", list(range(1, 150)) + [7], 4).cached > 0  # from the store
    cache.close()


def test_a_host_copy_stays_when_its_swap_in_finds_no_blocks() -> None:
    """A session in the host tier (no store: its only copy) whose swap-in cannot get blocks
    stays in the host tier, and a later request reuses it."""
    cache = make_cache(None, blocks=24, host_bytes=1 << 30)
    engine = Engine(MODEL, cache)
    tokens = list(range(1, 100))
    out = engine.generate("kept", tokens, 4)
    cache.swap_out("kept")
    assert "kept" in cache.host
    with cache.open("big", list(range(300))) as handle:
        handle.reserve(310)  # 20 blocks, held: the 7 "kept" needs are not there
        with pytest.raises(OutOfBlocksError):
            cache.open("kept", tokens + out.tokens + [5])
        assert "kept" in cache.host
    assert engine.generate("kept", tokens + out.tokens + [5], 4).cached == len(tokens) + 3
    assert cache.stats.host_hits == 1


def test_prefetch_swap_out_and_drop(tmp_path: Path) -> None:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=40, host_bytes=1 << 30)
    engine = Engine(MODEL, cache)
    tokens = first_prompt(TOKENIZER, 3)
    out = engine.generate("admin", tokens, 6)
    cache.swap_out("admin", to_store=True)
    assert cache.resident_sessions() == []
    assert cache.prefetch("admin") == len(tokens) + 5 and cache.resident_sessions() == ["admin"]
    follow = engine.generate("admin", tokens + out.tokens + [32], 4)
    # The prefetched KV served the request from HBM.
    assert follow.cached == len(tokens) + 5 and cache.stats.hbm_hits == 1
    assert cache.stats.swapped_in_tokens == len(tokens) + 5
    cache.swap_out("admin")  # to the host tier
    assert "admin" in cache.host and cache.resident_sessions() == []
    keys = list(cache.stores[0].connector.list("kv/"))
    assert keys and cache.drop("admin")
    assert list(cache.stores[0].connector.list("kv/")) == [] and "admin" not in cache.host
    assert engine.generate("admin", tokens + out.tokens + [32], 4).cached == 0
    assert not cache.drop("never-seen")


def test_loading_predicted_slower_than_recompute_recomputes(tmp_path: Path) -> None:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=40)
    cache.recompute_when_faster = True
    engine = Engine(MODEL, cache)
    tokens = first_prompt(TOKENIZER, 4)
    out = engine.generate("slow", tokens, 6)
    for _ in range(2):  # learn the store's bandwidth from a real read
        cache.swap_out("slow", to_store=True)
        engine.generate("slow", tokens + out.tokens, 6)
    cache.swap_out("slow", to_store=True)
    cache.observe_prefill(10**12, 1e-3)  # an engine that recomputes absurdly fast
    again = engine.generate("slow", tokens + out.tokens, 6)
    assert again.cached == 0 and cache.stats.skipped_slower_than_recompute == 1


def test_gc_removes_expired_sessions_and_orphan_blobs(tmp_path: Path) -> None:
    now = [1000.0]
    store = open_connector(f"file://{tmp_path}/kv")
    meta = open_meta_store("memkv://", clock=lambda: now[0])
    cache = SessionCache(PagedKVPool(LAYOUT, 40, 16, DEVICE), meta, [store], session_ttl=60, gc_grace=0)
    engine = Engine(MODEL, cache)
    for name, at in (("old", 1000.0), ("young", 1050.0)):
        now[0] = at
        engine.generate(name, first_prompt(TOKENIZER, 5), 4)
        cache.swap_out(name, to_store=True)
    orphan = cache.stores[0].new_key("nobody", 0, 16)
    store.put(orphan, b"left by a writer that died before its meta append")
    store.put("kv/foreign-file", b"not named by kvswap: never touched")
    now[0] = 1070.0  # "old" idle 70 s > ttl; "young" 20 s
    assert cache.gc() == {"sessions": 1, "blobs": 1}
    assert [s.id for s in meta.list_sessions().sessions] == ["young"]
    assert not store.exists(orphan) and store.exists("kv/foreign-file")
    remaining = {e.key for e in meta.entries("young")}
    assert remaining and all(store.exists(k) for k in remaining)


@pytest.fixture
def unique() -> Iterator[str]:
    yield f"t-{os.urandom(6).hex()}"


class _PerLayerPool(PagedKVPool):
    """Shows the mover its layers one by one, as an engine's per-layer caches do."""

    def layer_range(self, first: int, last: int) -> None:
        return None


@pytest.mark.parametrize("pool_kind", [PagedKVPool, _PerLayerPool])
@pytest.mark.parametrize("group_layers", [1, 2, 5])
def test_mover_moves_layer_groups_exactly(pool_kind: type[PagedKVPool], group_layers: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Scatter and gather in groups of layers (more groups than staging buffers, a short last
    group), from spans cut short along their tokens (not contiguous), at an offset in a
    session's scattered blocks: every slot of the session exact, every other slot untouched."""
    from kvswap.session_cache import KVLayout, KVMover, transfer

    layout = KVLayout(model="mover-test", num_layers=5, num_kv_heads=2, head_dim=8, dtype="float32")
    pool = pool_kind(layout, 40, block_size=4, device=DEVICE)
    pool._free.reverse()  # the session's blocks out of order
    monkeypatch.setattr(transfer, "_STAGING_BYTES", group_layers * 2 * 50 * 2 * 8 * 4)
    blocks = pool.allocate(pool.blocks_for(50))
    mover = KVMover(pool)
    src = mover.host_tensor(60)
    src.copy_(torch.randn(src.shape))
    mover.scatter(src[:, :, :37], blocks, 3)
    events = mover.scatter(src[:, :, 40:50], blocks, 40, per_layer=True)
    assert events is None if DEVICE == "cpu" else len(events) == layout.num_layers
    mover.synchronize()
    out = mover.host_tensor(47)
    mover.gather(blocks, 3, 50, out)
    assert torch.equal(out[:, :, :37], src[:, :, :37]) and torch.equal(out[:, :, 37:], src[:, :, 40:50])
    session = pool.slots(blocks, 3, 50).cpu()
    others = torch.ones(pool.kv.shape[2], dtype=torch.bool)
    others[session] = False
    assert not pool.kv[:, :, others.to(pool.kv.device)].any()
