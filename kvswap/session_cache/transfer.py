"""Moving a session's KV between the pool's scattered blocks and one token-major host tensor.

On a CUDA pool, copies run on side streams so they never queue behind the model's
kernels. The layers move in groups of about ``_STAGING_BYTES``: a group is gathered by
one ``index_select`` (on a pool that keeps its layers in one tensor; one per (layer, K|V)
otherwise) into a device staging tensor and copied to pinned host memory in one copy, and
the reverse for swap-in: so a call launches a few dozen operations, not hundreds (their
launch cost, not the bytes, bounded a swap-in of small entries). The side streams first
wait for the compute stream (the KV must be written before it is read); after a swap-in
the compute stream waits for them (the model must not read blocks before they are
filled). A swap-in keeps the copy engine busy: host-to-device copies run on one stream
into a ring of staging buffers while the scatter kernels (``index_copy_``) run on another,
each buffer reused once its scatter is done. Both calls return when the host side is done
(or, for a per-layer swap-in, hand back events), so the host tensor may be reused or freed
at once. On a CPU pool the same gathers write straight into the host tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvswap.session_cache.base import KVPool

if TYPE_CHECKING:
    import torch


#: Staging buffers a swap-in cycles through (one group of layers each): enough that the
#: next host-to-device copy never waits for a scatter kernel.
_RING = 3

#: Bytes of device staging per group of layers (at least one layer).
_STAGING_BYTES = 16 << 20


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
            self._take_layers(0, self.layout.num_layers, index, out)
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.pool.device))
        index.record_stream(stream)
        with torch.cuda.stream(stream):
            groups = self._groups(out)
            staging = torch.empty((groups[0][1] - groups[0][0], *out.shape[1:]), dtype=out.dtype,
                                  device=self.pool.device)
            for first, last in groups:
                buffer = staging[:last - first]
                self._take_layers(first, last, index, buffer)
                _copy(out[first:last], buffer)
        stream.synchronize()

    def _groups(self, span: torch.Tensor) -> list[tuple[int, int]]:
        """The layers of ``span`` (``[layers, 2, tokens, ...]``) in runs of about ``_STAGING_BYTES``."""
        layers = self.layout.num_layers
        per_layer = span[0].numel() * span.element_size()
        size = max(1, min(layers, _STAGING_BYTES // max(per_layer, 1)))
        return [(first, min(first + size, layers)) for first in range(0, layers, size)]

    def _take_layers(self, first: int, last: int, index: torch.Tensor, out: torch.Tensor) -> None:
        """Read the pool's ``index`` slots of layers ``first..last-1`` into ``out`` (on the
        pool's device): one kernel where the pool keeps those layers in one tensor."""
        import torch

        whole = self.pool.layer_range(first, last)
        if whole is not None and out.is_contiguous():
            torch.index_select(whole, 2, index, out=out)
            return
        for layer, which, view in self._slot_views(first, last):
            torch.index_select(view, 0, index, out=out[layer - first, which])

    def _put_layers(self, first: int, last: int, index: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src`` (layers ``first..last-1``, on the pool's device) to the pool's ``index`` slots."""
        whole = self.pool.layer_range(first, last)
        if whole is not None:
            whole.index_copy_(2, index, src)
            return
        for layer, which, view in self._slot_views(first, last):
            view.index_copy_(0, index, src[layer - first, which])

    def _slot_views(self, first: int, last: int) -> list[tuple[int, int, torch.Tensor]]:
        """(layer, 0 for K | 1 for V, the pool's slot view) for layers ``first..last-1``."""
        return [(layer, which, view) for layer in range(first, last)
                for which, view in enumerate(self.pool.layer_slots(layer))]

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
            self._put_layers(0, self.layout.num_layers, index, src)
            return None
        copier, scatterer = self._stream, self._scatter_stream
        current = torch.cuda.current_stream(self.pool.device)
        copier.wait_stream(current)  # blocks may have been handed over by a just-finished kernel
        scatterer.wait_stream(current)
        index.record_stream(scatterer)  # made on the compute stream: not to be reused while we copy
        groups = self._groups(src)
        ring = [torch.empty((groups[0][1] - groups[0][0], *src.shape[1:]), dtype=src.dtype, device=self.pool.device)
                for _ in range(min(_RING, len(groups)))]
        copied = [torch.cuda.Event() for _ in ring]
        freed = [torch.cuda.Event() for _ in ring]
        events = []
        for step, (first, last) in enumerate(groups):
            slot = step % len(ring)
            buffer = ring[slot][:last - first]
            with torch.cuda.stream(copier):
                if step >= len(ring):
                    copier.wait_event(freed[slot])  # its previous group is scattered
                _copy(buffer, src[first:last])
                copied[slot].record(copier)
            with torch.cuda.stream(scatterer):
                scatterer.wait_event(copied[slot])
                self._put_layers(first, last, index, buffer)
                freed[slot].record(scatterer)
            if per_layer:
                events.append(torch.cuda.Event())
                events[-1].record(scatterer)
        for buffer in ring:  # allocated on the compute stream, used on both side streams
            buffer.record_stream(copier)
            buffer.record_stream(scatterer)
        if per_layer:  # one event per layer: each layer's is its group's
            return [events[step] for step, (first, last) in enumerate(groups) for _ in range(first, last)]
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


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """An asynchronous copy between host and device of a group of layers: one copy when both
    sides are contiguous, else one per (layer, K|V) slice (each contiguous: a span cut
    short along its tokens is)."""
    if dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src, non_blocking=True)
        return
    for layer in range(dst.shape[0]):
        for which in (0, 1):
            dst[layer, which].copy_(src[layer, which], non_blocking=True)
