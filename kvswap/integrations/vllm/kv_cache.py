"""vLLM's paged KV memory, read and written as kvswap's token-major spans.

vLLM hands the worker one tensor per attention layer (``register_kv_caches``). Where a
token's K and V bytes lie inside it is the attention kernel's business: vLLM's CPU backend
writes each (block, head) page in an ISA-specific arrangement (tokens interleaved in pairs
for its vector kernels, for instance), and GPU backends have changed their K/V packing
between releases (vLLM 0.26, PR #44455, silently broke a connector that assumed the old one).

So kvswap does not assume a layout: it asks vLLM's own cache writer. At registration it
writes a probe page through the backend's ``reshape_and_cache`` op (every element a distinct
number) and reads where each token's K and V landed: a map from (slot, K|V, head, dim) to
the element of the page that holds it. Gathers and scatters go through that map, so they
move exactly the bytes the kernel writes and reads for those tokens, whatever the layout;
a map that is not a permutation of the page is refused. The backend, layout, ISA, vLLM's
version and the block size still name the KV in its fingerprint (``KVLayout.kv_format``).

Known writers: vLLM's CPU attention backend (``cpu_attn_reshape_and_cache``). Other
platforms are refused when the engine starts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from kvswap.errors import ConfigError

if TYPE_CHECKING:
    import torch

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
#: Integers each dtype holds exactly: the probe writes its numbers in digits of this base.
_EXACT = {"float32": 1 << 24, "float16": 1 << 11, "bfloat16": 1 << 8}

#: Writes K and V of tokens ``[n, heads, dim]`` into slots ``[n]`` of one layer's cache tensor.
Writer = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"], None]


def cpu_writer(dtype: torch.dtype, block_size: int, head_dim: int, cache_dtype: str) -> tuple[str, Writer]:
    """vLLM's CPU attention cache writer for this configuration, and its ISA's name."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim, cache_dtype)

    def write(layer: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        blocks, heads, size, _ = layer.shape
        key_cache, value_cache = layer.view(blocks, heads, size * 2, -1).chunk(2, dim=2)  # as cpu_attn.py does
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    return isa, write


def engine_writer(vllm_config: object, dtype: torch.dtype, head_dim: int, block_size: int) -> tuple[str, Writer]:
    """The KV format this engine's cache has (it goes into fingerprints) and its cache writer;
    ConfigError where kvswap knows no writer."""
    import vllm
    from vllm.platforms import current_platform

    device = str(current_platform.device_type)
    cache = vllm_config.cache_config  # type: ignore[attr-defined]
    if device != "cpu":
        raise ConfigError(f"kvswap's vLLM connector moves KV on vLLM's CPU backend only for now (this is {device}): "
                          "it will not move KV whose layout it has not checked")
    isa, write = cpu_writer(dtype, block_size, head_dim, str(cache.cache_dtype or "auto"))
    version = ".".join(str(vllm.__version__).split(".")[:2])
    return f"vllm{version}:{device}:{getattr(cache, 'kv_cache_layout', None) or 'default'}:{isa}:b{block_size}", write


def layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ConfigError(f"cannot tell the layer number of vLLM KV cache {name!r}")
    return int(match.group(1))


@dataclasses.dataclass
class VLLMKVCache:
    """The worker's KV tensors, as token-major spans ``[layers, 2, tokens, heads, head_dim]``.

    ``pages`` are the layers' tensors viewed as ``[kernel blocks, page elements]``;
    ``where[slot, which, head * head_dim + d]`` is the element of a page holding that value.
    ``block_size`` is the scheduler's (its block ids index ``block_size`` tokens); vLLM may
    split a scheduler block into several kernel blocks of ``kernel_block_size``.
    """

    pages: list[torch.Tensor]
    where: torch.Tensor  # [kernel_block_size, 2, heads * head_dim] int64
    heads: int
    head_dim: int
    block_size: int
    kernel_block_size: int

    @classmethod
    def register(cls, kv_caches: Mapping[str, torch.Tensor], write: Writer, *, num_layers: int, heads: int,
                 head_dim: int, dtype: torch.dtype, block_size: int) -> VLLMKVCache:
        """Check vLLM's per-layer tensors against the fingerprint, and learn their layout
        from ``write`` (the backend's own cache writer)."""
        ordered = [tensor for _, tensor in sorted(kv_caches.items(), key=lambda item: layer_index(item[0]))]
        if len(ordered) != num_layers:
            raise ConfigError(f"vLLM registered {len(ordered)} KV layers; the model has {num_layers}")
        shapes = {tuple(t.shape) for t in ordered}
        if len(shapes) != 1 or any(t.dtype != dtype or not t.is_contiguous() for t in ordered):
            raise ConfigError(f"vLLM's KV layers are not alike contiguous {dtype} tensors: {sorted(shapes)}")
        blocks, layer_heads, kernel, content = ordered[0].shape
        if layer_heads != heads or content != 2 * head_dim or not kernel or block_size % kernel:
            raise ConfigError(f"a vLLM KV layer of shape {tuple(ordered[0].shape)} is not [blocks, {heads}, "
                              f"block (a divisor of {block_size}), {2 * head_dim}]: an unknown layout")
        where = _probe(write, heads, kernel, head_dim, dtype, ordered[0].device)
        return cls([t.view(blocks, -1) for t in ordered], where, heads, head_dim, block_size, kernel)

    def _index(self, block_ids: Sequence[int], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel block and slot of each token position ``start..stop-1`` of a request."""
        import torch

        positions = torch.arange(start, stop, dtype=torch.int64)
        table = torch.as_tensor(list(block_ids), dtype=torch.int64)
        ratio = self.block_size // self.kernel_block_size
        blocks = table[positions // self.block_size] * ratio + (positions % self.block_size) // self.kernel_block_size
        return blocks, positions % self.kernel_block_size

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, bool]]:
        """``start..stop`` cut at kernel-block bounds: (from, to, whole blocks?) pieces; whole
        blocks move as pages through one permutation, the partial ends element by element."""
        size = self.kernel_block_size
        first, last = -(-start // size) * size, stop // size * size
        if first >= last:
            return [(start, stop, False)]
        return [(a, b, whole) for a, b, whole in ((start, first, False), (first, last, True), (last, stop, False))
                if b > a]

    def gather(self, block_ids: Sequence[int], start: int, stop: int, out: torch.Tensor) -> None:
        """Token positions ``start..stop-1`` of a request whose blocks are ``block_ids`` into
        ``out`` (``[layers, 2, stop - start, heads, head_dim]``, host memory)."""
        for low, high, whole in self._pieces(start, stop):
            blocks, slots = self._index(block_ids, low, high)
            target = out[:, :, low - start:high - start]
            if whole:
                pages = blocks[::self.kernel_block_size]
                for index, page in enumerate(self.pages):
                    self._axes.to_tokens(page.index_select(0, pages), target[index])
                continue
            rows = blocks[:, None]
            for index, page in enumerate(self.pages):
                for which in (0, 1):
                    target[index, which].copy_(page[rows, self.where[slots, which]].view(-1, self.heads, self.head_dim))

    def scatter(self, src: torch.Tensor, block_ids: Sequence[int], start: int) -> None:
        """Write ``src`` (``[layers, 2, n, heads, head_dim]``) into positions ``start..start+n-1``."""
        for low, high, whole in self._pieces(start, start + src.shape[2]):
            blocks, slots = self._index(block_ids, low, high)
            source = src[:, :, low - start:high - start]
            if whole:
                pages = blocks[::self.kernel_block_size]
                for index, page in enumerate(self.pages):
                    page.index_copy_(0, pages, self._axes.to_pages(source[index].to(page.dtype)))
                continue
            rows = blocks[:, None]
            for index, page in enumerate(self.pages):
                for which in (0, 1):
                    page[rows, self.where[slots, which]] = source[index, which].reshape(len(slots), -1).to(page.dtype)

    @functools.cached_property
    def _axes(self) -> _PageLayout:
        return _PageLayout(self.where, self.kernel_block_size, self.heads * self.head_dim)


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
        logical = pages.view(count, *[sizes[a] for a in page_axes]).permute(0, *[1 + a for a in inverse])
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


def _probe(write: Writer, heads: int, block: int, head_dim: int, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """Where ``write`` puts each (slot, K|V, head, dim) of one page: write every value's
    number, digit by digit in a base the dtype holds exactly, into a scratch page."""
    import torch

    count = 2 * block * heads * head_dim
    numbers = torch.arange(count, dtype=torch.int64).view(block, 2, heads, head_dim)
    base = _EXACT.get(str(dtype).removeprefix("torch."))
    if base is None:
        raise ConfigError(f"kvswap cannot probe a {dtype} KV cache")
    found = torch.zeros(count, dtype=torch.int64)
    scale = 1
    while scale < count:
        digits = ((numbers // scale) % base).to(dtype)
        page = torch.full((1, heads, block, 2 * head_dim), -1, dtype=dtype, device=device)
        write(page, digits[:, 0].contiguous().to(device), digits[:, 1].contiguous().to(device),
              torch.arange(block, dtype=torch.int64, device=device))
        written = page.reshape(-1).cpu().to(torch.int64)
        if (written < 0).any():
            raise ConfigError("vLLM's cache writer left part of a page unwritten: an unknown KV layout")
        found += written * scale
        scale *= base
    if not torch.equal(torch.sort(found).values, torch.arange(count)):
        raise ConfigError("vLLM's cache writer does not place each token's K and V in a page of its own: "
                          "an unknown KV layout")
    where = torch.empty(count, dtype=torch.int64)
    where[found] = torch.arange(count, dtype=torch.int64)
    return where.view(block, 2, heads * head_dim).to(device)
