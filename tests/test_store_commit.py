"""The session-store core's commit: what happens to a finished turn's save when meta moved
since the turn looked the session up (another instance saved a turn, damaged entries were
dropped, another history won). Two cores share one SQLite meta and one file store, as two
engine instances would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvswap.connectors import open_connector
from kvswap.meta import Entry, EntrySpec, open_meta_store
from kvswap.session_cache import KVLayout, SessionStore
from kvswap.session_cache.base import UNWRITTEN, SwapError
from kvswap.session_cache.pinned import PinnedBlocks
from kvswap.session_cache.tiers import Plan, SpanCache, StoredState

LAYOUT = KVLayout("commit-test", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


def kv_of(tokens: list[int]):
    """A deterministic KV for each token (what a model would compute for this history)."""
    def fetch(start: int, stop: int) -> torch.Tensor:
        values = torch.tensor(tokens[start:stop], dtype=torch.float32)
        return values.view(1, 1, -1, 1, 1).expand(*LAYOUT.span_shape(stop - start)).contiguous()
    return fetch


@pytest.fixture
def instances(tmp_path: Path):
    def core() -> SessionStore:
        return SessionStore(open_meta_store(f"sqlite:///{tmp_path}/meta.db"), [open_connector(f"file://{tmp_path}/kv")],
                            LAYOUT, entry_tokens=100)
    a, b = core(), core()
    yield a, b
    for store in (a, b):
        store.close()


def blobs(store: SessionStore) -> set[str]:
    return set(store.stores[0].connector.list("kv/"))


def recorded(store: SessionStore, session: str) -> list[tuple[int, int]]:
    return [(e.token_offset, e.token_end) for e in store.meta.entries(session)]


def test_a_save_whose_base_moved_appends_what_is_missing(instances) -> None:
    a, b = instances
    turn1, turn2 = list(range(1, 280)), list(range(1, 334))
    before = b.lookup("chat", turn2)  # B looks the session up before A's save of turn 1 lands
    assert before.stored.version is None
    a.write("chat", a.lookup("chat", turn1).stored, turn1, kv_of(turn1))
    assert recorded(a, "chat") == [(0, 100), (100, 200), (200, 279)]
    assert b.commit("chat", before.stored, turn2, b.write_blobs("chat", before.stored, turn2, kv_of(turn2))) == "saved"
    # A's whole entries at 0-100 and 100-200 stay; from 200 B's entries (which cover A's tail) follow.
    assert recorded(a, "chat") == [(0, 100), (100, 200), (200, 300), (300, 333)]
    assert len(blobs(a)) == 4  # the blobs nothing points at are gone
    plan = a.lookup("chat", [*turn2, 7])
    assert plan.matched == 333
    spans = list(a.read("chat", plan, [*turn2, 7]))
    assert torch.cat([s.kv for s in spans], dim=2)[0, 0, :, 0, 0].tolist() == [float(t) for t in turn2]


def test_a_save_after_dropped_entries_appends_from_what_is_left(instances) -> None:
    a, b = instances
    turn1, turn2 = list(range(1, 150)), list(range(1, 260))
    a.write("chat", a.lookup("chat", turn1).stored, turn1, kv_of(turn1))
    plan = b.lookup("chat", turn2)
    assert plan.matched == 149
    stale = StoredState(plan.stored.version, plan.stored.meta_total, [(100, plan.entries[0][0].prefix_hash)])
    a.drop_from("chat", a.lookup("chat", turn1).stored, 100)  # what a damaged second entry costs
    assert b.commit("chat", stale, turn2, b.write_blobs("chat", stale, turn2, kv_of(turn2))) == "saved"
    assert recorded(a, "chat") == [(0, 100), (100, 200), (200, 259)]


def test_a_save_over_a_longer_agreeing_history_adds_nothing(instances) -> None:
    a, b = instances
    short, long = list(range(1, 120)), list(range(1, 250))
    base = b.lookup("chat", short).stored
    a.write("chat", a.lookup("chat", long).stored, long, kv_of(long))
    specs = b.write_blobs("chat", base, short, kv_of(short))
    assert b.commit("chat", base, short, specs) == "stored"
    assert recorded(a, "chat") == [(0, 100), (100, 200), (200, 249)]
    assert not {s.key for s in specs} & blobs(a)


def test_a_save_over_another_history_is_refused_and_leaves_it(instances) -> None:
    a, b = instances
    mine, theirs = list(range(1, 150)), [*range(1, 50), *range(900, 1000)]
    base = b.lookup("chat", mine).stored
    a.write("chat", a.lookup("chat", theirs).stored, theirs, kv_of(theirs))
    specs = b.write_blobs("chat", base, mine, kv_of(mine))
    assert b.commit("chat", base, mine, specs) == "diverged"
    assert recorded(a, "chat") == [(0, 100), (100, 149)]
    assert a.lookup("chat", theirs).matched == 149
    assert not {s.key for s in specs} & blobs(a)
    with pytest.raises(SwapError, match="diverged"):  # write() says so
        b.write("chat", base, mine, kv_of(mine))
    assert recorded(a, "chat") == [(0, 100), (100, 149)]


@pytest.fixture
def holder(tmp_path: Path):
    """A core with a host tier (as the vLLM connector's worker has) over the same meta and store."""
    store = SessionStore(open_meta_store(f"sqlite:///{tmp_path}/meta.db"), [open_connector(f"file://{tmp_path}/kv")],
                         LAYOUT, entry_tokens=100, span_cache_bytes=1 << 20)
    yield store
    store.close()


def local_entries(session: str, kept: list[Entry], specs: list[EntrySpec]) -> list[Entry]:
    return kept + [Entry.of(spec, session, len(kept) + i, 0.0) for i, spec in enumerate(specs)]


def built_on(plan: Plan) -> StoredState:
    """What a turn's save builds on when it reused all its plan held (as the vLLM scheduler does)."""
    return StoredState(plan.stored.version, plan.stored.meta_total,
                       [(entry.token_end, entry.prefix_hash) for entry, _ in plan.entries], plan.stored.fingerprint_ok)


def test_a_turn_planned_over_unwritten_entries_is_served_from_the_host_tier_then_committed_after_them(holder) -> None:
    turn1, turn2 = list(range(1, 250)), list(range(1, 330))
    promised: list[EntrySpec] = []
    stored1 = holder.lookup("chat", turn1).stored
    written1 = holder.write_blobs("chat", stored1, turn1, kv_of(turn1), held=promised.extend)
    assert [(s.token_offset, s.token_end, s.checksum) for s in promised] == [
        (0, 100, UNWRITTEN), (100, 200, UNWRITTEN), (200, 249, UNWRITTEN)]
    assert [s.key for s in promised] == [s.key for s in written1]
    assert all(holder.spans.get(s.key)[2] == s.checksum for s in written1)  # settled: the blobs' checksums

    # Turn 2 is planned over turn 1's entries as the worker promised them, before meta has any.
    plan = holder.plan_over("chat", None, StoredState(None, 0, [], True), turn2, local_entries("chat", [], promised))
    assert plan.matched == 249
    spans = list(holder.read("chat", plan, turn2))
    assert [s.cached for s in spans] == [True, True, True]
    assert torch.equal(torch.cat([s.kv for s in spans], dim=2), kv_of(turn2)(0, 249))
    stored2 = built_on(plan)
    written2 = holder.write_blobs("chat", stored2, turn2, kv_of(turn2))
    assert [(s.token_offset, s.token_end) for s in written2] == [(249, 329)]

    # Turn 1 commits first (the scheduler keeps a session's commits in order); turn 2's then rebases on it.
    assert holder.commit("chat", stored1, turn1, written1) == "saved"
    assert holder.commit("chat", stored2, turn2, written2) == "saved"
    assert recorded(holder, "chat") == [(0, 100), (100, 200), (200, 249), (249, 329)]
    assert holder.lookup("chat", [*turn2, 5]).matched == 329


def test_a_turn_built_on_a_save_that_never_landed_is_not_recorded(holder) -> None:
    turn1, turn2 = list(range(1, 150)), list(range(1, 230))
    promised: list[EntrySpec] = []
    written1 = holder.write_blobs("chat", StoredState(), turn1, kv_of(turn1), held=promised.extend)
    plan = holder.plan_over("chat", None, StoredState(None, 0, [], True), turn2, local_entries("chat", [], promised))
    stored2 = built_on(plan)
    written2 = holder.write_blobs("chat", stored2, turn2, kv_of(turn2))
    holder.delete_blobs(written1)  # turn 1's commit failed: its blobs are gone, meta never had them
    assert holder.commit("chat", stored2, turn2, written2) == "diverged"
    assert holder.lookup("chat", turn2).entries == []
    assert blobs(holder) == set()


def test_unwritten_spans_stay_in_the_host_tier_until_written_or_discarded() -> None:
    cache = SpanCache(1000)
    span, small = torch.zeros(100), torch.zeros(75)  # 400 and 300 bytes
    assert cache.put("a", span, [1], "", unwritten=True) and cache.get("a")[2] == UNWRITTEN
    assert cache.put("b", span, [2], "xxh:b")
    assert cache.put("d", span, [4], "xxh:d")  # the oldest written span goes, never an unwritten one
    assert "a" in cache and "b" not in cache and "d" in cache
    assert cache.put("f", span, [6], "", unwritten=True) and "d" not in cache
    assert not cache.put("g", small, [7], "xxh:g")  # no written span left to make room
    assert cache.put("h", span, [8], "", unwritten=True)  # held beyond capacity: it is being written
    assert cache.used == 1200
    assert cache.put("a", span, [1], "xxh:a") and cache.get("a")[2] == "xxh:a"  # written: settled
    cache.discard("f")  # its write failed
    assert "f" not in cache and cache.used == 800
    assert cache.put("g", small, [7], "xxh:g") and "a" not in cache and "h" in cache and cache.used == 700


def test_pinned_reads_and_saves_borrow_blocks_that_come_back_when_no_tensor_uses_them(tmp_path: Path) -> None:
    """The worker's pinned blocks (here unpinned, on a machine without CUDA): a read lands in a
    free block and keeps it while any of its tensors lives; a tensor larger than a block, or one
    asked when none is free, is allocated apart."""
    blocks = PinnedBlocks([(64 << 10, 2), (4 << 10, 1)], pin=False)
    store = SessionStore(open_meta_store(f"sqlite:///{tmp_path}/meta.db"), [open_connector(f"file://{tmp_path}/kv")],
                         LAYOUT, entry_tokens=100)
    store.use_pinned(blocks)
    try:
        turn = list(range(1, 180))
        store.write("chat", StoredState(), turn, kv_of(turn))
        spans = list(store.read("chat", store.lookup("chat", turn), turn, pin=True))
        assert torch.equal(torch.cat([s.kv for s in spans], dim=2), kv_of(turn)(0, 179))
        assert blocks.free() == 1 and blocks.misses == 0  # two large blocks, none of the small one
        first = spans[0].kv[:, :, 10:20]  # a slice keeps its block
        del spans
        assert blocks.free() == 2
        del first
        assert blocks.free() == 3
        small = blocks.take((1000,), torch.float32)  # the smallest block that holds it
        assert blocks.free() == 2
        blocks.take((1000,), torch.float32)  # lent once and gone at once: free again
        other = blocks.take((1001,), torch.float32)  # small one busy: a large one
        assert blocks.free() == 1 and small.numel() == other.numel() - 1
        big = blocks.take((65 << 10,), torch.uint8)
        assert blocks.misses == 1 and blocks.free() == 1 and big.numel() == 65 << 10
    finally:
        store.close()


def test_the_host_tier_counts_the_whole_pinned_block_a_span_keeps() -> None:
    """Spans in lent blocks count a block each, so the host tier never keeps more blocks than
    its capacity buys, and the rest stay free for the moves in flight."""
    blocks = PinnedBlocks([(64 << 10, 4)], pin=False)
    cache = SpanCache(128 << 10)
    cache.footprint = blocks.footprint
    spans = [blocks.take((256,), torch.float32) for _ in range(3)]  # 1 KiB each, a block each
    assert cache.put("a", spans[0], [1], "xxh:a") and cache.put("b", spans[1], [2], "xxh:b")
    assert cache.used == 128 << 10
    assert cache.put("c", spans[2], [3], "xxh:c") and "a" not in cache  # the oldest went for the third block
    del spans
    assert blocks.free() == 2  # the tier keeps two blocks, not four
    assert cache.put("d", torch.zeros(256), [4], "xxh:d") and cache.used == (128 << 10) + 1024 - (64 << 10)
