"""Where swapped-out KV lives below HBM: a bounded host-memory tier and connector-backed stores.

:class:`HostTier` keeps whole sessions (token-major host tensors, pinned on GPU
machines) in LRU order within a byte budget; it is this process's memory, so it needs no
checksum and is lost on exit. :class:`StoreTier` writes spans as kvswap blobs through a
connector and reads them back verified; what a span is (offsets, prefix hash) is
recorded in the meta store by the session cache, data first. :class:`SpanCache` keeps
recently written or read spans by blob key, a host tier for engines that keep no host copy
of their own (the vLLM connector). :class:`Plan` and :class:`Span` are what the session
store plans to read from these stores and what it reads back.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from kvswap.blob import DTYPE_NAMES, BlobHeader, read_blob, write_blob
from kvswap.errors import ConfigError, IntegrityError
from kvswap.session_cache.base import UNWRITTEN, KVLayout, token_bytes
from kvswap.session_cache.ranks import RANKS_CHECKSUM
from kvswap.uri import URI

if TYPE_CHECKING:
    import torch

    from kvswap.connectors.base import Connector
    from kvswap.meta import Entry, EntrySpec, Session


@dataclasses.dataclass
class HostCopy:
    """A session's KV in host memory: ``kv`` holds the tokens ``tokens`` (all of them)."""

    tokens: list[int]
    kv: torch.Tensor
    stored: StoredState

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclasses.dataclass
class StoredState:
    """What of a session the meta store holds, as this instance last saw it.

    ``entries`` are ``(token_end, prefix_hash)`` of the stored entries this instance may
    build on; ``meta_total`` is the store's ``total_tokens``, which exceeds the last kept
    entry's end when a request diverged inside stored history (the store is truncated
    before the next append). ``version`` is None until the session exists in the store.
    """

    version: int | None = None
    meta_total: int = 0
    entries: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    fingerprint_ok: bool = True

    @property
    def tokens(self) -> int:
        return self.entries[-1][0] if self.entries else 0

    def keep_up_to(self, count: int) -> None:
        """Forget entries that end after ``count`` tokens (they are no longer ours to extend)."""
        while self.entries and self.entries[-1][0] > count:
            self.entries.pop()


