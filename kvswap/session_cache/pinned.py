"""Pinned host memory taken once and lent out, so that no save or read pins memory while the
model runs.

Pinning memory (``cudaHostAlloc``) runs at a few GB/s and holds the CUDA driver meanwhile:
measured on an H100 under vLLM (``bench/vllm_gpu_load.py --profile``), the saves' copy thread
spent 6.7 of 12 s allocating pinned tensors and vLLM's engine thread waited in kernel launches
for as long, beside 8 GiB of saves (decode at 0.67 of its speed alone). PyTorch's own pinned
cache did not serve those allocations. :class:`PinnedBlocks` pins its blocks at start and lends
each out as a tensor view; a block is free again as soon as no tensor uses its memory (PyTorch
counts the users of a storage), so spans kept in a host tier or in flight keep theirs, and
nothing has to be given back by hand.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import torch

log = logging.getLogger(__name__)


class PinnedBlocks:
    """``count`` pinned blocks of ``block_bytes``. :meth:`take` lends the first free block as
    a tensor of the asked shape; when none is free, or the tensor is larger than a block, it
    falls back to PyTorch's pinned allocator (counted in ``misses``). ``pin=False``: plain host
    memory, the same lending (on a machine without CUDA)."""

    def __init__(self, block_bytes: int, count: int, *, pin: bool = True) -> None:
        began = time.perf_counter()
        self.block_bytes = block_bytes
        self.pin = pin
        self._blocks = [torch.empty(block_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]
        self._next = 0
        self._lock = threading.Lock()
        self.misses = 0
        log.info("kvswap: pinned %d blocks of %.0f MiB (%.1f GiB) in %.1f s", count, block_bytes / 2**20,
                 count * block_bytes / 2**30, time.perf_counter() - began)

    def __len__(self) -> int:
        return len(self._blocks)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned tensor of ``shape`` and ``dtype`` (contents undefined)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes <= self.block_bytes:
            with self._lock:  # the view counts as the block's user before another thread looks
                for step in range(len(self._blocks)):
                    index = (self._next + step) % len(self._blocks)
                    block = self._blocks[index]
                    if _users(block) == 1:
                        self._next = index + 1
                        return block[:nbytes].view(dtype).view(shape)
        self.misses += 1
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def bytes(self, nbytes: int) -> torch.Tensor:
        """A flat pinned uint8 tensor of ``nbytes`` (a read's buffer)."""
        return self.take((nbytes,), torch.uint8)

    def free(self) -> int:
        """How many blocks no tensor uses now."""
        with self._lock:
            return sum(_users(block) == 1 for block in self._blocks)


def _users(block: torch.Tensor) -> int:
    """How many tensors use ``block``'s memory (1: the block alone)."""
    storage = block.untyped_storage()
    return int(torch._C._storage_Use_Count(storage._cdata)) - 1  # not the storage object made here


__all__ = ["PinnedBlocks"]
