"""The session cache under faults: stores down, blobs corrupted or gone, writers killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_session_reuse import DEVICE, LAYOUT, MODEL, TOKENIZER, make_cache

from kvswap.connectors import open_connector
from kvswap.engine import Engine
from kvswap.meta import EntrySpec, open_meta_store
from kvswap.session_cache import OutOfBlocksError, PagedKVPool, SessionCache, StoreTier
from kvswap.workload import first_prompt, user_turn


def _one_turn_then_store(tmp_path: Path, words: int = 40) -> tuple[SessionCache, Engine, list[int]]:
    cache = make_cache(f"file://{tmp_path}/kv", blocks=60, policy="write-through")
    engine = Engine(MODEL, cache)
    tokens = first_prompt(TOKENIZER, 7, words=words)
    history = tokens + engine.generate("s", tokens, 8).tokens
    history += TOKENIZER.encode(user_turn(7, 1))
    history += engine.generate("s", history, 8).tokens  # a second entry
    cache.swap_out("s", to_store=True)
    assert len(cache.meta.entries("s")) == 2 and cache.resident_sessions() == []
    return cache, engine, history + TOKENIZER.encode(user_turn(7, 2))


def _check_exact(engine: Engine, session: str, tokens: list[int]) -> int:
    got = engine.generate(session, tokens, 8, return_logits=True)
    ref = engine.generate_uncached(tokens, 8, return_logits=True)
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    return got.cached


def test_store_down_during_swap_out_keeps_the_session_resident(closed_port: int) -> None:
    cache = make_cache(f"redis://127.0.0.1:{closed_port}/0?timeout=1&connect_timeout=1&retries=0", blocks=16)
    engine = Engine(MODEL, cache)
    tokens = first_prompt(TOKENIZER, 1, words=20)
    history = tokens + engine.generate("kept", tokens, 8).tokens
    began = time.monotonic()
    with pytest.raises(OutOfBlocksError, match="swap-out failed: could not store session 'kept'"):
        engine.generate("other", first_prompt(TOKENIZER, 2, words=40), 8)
    assert time.monotonic() - began < 10
    assert cache.resident_sessions() == ["kept"] and cache.stats.store_errors >= 1
    assert cache.meta.entries("kept") == []  # nothing claims KV that was never stored
    assert _check_exact(engine, "kept", history + [33]) == len(history) - 1  # still an HBM hit


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_damaged_blob_is_a_miss_and_its_entries_are_dropped(tmp_path: Path, damage: str) -> None:
    cache, engine, request = _one_turn_then_store(tmp_path)
    first, second = cache.meta.entries("s")
    path = tmp_path / "kv" / second.key
    if damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x01  # one bit of KV
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    assert _check_exact(engine, "s", request) == first.token_end  # the intact first entry only
    assert cache.stats.dropped_entries == 1
    assert [e.key for e in cache.meta.entries("s")][:1] == [first.key]
    if damage == "corrupt":
        assert not path.exists()  # the bad blob was deleted with its entry


def test_a_newer_format_is_a_miss_and_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans whose checksum this kvswap does not know (written by a newer one, during a rolling
    upgrade) are not read and not dropped: once this instance reads that format, they reuse."""
    import kvswap.blob as blob

    monkeypatch.setattr(blob, "CHECKSUM_ALGORITHM", "xxh3_128_next")  # what "a newer kvswap" writes
    cache, engine, request = _one_turn_then_store(tmp_path)
    entries = cache.meta.entries("s")
    assert all(e.checksum.startswith("xxh3_128_next:") for e in entries)
    monkeypatch.setattr(blob, "CHECKSUM_ALGORITHM", "xxh3_128")  # this kvswap
    assert cache.prefetch("s") == 0  # a miss
    assert cache.stats.dropped_entries == 0
    assert cache.meta.entries("s") == entries
    assert all((tmp_path / "kv" / e.key).exists() for e in entries)
    monkeypatch.setattr(blob, "CHECKSUM_ALGORITHM", "xxh3_128_next")  # upgraded: the format is known
    assert cache.prefetch("s") == entries[-1].token_end
    assert _check_exact(engine, "s", request) == entries[-1].token_end


def test_damaged_first_entry_leaves_nothing_to_reuse(tmp_path: Path) -> None:
    cache, engine, request = _one_turn_then_store(tmp_path)
    first, second = cache.meta.entries("s")
    (tmp_path / "kv" / first.key).write_bytes(b"not a blob")
    assert _check_exact(engine, "s", request) == 0
    assert cache.stats.dropped_entries == 2 and not (tmp_path / "kv" / second.key).exists()


def test_meta_entry_without_its_blob(tmp_path: Path) -> None:
    cache, engine, request = _one_turn_then_store(tmp_path)
    session = cache.meta.get("s")
    store = cache.stores[0]
    ghost = EntrySpec(token_offset=session.total_tokens, token_length=4, connector=store.location,
                      key=store.new_key("s", session.total_tokens, session.total_tokens + 4), size=4096,
                      checksum="xxh3_128:" + "0" * 32, prefix_hash="0" * 32)
    cache.meta.append("s", session.version, ghost)
    # Both real entries are reused, the ghost (its blob never written) is dropped, output is exact.
    extended = request + [1, 2, 3, 4, 5]
    assert _check_exact(engine, "s", extended) == session.total_tokens
    assert cache.stats.dropped_entries == 1 and all(e.key != ghost.key for e in cache.meta.entries("s"))


