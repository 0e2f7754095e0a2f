"""The reference paged KV pool: one tensor ``[layers, 2, num_blocks, block_size, heads, dim]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvswap.device import resolve_device
from kvswap.session_cache.base import KVLayout, KVPool, OutOfBlocksError

if TYPE_CHECKING:
    import torch


class PagedKVPool(KVPool):
    """``num_blocks`` blocks of ``block_size`` tokens for every layer, on ``device``.

    The free list is a stack: the most recently freed blocks are handed out first, so a
    busy pool reuses warm memory and a long-lived session's blocks end up scattered, as in
    a real engine.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int = 16,
                 device: str | torch.device = "cpu") -> None:
        import torch

        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.layout = layout
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = resolve_device(device)
        self.kv = torch.zeros((layout.num_layers, 2, num_blocks * block_size, layout.num_kv_heads, layout.head_dim),
                              dtype=layout.torch_dtype, device=self.device)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._allocated = bytearray(num_blocks)

    def __repr__(self) -> str:
        return (f"PagedKVPool({self.layout.fingerprint!r}, blocks={self.num_blocks}x{self.block_size}, "
                f"free={len(self._free)}, device={self.device})")

    @classmethod
    def for_budget(cls, layout: KVLayout, budget_bytes: int, block_size: int = 16,
                   device: str | torch.device = "cpu") -> PagedKVPool:
        """As many blocks as fit in ``budget_bytes``."""
        blocks = budget_bytes // (layout.token_bytes * block_size)
        if blocks < 1:
            raise ValueError(f"{budget_bytes} bytes hold no block of {block_size} tokens")
        return cls(layout, blocks, block_size, device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer, 0], self.kv[layer, 1]

    def layer_range(self, first: int, last: int) -> torch.Tensor:
        return self.kv[first:last]

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"need {count} blocks, {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._allocated[block] = 1
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if not 0 <= block < self.num_blocks or not self._allocated[block]:
                raise ValueError(f"block {block} is not allocated")
            self._allocated[block] = 0
            self._free.append(block)

    @property
    def free_blocks(self) -> int:
        return len(self._free)