class HostTier:
    """Whole sessions in host memory, least recently used first out, within ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._copies: collections.OrderedDict[str, HostCopy] = collections.OrderedDict()
        self.used = 0

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._copies

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def put(self, session_id: str, copy: HostCopy) -> None:
        self.pop(session_id)
        self._copies[session_id] = copy
        self.used += copy.nbytes

    def peek(self, session_id: str) -> HostCopy | None:
        return self._copies.get(session_id)

    def pop(self, session_id: str) -> HostCopy | None:
        copy = self._copies.pop(session_id, None)
        if copy is not None:
            self.used -= copy.nbytes
        return copy

    def oldest(self) -> Iterator[str]:
        """Session ids, least recently stored first (a snapshot)."""
        return iter(list(self._copies))


def new_stamp() -> str:
    """What ends a new blob key: the time it was named (ms, for gc's grace) and 32 random bits."""
    return f"{int(time.time() * 1000):013d}-{os.urandom(4).hex()}"


def store_location(uri: URI) -> str:
    """A store's identity as meta records it: scheme, host, port and path; no credentials,
    no tuning options (two instances with other timeouts still share entries)."""
    return dataclasses.replace(uri, username=None, password=None, query=()).render()


class StoreTier:
    """Session spans as blobs under ``{prefix}/{session hash}/{start}-{end}-{ms}-{rand}``.

    The session id is hashed into the key (ids may hold any character); the time in the
    key lets garbage collection spare blobs younger than a grace period, whose meta entry
    may still be on its way.
    """

    def __init__(self, connector: Connector, layout: KVLayout | None, prefix: str = "kv") -> None:
        self.connector = connector
        self._layout = layout  # None: a tier for administration (list, delete, gc), no KV moves
        self.prefix = prefix.strip("/")
        self.location = store_location(connector.uri)
        self.read_seconds = 0.0
        self.read_bytes = 0
        self.write_seconds = 0.0
        self.write_bytes = 0

    def __repr__(self) -> str:
        return f"StoreTier({self.location!r})"

    @property
    def layout(self) -> KVLayout:
        if self._layout is None:
            raise ConfigError(f"{self!r} was opened for administration only: it moves no KV")
        return self._layout

    def session_prefix(self, session_id: str) -> str:
        return f"{self.prefix}/{hashlib.sha256(session_id.encode()).hexdigest()[:32]}/"

    def new_key(self, session_id: str, start: int, end: int, stamp: str | None = None) -> str:
        """A blob key for tokens ``start..end-1`` of the session; ``stamp`` (:func:`new_stamp`)
        names a save's blobs alike on every rank that writes them."""
        return f"{self.session_prefix(session_id)}{start:010d}-{end:010d}-{stamp or new_stamp()}"

    @staticmethod
    def key_time(key: str) -> float | None:
        """When the blob under ``key`` was named (seconds), or None for a foreign key."""
        parts = key.rsplit("/", 1)[-1].split("-")
        if len(parts) != 4 or not parts[2].isdigit():
            return None
        return int(parts[2]) / 1000

    def write(self, session_id: str, kv: torch.Tensor, tokens: Sequence[int], start: int,
              prefix_hash: str, key: str | None = None) -> EntrySpec:
        """Store ``kv`` (token-major host tensor) for ``tokens`` at ``start`` under ``key``
        (default: a new one); the entry to append."""
        import torch

        from kvswap.meta import EntrySpec

        end = start + len(tokens)
        key = key or self.new_key(session_id, start, end)
        token_tensor = torch.frombuffer(bytearray(token_bytes(tokens)), dtype=torch.int32)
        began = time.perf_counter()
        # Tokens first (stable order among equal element sizes): a small ranged read finds them.
        header = write_blob(self.connector, key, {"tokens": token_tensor, "kv": kv},
                            {"fingerprint": self.layout.fingerprint, "token_offset": str(start),
                             "token_length": str(len(tokens)), "prefix_hash": prefix_hash}, mode="create")
        self.write_seconds += time.perf_counter() - began
        self.write_bytes += header.total_size
        return EntrySpec(token_offset=start, token_length=len(tokens), connector=self.location, key=key,
                         size=header.total_size, checksum=header.checksum or "", prefix_hash=prefix_hash)

    def read(self, entry: Entry,
             allocate: Callable[[int], torch.Tensor] | None = None) -> tuple[torch.Tensor, list[int], str]:
        """The entry's KV (token-major host tensor, in a buffer from ``allocate(nbytes)`` when given),
        token ids and checksum, verified against the entry:
        size, checksum, fingerprint, offsets and shapes (all before any buffer is allocated or
        any data read), then the bytes. IntegrityError if anything disagrees; NotFoundError if
        the blob is gone; InvalidKeyError if the entry's key is not a key."""
        began = time.perf_counter()
        blob = read_blob(self.connector, entry.key, expected_size=entry.size, allocate=allocate,
                         check=lambda header: self._check_header(entry, header))
        self.read_seconds += time.perf_counter() - began
        self.read_bytes += blob.header.total_size
        return blob.tensors["kv"], blob.tensors["tokens"].tolist(), blob.header.checksum or ""

    def _check_header(self, entry: Entry, header: BlobHeader) -> None:
        meta = header.metadata
        if header.checksum != entry.checksum and entry.checksum != RANKS_CHECKSUM:
            raise IntegrityError(f"{entry.key!r} holds checksum {header.checksum}, meta recorded {entry.checksum}")
        if meta.get("fingerprint") != self.layout.fingerprint:
            raise IntegrityError(f"{entry.key!r} was computed by {meta.get('fingerprint')!r}, "
                                 f"not {self.layout.fingerprint!r}")
        if (meta.get("token_offset"), meta.get("token_length"), meta.get("prefix_hash")) != (
                str(entry.token_offset), str(entry.token_length), entry.prefix_hash):
            raise IntegrityError(f"{entry.key!r} describes another span than its meta entry")
        kv, tokens = header.tensors.get("kv"), header.tensors.get("tokens")
        if (len(header.tensors) != 2 or kv is None or tokens is None
                or DTYPE_NAMES.get(tokens.dtype) != "int32" or tokens.shape != (entry.token_length,)
                or DTYPE_NAMES.get(kv.dtype) != self.layout.dtype
                or kv.shape != self.layout.span_shape(entry.token_length)):
            raise IntegrityError(f"{entry.key!r} does not hold a KV span of this layout")

    @property
    def read_bandwidth(self) -> float | None:
        """Bytes per second of reads so far (None before the first read)."""
        return self.read_bytes / self.read_seconds if self.read_seconds > 0 else None


class SpanCache:
    """Recently written or read spans in host memory, by blob key, within ``capacity`` bytes
    (least recently used out): a bounded first tier in front of the stores for engines that
    keep no host copy of their own (vLLM). Keys name immutable blobs, so a hit is the blob's
    own content, already verified when it was read or computed when it was written.

    A span put ``unwritten`` (its blob is being written; checksum :data:`UNWRITTEN`) is not
    evicted until a put of its key with the blob's checksum settles it, or :meth:`discard`
    drops it (the write failed): until then it is the only copy anyone can read. It counts
    against ``capacity`` and may exceed it (the writer holds that memory anyway).

    A span counts ``footprint(kv)`` bytes: its own by default; the whole block it sits in when
    its memory is lent by :class:`~kvswap.session_cache.pinned.PinnedBlocks` (set
    ``footprint`` to the blocks' own), so the tier never holds more of the blocks than its
    capacity and the rest stay free for the moves in flight."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.hits = 0
        self.footprint: Callable[[torch.Tensor], int] = _own_bytes
        self._spans: collections.OrderedDict[str, tuple[torch.Tensor, list[int], str, bytes]] = \
            collections.OrderedDict()
        self._costs: dict[str, int] = {}
        self._unwritten: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._spans

    def get(self, key: str) -> tuple[torch.Tensor, list[int], str, bytes] | None:
        """The span's KV, token ids, blob checksum and token ids as :func:`token_bytes` (what
        a read hashes and compares), if held."""
        if not self.capacity:
            return None
        with self._lock:
            found = self._spans.get(key)
            if found is not None:
                self._spans.move_to_end(key)
                self.hits += 1
            return found

    def put(self, key: str, kv: torch.Tensor, tokens: list[int], checksum: str, ids: bytes | None = None, *,
            unwritten: bool = False) -> bool:
        """Hold a span (True if it is held now). A put of an unwritten span's key with its
        blob's checksum settles it."""
        nbytes = self.footprint(kv)
        if not self.capacity or (nbytes > self.capacity and not unwritten):
            return False
        ids = ids if ids is not None else token_bytes(tokens)
        with self._lock:
            if key in self._spans:
                if key in self._unwritten and not unwritten:
                    self._unwritten.discard(key)
                    self._spans[key] = (kv, tokens, checksum, ids)
                    self.used += nbytes - self._costs[key]
                    self._costs[key] = nbytes
                return True
            evictable = [k for k in self._spans if k not in self._unwritten]  # oldest first
            if not unwritten and self.used - sum(self._costs[k] for k in evictable) + nbytes > self.capacity:
                return False  # no room even without every written span: keep them
            for old_key in evictable:
                if self.used + nbytes <= self.capacity:
                    break
                self._pop(old_key)
            self._spans[key] = (kv, tokens, UNWRITTEN if unwritten else checksum, ids)
            self._costs[key] = nbytes
            self.used += nbytes
            if unwritten:
                self._unwritten.add(key)
            return True

    def discard(self, key: str) -> None:
        """Drop a span (an unwritten one whose write failed)."""
        with self._lock:
            self._unwritten.discard(key)
            if key in self._spans:
                self._pop(key)

    def _pop(self, key: str) -> None:
        del self._spans[key]
        self.used -= self._costs.pop(key)


