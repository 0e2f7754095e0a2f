"""The session-store core's commit: what happens to a finished turn's save when meta moved
since the turn looked the session up (another instance saved a turn, damaged entries were
dropped, another history won). Two cores share one SQLite meta and one file store, as two
engine instances would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvswap.connectors import open_connector
from kvswap.meta import open_meta_store
from kvswap.session_cache import KVLayout, SessionStore
from kvswap.session_cache.base import SwapError
from kvswap.session_cache.tiers import StoredState

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
