"""The meta-store conformance suite: every backend runs all of it, against a real server.

Bind one fixture in a subclass::

    class TestPostgres(MetaSuite):
        @pytest.fixture
        def meta_uri(self): ...   # a URI naming a fresh, empty namespace (table prefix,
                                  # key prefix, file) that other processes can open too

Set ``processes = False`` for stores that live in one process's memory (memkv): the
concurrency tests then use threads only.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kvswap.errors import AlreadyExistsError, ConfigError, InvalidKeyError, NotFoundError, VersionConflictError
from kvswap.meta import Entry, EntrySpec, InvalidEntryError, LeaseError, MetaStore, Session, open_meta_store
from kvswap.meta.rules import MAX_HASH_CHARS

ODD_IDS = ["it's \"quoted\"", "a/b/../c", "/leading/slash/", "日本語のセッション", "emoji 🎉 ok",
           "Robert'); DROP TABLE "
           "kvswap_sessions;--", "x' OR '1'='1", "trailing space ", "CaseSensitive", "casesensitive", "%41%00+",
           "\\back\\slash", "🎉" * 255, "a" * 255, "[]{}*?$^.|()", "-", "e"]
BAD_IDS: list[Any] = ["", "a" * 256, "x" * 10_000, "nul\x00byte", "new\nline", "tab\tid", "del\x7f", "c1\x85ctl",
                      "lone\ud800surrogate", 42, None, b"bytes"]
FP = "tiny-llama/float32/paged16/tp0of1"


def spec(offset: int, length: int = 16, key: str | None = None) -> EntrySpec:
    return EntrySpec(token_offset=offset, token_length=length, connector="file:///var/kvswap",
                     key=key or f"k/{offset}", size=length * 1024, checksum=f"xxh3:{offset:032x}",
                     prefix_hash=f"{offset + length:064x}")


def fill(meta: MetaStore, session_id: str, spans: list[int]) -> Session:
    """Create ``session_id`` and append one entry per span length."""
    session = meta.create(session_id, FP)
    for length in spans:
        session, _ = meta.append(session_id, session.version, spec(session.total_tokens, length))
    return session


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def append_with_retry(meta: MetaStore, session_id: str, key: str) -> tuple[int, int]:
    """Append one 4-token entry tagged ``key`` with compare-and-swap and retry: (version, seq)."""
    session = meta.get(session_id)
    while True:
        try:
            new, entry = meta.append(session_id, session.version, spec(session.total_tokens, 4, key))
            return new.version, entry.seq
        except VersionConflictError:
            session = meta.get(session_id)


def _append_worker(uri: str, session_id: str, worker: int, threads: int, count: int,
                   results: Any = None) -> list[tuple[str, int, int]]:
    """``threads`` threads, each appending ``count`` tagged entries; returns (key, version, seq)."""
    with open_meta_store(uri) as meta:
        def run(thread: int) -> list[tuple[str, int, int]]:
            done = []
            for i in range(count):
                key = f"w{worker}/t{thread}/{i}"
                done.append((key, *append_with_retry(meta, session_id, key)))
            return done

        with ThreadPoolExecutor(threads) as pool:
            landed = [item for part in pool.map(run, range(threads)) for item in part]
    if results is not None:
        results.put(landed)
    return landed


def _lease_worker(uri: str, session_id: str, owner: str, start: Any, results: Any) -> None:
    with open_meta_store(uri) as meta:
        start.wait(60)  # a barrier: both racers and the test
        try:
            meta.acquire_lease(session_id, owner, 30)
            results.put((owner, True))
        except LeaseError:
            results.put((owner, False))


class MetaSuite:
    processes: bool = True  # False: a store of one process (the concurrency tests use threads)

    @pytest.fixture
    def meta(self, meta_uri: str) -> Iterator[MetaStore]:
        with open_meta_store(meta_uri) as store:
            yield store

    @pytest.fixture
    def clocked(self, meta_uri: str) -> Iterator[Callable[[float], MetaStore]]:
        """Opens extra stores on the same namespace whose clock runs ``offset`` seconds ahead."""
        opened: list[MetaStore] = []

        def open_at(offset: float) -> MetaStore:
            opened.append(open_meta_store(meta_uri, clock=lambda: time.time() + offset))
            return opened[-1]

        yield open_at
        for store in opened:
            store.close()

    # ---- sessions ----------------------------------------------------------------------------

    def test_create_then_get(self, meta: MetaStore) -> None:
        before = time.time()
        created = meta.create("s1", FP, ttl=3600.5, attrs={"user": "ann", "turns": [1, 2], "n": 1.5})
        assert (created.version, created.total_tokens, created.owner, created.lease_expires) == (1, 0, None, None)
        assert before - 1 <= created.created <= time.time() + 1
        assert meta.get("s1") == created
        assert meta.entries("s1") == []

    def test_read_is_the_session_and_its_entries(self, meta: MetaStore) -> None:
        assert meta.read(meta.create("s1", FP).id) == (meta.get("s1"), [])
        filled = fill(meta, "s2", [16, 8])
        session, entries = meta.read("s2")
        assert session == filled == meta.get("s2") and entries == meta.entries("s2")
        assert [(e.token_offset, e.token_length, e.seq) for e in entries] == [(0, 16, 0), (16, 8, 1)]

    def test_create_twice_is_already_exists(self, meta: MetaStore) -> None:
        meta.create("s1", FP)
        with pytest.raises(AlreadyExistsError):
            meta.create("s1", "another-fingerprint")
        assert meta.get("s1").fingerprint == FP

    def test_missing_session_is_not_found_everywhere(self, meta: MetaStore) -> None:
        calls: list[Callable[[], Any]] = [
            lambda: meta.get("nope"), lambda: meta.entries("nope"), lambda: meta.read("nope"),
            lambda: meta.update("nope", 1),
            lambda: meta.append("nope", 1, spec(0)), lambda: meta.truncate("nope", 1, 0),
            lambda: meta.delete("nope"), lambda: meta.acquire_lease("nope", "me", 5),
            lambda: meta.renew_lease("nope", "me", 5), lambda: meta.release_lease("nope", "me")]
        for call in calls:
            with pytest.raises(NotFoundError):
                call()

    def test_update_is_compare_and_swap(self, meta: MetaStore) -> None:
        created = meta.create("s1", FP, ttl=60, attrs={"a": 1})
        updated = meta.update("s1", 1, attrs={"b": 2}, ttl=None)
        assert (updated.version, updated.attrs, updated.ttl, updated.fingerprint) == (2, {"b": 2}, None, FP)
        assert updated.last_access >= created.last_access
        with pytest.raises(VersionConflictError) as info:
            meta.update("s1", 1, fingerprint="other")
        assert info.value.current == 2
        assert meta.get("s1") == updated
        touched = meta.update("s1", 2)
        assert touched.version == 3 and touched.attrs == {"b": 2}
        assert meta.update("s1", 3, fingerprint="fp2").fingerprint == "fp2"

    def test_update_rejects_bad_fields_without_change(self, meta: MetaStore) -> None:
        meta.create("s1", FP)
        for bad in ({"ttl": -1}, {"ttl": float("nan")}, {"attrs": {"x": object()}}, {"fingerprint": ""}):
            with pytest.raises((ConfigError, InvalidEntryError)):
                meta.update("s1", 1, **bad)
        assert meta.get("s1").version == 1

    # ---- entries ---------------------------------------------------------------------------

    def test_append_is_contiguous_and_versioned(self, meta: MetaStore) -> None:
        session = meta.create("s1", FP)
        stored = []
        for i, length in enumerate([16, 32, 1]):
            new, entry = meta.append("s1", session.version, spec(session.total_tokens, length))
            assert new.version == session.version + 1
            assert new.total_tokens == session.total_tokens + length
            assert (entry.seq, entry.session_id, entry.token_offset) == (i, "s1", session.total_tokens)
            assert entry._replace(created=0) == Entry.of(spec(session.total_tokens, length), "s1", i, 0)
            stored.append(entry)
            session = new
        assert meta.entries("s1") == stored
        assert meta.get("s1") == session

    def test_append_gap_overlap_and_stale_version_change_nothing(self, meta: MetaStore) -> None:
        session = fill(meta, "s1", [16])
        with pytest.raises(InvalidEntryError):
            meta.append("s1", session.version, spec(17))  # gap
        with pytest.raises(InvalidEntryError):
            meta.append("s1", session.version, spec(8))  # overlap
        with pytest.raises(VersionConflictError) as info:
            meta.append("s1", session.version - 1, spec(16))
        assert info.value.current == session.version
        assert meta.get("s1") == session
        assert len(meta.entries("s1")) == 1

    @pytest.mark.parametrize("bad", [
        {"token_length": 0}, {"token_offset": -1}, {"size": -5}, {"key": ""}, {"checksum": ""},
        {"connector": "not a uri"}, {"connector": "redis://:hunter2@127.0.0.1/0"}, {"key": "nul\x00"},
        {"token_length": 1.5}, {"prefix_hash": "x" * 5000}, {"checksum": "x" * 256}, {"prefix_hash": "x" * 256}])
    def test_malformed_entry_is_refused(self, meta: MetaStore, bad: dict[str, Any]) -> None:
        meta.create("s1", FP)
        with pytest.raises(InvalidEntryError) as info:
            meta.append("s1", 1, spec(0)._replace(**bad))
        assert "hunter2" not in str(info.value)
        assert meta.get("s1").version == 1 and meta.entries("s1") == []

    def test_hashes_at_their_limit_round_trip(self, meta: MetaStore) -> None:  # one more character: refused above
        long = spec(0)._replace(checksum="c" * MAX_HASH_CHARS, prefix_hash="h" * MAX_HASH_CHARS)
        meta.append("s1", meta.create("s1", FP).version, long)
        assert meta.entries("s1")[0].spec_values() == long.spec_values()

    def test_truncate_removes_whole_entries_after_offset(self, meta: MetaStore) -> None:
        session = fill(meta, "s1", [16, 16, 16])  # [0,16) [16,32) [32,48)
        before = meta.entries("s1")
        new, removed = meta.truncate("s1", session.version, 20)
        assert removed == before[1:]
        assert (new.version, new.total_tokens) == (session.version + 1, 16)
        assert meta.entries("s1") == before[:1]
        again, entry = meta.append("s1", new.version, spec(16, 8))
        assert (entry.seq, again.total_tokens) == (1, 24)
        with pytest.raises(VersionConflictError):
            meta.truncate("s1", new.version, 0)
        cleared, removed = meta.truncate("s1", again.version, 0)
        assert cleared.total_tokens == 0 and len(removed) == 2 and meta.entries("s1") == []
        same, none_removed = meta.truncate("s1", cleared.version, 100)
        assert none_removed == [] and same.version == cleared.version + 1

    def test_delete_returns_entries_and_id_can_be_reused(self, meta: MetaStore) -> None:
        session = fill(meta, "s1", [8, 8])
        entries = meta.entries("s1")
        meta.acquire_lease("s1", "owner-a", 30)
        with pytest.raises(VersionConflictError):
            meta.delete("s1", expected_version=session.version - 1)
        assert meta.delete("s1", expected_version=session.version) == entries
        with pytest.raises(NotFoundError):
            meta.get("s1")
        reborn = meta.create("s1", FP)
        assert (reborn.version, reborn.total_tokens, reborn.owner) == (1, 0, None)
        assert meta.entries("s1") == []
        assert meta.delete("s1") == []

    # ---- listing ----------------------------------------------------------------------------

    def test_list_pages_in_byte_order(self, meta: MetaStore) -> None:
        ids = [f"s{i:03d}" for i in range(250)] + ["Zed", "zed", "é", "日本", "~"]
        for session_id in ids:
            meta.create(session_id, FP if session_id.startswith("s") else "other")
        seen, cursor, pages = [], None, 0
        while True:
            page = meta.list_sessions(limit=100, cursor=cursor)
            pages += 1
            seen += [s.id for s in page.sessions]
            cursor = page.cursor
            if cursor is None:
                break
        assert seen == sorted(ids, key=lambda i: i.encode("utf-8"))
        assert pages == 3
        page = meta.list_sessions(fingerprint="other", limit=2)
        assert [s.id for s in page.sessions] == ["Zed", "zed"] and page.cursor is not None
        rest = meta.list_sessions(fingerprint="other", limit=10, cursor=page.cursor)
        assert [s.id for s in rest.sessions] == ["~", "é", "日本"] and rest.cursor is None

    def test_list_filters_by_owner_and_idle(self, meta: MetaStore, clocked: Callable[[float], MetaStore]) -> None:
        for session_id in ("a", "b", "c"):
            meta.create(session_id, FP)
        meta.acquire_lease("b", "node-1", 30)
        listed = {s.id: s.owner for s in meta.list_sessions().sessions}
        assert listed == {"a": None, "b": "node-1", "c": None}  # unfiltered pages carry leases too
        assert [s.id for s in meta.list_sessions(owner="node-1").sessions] == ["b"]
        assert meta.list_sessions(owner="node-2").sessions == []
        cut = time.time() + 0.001
        time.sleep(0.01)
        future = clocked(1000)
        future.update("c", 1)  # touched "later"
        assert [s.id for s in meta.list_sessions(idle_since=cut).sessions] == ["a", "b"]

    def test_list_rejects_bad_limit_and_cursor(self, meta: MetaStore) -> None:
        for limit in (0, -1, 1001, 2.5):
            with pytest.raises(ConfigError):
                meta.list_sessions(limit=limit)  # type: ignore[arg-type]
        for cursor in ("%%%", "bm9uZQ", "AA=="):
            with pytest.raises(ConfigError):
                meta.list_sessions(cursor=cursor)

    def test_expired_sessions(self, meta: MetaStore, clocked: Callable[[float], MetaStore]) -> None:
        meta.create("short", FP, ttl=100)
        meta.create("long", FP, ttl=10_000)
        meta.create("forever", FP)
        assert meta.expired() == []
        assert [s.id for s in clocked(500).expired()] == ["short"]
        assert sorted(s.id for s in clocked(50_000).expired()) == ["long", "short"]
        later = clocked(500)
        later.update("short", 1)  # touched at +500: expires at +600
        assert clocked(550).expired() == []
        clocked(580).append("short", 2, spec(0))  # an append touches it too: expires at +680
        assert clocked(650).expired() == []
        assert [s.id for s in clocked(700).expired()] == ["short"]

    def test_expired_drains_in_batches(self, meta: MetaStore, clocked: Callable[[float], MetaStore]) -> None:
        """gc's loop: ``expired(limit)`` then delete, until none is due, finds every due session once."""
        due = {f"d{i:02d}" for i in range(40)}
        for i, session_id in enumerate(sorted(due)):
            meta.create(session_id, FP, ttl=100 + i)
        meta.create("later", FP, ttl=1_000_000)
        future, seen = clocked(10_000), list[str]()
        while batch := future.expired(limit=7):
            assert len(batch) <= 7
            for session in batch:
                seen.append(session.id)
                future.delete(session.id)
        assert sorted(seen) == sorted(due)
        assert [s.id for s in meta.list_sessions().sessions] == ["later"]

    # ---- leases -----------------------------------------------------------------------------

    def test_lease_lifecycle(self, meta: MetaStore) -> None:
        meta.create("s1", FP)
        held = meta.acquire_lease("s1", "node-a", 30)
        assert held.owner == "node-a" and held.lease_expires is not None and held.lease_expires > time.time() + 20
        assert held.version == 1  # lease calls never bump the version
        with pytest.raises(LeaseError) as info:
            meta.acquire_lease("s1", "node-b", 30)
        assert info.value.owner == "node-a"
        with pytest.raises(LeaseError):
            meta.renew_lease("s1", "node-b", 30)
        assert meta.release_lease("s1", "node-b") is False
        assert meta.get("s1").owner == "node-a"
        assert meta.acquire_lease("s1", "node-a", 60).owner == "node-a"  # re-entrant
        renewed = meta.renew_lease("s1", "node-a", 120)
        assert renewed.lease_expires is not None and renewed.lease_expires > time.time() + 100
        assert meta.release_lease("s1", "node-a") is True
        assert meta.get("s1").owner is None
        with pytest.raises(LeaseError):
            meta.renew_lease("s1", "node-a", 30)
        assert meta.acquire_lease("s1", "node-b", 30).owner == "node-b"
        assert meta.get("s1").version == 1

    def test_lease_expiry_lets_another_owner_in(self, meta: MetaStore) -> None:
        meta.create("s1", FP)
        held = meta.acquire_lease("s1", "node-a", 1.0)
        with pytest.raises(LeaseError):
            meta.acquire_lease("s1", "node-b", 30)

        def take() -> bool:
            try:
                return meta.acquire_lease("s1", "node-b", 30).owner == "node-b"
            except LeaseError:
                return False

        assert held.lease_expires is not None and wait_until(take, held.lease_expires - time.time() + 3)
        with pytest.raises(LeaseError):
            meta.renew_lease("s1", "node-a", 30)

    def test_two_owners_racing_for_a_lease(self, meta: MetaStore, meta_uri: str) -> None:
        for round_ in range(2):
            session_id = f"race-{round_}"
            meta.create(session_id, FP)
            if self.processes:
                ctx = multiprocessing.get_context("spawn")
                start, results = ctx.Barrier(3), ctx.Queue()
                procs = [ctx.Process(target=_lease_worker, args=(meta_uri, session_id, owner, start, results))
                         for owner in ("node-a", "node-b")]
                for proc in procs:
                    proc.start()
                start.wait(60)
                outcome = dict(results.get(timeout=60) for _ in procs)
                for proc in procs:
                    proc.join(30)
            else:
                barrier = threading.Barrier(2)

                def race(owner: str, session_id: str = session_id,
                         barrier: threading.Barrier = barrier) -> tuple[str, bool]:
                    barrier.wait()
                    try:
                        meta.acquire_lease(session_id, owner, 30)
                        return owner, True
                    except LeaseError:
                        return owner, False

                with ThreadPoolExecutor(2) as pool:
                    outcome = dict(pool.map(race, ["node-a", "node-b"]))
            assert sorted(outcome.values()) == [False, True]
            winner = next(owner for owner, won in outcome.items() if won)
            assert meta.get(session_id).owner == winner

    # ---- concurrency --------------------------------------------------------------------------

    def test_concurrent_appends_land_exactly_once(self, meta: MetaStore, meta_uri: str) -> None:
        meta.create("shared", FP)
        procs, threads, count = (4, 4, 8) if self.processes else (1, 16, 8)
        if self.processes:
            ctx = multiprocessing.get_context("spawn")
            results = ctx.Queue()
            workers = [ctx.Process(target=_append_worker, args=(meta_uri, "shared", w, threads, count, results))
                       for w in range(procs)]
            for worker in workers:
                worker.start()
            landed = [item for _ in workers for item in results.get(timeout=240)]
            for worker in workers:
                worker.join(30)
                assert worker.exitcode == 0
        else:
            landed = _append_worker(meta_uri, "shared", 0, threads, count)
        total = procs * threads * count
        assert len(landed) == total
        entries = meta.entries("shared")
        assert sorted(e.key for e in entries) == sorted(key for key, _, _ in landed)  # each exactly once
        assert [e.seq for e in entries] == list(range(total))
        assert [e.token_offset for e in entries] == [4 * i for i in range(total)]  # contiguous
        versions = sorted(version for _, version, _ in landed)
        assert versions == list(range(2, total + 2))  # every append its own version
        by_key = {e.key: e.seq for e in entries}
        assert all(by_key[key] == seq for key, _, seq in landed)
        per_writer: dict[str, list[int]] = {}
        for key, version, _ in landed:
            per_writer.setdefault(key.rsplit("/", 1)[0], []).append(version)
        assert all(v == sorted(v) for v in per_writer.values())  # strictly increasing per writer
        session = meta.get("shared")
        assert (session.version, session.total_tokens) == (total + 1, 4 * total)

    def test_racing_creators_one_wins(self, meta: MetaStore) -> None:
        barrier = threading.Barrier(8)

        def create(i: int) -> bool:
            barrier.wait()
            try:
                meta.create("contended", f"fp-{i}")
                return True
            except AlreadyExistsError:
                return False

        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(create, range(8))) == [False] * 7 + [True]

    # ---- odd and bad input ---------------------------------------------------------------------

    def test_odd_ids_round_trip_and_stay_distinct(self, meta: MetaStore) -> None:
        for i, session_id in enumerate(ODD_IDS):
            fill(meta, session_id, [i + 1])
        for i, session_id in enumerate(ODD_IDS):
            session = meta.get(session_id)
            assert session.id == session_id and session.total_tokens == i + 1
            assert [e.session_id for e in meta.entries(session_id)] == [session_id]
        listed = []
        cursor = None
        while True:
            page = meta.list_sessions(limit=5, cursor=cursor)
            listed += [s.id for s in page.sessions]
            if (cursor := page.cursor) is None:
                break
        assert listed == sorted(ODD_IDS, key=lambda i: i.encode("utf-8"))
        meta.delete(ODD_IDS[0])
        assert meta.get(ODD_IDS[1]).total_tokens == 2

    @pytest.mark.parametrize("bad", BAD_IDS, ids=lambda b: repr(b)[:20])
    def test_bad_ids_are_refused_everywhere(self, meta: MetaStore, bad: Any) -> None:
        calls: list[Callable[[], Any]] = [
            lambda: meta.create(bad, FP), lambda: meta.get(bad), lambda: meta.entries(bad),
            lambda: meta.update(bad, 1), lambda: meta.append(bad, 1, spec(0)), lambda: meta.truncate(bad, 1, 0),
            lambda: meta.delete(bad), lambda: meta.acquire_lease(bad, "me", 5)]
        for call in calls:
            with pytest.raises(InvalidKeyError):
                call()
        assert meta.list_sessions().sessions == []

    def test_repr_and_errors_hide_secrets(self, meta: MetaStore, meta_uri: str) -> None:
        from kvswap.uri import URI

        password = URI.parse(meta_uri).password
        assert "***" in repr(meta) or password is None
        if password:
            assert password not in repr(meta) and password not in str(meta)
            with pytest.raises(NotFoundError) as info:
                meta.get("missing")
            assert password not in str(info.value)


def run_appender(uri: str, session_id: str, out_path: str, count: int) -> None:
    """A writer for restart tests: appends ``count`` entries, logging each that returned."""
    meta = open_meta_store(uri)
    with open(out_path, "a", buffering=1) as log:
        for i in range(count):
            version, seq = append_with_retry(meta, session_id, f"k{i}")
            log.write(f"{seq} {version} k{i}\n")
            log.flush()
            os.fsync(log.fileno())