def _own_bytes(kv: torch.Tensor) -> int:
    return kv.nbytes


@dataclasses.dataclass
class Plan:
    """What a session's stored entries can give back for one request (``SessionStore.plan``).

    ``entries`` are the ones to read, in token order: every entry whose span the request's
    tokens hash to (``matched`` tokens in all), then possibly one ``partial`` entry where
    the request diverges from the stored history inside an entry (how far they agree is
    known only from the blob's own token ids). ``stored`` is the session as meta has it,
    for the caller's next write.
    """

    session: Session | None
    entries: list[tuple[Entry, StoreTier]]
    matched: int
    partial: bool
    stored: StoredState
    #: Set by ``SessionStore.read`` when it stopped early: the first entry found damaged (a
    #: miss from there on), or the error of a store that did not answer.
    damaged_at: int | None = None
    failure: Exception | None = None

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry, _ in self.entries)

    @property
    def end(self) -> int:
        """The last token position the planned entries cover (an upper bound of the reuse)."""
        return self.entries[-1][0].token_end if self.entries else 0


@dataclasses.dataclass
class Span:
    """One verified entry read back: ``kv`` holds its tokens' KV; the first ``take`` of them
    agree with the request (all of them, except in a partial entry)."""

    entry: Entry
    kv: torch.Tensor
    tokens: list[int]
    take: int
    cached: bool = False  # served by the span cache (host memory), not read from its store
    checksum: str = ""  # its blob's checksum
