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
    """Pinned blocks of a few sizes, ``classes``: (block bytes, count) each. :meth:`take` lends
    the first free block of the smallest size that holds the tensor (then larger ones) as a
    tensor of the asked shape; when none is free, or the tensor is larger than every block, it
    falls back to PyTorch's pinned allocator (counted in ``misses``). ``pin=False``: plain
    host memory, the same lending (on a machine without CUDA)."""

    def __init__(self, classes: list[tuple[int, int]], *, pin: bool = True) -> None:
        began = time.perf_counter()
        self.pin = pin
        self._classes = [(size, [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(count)])
                         for size, count in sorted(classes) if count > 0]
        self._next = [0] * len(self._classes)
        self._sizes = {block.data_ptr(): size for size, blocks in self._classes for block in blocks}
        self._lock = threading.Lock()
        self.misses = 0
        log.info("kvswap: pinned %s (%.1f GiB) in %.1f s",
                 ", ".join(f"{len(blocks)} blocks of {size / 2**20:.0f} MiB" for size, blocks in self._classes),
                 self.nbytes / 2**30, time.perf_counter() - began)

    @property
    def nbytes(self) -> int:
        return sum(size * len(blocks) for size, blocks in self._classes)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned tensor of ``shape`` and ``dtype`` (contents undefined)."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:  # the view counts as the block's user before another thread looks
            for which, (size, blocks) in enumerate(self._classes):
                if size < nbytes:
                    continue
                for step in range(len(blocks)):
                    index = (self._next[which] + step) % len(blocks)
                    if _users(blocks[index]) == 1:
                        self._next[which] = index + 1
                        return blocks[index][:nbytes].view(dtype).view(shape)
            self.misses += 1
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def footprint(self, tensor: torch.Tensor) -> int:
        """The bytes ``tensor`` keeps from others: the whole block it sits in when it is one of
        these blocks' (a view of it), else its own."""
        return self._sizes.get(tensor.untyped_storage().data_ptr(), tensor.nbytes)

    def bytes(self, nbytes: int) -> torch.Tensor:
        """A flat pinned uint8 tensor of ``nbytes`` (a read's buffer)."""
        return self.take((nbytes,), torch.uint8)

    def free(self) -> int:
        """How many blocks no tensor uses now."""
        with self._lock:
            return sum(_users(block) == 1 for _, blocks in self._classes for block in blocks)


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private: absent, nothing is lent (PyTorch pins)


def _count(tensor: torch.Tensor) -> int:
    return int(_USE_COUNT(tensor.untyped_storage()._cdata)) if _USE_COUNT is not None else -1


#: What the count reads for a block no other tensor uses, measured on this PyTorch (not assumed).
_ALONE = _count(torch.empty(1, dtype=torch.uint8))


def _users(block: torch.Tensor) -> int:
    """How many tensors use ``block``'s memory (1: the block alone; 0 when PyTorch cannot say,
    which never reads as free)."""
    return _count(block) - _ALONE + 1 if _USE_COUNT is not None else 0


__all__ = ["PinnedBlocks"]
