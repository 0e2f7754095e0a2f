"""Damage of any kind, anywhere, is a miss: random damage to stored blobs (through the store,
and raw: Valkey manifests and chunks, file bytes) and to meta's fields (SQLite edited behind
kvswap's back). Each example stores a two-turn session, damages it, runs the next turn and
checks: no exception, exactly the tokens of a recompute, nothing reused from the damaged
entry on, and afterwards every entry left in meta reads back whole."""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_session_reuse import DEVICE, LAYOUT, MODEL, TOKENIZER

from kvswap.connectors import open_connector
from kvswap.engine import Engine
from kvswap.meta import open_meta_store
from kvswap.session_cache import PagedKVPool, SessionCache
from kvswap.testing.connector_suite import store_uri
from kvswap.workload import first_prompt, user_turn

FUZZ = settings(max_examples=int(os.environ.get("KVSWAP_FUZZ_EXAMPLES", "25")), deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Stored:
    """A session of two stored turns (two entries) and the request of its third turn."""

    def __init__(self, store: str, meta_path: Path) -> None:
        self.meta_path = meta_path
        pool = PagedKVPool(LAYOUT, 64, 16, DEVICE)
        self.cache = SessionCache(pool, open_meta_store(f"sqlite:///{meta_path}"), [open_connector(store)],
                                  policy="write-through", recompute_when_faster=False)
        self.engine = Engine(MODEL, self.cache)
        self.session = f"s-{uuid.uuid4().hex[:8]}"
        history = first_prompt(TOKENIZER, 3, words=30)
        history += self.engine.generate(self.session, history, 6).tokens + TOKENIZER.encode(user_turn(3, 1))
        history += self.engine.generate(self.session, history, 6).tokens
        self.cache.swap_out(self.session, to_store=True)
        self.entries = self.cache.meta.entries(self.session)
        assert len(self.entries) == 2
        self.request = history + TOKENIZER.encode(user_turn(3, 2))
        self.connector = self.cache.stores[0].connector

    def next_turn_is_a_clean_miss_from(self, damaged_at: int) -> None:
        got = self.engine.generate(self.session, self.request, 6)
        assert got.tokens == self.engine.generate_uncached(self.request, 6).tokens
        assert got.cached <= damaged_at
        # What meta keeps afterwards is whole: every entry reads back, verified.
        plan = self.cache.store.plan(self.session, self.cache.meta.get(self.session), None)
        read = sum(span.take for span in self.cache.store.read(self.session, plan, None))
        assert read == self.cache.meta.get(self.session).total_tokens == plan.end

    def close(self) -> None:
        self.cache.close()
        self.connector.close()
        self.cache.meta.close()


BLOB_DAMAGE = st.sampled_from(["flip", "flip-header", "truncate", "extend", "swap", "bigger", "empty", "delete"])


def damage_value(stored: Stored, index: int, kind: str, where: float, bit: int, amount: int) -> None:
    """Damage entry ``index``'s blob through the store itself (every backend alike)."""
    entry, other = stored.entries[index], stored.entries[1 - index]
    data = bytearray(stored.connector.get(entry.key))
    if kind == "delete":
        stored.connector.delete(entry.key)
        return
    if kind == "flip":
        data[int(where * (len(data) - 1))] ^= 1 << bit
    elif kind == "flip-header":
        data[int(where * 7)] ^= 1 << bit  # the 8-byte header length
    elif kind == "truncate":
        del data[int(where * (len(data) - 1)):]
    elif kind == "extend":
        data += os.urandom(amount)
    elif kind == "swap":
        data = bytearray(stored.connector.get(other.key))
    elif kind == "bigger":  # a valid blob, but a larger one than meta recorded
        data = bytearray(stored.connector.get(max(stored.entries, key=lambda e: e.size).key)) + os.urandom(4096)
    elif kind == "empty":
        data = bytearray()
    stored.connector.put(entry.key, bytes(data))


@pytest.mark.parametrize("kind", ["file", "valkey"])
@FUZZ
@given(index=st.integers(0, 1), damage=BLOB_DAMAGE, where=st.floats(0, 1), bit=st.integers(0, 7),
       amount=st.integers(1, 70000))
def test_damaged_blobs_are_a_miss(kind: str, tmp_path: Path, index: int, damage: str, where: float, bit: int,
                                  amount: int) -> None:
    uri = store_uri(kind, f"{tmp_path}/kv", f"fz-{uuid.uuid4().hex[:8]}", "&chunk_size=64KiB")
    stored = Stored(uri, tmp_path / f"meta-{uuid.uuid4().hex[:6]}.db")
    try:
        damage_value(stored, index, damage, where, bit, amount)
        stored.next_turn_is_a_clean_miss_from(stored.entries[index].token_offset)
    finally:
        stored.close()


@FUZZ
@given(index=st.integers(0, 1), target=st.sampled_from(["manifest", "chunk"]), where=st.floats(0, 1),
       bit=st.integers(0, 7), how=st.sampled_from(["flip", "truncate", "delete", "garbage"]))
def test_damaged_valkey_manifests_and_chunks_are_a_miss(tmp_path: Path, index: int, target: str, where: float,
                                                        bit: int, how: str) -> None:
    unique = f"fz{uuid.uuid4().hex[:8]}"
    uri, prefix = store_uri("valkey", "", unique, "&chunk_size=64KiB"), f"{unique}:"
    import redis

    stored = Stored(uri, tmp_path / f"meta-{uuid.uuid4().hex[:6]}.db")
    raw = redis.Redis.from_url(os.environ["KVSWAP_TEST_VALKEY_URI"].replace("valkey://", "redis://"))
    try:
        entry = stored.entries[index]
        names = sorted(raw.keys(f"{prefix}c/*")) if target == "chunk" else [f"{prefix}m/{entry.key}".encode()]
        if target == "chunk":  # a chunk of this entry's value: its manifest names its write id
            manifest = raw.get(f"{prefix}m/{entry.key}")
            names = [n for n in names if n.split(b"/")[1].decode() in manifest.decode("latin-1")]
        assert names
        name = names[int(where * (len(names) - 1))]
        value = bytearray(raw.get(name))
        if how == "flip":
            value[int(where * (len(value) - 1))] ^= 1 << bit
        elif how == "truncate":
            del value[int(where * (len(value) - 1)):]
        elif how == "garbage":
            value = bytearray(os.urandom(len(value)))
        if how == "delete":
            raw.delete(name)
        else:
            raw.set(name, bytes(value))
        stored.next_turn_is_a_clean_miss_from(entry.token_offset)
        assert stored.connector.collect_garbage(older_than=0) >= 0  # sweeping chunks of a damaged manifest works
    finally:
        raw.close()
        stored.close()


META_FIELDS = {
    "token_offset": st.one_of(st.integers(-(1 << 40), 1 << 40), st.sampled_from([0, 1, 16, 100])),
    "token_length": st.one_of(st.integers(-(1 << 40), 1 << 40), st.sampled_from([0, 1, 15, 17])),
    "size": st.one_of(st.integers(-(1 << 62), 1 << 62), st.sampled_from([0, 1, 4096])),
    "connector": st.one_of(st.text(max_size=40), st.just("file:///elsewhere"), st.just("valkey://other:1/0")),
    "key": st.one_of(st.text(max_size=60), st.sampled_from(["../../etc/passwd", "/abs", "kv/none", ""])),
    "checksum": st.one_of(st.text(max_size=50), st.just("xxh3_128:" + "0" * 32)),
    "prefix_hash": st.one_of(st.text(max_size=40), st.just("0" * 32)),
}


@st.composite
def meta_edit(draw: st.DrawFn) -> tuple[str, object]:
    field = draw(st.sampled_from(sorted(META_FIELDS)))
    value = draw(st.one_of(META_FIELDS[field], st.text(max_size=8), st.integers()))  # also the wrong type
    return field, value


def rows(db: sqlite3.Connection) -> list[tuple[tuple[type, object], ...]]:
    """Every entry row, each value with its SQLite storage type (an edit to ``"0"`` from ``0`` is damage)."""
    return [tuple((type(v), v) for v in row) for row in db.execute("SELECT * FROM kvswap_entries ORDER BY seq")]


@FUZZ
@given(index=st.integers(0, 1), edits=st.lists(meta_edit(), min_size=1, max_size=3),
       swap_keys=st.booleans())
def test_damaged_meta_fields_are_a_miss(tmp_path: Path, index: int, edits: list, swap_keys: bool) -> None:
    stored = Stored(f"file://{tmp_path}/kv-{uuid.uuid4().hex[:6]}", tmp_path / f"meta-{uuid.uuid4().hex[:6]}.db")
    try:
        entry = stored.entries[index]
        with sqlite3.connect(stored.meta_path) as db:
            before = rows(db)
            for field, value in edits:
                if isinstance(value, int) and not -(1 << 63) <= value < 1 << 63:
                    value = str(value)
                db.execute(f"UPDATE kvswap_entries SET {field} = ? WHERE session_id = ? AND seq = ?",
                           (value, stored.session.encode(), entry.seq))
            if swap_keys:  # both entries name each other's blob
                a, b = stored.entries
                db.execute("UPDATE kvswap_entries SET key = ? WHERE session_id = ? AND seq = ?",
                           (b.key, stored.session.encode(), a.seq))
                db.execute("UPDATE kvswap_entries SET key = ? WHERE session_id = ? AND seq = ?",
                           (a.key, stored.session.encode(), b.seq))
            unchanged = rows(db) == before  # e.g. an edit and a second one that restores the value
        damaged_at = 0 if swap_keys else entry.token_offset
        stored.next_turn_is_a_clean_miss_from(stored.request.__len__() if unchanged else damaged_at)
    finally:
        stored.close()
