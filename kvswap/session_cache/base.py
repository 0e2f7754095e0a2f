"""The session-cache contract: the KV layout, the pool adapter, fingerprints and prefix hashes.

An engine's KV memory is a :class:`KVPool`: per layer, a K and a V tensor addressed by
*slot* (one slot holds one token's K or V: ``[num_kv_heads, head_dim]``), handed out in
blocks of ``block_size`` consecutive slots. The reference pool (:mod:`.pool`) is one
tensor; a vLLM pool (per layer ``[2, num_blocks, block_size, heads, dim]``) or an SGLang
token pool (per layer ``k_buffer[size, heads, dim]``) fits the same interface by
returning views of its own tensors from :meth:`KVPool.layer_slots`, so the swap engine
never depends on the engine's layout.

Stored KV is *token-major*, independent of blocks: a span of ``n`` tokens is one tensor
``[num_layers, 2, n, num_kv_heads, head_dim]``. A pool with another block size, or
another engine with the same model, reads it back.

Reuse is safe only when three things match, and every swap-in checks all three:

* the **fingerprint** (:class:`KVLayout.fingerprint`): model identity, dtype, KV shape
  and tensor-parallel rank; another model's KV is a miss;
* the **prefix hash** (:func:`prefix_hashes`): a hash chained over the token ids from the
  first token, so KV for a span is used only after the same history;
* the **checksum** of the bytes (:mod:`kvswap.blob`).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import xxhash

from kvswap.errors import BackendUnavailableError, ConfigError, OverloadedError

if TYPE_CHECKING:
    import torch


class Policy(str, enum.Enum):
    """When a session's KV is stored: ``write-back`` as it leaves HBM and the host tier (the
    library's and the demo's default), ``write-through`` after every turn (``kvswap serve``'s
    default: any instance resumes any session)."""

    WRITE_BACK = "write-back"
    WRITE_THROUGH = "write-through"

    @classmethod
    def parse(cls, value: object) -> Policy:
        """``value`` (a policy or its name) as a policy; ConfigError otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"policy must be write-back or write-through, not {value!r}") from None


class OutOfBlocksError(OverloadedError):
    """The pool cannot hold the request: too few free blocks even after swapping out every
    unpinned session (the request is larger than the pool, or everything else is pinned)."""


