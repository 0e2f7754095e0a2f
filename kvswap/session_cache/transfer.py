"""Moving a session's KV between the pool's scattered blocks and one token-major host tensor.

On a CUDA pool, copies run on side streams so they never queue behind the model's
kernels: each (layer, K|V) slice is gathered by ``index_select`` into a small device
staging tensor and copied to pinned host memory (and the reverse for swap-in). The side
streams first wait for the compute stream (the KV must be written before it is read);
after a swap-in the compute stream waits for them (the model must not read blocks before
they are filled). A swap-in keeps the copy engine busy: host-to-device copies run on one
stream into a ring of staging buffers while the scatter kernels (``index_copy_``) run on
another, each buffer reused once its scatter is done. Both calls return when the host
side is done (or, for a per-layer swap-in, hand back events), so the host tensor may be
reused or freed at once. On a CPU pool the same gathers write straight into the host tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvswap.session_cache.base import KVPool

if TYPE_CHECKING:
    import torch


#: Staging buffers a swap-in cycles through (one (layer, K|V) slice each): enough that the
#: next host-to-device copy never waits for a scatter kernel.
_RING = 4


class KVMover:
    """Gathers and scatters token spans of one pool. One mover per pool; not thread-safe."""

    def __init__(self, pool: KVPool) -> None:
        import torch

        self.pool = pool
        self.layout = pool.layout
        self.cuda = pool.device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(pool.device) if self.cuda else None  # copies (H2D, D2H)
        self._scatter_stream: Any = torch.cuda.Stream(pool.device) if self.cuda else None  # index_copy_

    def host_tensor(self, num_tokens: int) -> torch.Tensor:
        """An empty token-major span ``[layers, 2, num_tokens, heads, dim]`` in host memory,
        pinned when the pool is on a GPU (PyTorch caches pinned blocks, so reuse is cheap)."""
        import torch

        return torch.empty(self.layout.span_shape(num_tokens), dtype=self.layout.torch_dtype, pin_memory=self.cuda)

    def gatherer(self, blocks: Sequence[int]) -> Callable[[int, int], torch.Tensor]:
        """A function of (start, stop) that gathers those positions of ``blocks`` into a new host tensor."""
        def gather(start: int, stop: int) -> torch.Tensor:
            kv = self.host_tensor(stop - start)
            self.gather(blocks, start, stop, kv)
            return kv
        return gather

    def gather(self, blocks: Sequence[int], start: int, stop: int, out: torch.Tensor) -> None:
        """Copy token positions ``start..stop-1`` of the sequence in ``blocks`` into ``out``."""
        import torch

        count = stop - start
        self._check_span(out, count)
        if count == 0:
            return
        index = self.pool.slots(blocks, start, stop)
        if not self.cuda:
            for layer in range(self.layout.num_layers):
                for which, view in enumerate(self.pool.layer_slots(layer)):
                    torch.index_select(view, 0, index, out=out[layer, which])
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        index.record_stream(stream)
        with torch.cuda.stream(stream):
            staging = torch.empty(out.shape[2:], dtype=out.dtype, device=self.pool.device)
            for layer in range(self.layout.num_layers):
                for which, view in enumerate(self.pool.layer_slots(layer)):
                    torch.index_select(view, 0, index, out=staging)
                    out[layer, which].copy_(staging, non_blocking=True)
        stream.synchronize()

    def scatter(self, src: torch.Tensor, blocks: Sequence[int], start: int, *,
                per_layer: bool = False) -> list[torch.cuda.Event] | None:
        """Copy ``src`` (token-major, on the host) into positions ``start..`` of ``blocks``.

        With ``per_layer`` on a CUDA pool, returns at once with one event per layer, recorded
        when that layer's K and V are in place: the model waits on each before reading that
        layer, so the copy of layer ``l + 1`` overlaps the compute of layer ``l``. The caller
        keeps ``src`` alive until the last event (or :meth:`synchronize`). Otherwise returns
        None when everything is copied.
        """
        import torch

        count = src.shape[2]
        self._check_span(src, count)
        if count == 0:
            return None
        index = self.pool.slots(blocks, start, start + count)
        if not self.cuda:
            for layer in range(self.layout.num_layers):
                for which, view in enumerate(self.pool.layer_slots(layer)):
                    view.index_copy_(0, index, src[layer, which])
            return None
        copier, scatterer = self._stream, self._scatter_stream
        current = torch.cuda.current_stream(self.pool.device)
        copier.wait_stream(current)  # blocks may have been handed over by a just-finished kernel
        scatterer.wait_stream(current)
        index.record_stream(scatterer)  # made on the compute stream: not to be reused while we copy
        ring = [torch.empty(src.shape[2:], dtype=src.dtype, device=self.pool.device) for _ in range(_RING)]
        copied = [torch.cuda.Event() for _ in range(_RING)]
        freed = [torch.cuda.Event() for _ in range(_RING)]
        events = []
        for step, (layer, which) in enumerate((layer, which) for layer in range(self.layout.num_layers)
                                              for which in (0, 1)):
            slot = step % _RING
            buffer = ring[slot]
            with torch.cuda.stream(copier):
                if step >= _RING:
                    copier.wait_event(freed[slot])  # its previous slice is scattered
                buffer.copy_(src[layer, which], non_blocking=True)
                copied[slot].record(copier)
            with torch.cuda.stream(scatterer):
                scatterer.wait_event(copied[slot])
                self.pool.layer_slots(layer)[which].index_copy_(0, index, buffer)
                freed[slot].record(scatterer)
            if per_layer and which == 1:
                events.append(torch.cuda.Event())
                events[-1].record(scatterer)
        for buffer in ring:  # allocated on the compute stream, used on both side streams
            buffer.record_stream(copier)
            buffer.record_stream(scatterer)
        if per_layer:
            return events
        current.wait_stream(scatterer)
        scatterer.synchronize()
        return None

    def synchronize(self) -> None:
        """Wait for every copy this mover started, and order the compute stream after them."""
        import torch

        if self._stream is not None:
            current = torch.cuda.current_stream(self.pool.device)
            for stream in (self._stream, self._scatter_stream):
                current.wait_stream(stream)
                stream.synchronize()

    def _check_span(self, tensor: torch.Tensor, count: int) -> None:
        expected = self.layout.span_shape(count)
        if tuple(tensor.shape) != expected or tensor.dtype != self.layout.torch_dtype or tensor.device.type != "cpu":
            raise ValueError(f"expected a host tensor {expected} of {self.layout.dtype}, "
                             f"got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
        if (count and not tensor[0, 0].is_contiguous()) or tensor.stride(1) != tensor.stride(0) // 2:
            raise ValueError("each (layer, K|V) slice of the host tensor must be contiguous")
