"""Token spans between vLLM's paged KV on a GPU and pinned host memory, on kvswap's own stream.

A save gathers a request's tokens from every layer's blocks into device staging with one
kernel per group of about :data:`GROUP_BYTES` (all layers, all tokens of the group), then
copies the group to pinned host memory in one copy; a load copies each fetched entry from
pinned host memory into device staging in one copy and scatters the group into the blocks
with one kernel. The kernel follows the layout the probe learned (:mod:`.kv_cache`): block
``b``'s value ``(slot, K|V, i)`` of layer ``l`` is element ``bases[l] + b * block_stride +
where[slot, K|V, i]`` of that layer's storage. Staging is entry-major: an entry of ``n``
tokens is ``[layers, 2, n, heads * head_dim]``, what kvswap's blobs hold, so each entry
moves between host and device as one contiguous copy.

Ordering: the stream first waits for an event the caller recorded on the compute stream
(a save must read the KV after the forward that wrote it; a load must not write blocks
before the forwards still in flight for their previous owner are done); the caller reports
a job finished only once the event recorded after its copies has completed, so the model
never reads blocks being filled and never waits for kvswap's copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from kvswap.integrations.vllm.kv_cache import PagedKV
    from kvswap.session_cache.pinned import PinnedBlocks

#: Device staging per group of tokens (bounds the GPU memory a job takes beside vLLM's KV).
GROUP_BYTES = 256 << 20


@triton.jit
def _move(layers, stage, where, table, count, WIDTH: tl.constexpr, BLOCK: tl.constexpr, TO_PAGES: tl.constexpr):
    """Program (t, 2 * layer + K|V) moves one token's K or V of one layer (``WIDTH`` values).
    ``table`` rows (``count`` each): block element offset, slot, the token's entry's staging
    offset, that entry's length, the token's index in it."""
    token = tl.program_id(0)
    plane = tl.program_id(1)
    layer = plane // 2
    which = plane % 2
    paged_base = tl.load(layers + layer).to(tl.pointer_type(stage.dtype.element_ty))
    block = tl.load(table + token)
    slot = tl.load(table + count + token)
    entry = tl.load(table + 2 * count + token)
    length = tl.load(table + 3 * count + token)
    index = tl.load(table + 4 * count + token)
    lanes = tl.arange(0, BLOCK)
    mask = lanes < WIDTH
    inside = tl.load(where + (slot * 2 + which) * WIDTH + lanes, mask=mask, other=0)
    paged = paged_base + block + inside
    staged = stage + entry + (plane * length + index) * WIDTH + lanes
    if TO_PAGES:
        tl.store(paged, tl.load(staged, mask=mask), mask=mask)
    else:
        tl.store(staged, tl.load(paged, mask=mask), mask=mask)


class GPUMover:
    """Saves and loads of one worker's :class:`PagedKV` on a CUDA device. Launches come from
    the worker's own thread (vLLM's ``start_load_kv``); completion is told by events."""

    def __init__(self, kv: PagedKV, pinned: PinnedBlocks) -> None:
        self.kv = kv
        self.pinned = pinned  # the saves' host buffers
        self.device = kv.device
        low_priority = torch.cuda.Stream.priority_range()[0]  # type: ignore[call-arg]  # copies yield to the model
        self.stream = torch.cuda.Stream(self.device, priority=low_priority)
        item = kv.storages[0].element_size()
        self.layers = torch.tensor([s.data_ptr() + base * item for s, base in zip(kv.storages, kv.bases)],
                                   dtype=torch.int64, device=self.device)
        self.where = kv.where.to(device=self.device, dtype=torch.int64).contiguous()
        self.width = kv.heads * kv.head_dim
        self.dtype = kv.storages[0].dtype
        self.token_elems = kv.num_layers * 2 * self.width
        self._warm()

    def save(self, block_ids: Sequence[int], chunks: Sequence[tuple[int, int]],
             after: torch.cuda.Event) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        """Gather positions of ``chunks`` ((start, stop) each) into pinned host tensors
        ``[layers, 2, stop - start, heads, head_dim]`` (one per chunk, each in a block of
        ``pinned``: no memory is pinned now), after ``after``; returns them and the event
        that tells when they hold the KV. Any thread may call it (the worker's copy thread does)."""
        views = [self.pinned.take((self.kv.num_layers, 2, stop - start, self.kv.heads, self.kv.head_dim), self.dtype)
                 for start, stop in chunks]
        placed = [(start, stop - start, start, stop) for start, stop in chunks]
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream), self._settled_on_error():
            self.stream.wait_event(after)
            index = 0
            for group in self._groups(placed):
                elems = sum(n for _, n, _, _ in group) * self.token_elems
                stage = torch.empty(elems, dtype=self.dtype, device=self.device)
                self._launch(stage, block_ids, group, to_pages=False)
                at = 0
                for _, length, _, _ in group:
                    size = length * self.token_elems
                    views[index].view(-1).copy_(stage[at:at + size], non_blocking=True)
                    at += size
                    index += 1
            done = torch.cuda.Event()
            done.record(self.stream)
        return views, done

    def load(self, pieces: Sequence[tuple[torch.Tensor, int, int, int]], block_ids: Sequence[int],
             after: torch.cuda.Event) -> torch.cuda.Event:
        """Scatter ``pieces`` ((host span ``[layers, 2, n, heads, head_dim]`` starting at token
        ``offset``, then the positions ``low..high-1`` of it to write)) into ``block_ids``,
        after ``after``. The host spans must live until the returned event has completed."""
        placed = [(offset, kv.shape[2], low, high) for kv, offset, low, high in pieces]
        spans = {offset: kv for kv, offset, _, _ in pieces}
        with torch.cuda.stream(self.stream), self._settled_on_error():
            self.stream.wait_event(after)
            for group in self._groups(placed):
                elems = sum(n for _, n, _, _ in group) * self.token_elems
                stage = torch.empty(elems, dtype=self.dtype, device=self.device)
                at = 0
                for offset, length, _, _ in group:
                    size = length * self.token_elems
                    stage[at:at + size].copy_(spans[offset].reshape(-1), non_blocking=True)
                    at += size
                self._launch(stage, block_ids, group, to_pages=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    @contextlib.contextmanager
    def _settled_on_error(self) -> Iterator[None]:
        """A save or load that fails midway waits for the copies it queued before it raises:
        their host memory (blocks of ``pinned``) is lent again once its tensors are gone."""
        try:
            yield
        except BaseException:
            self.stream.synchronize()
            raise

    def _warm(self) -> None:
        """Compile and load every variant of the move kernel now (at registration, before vLLM
        captures its CUDA graphs), not on a user's first save or load: Triton specialises
        ``count`` on divisibility by 16, so both kinds, both directions, on a scratch block
        (vLLM's blocks are not touched). The first load of a process was 130-180 ms slower
        without this (bench/vllm_gpu.py, H100)."""
        scratch = torch.zeros(int(self.where.max().item()) + 1, dtype=self.dtype, device=self.device)
        layers = torch.full((self.kv.num_layers,), scratch.data_ptr(), dtype=torch.int64, device=self.device)
        with torch.cuda.stream(self.stream):
            for count in (16, 17):
                table = torch.zeros((5, count), dtype=torch.int64, device=self.device)
                table[3] = count
                table[4] = torch.arange(count, device=self.device)
                stage = torch.zeros(count * self.token_elems, dtype=self.dtype, device=self.device)
                for to_pages in (False, True):
                    self._kernel(layers, stage, table, count, to_pages)
        self.stream.synchronize()

    def _groups(self, placed: Sequence[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
        """Entries (offset, length, low, high) in groups of about GROUP_BYTES of staging."""
        limit = max(1, GROUP_BYTES // (self.token_elems * self.kv.storages[0].element_size()))
        groups: list[list[tuple[int, int, int, int]]] = [[]]
        used = 0
        for entry in placed:
            if groups[-1] and used + entry[1] > limit:
                groups.append([])
                used = 0
            groups[-1].append(entry)
            used += entry[1]
        return groups

    def _launch(self, stage: torch.Tensor, block_ids: Sequence[int], group: Sequence[tuple[int, int, int, int]],
                *, to_pages: bool) -> None:
        """One kernel moving positions ``low..high-1`` of each entry of ``group`` between the
        blocks and ``stage`` (the group's entries one after another)."""
        rows = self.kv.move_table(block_ids, group)
        count = rows.shape[1]
        if not count:
            return
        table = torch.from_numpy(rows).pin_memory().to(self.device, non_blocking=True)
        self._kernel(self.layers, stage, table, count, to_pages)

    def _kernel(self, layers: torch.Tensor, stage: torch.Tensor, table: torch.Tensor, count: int,
                to_pages: bool) -> None:
        block = triton.next_power_of_2(self.width)
        _move[(count, 2 * self.kv.num_layers)](layers, stage, self.where, table, count, WIDTH=self.width,
                                               BLOCK=block, TO_PAGES=to_pages, num_warps=4 if block >= 512 else 2)