class SwapError(BackendUnavailableError):
    """A swap-out could not store the session (its store failed); it stays resident and
    nothing was freed."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The shape of one token's KV and what it belongs to.

    ``model`` names the weights (a checkpoint id and revision, or a hash of random-init
    parameters); two layouts produce interchangeable KV only if their fingerprints match.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.": "bfloat16", "float32", ...
    tp_rank: int = 0
    tp_size: int = 1
    # A stored format other than kvswap's token-major one, when an engine needs it: KV of
    # another format is a miss. Empty for kvswap's own engine and vLLM (both move token-major
    # KV through what their own kernels write, so they share sessions).
    kv_format: str = ""
    # What KV values also depend on, known only where the model runs: the digest of an fp8
    # cache's per-layer scales. In the blobs' fingerprint, not the session's.
    kv_scales: str = ""

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V of one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def itemsize(self) -> int:
        import torch

        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        return dtype

    @property
    def fingerprint(self) -> str:
        """``model|dtype|L<layers>xH<kv heads>xD<head dim>|tp<rank>/<size>[|kv_format]``, readable
        and exact: what one rank's blobs hold. The rank has as many digits as the largest one,
        so every rank's blob of a span has the same size. ``|scales:<digest>`` ends it for an
        fp8 cache."""
        return (self._fingerprint(f"{self.tp_rank:0{len(str(self.tp_size - 1))}d}")
                + (f"|scales:{self.kv_scales}" if self.kv_scales else ""))

    @property
    def session_fingerprint(self) -> str:
        """What a session stored by this engine is recorded with (and its prefix hashes chained
        from): the fingerprint, with ``*`` for the rank when there are several (a session holds
        every rank's KV), without the scales (the blobs' fingerprint checks them)."""
        return self._fingerprint(str(self.tp_rank) if self.tp_size == 1 else "*")

    def _fingerprint(self, rank: str) -> str:
        return (f"{self.model}|{self.dtype}|L{self.num_layers}xH{self.num_kv_heads}xD{self.head_dim}"
                f"|tp{rank}/{self.tp_size}" + (f"|{self.kv_format}" if self.kv_format else ""))

    def span_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)


class KVPool(abc.ABC):
    """An engine's paged KV memory on its device (the adapter interface).

    Blocks are numbered ``0 .. num_blocks - 1``; block ``b`` holds slots
    ``b * block_size .. (b + 1) * block_size - 1`` of every layer. The pool owns the
    allocator; the session cache decides which session gets which blocks.
    """

    layout: KVLayout
    block_size: int
    num_blocks: int
    device: torch.device

    @abc.abstractmethod
    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` as ``[num_blocks * block_size, num_kv_heads, head_dim]`` views
        of the pool's memory (writes through them land in the pool)."""

    def layer_range(self, first: int, last: int) -> torch.Tensor | None:
        """Layers ``first..last-1`` as one ``[last - first, 2, slots, heads, dim]`` view, if the
        pool keeps them in one tensor (then a copy moves them with one kernel); None if not."""
        return None

    @abc.abstractmethod
    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks; OutOfBlocksError (taking none) if fewer are free."""

    @abc.abstractmethod
    def free(self, blocks: Sequence[int]) -> None:
        """Return blocks to the free list."""

    @property
    @abc.abstractmethod
    def free_blocks(self) -> int:
        """How many blocks are free now."""

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, blocks: Sequence[int], start: int, stop: int) -> torch.Tensor:
        """Slot indices (int64, on the pool's device) of token positions ``start..stop-1`` of a
        sequence laid out in ``blocks``."""
        import torch

        positions = torch.arange(start, stop, dtype=torch.int64)
        table = torch.as_tensor(blocks, dtype=torch.int64)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.device, non_blocking=True)


# ---- prefix hashes -------------------------------------------------------------------------


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as little-endian int32, the form that is hashed and stored."""
    import numpy as np

    return np.asarray(tokens, dtype="<i4").tobytes()


def root_hash(fingerprint: str) -> str:
    """The chain's start: binds every prefix hash to the model that computed the KV."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:32]


def chain_hash(previous: str, tokens: Sequence[int] | bytes | memoryview) -> str:
    """The prefix hash after ``tokens`` (ids, or already as :func:`token_bytes`), given the
    hash of everything before them."""
    digest = xxhash.xxh3_128(previous.encode())
    digest.update(tokens if isinstance(tokens, (bytes, memoryview)) else token_bytes(tokens))
    return digest.hexdigest()


def prefix_hashes(fingerprint: str, tokens: Sequence[int], boundaries: Sequence[int]) -> list[str]:
    """The prefix hash of ``tokens[:b]`` for each boundary ``b`` (ascending, each <= len)."""
    hashes = []
    previous, start = root_hash(fingerprint), 0
    data = memoryview(token_bytes(tokens))  # converted once: a long history has hundreds of entries
    for end in boundaries:
        previous = chain_hash(previous, data[start * 4:end * 4])
        hashes.append(previous)
        start = end
    return hashes


def common_prefix(a: Sequence[int] | bytes | memoryview, b: Sequence[int] | bytes | memoryview) -> int:
    """Length of the longest common prefix of two token sequences (ids, or as :func:`token_bytes`)."""
    import numpy as np

    x, y = (np.frombuffer(t, dtype="<i4") if isinstance(t, (bytes, memoryview)) else np.asarray(t, dtype=np.int64)
            for t in (a, b))
    n = min(len(x), len(y))
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if diff.size else n


#: An entry's size when the caller names none (``kvswap serve``; the vLLM connector's is smaller:
#: :class:`~kvswap.session_cache.stack.StackSettings` carries each process's).
#: The checksum an entry carries while its blob is still being written: only the host tier of
#: the process writing it holds its KV (a store has nothing, or part of it, under its key).
UNWRITTEN = "unwritten"

DEFAULT_ENTRY_BYTES = 256 << 20


def entry_tokens_within(entry_bytes: int, layout: KVLayout, minimum: int = 1) -> int:
    """The most tokens (at least ``minimum``) whose entry data, KV plus int32 token ids, and the
    reader's one spare byte fit in ``entry_bytes``. Pinned host buffers come in powers of two:
    a 256 MiB budget holds 2047 tokens of 128 KiB, where 2048 would take a 512 MiB buffer."""
    return max(minimum, (entry_bytes - 1) // (layout.token_bytes + 4))

