"""A transformers ``Cache`` whose layers read and write a session's KV in a kvswap pool.

When a swap-in is still copying (``ready``: one CUDA event per layer), each layer waits
for its own event only, so the copy of later layers overlaps the compute of earlier ones.

The model keeps its own attention (sdpa or eager): each layer's ``update`` writes the new
keys and values into the session's slots of the pool and returns the whole history
gathered from them, shaped ``[1, kv_heads, seq, head_dim]`` as transformers expects.
One request (batch size 1) per cache object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvswap.session_cache.base import KVPool


class _Slots:
    """Slot indices of a session's positions, recomputed when its block list grows."""

    def __init__(self, pool: KVPool, blocks: Sequence[int]) -> None:
        self.pool = pool
        self.blocks = blocks
        self._known = -1
        self._slots = torch.empty(0, dtype=torch.int64)

    def upto(self, end: int) -> torch.Tensor:
        if len(self.blocks) != self._known:
            self._known = len(self.blocks)
            self._slots = self.pool.slots(self.blocks, 0, self._known * self.pool.block_size)
        if end > self._slots.numel():
            raise ValueError(f"position {end - 1} has no block reserved")
        return self._slots[:end]


class PagedLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, pool: KVPool, layer: int, slots: _Slots, length: int,
                 ready: torch.cuda.Event | None = None) -> None:
        super().__init__()
        self.ready = ready
        self.k_pool, self.v_pool = pool.layer_slots(layer)
        self.slots = slots
        self.length = length
        self.is_initialized = True
        self.dtype, self.device = self.k_pool.dtype, self.k_pool.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError("the paged cache serves one sequence at a time")
        if self.ready is not None:  # this layer's KV may still be on its way in
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        start, end = self.length, self.length + key_states.shape[-2]
        slots = self.slots.upto(end)
        self.k_pool.index_copy_(0, slots[start:end], key_states[0].transpose(0, 1).to(self.dtype))
        self.v_pool.index_copy_(0, slots[start:end], value_states[0].transpose(0, 1).to(self.dtype))
        self.length = end
        keys = self.k_pool.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        values = self.v_pool.index_select(0, slots).transpose(0, 1).unsqueeze(0)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


class PagedCache(Cache):
    """The session's KV for transformers: ``length`` positions already hold valid KV in ``blocks``."""

    def __init__(self, pool: KVPool, blocks: Sequence[int], length: int,
                 ready: Sequence[torch.cuda.Event] | None = None) -> None:
        slots = _Slots(pool, blocks)
        super().__init__(layers=[PagedLayer(pool, i, slots, length, ready[i] if ready else None)
                                 for i in range(pool.layout.num_layers)])