def test_swapped_kv_from_another_model_is_never_used(tmp_path: Path) -> None:
    from kvswap.engine import build_model

    cache, engine, request = _one_turn_then_store(tmp_path)
    other_model, other_layout = build_model("tiny", seed=1, device=DEVICE)
    other = SessionCache(PagedKVPool(other_layout, 60, 16, DEVICE), cache.meta, [c.connector for c in cache.stores],
                         recompute_when_faster=False)
    other_engine = Engine(other_model, other)
    assert _check_exact(other_engine, "s", request) == 0
    # The other model's turn replaced the history in meta; the first model misses too, exactly.
    other.swap_out("s", to_store=True)
    assert cache.meta.get("s").fingerprint == other_layout.fingerprint
    assert _check_exact(engine, "s", request) == 0


def test_blob_with_wrong_fingerprint_or_span_is_rejected(tmp_path: Path) -> None:
    cache, engine, request = _one_turn_then_store(tmp_path)
    first, second = cache.meta.entries("s")
    # Swap the two blobs' bytes: each is a valid blob, but not the one meta describes.
    a, b = tmp_path / "kv" / first.key, tmp_path / "kv" / second.key
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    assert _check_exact(engine, "s", request) == 0 and cache.stats.dropped_entries == 2


_KILLED_WRITER = r"""
import sys
from kvswap.connectors import open_connector
from kvswap.engine import Engine, ByteTokenizer, build_model
from kvswap.meta import open_meta_store
from kvswap.session_cache import PagedKVPool, SessionCache
model, layout = build_model("tiny")
cache = SessionCache(PagedKVPool(layout, 400, 16), open_meta_store(sys.argv[1]), [open_connector(sys.argv[2])],
                     policy="write-through", lease_ttl=None)
engine = Engine(model, cache)
tok = ByteTokenizer()
history = {}
for n in range(10_000):
    sid = f"k{n % 6}"
    history[sid] = history.get(sid, tok.encode("start", bos=True)) + tok.encode(f" turn {n} " + "x" * 300)
    history[sid] = history[sid][-3000:] if len(history[sid]) > 3000 else history[sid]
    history[sid] += engine.generate(sid, history[sid], 4).tokens
    print(n, flush=True)
"""


def test_sigkill_mid_swap_out_leaves_no_meta_pointing_at_partial_data(tmp_path: Path) -> None:
    meta_uri, store_uri = f"sqlite:///{tmp_path}/meta.db", f"file://{tmp_path}/kv"
    rng = random.Random(7)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, meta_uri, store_uri],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        time.sleep(rng.uniform(0.2, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        meta, store = open_meta_store(meta_uri), open_connector(store_uri)
        tier = StoreTier(store, LAYOUT)
        checked = 0
        for session in meta.list_sessions().sessions:
            for entry in meta.entries(session.id):
                tier.read(entry)  # raises if partial, corrupt or missing
                checked += 1
        assert checked, f"round {round_}: nothing was stored before the kill"
        meta.close()
        store.close()


def test_restart_after_sigkill_and_after_clean_stop_every_stored_session_is_a_hit(tmp_path: Path) -> None:
    meta_uri, store_uri = f"sqlite:///{tmp_path}/meta.db", f"file://{tmp_path}/kv"
    worker = _Worker(meta_uri, store_uri)
    histories = {}
    for s in range(3):
        tokens = first_prompt(TOKENIZER, s)
        reply = worker.ask(op="generate", session=f"r{s}", tokens=tokens, max_new=8)
        histories[f"r{s}"] = tokens + reply["tokens"] + TOKENIZER.encode(user_turn(s, 1))
    worker.kill()  # SIGKILL: write-through had stored every turn
    worker = _Worker(meta_uri, store_uri)
    for sid, tokens in histories.items():
        reply = worker.ask(op="generate", session=sid, tokens=tokens, max_new=8)
        assert reply["cached"] == len(tokens) - len(TOKENIZER.encode(user_turn(int(sid[1]), 1))) - 1
        assert reply["tokens"] == reply["reference"]
        histories[sid] = tokens + reply["tokens"] + [10]
    worker.stop()
    # A clean stop of a write-back cache: flush() stores what is resident.
    cache = make_cache(store_uri, blocks=200, meta=meta_uri)
    engine = Engine(MODEL, cache)
    cache.lease_ttl = 30.0
    for sid, tokens in histories.items():
        assert _check_exact(engine, sid, tokens) == len(tokens) - 2  # the worker stored all but [10]
        histories[sid] = tokens + [11, 12]
    assert cache.flush() == 3 and cache.resident_sessions() == []
    restarted = Engine(MODEL, make_cache(store_uri, blocks=200, meta=meta_uri))
    for sid, tokens in histories.items():
        assert _check_exact(restarted, sid, tokens) == len(tokens) - 2


class _Worker:
    """An engine process (kvswap.testing.engine_worker) spoken to in JSON lines."""

    def __init__(self, meta: str, store: str, **flags: object) -> None:
        args = [sys.executable, "-m", "kvswap.testing.engine_worker", "--meta", meta, "--store", store]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def ask(self, **request: object) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the worker died"
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        self.ask(op="exit")
        self.proc.wait(10)
