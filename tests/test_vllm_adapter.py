"""The vLLM KV-memory adapter moves exactly each token's own K and V.

The layout is learnt from a cache writer; here with writers of known layouts (plain, tokens
interleaved in pairs as vLLM's CPU vector kernels store them, K and V in separate halves of
the layer, a non-contiguous view as vLLM hands out for an HND stride order, layers sharing
one storage), a writer that is not a layout (refused), and, in vLLM's environment, vLLM's
real CPU cache writer."""

from __future__ import annotations

import subprocess

import pytest
import torch

from kvswap.errors import ConfigError
from kvswap.integrations.vllm.kv_cache import PagedKV
from kvswap.testing.vllm import fp8_kv_on_this_cpu, vllm_python

BLOCKS, HEADS, BLOCK, DIM, LAYERS = 12, 2, 32, 16, 3


def plain_writer(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    view = layer.view(layer.shape[0], HEADS, 2, BLOCK, DIM)
    view[slots // BLOCK, :, 0, slots % BLOCK] = key
    view[slots // BLOCK, :, 1, slots % BLOCK] = value


def paired_writer(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Slots 2i and 2i+1 share rows, their dims interleaved: [block, head, K|V, pair, dim, 2]."""
    view = layer.view(layer.shape[0], HEADS, 2, BLOCK // 2, DIM, 2)
    blocks, offsets = slots // BLOCK, slots % BLOCK
    view[blocks, :, 0, offsets // 2, :, offsets % 2] = key
    view[blocks, :, 1, offsets // 2, :, offsets % 2] = value


SHUFFLE = torch.randperm(BLOCK * 2 * HEADS * DIM, generator=torch.Generator().manual_seed(1))


def shuffled_writer(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """No axis permutation at all: each (slot, K|V, head, dim) at a fixed random place of its page."""
    pages = layer.view(layer.shape[0], -1)
    where = SHUFFLE.view(BLOCK, 2, HEADS * DIM)
    pages[(slots // BLOCK)[:, None], where[slots % BLOCK, 0]] = key.reshape(len(slots), -1)
    pages[(slots // BLOCK)[:, None], where[slots % BLOCK, 1]] = value.reshape(len(slots), -1)


def split_writer(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """K of every block first, then V: ``[2, blocks, block, heads, dim]`` (pages are not contiguous)."""
    view = layer.view(2, layer.shape[0], BLOCK, HEADS, DIM)
    view[0, slots // BLOCK, slots % BLOCK] = key
    view[1, slots // BLOCK, slots % BLOCK] = value


def hnd_writer(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """A logical ``[blocks, 2, block, heads, dim]`` view over memory laid out ``[blocks, 2, heads, block, dim]``."""
    layer[slots // BLOCK, 0, slots % BLOCK] = key
    layer[slots // BLOCK, 1, slots % BLOCK] = value


def lossy_writer(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    plain_writer(layer, key, key, slots)  # V lands where K does: not a layout at all


def caches(dtype: torch.dtype = torch.float32, writer: object = None) -> dict[str, torch.Tensor]:
    if writer is hnd_writer:  # non-contiguous views, as vLLM hands out for an HND stride order
        return {f"model.layers.{i}.self_attn.attn":
                torch.zeros(BLOCKS, 2, HEADS, BLOCK, DIM, dtype=dtype).transpose(2, 3) for i in range(LAYERS)}
    if writer is split_writer:  # all layers in one storage, one after another
        shared = torch.zeros(LAYERS, BLOCKS, HEADS, BLOCK, 2 * DIM, dtype=dtype)
        return {f"model.layers.{i}.self_attn.attn": shared[i] for i in range(LAYERS)}
    return {f"model.layers.{i}.self_attn.attn": torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM, dtype=dtype)
            for i in range(LAYERS)}


def register(tensors: dict[str, torch.Tensor], writer, **options) -> PagedKV:
    settings = dict(num_layers=LAYERS, heads=HEADS, head_dim=DIM, dtype=torch.float32, block_size=BLOCK)
    settings.update(options)
    return PagedKV.register(tensors, lambda name: writer, **settings)


@pytest.mark.parametrize("writer", [plain_writer, paired_writer, shuffled_writer, split_writer, hnd_writer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheduler_block", [BLOCK, 2 * BLOCK])
def test_each_token_moves_its_own_k_and_v(writer, dtype: torch.dtype, scheduler_block: int) -> None:
    tensors = caches(dtype, writer)
    kv = register(tensors, writer, dtype=dtype, block_size=scheduler_block)
    assert all(not t.any() for t in tensors.values())  # the probe left the cache as it found it
    assert (kv.pages is None) == (writer is split_writer)  # whole pages move as views where a block is one page
    block_ids = [4, 1, 5]  # a request's blocks (scheduler blocks), scattered
    start, stop = 3, 2 * scheduler_block + 5  # partial blocks at both ends
    ratio = scheduler_block // BLOCK
    positions = torch.arange(start, stop)
    slots = (torch.tensor(block_ids)[positions // scheduler_block] * ratio
             + (positions % scheduler_block) // BLOCK) * BLOCK + positions % BLOCK
    torch.manual_seed(0)
    written = torch.randn(LAYERS, 2, stop - start, HEADS, DIM).to(dtype)
    for index, layer in enumerate(tensors.values()):  # as the engine writes them
        writer(layer, written[index, 0], written[index, 1], slots)
    out = torch.empty_like(written)
    kv.gather(block_ids, start, stop, out)
    assert torch.equal(out, written)
    # Scatter elsewhere and gather back; the engine's own writer agrees on where it went.
    before = {n: t.clone() for n, t in tensors.items()}
    kv.scatter(written, [2, 0, 3], start)
    again = torch.empty_like(written)
    kv.gather([2, 0, 3], start, stop, again)
    assert torch.equal(again, written)
    expected = {n: t.clone() for n, t in before.items()}
    other = (torch.tensor([2, 0, 3])[positions // scheduler_block] * ratio
             + (positions % scheduler_block) // BLOCK) * BLOCK + positions % BLOCK
    for index, name in enumerate(expected):
        writer(expected[name], written[index, 0], written[index, 1], other)
        assert torch.equal(tensors[name], expected[name])  # those slots changed, nothing else


def test_what_is_not_a_layout_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown KV layout"):
        register(caches(), lossy_writer)
    with pytest.raises(ConfigError, match="registered 3 KV layers; the model has 4"):
        register(caches(), plain_writer, num_layers=4)
    with pytest.raises(ConfigError, match="not alike"):
        register(caches(), plain_writer, dtype=torch.bfloat16)
    mixed = caches()
    mixed["model.layers.1.self_attn.attn"] = mixed["model.layers.1.self_attn.attn"].transpose(1, 2)
    with pytest.raises(ConfigError, match="not alike"):
        register(mixed, plain_writer)


REAL_WRITER = """
import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from kvswap.integrations.vllm.kv_cache import PagedKV
for dtype, dim in ((torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 128)):
    blocks, heads, block = 6, 3, 128
    isa = _get_attn_isa(dtype, block, dim, "auto")

    def write(cache, key, value, slots):  # what vLLM 0.32's CPU do_kv_cache_update does
        key_cache, value_cache = cache.view(cache.shape[0], heads, block * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")

    tensors = {f"model.layers.{i}.attn": torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype) for i in range(2)}
    kv = PagedKV.register(tensors, lambda name: write, num_layers=2, heads=heads, head_dim=dim, dtype=dtype,
                          block_size=block)
    start, stop, ids = 5, 2 * block + 9, [3, 0, 4]
    positions = torch.arange(start, stop)
    slots = torch.tensor(ids)[positions // block] * block + positions % block
    written = torch.randn(2, 2, stop - start, heads, dim).to(dtype)
    for index, layer in enumerate(tensors.values()):
        write(layer, written[index, 0].contiguous(), written[index, 1].contiguous(), slots)
    out = torch.empty_like(written)
    kv.gather(ids, start, stop, out)
    assert torch.equal(out, written), (dtype, dim, isa)
    kv.scatter(written * 2, [1, 2, 5], start)
    back = torch.empty_like(written)
    kv.gather([1, 2, 5], start, stop, back)
    assert torch.equal(back, written * 2), (dtype, dim, isa)
    print("ok", dtype, dim, isa, kv.pages is not None)
# An fp8 cache (bytes to vLLM): the writer quantizes float32 values; kvswap moves the bytes as they are.
# (vLLM's CPU writer takes fp8 only on x86 with AVX-512 or AMX: the test passes "no-fp8" elsewhere.)
import sys
from kvswap.integrations.vllm.kv_cache import as_held
for name, fp8, spacing in (("fp8", torch.float8_e4m3fn, 2 ** -3), ("fp8_e5m2", torch.float8_e5m2, 2 ** -2))[
        :0 if sys.argv[1:] == ["no-fp8"] else 2]:
    blocks, heads, block, dim = 6, 2, 128, 64
    isa = _get_attn_isa(torch.float32, block, dim, name)

    def write(cache, key, value, slots):
        key_cache, value_cache = cache.view(cache.shape[0], heads, block * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype=name)

    tensors = {f"model.layers.{i}.attn": torch.zeros(blocks, heads, block, 2 * dim, dtype=torch.uint8)
               for i in range(2)}
    kv = PagedKV.register(tensors, lambda name: write, num_layers=2, heads=heads, head_dim=dim, dtype=fp8,
                          block_size=block, values=torch.float32)
    start, stop, ids = 5, 2 * block + 9, [3, 0, 4]
    positions = torch.arange(start, stop)
    slots = torch.tensor(ids)[positions // block] * block + positions % block
    written = torch.randn(2, 2, stop - start, heads, dim)
    for index, layer in enumerate(tensors.values()):
        write(layer, written[index, 0].contiguous(), written[index, 1].contiguous(), slots)
    out = torch.empty(written.shape, dtype=fp8)
    kv.gather(ids, start, stop, as_held(out))
    assert torch.allclose(out.float(), written, rtol=spacing * 1.01, atol=0.02), name  # what the writer quantized
    kv.scatter(as_held(out), [1, 2, 5], start)
    back = torch.empty(written.shape, dtype=fp8)
    kv.gather([1, 2, 5], start, stop, as_held(back))
    assert torch.equal(as_held(back), as_held(out)), name  # byte for byte
    print("ok", name)
"""


@pytest.mark.skipif(vllm_python() is None, reason="no .venv-vllm (scripts/setup.sh --vllm)")
def test_vllm_cpu_cache_writer_round_trips() -> None:
    """vLLM's real CPU cache writer in each dtype; fp8 where this CPU lets vLLM write it."""
    fp8 = fp8_kv_on_this_cpu()
    done = subprocess.run([str(vllm_python()), "-c", REAL_WRITER, *([] if fp8 else ["no-fp8"])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == (5 if fp8 else 3), done.stdout


def emulate_move(kv: PagedKV, stage: torch.Tensor, rows, to_pages: bool) -> None:
    """What the GPU kernel (kvswap.integrations.vllm.gpu._move) does with a move table, in torch."""
    width = kv.heads * kv.head_dim
    table = torch.from_numpy(rows)
    lanes = torch.arange(width)
    for token in range(table.shape[1]):
        block, slot, entry, length, index = (int(v) for v in table[:, token])
        for plane in range(2 * kv.num_layers):
            layer, which = divmod(plane, 2)
            paged = kv.bases[layer] + block + kv.where[slot, which]
            staged = entry + (plane * length + index) * width + lanes
            if to_pages:
                kv.storages[layer][paged] = stage[staged]
            else:
                stage[staged] = kv.storages[layer][paged]


@pytest.mark.parametrize("writer", [paired_writer, split_writer, hnd_writer])
def test_the_gpu_kernels_table_moves_each_token_of_each_entry(writer) -> None:
    """The GPU path moves entries (staged one after another, each [layers, 2, n, heads * dim])
    by a table of offsets: emulated here, it agrees with the CPU gather and scatter."""
    tensors = caches(torch.float32, writer)
    kv = register(tensors, writer)
    block_ids = [7, 2, 9, 4]  # a request of entries 0-40, 40-70, 70-128
    written = torch.randn(LAYERS, 2, 4 * BLOCK, HEADS, DIM)
    kv.scatter(written, block_ids, 0)
    # Gather entries 2 and 3 (a group), positions 50.. only, as a load would scatter them.
    group = [(40, 30, 50, 70), (70, 4 * BLOCK - 70, 70, 4 * BLOCK)]
    stage = torch.zeros(sum(n for _, n, _, _ in group) * LAYERS * 2 * HEADS * DIM)
    emulate_move(kv, stage, kv.move_table(block_ids, group), to_pages=False)
    first = stage[:30 * LAYERS * 2 * HEADS * DIM].view(LAYERS, 2, 30, HEADS, DIM)
    second = stage[30 * LAYERS * 2 * HEADS * DIM:].view(LAYERS, 2, 4 * BLOCK - 70, HEADS, DIM)
    assert torch.equal(first[:, :, 10:], written[:, :, 50:70]) and not first[:, :, :10].any()
    assert torch.equal(second, written[:, :, 70:])
    # And back, into other blocks: the CPU gather reads what the table wrote.
    emulate_move(kv, stage, kv.move_table([1, 0, 3, 5], group), to_pages=True)
    out = torch.empty(LAYERS, 2, 4 * BLOCK - 50, HEADS, DIM)
    kv.gather([1, 0, 3, 5], 50, 4 * BLOCK, out)
    assert torch.equal(out, written[:, :, 50:])


def test_store_health_pauses_a_store_then_tries_it_again() -> None:
    import time

    from kvswap.integrations.vllm.pacing import StoreHealth

    health = StoreHealth(pause=0.2)
    assert not health.is_down("valkey://a")
    health.down("valkey://a")
    assert health.is_down("valkey://a") and not health.is_down("valkey://b")
    time.sleep(0.25)
    assert not health.is_down("valkey://a")  # tried again after the pause
    health.down("valkey://a")
    health.up("valkey://a")  # it answered
    assert not health.is_down("valkey://a")


def test_forward_clock_times_large_steps_only() -> None:
    import time

    from kvswap.integrations.vllm.pacing import TIMED_TOKENS, ForwardClock

    clock = ForwardClock()
    clock.start(TIMED_TOKENS - 1, cuda=False)  # a decode step: not a prefill speed
    time.sleep(0.01)
    clock.stop()
    assert clock.seconds_per_token is None
    clock.start(1000, cuda=False)
    time.sleep(0.02)
    clock.stop()
    assert clock.seconds_per_token is not None and 1.5e-5 < clock.seconds_per_token < 2e-4


def test_store_rates_measure_the_store_not_one_of_many_reads_sharing_it() -> None:
    """32 reads of 64 MiB that share a store for 1 s measure 2 GiB/s, not a 32nd of it; a new
    read is predicted behind what is in flight; a store never measured has no prediction."""
    from kvswap.integrations.vllm.pacing import StoreRates

    now = [0.0]
    rates = StoreRates(clock=lambda: now[0])
    assert rates.seconds("valkey://a", 1 << 20) is None
    mib64 = 64 << 20
    for _ in range(32):
        rates.started({"valkey://a": mib64})
    assert rates.seconds("valkey://a", 1) is None  # in flight, not yet measured
    for _ in range(32):
        now[0] += 1 / 32
        rates.finished({"valkey://a": mib64}, {"valkey://a": mib64})
    assert rates.seconds("valkey://a", 2 << 30) == pytest.approx(1.0)  # 2 GiB at 2 GiB/s, nothing in flight
    rates.started({"valkey://a": 1 << 30})
    assert rates.seconds("valkey://a", 1 << 30) == pytest.approx(1.0)  # behind the GiB in flight
    now[0] += 100.0
    assert rates.stale({"valkey://a", "file://b"}, 30.0) == {"valkey://a"}
    rates.finished({"valkey://a": 1 << 30}, {})  # a read that moved nothing (failed) measures no speed
    assert rates.seconds("valkey://a", 2 << 30) == pytest.approx(1.0)
    rates.measured("file://b", 10e9)
    assert rates.seconds("file://b", int(5e9)) == pytest.approx(0.5)


def test_a_held_save_is_what_its_sessions_next_turn_plans_over_and_commits_keep_their_order() -> None:
    """A save's unwritten entries serve its session's next turn once every rank holds them;
    written, they carry their blobs' checksums everywhere they are held; the session's commits
    run one at a time in the order their saves were written."""
    from kvswap.integrations.vllm.outcomes import Held, Saved, merge_held
    from kvswap.integrations.vllm.saves import InFlightSaves, Save
    from kvswap.meta import Entry, EntrySpec
    from kvswap.session_cache.base import UNWRITTEN
    from kvswap.session_cache.tiers import StoredState

    def spec(start: int, end: int, key: str, checksum: str = UNWRITTEN) -> EntrySpec:
        return EntrySpec(start, end - start, "file:///kv", key, 64, checksum, f"h{end}")

    saves = InFlightSaves()
    saves.add("r1", Save("chat", list(range(100)), StoredState(), deadline=10.0))
    assert saves.waiting("chat", 1.0) == (True, []) and saves.local("chat") is None  # not held: the turn waits
    # Rank 1 holds the same spans under its own keys; the entries are rank 0's.
    assert merge_held([Held([spec(0, 50, "a")]), Held([spec(0, 50, "a.r1")])]) == [spec(0, 50, "a")]
    assert merge_held([Held([spec(0, 50, "a")]), Held([spec(0, 40, "a.r1")])]) is None
    saves.held("r1", [spec(0, 50, "a"), spec(50, 100, "b")])
    assert saves.waiting("chat", 1.0) == (False, [])
    stored, entries = saves.local("chat")
    assert [(e.key, e.checksum) for e in entries] == [("a", UNWRITTEN), ("b", UNWRITTEN)]
    assert stored.version is None and stored.fingerprint_ok  # a write over them rebases on meta

    # Turn 2 built on them, saved and held too; turn 1's blobs are written after.
    saves.add("r2", Save("chat", list(range(130)), StoredState(), 10.0, kept=list(entries)))
    saves.held("r2", [spec(100, 130, "c")])
    assert [e.key for e in saves.local("chat")[1]] == ["a", "b", "c"]  # the furthest save
    assert saves.written("r1", Saved([spec(0, 50, "a", "xxh:a"), spec(50, 100, "b", "xxh:b")]))[1] is True
    assert [e.checksum for e in saves.local("chat")[1]] == ["xxh:a", "xxh:b", UNWRITTEN]
    save2, first = saves.written("r2", Saved([spec(100, 130, "c", "xxh:c")]))
    assert save2 is not None and first is False  # behind turn 1's commit
    following = saves.committed("r1", "chat")
    assert following is not None and following[0] == "r2"
    assert saves.committed("r2", "chat") is None and not saves
    # A request planned over turn 2's unwritten entry finishes after that save landed: it holds
    # the written entry, and the turn after it is planned over its save.
    saves.add("r8", Save("chat", list(range(150)), StoredState(), 10.0,
                         kept=[*(Entry.of(spec(a, b, k, f"xxh:{k}"), "chat", i, 0.0)
                                 for i, (a, b, k) in enumerate([(0, 50, "a"), (50, 100, "b")])),
                               Entry.of(spec(100, 130, "c"), "chat", 2, 0.0)]))
    saves.held("r8", [spec(130, 150, "d")])
    assert [(e.key, e.checksum) for e in saves.local("chat")[1]] == [
        ("a", "xxh:a"), ("b", "xxh:b"), ("c", "xxh:c"), ("d", UNWRITTEN)]
    assert saves.written("r8", Saved([spec(130, 150, "d", "xxh:d")]))[1] is True
    # ... but not once the commit of what it built on did not land.
    saves.add("r9", Save("chat", list(range(170)), StoredState(), 10.0, kept=saves.local("chat")[1][:3] + [
        Entry.of(spec(130, 150, "d"), "chat", 3, 0.0)]))
    assert saves.committed("r8", "chat", landed=False) is None
    saves.held("r9", [spec(150, 170, "e9")])
    assert saves.local("chat") is None
    saves.written("r9", Saved(None, "not needed"))
    assert not saves
    # A save that fails takes the local entries of the saves built after it: the next turn waits, then reads meta.
    saves.add("r5", Save("chat", [], StoredState(), 10.0))
    saves.held("r5", [spec(0, 50, "e")])
    saves.add("r6", Save("chat", [], StoredState(), 10.0))
    saves.held("r6", [spec(50, 60, "f")])
    assert saves.written("r5", Saved(None, "disk full")) == (None, False)
    assert saves.local("chat") is None and saves.waiting("chat", 1.0) == (True, [])
    saves.held("r6", [spec(50, 60, "f")])  # held again after the failure: still not planned over
    saves.add("r7", Save("chat", [], StoredState(), 10.0, kept=[Entry.of(spec(0, 50, "e"), "chat", 0, 0.0)]))
    saves.held("r7", [spec(50, 70, "g")])  # built on the failed save's entries: never planned over
    assert saves.local("chat") is None
    saves.written("r7", Saved(None, "not needed"))
    assert saves.written("r6", Saved([spec(50, 60, "f", "xxh:f")]))[1] is True
    assert saves.committed("r6", "chat", landed=False) is None and not saves
    # A save whose report never comes is forgotten at its deadline; one that wrote nothing at once.
    saves.add("r3", Save("chat", [], StoredState(), 5.0))
    assert saves.waiting("chat", 6.0) == (False, ["r3"])
    saves.add("r4", Save("chat", [], StoredState(), 5.0))
    assert saves.written("r4", Saved(None, "disk full")) == (None, False) and not saves


def test_a_probe_reads_a_sessions_first_entries_to_measure_their_store(tmp_path) -> None:
    """The worker's probe of a store skipped as slower than recomputing: whole entries up to
    the limit (at least one), read from the store itself, and the store's rate measured."""
    from kvswap.connectors import open_connector
    from kvswap.integrations.vllm.pacing import StoreRates, probe_entries
    from kvswap.meta import open_meta_store
    from kvswap.session_cache import KVLayout, SessionStore
    from kvswap.session_cache.tiers import StoredState

    layout = KVLayout("probe-test", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")
    store = SessionStore(open_meta_store(f"sqlite:///{tmp_path}/meta.db"), [open_connector(f"file://{tmp_path}/kv")],
                         layout, entry_tokens=100)
    try:
        tokens = list(range(1, 300))
        store.write("chat", StoredState(), tokens, lambda a, b: torch.ones(layout.span_shape(b - a)))
        entries = [entry for entry, _ in store.lookup("chat", tokens).entries]
        rates = StoreRates()
        probe_entries(store, "chat", entries, 1, rates)  # a limit below one entry still reads one
        location = store.stores[0].location
        assert rates.seconds(location, 1 << 30) is not None and rates.seconds(location, 1 << 30) > 0
    finally:
        store.close()
