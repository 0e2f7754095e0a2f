"""vLLM's paged KV memory, read and written as kvswap's token-major spans.

vLLM hands the worker one tensor per attention layer (``register_kv_caches``). Where a
token's K and V bytes lie inside it is the attention backend's business, and it changes:
the CPU backend interleaves tokens for its vector kernels; FlashAttention's cache was
``[blocks, 2, block, heads, dim]`` in vLLM 0.25 and packs K and V into one row per head in
0.32 (vLLM PR #44455, which silently broke a connector that assumed the old layout); the
views vLLM hands out on CUDA may be non-contiguous (an HND stride order).

So kvswap assumes nothing: at registration it writes a probe through the layer's own cache
writer (``impl.do_kv_cache_update``, which calls ``reshape_and_cache_flash`` on GPUs and
``cpu_attn_reshape_and_cache`` on the CPU) into the real layer tensor, over two blocks:

1. NaN into every (slot, K|V, head, dim) of two blocks: the elements that turn NaN are the
   ones the writer owns for those blocks (the cache holds zeros when vLLM registers it; an
   fp8 writer saturates NaN to its largest value: there, the elements that turn non-zero);
2. each value's number, digit by digit in a base the dtype holds exactly: where each value
   went;
3. zeros back where they were.

That gives ``where[slot, K|V, head * dim + d]`` (the element of a block's page holding that
value) and the distance between two blocks; every layer has the real layer's strides, so the
same map serves all. A writer whose blocks do not repeat at a fixed distance, or that does not
give each value an element of its own, is refused when the engine starts. Gathers and
scatters move exactly the elements the kernel owns, on the CPU through strided views of
whole pages (a permutation of axes) or an element gather, on a GPU through one kernel for
all layers (:mod:`.gpu`). An fp8 cache (bytes to vLLM) is moved as bytes, as the writer
quantized it: stored KV is what the model attends to, never dequantized and quantized again.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvswap.errors import ConfigError

if TYPE_CHECKING:
    import torch

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: Integers each dtype holds exactly: the probe writes its numbers in digits of this base.
_EXACT = {"float32": 1 << 24, "float16": 1 << 11, "bfloat16": 1 << 8, "float8_e4m3fn": 16, "float8_e5m2": 8}
#: Elements of a cache scanned at once when looking for the probe's NaNs (bounds the scan's memory).
_SCAN = 1 << 26

#: Writes K and V of tokens ``[n, heads, dim]`` into slots ``[n]`` of one layer's cache tensor.
Writer = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"], None]


def layer_writer(vllm_config: Any, layer_name: str) -> Writer:
    """The attention layer's own cache writer (``impl.do_kv_cache_update``, in vLLM 0.25 to
    0.34); ConfigError where the layer has none."""
    context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    layer = context.get(layer_name)
    update = getattr(getattr(layer, "impl", None), "do_kv_cache_update", None)
    if update is None:
        raise ConfigError(f"vLLM layer {layer_name!r} has no cache writer (impl.do_kv_cache_update) for kvswap to "
                          "learn its KV layout from")

    k_scale, v_scale = float(getattr(layer, "_k_scale_float", 1.0)), float(getattr(layer, "_v_scale_float", 1.0))

    def write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        if cache.element_size() == 1:  # an fp8 cache stores value / scale: the probe's numbers must arrive whole
            key, value = key * k_scale, value * v_scale
        update(layer, key, value, cache, slots)

    return write


def as_held(kv: torch.Tensor) -> torch.Tensor:
    """``kv`` as :class:`PagedKV` moves it: an fp8 tensor as its bytes (a view)."""
    import torch

    return kv.view(torch.uint8) if kv.element_size() == 1 else kv


def layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ConfigError(f"cannot tell the layer number of vLLM KV cache {name!r}")
    return int(match.group(1))


def ordered_layers(kv_caches: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return sorted(kv_caches.items(), key=lambda item: layer_index(item[0]))


@dataclasses.dataclass
class PagedKV:
    """The worker's KV tensors, as token-major spans ``[layers, 2, tokens, heads, head_dim]``.

    ``storages[i]`` is layer ``i``'s whole storage as a flat tensor; block ``b`` of layer ``i``
    starts at element ``bases[i] + b * block_stride`` of it, and ``where[slot, K|V, head * dim
    + d]`` is the element of that block's page holding the value (pages span ``page_elems``
    elements). Block ids are the scheduler's (``block_size`` tokens each), whatever block size
    the kernel uses inside them.
    """

    storages: list[torch.Tensor]
    bases: list[int]
    where: torch.Tensor  # [block_size, 2, heads * head_dim] int64, on the cache's device
    block_stride: int
    page_elems: int
    heads: int
    head_dim: int
    block_size: int

    @classmethod
    def register(cls, kv_caches: Mapping[str, torch.Tensor], writer: Callable[[str], Writer], *, num_layers: int,
                 heads: int, head_dim: int, dtype: torch.dtype, block_size: int,
                 values: torch.dtype | None = None) -> PagedKV:
        """Check vLLM's per-layer tensors against the fingerprint and learn their layout from
        the first layer's own cache writer (``writer(layer name)``, which takes K and V as
        ``values``, the model's dtype, and stores them as ``dtype``). An fp8 cache (vLLM keeps
        it as bytes) is moved as bytes: its storages are uint8, and so must be what
        :meth:`gather` and :meth:`scatter` are given (a ``.view(torch.uint8)``)."""
        import torch

        ordered = ordered_layers(kv_caches)
        if len(ordered) != num_layers:
            raise ConfigError(f"vLLM registered {len(ordered)} KV layers; the model has {num_layers}")
        first = ordered[0][1]
        held = torch.uint8 if dtype.itemsize == 1 else dtype
        if any(t.dtype not in (dtype, held) or t.shape != first.shape or t.stride() != first.stride()
               or t.device != first.device for _, t in ordered):
            raise ConfigError(f"vLLM's KV layers are not alike {dtype} tensors: "
                              f"{sorted({(str(t.dtype), tuple(t.shape), t.stride()) for _, t in ordered})}")
        where, stride, low = _probe(writer(ordered[0][0]), first, heads, head_dim, block_size, dtype, values or dtype)
        page = int(where.max()) + 1
        storages = [_storage_of(t).view(held) for _, t in ordered]
        return cls(storages, [int(t.storage_offset()) + low for _, t in ordered], where, stride, page, heads, head_dim,
                   block_size)

    @property
    def device(self) -> torch.device:
        return self.storages[0].device

    @property
    def num_layers(self) -> int:
        return len(self.storages)

    @functools.cached_property
    def pages(self) -> list[torch.Tensor] | None:
        """Each layer as ``[blocks, page_elems]``; None unless a block's values fill a page of
        their own (no gaps, not wider than the distance between blocks)."""
        if self.page_elems > self.block_stride or self.page_elems != self.where.numel():
            return None
        return [s.as_strided(((s.numel() - base - self.page_elems) // self.block_stride + 1, self.page_elems),
                             (self.block_stride, 1), base) for s, base in zip(self.storages, self.bases)]

    def element_offsets(self, block_ids: Sequence[int], start: int, stop: int) -> torch.Tensor:
        """The page element (relative to a layer's base) of every value of positions
        ``start..stop-1``: ``[stop - start, 2, heads * head_dim]``."""
        import torch

        positions = torch.arange(start, stop, dtype=torch.int64)
        table = torch.as_tensor(list(block_ids), dtype=torch.int64)
        blocks = table[positions // self.block_size].to(self.device)
        return blocks[:, None, None] * self.block_stride + self.where[(positions % self.block_size).to(self.device)]

    def move_table(self, block_ids: Sequence[int], group: Sequence[tuple[int, int, int, int]]) -> Any:
        """What the GPU kernel (:mod:`.gpu`) reads to move positions ``low..high-1`` of each
        entry ``(offset, length, low, high)`` of ``group`` (entries staged one after another,
        each ``[layers, 2, length, heads * head_dim]``): rows of the block's element offset, the
        slot, the token's entry's first staged element, that entry's length, the token's index
        in it; one column per position (a numpy ``[5, positions]`` int64 array)."""
        import numpy

        ids = numpy.asarray(block_ids, dtype=numpy.int64)
        spans = numpy.asarray([(offset, length, high - low) for offset, length, low, high in group],
                              dtype=numpy.int64).reshape(-1, 3)
        positions = numpy.concatenate([numpy.arange(low, high, dtype=numpy.int64) for _, _, low, high in group]
                                      or [numpy.empty(0, dtype=numpy.int64)])
        token_elems = self.num_layers * 2 * self.heads * self.head_dim
        starts = numpy.concatenate([[0], numpy.cumsum(spans[:-1, 1])]).astype(numpy.int64) * token_elems
        rows = numpy.empty((5, len(positions)), dtype=numpy.int64)
        rows[0] = ids[positions // self.block_size] * self.block_stride
        rows[1] = positions % self.block_size
        rows[2] = numpy.repeat(starts, spans[:, 2])
        rows[3] = numpy.repeat(spans[:, 1], spans[:, 2])
        rows[4] = positions - numpy.repeat(spans[:, 0], spans[:, 2])
        return rows

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, bool]]:
        """``start..stop`` cut at block bounds: (from, to, whole blocks?) pieces; whole blocks
        move as pages through one permutation, the partial ends element by element."""
        size = self.block_size
        first, last = -(-start // size) * size, stop // size * size
        if self.pages is None or first >= last:
            return [(start, stop, False)]
        return [(a, b, whole) for a, b, whole in ((start, first, False), (first, last, True), (last, stop, False))
                if b > a]

    def gather(self, block_ids: Sequence[int], start: int, stop: int, out: torch.Tensor) -> None:
        """Token positions ``start..stop-1`` of a request whose blocks are ``block_ids`` into
        ``out`` (``[layers, 2, stop - start, heads, head_dim]``, on the CPU)."""
        for low, high, whole in self._pieces(start, stop):
            target = out[:, :, low - start:high - start]
            if whole:
                blocks = self._block_index(block_ids, low, high)
                for index, pages in enumerate(self.pages or ()):
                    self._axes.to_tokens(pages.index_select(0, blocks), target[index])
                continue
            offsets = self.element_offsets(block_ids, low, high)
            for index, (storage, base) in enumerate(zip(self.storages, self.bases)):
                values = storage[base + offsets].view(high - low, 2, self.heads, self.head_dim)
                target[index].copy_(values.transpose(0, 1))

    def scatter(self, src: torch.Tensor, block_ids: Sequence[int], start: int) -> None:
        """Write ``src`` (``[layers, 2, n, heads, head_dim]``) into positions ``start..start+n-1``."""
        for low, high, whole in self._pieces(start, start + src.shape[2]):
            source = src[:, :, low - start:high - start]
            if whole:
                blocks = self._block_index(block_ids, low, high)
                for index, pages in enumerate(self.pages or ()):
                    pages.index_copy_(0, blocks, self._axes.to_pages(source[index].to(pages.dtype)))
                continue
            offsets = self.element_offsets(block_ids, low, high)
            for index, (storage, base) in enumerate(zip(self.storages, self.bases)):
                storage[base + offsets] = source[index].transpose(0, 1).reshape(offsets.shape).to(storage.dtype)

    def _block_index(self, block_ids: Sequence[int], low: int, high: int) -> torch.Tensor:
        import torch

        return torch.as_tensor(list(block_ids[low // self.block_size:high // self.block_size]), dtype=torch.int64,
                               device=self.device)

    @functools.cached_property
    def _axes(self) -> _PageLayout:
        return _PageLayout(self.where, self.block_size, self.heads * self.head_dim)


class _PageLayout:
    """Whole pages <-> tokens ``[2 (K, V), tokens, heads, head_dim]``, fast where it can be.

    Where the probed layout is a permutation of axes (each logical axis, slot, K|V and
    head * dim, cut into prime factors; each factor a fixed stride in the page), a page is a
    strided view and one copy moves it; else an element gather through the probed map.
    """

    def __init__(self, where: torch.Tensor, block: int, width: int) -> None:
        import torch

        self.block, self.width = block, width
        self.order = where.reshape(-1)  # page element of each (slot, K|V, head * dim) value
        self.placed = torch.empty_like(self.order)  # the value each page element holds
        self.placed[self.order] = torch.arange(self.order.numel(), dtype=torch.int64, device=self.order.device)
        self.digits = _axes_of(self.order.cpu(), [block, 2, width])

    def to_tokens(self, pages: torch.Tensor, out: torch.Tensor) -> None:
        """Copy whole pages ``[m, page elements]`` into ``out`` ``[2, m * block, heads, head_dim]``."""
        count = pages.shape[0]
        if self.digits is None:
            logical = pages.index_select(1, self.order).view(count, self.block, 2, self.width)
            out.view(2, count, self.block, self.width).copy_(logical.permute(2, 0, 1, 3))
            return
        groups, page_axes = self.digits
        sizes = [size for group in groups for size in group]
        slot, which, width = (len(g) for g in groups)
        inverse = [page_axes.index(axis) for axis in range(len(sizes))]
        logical = pages.reshape(count, *[sizes[a] for a in page_axes]).permute(0, *[1 + a for a in inverse])
        # logical axes: m, slot digits, the K|V digit, width digits -> K|V, m, slot digits, width digits
        arranged = logical.permute(1 + slot, 0, *range(1, 1 + slot), *range(2 + slot, 1 + slot + which + width))
        out.view(2, count, *groups[0], *groups[2]).copy_(arranged)

    def to_pages(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[2, m * block, heads, head_dim]`` as whole pages ``[m, page elements]``."""
        import torch

        count = tokens.shape[1] // self.block
        if self.digits is None:
            logical = tokens.reshape(2, count, self.block, self.width).permute(1, 2, 0, 3)
            return logical.reshape(count, -1).index_select(1, self.placed)
        groups, page_axes = self.digits
        sizes = [size for group in groups for size in group]
        slot = len(groups[0])
        pages = torch.empty((count, *[sizes[a] for a in page_axes]), dtype=tokens.dtype, device=tokens.device)
        source = tokens.reshape(2, count, *groups[0], *groups[2])  # K|V, m, slot digits, width digits
        # -> m, slot digits, K|V, width digits: the logical order of the digits
        logical = source.permute(1, *range(2, 2 + slot), 0, *range(2 + slot, source.dim()))
        pages.copy_(logical.permute(0, *[1 + a for a in page_axes]))
        return pages.view(count, -1)


def _axes_of(order: torch.Tensor, logical: list[int]) -> tuple[list[list[int]], list[int]] | None:
    """Whether ``order`` (page element of each position, C order over ``logical``) is a
    permutation of axes: each logical axis cut into prime factors (digits), each digit a fixed
    stride in the page, the map their sum. Returns the digits' sizes per logical axis (digits
    the page keeps adjacent merged) and the page's axes, outermost first, as indices into the
    flattened digits; None otherwise."""
    import torch

    groups = [_prime_factors(size) for size in logical]
    sizes = [size for group in groups for size in group]
    steps = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        steps[i] = steps[i + 1] * sizes[i + 1]
    if int(order[0]) != 0:
        return None
    strides = [int(order[step]) for step in steps]
    predicted = torch.zeros(1, dtype=torch.int64)
    for size, stride in zip(sizes, strides):
        predicted = (predicted[:, None] + torch.arange(size, dtype=torch.int64) * stride).reshape(-1)
    if not torch.equal(predicted, order):
        return None
    merged: list[list[int]] = []
    merged_strides: list[int] = []
    position = 0
    for group in groups:  # merge within a logical axis only: K|V must stay its own digit
        sizes_here: list[int] = []
        for size in group:
            stride = strides[position]
            position += 1
            if sizes_here and merged_strides[-1] == stride * size:
                sizes_here[-1] *= size
                merged_strides[-1] = stride
            else:
                sizes_here.append(size)
                merged_strides.append(stride)
        merged.append(sizes_here)
    page_axes = sorted(range(len(merged_strides)), key=lambda i: -merged_strides[i])
    return merged, page_axes


def _prime_factors(value: int) -> list[int]:
    factors, divisor = [], 2
    while value > 1:
        while value % divisor == 0:
            factors.append(divisor)
            value //= divisor
        divisor += 1
    return factors or [1]


def _storage_of(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor`` as a flat tensor of its dtype."""
    import torch

    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        storage, 0, (storage.nbytes() // tensor.element_size(),), (1,))


def _nan_positions(flat: torch.Tensor) -> torch.Tensor:
    """Positions of NaN elements of a flat tensor (of an fp8 one: non-zero), on the CPU
    (scanned in pieces)."""
    import torch

    def nan(piece: torch.Tensor) -> torch.Tensor:  # fp8 writers saturate NaN to the largest value: not zero
        return piece.view(torch.uint8) != 0 if piece.element_size() == 1 else piece.isnan()

    found = [torch.nonzero(nan(flat[low:low + _SCAN])).flatten().cpu() + low for low in range(0, flat.numel(), _SCAN)]
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def _probe(write: Writer, cache: torch.Tensor, heads: int, head_dim: int, block_size: int,
           dtype: torch.dtype, values: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """Where ``write`` puts each value of blocks 0 and 1 of ``cache`` (see the module
    docstring; it takes ``values`` and stores ``dtype``). Returns ``where`` (relative to the
    lowest element of block 0), the distance between consecutive blocks, and that lowest
    element relative to ``cache``'s own offset."""
    import torch

    base = _EXACT.get(str(dtype).removeprefix("torch."))
    if base is None:
        raise ConfigError(f"kvswap cannot probe a {dtype} KV cache")
    flat, device = _storage_of(cache).view(dtype), cache.device
    slots = torch.arange(2 * block_size, dtype=torch.int64, device=device)
    count = 2 * block_size * 2 * heads * head_dim
    already = _nan_positions(flat)
    nan = torch.full((2 * block_size, heads, head_dim), float("nan"), dtype=values, device=device)
    write(cache, nan, nan, slots)
    owned = _nan_positions(flat)
    if already.numel():
        owned = owned[~torch.isin(owned, already)]
    if owned.numel() != count:
        flat.view(torch.uint8 if dtype.itemsize == 1 else dtype)[owned.to(device)] = 0
        raise ConfigError(f"vLLM's cache writer wrote {owned.numel()} elements for {count} values: "
                          "an unknown KV layout")
    positions = owned.to(device)
    numbers = torch.arange(count, dtype=torch.int64).view(2 * block_size, 2, heads, head_dim)
    found = torch.zeros(count, dtype=torch.int64)
    scale = 1
    try:
        while scale < count:
            digits = ((numbers // scale) % base).to(values).to(device)
            write(cache, digits[:, 0].contiguous(), digits[:, 1].contiguous(), slots)
            found += flat[positions].cpu().float().to(torch.int64) * scale
            scale *= base
    finally:
        flat.view(torch.uint8 if dtype.itemsize == 1 else dtype)[positions] = 0  # what vLLM allocated
    if not torch.equal(torch.sort(found).values, torch.arange(count)):
        raise ConfigError("vLLM's cache writer does not give each token's K and V values elements of their own: "
                          "an unknown KV layout")
    where = torch.empty(count, dtype=torch.int64)
    where[found] = owned
    where = where.view(2, block_size, 2, heads * head_dim)
    strides = (where[1] - where[0]).unique()
    if strides.numel() != 1 or int(strides[0]) <= 0:
        raise ConfigError("vLLM's KV blocks do not repeat at a fixed distance: an unknown KV layout")
    low = int(where[0].min())
    return (where[0] - low).to(device), int(strides[0]), low - int(cache.storage_offset())
