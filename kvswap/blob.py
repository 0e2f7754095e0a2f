"""The tensor blob format shared by the session cache and weights.

A blob is a valid safetensors file: an 8-byte little-endian header length, a JSON header
(each tensor's dtype, shape and byte range; ``__metadata__`` with string fields), then
the raw tensor bytes back to back. kvswap adds to ``__metadata__``:

* ``kvswap.format`` — the format version (``"1"``);
* ``kvswap.checksum`` — ``xxh3_128:<hex>`` of the whole data section, or, for data sections
  of STREAM_MIN bytes and more, ``xxh3_128-tree-<C>:<hex>``: the xxh3-128 of the
  concatenated 16-byte xxh3-128 digests of each ``C``-byte chunk (the last one shorter), so
  the chunks of one blob are read and hashed in parallel, each as it lands;

plus any caller fields (names starting with ``kvswap.`` are reserved). So
``safetensors.torch.load`` reads kvswap blobs, and kvswap reads plain safetensors files
(those carry no checksum: pass ``require_checksum=False``).

Writing gathers the header and each tensor's memory straight into ``Connector.put``
(no concatenation). Reading fetches the header with one ranged get and the data
straight into a caller's buffer (pinned host memory, for instance), then returns tensor
views of that buffer. A large data section is read in chunks on several threads, each
chunk hashed by the thread that read it (blobs written before the chunked checksum: chunk
k hashed while chunk k + 1 is read), so verification costs little beyond the read itself;
the whole section is verified before any tensor is returned. Tensors are
laid out by descending element size, so every view is aligned. A checksum mismatch or a
malformed header raises :class:`IntegrityError` naming the key; wrong bytes never come
back as tensors.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import xxhash

from kvswap.errors import IntegrityError, UnsupportedFormatError

if TYPE_CHECKING:
    import torch

    from kvswap.connectors.base import Connector, PutMode

FORMAT_VERSION = "1"
CHECKSUM_ALGORITHM = "xxh3_128"
TREE_ALGORITHM = "xxh3_128-tree-"  # + the chunk size in bytes
MIN_TREE_CHUNK = 4 << 10
RESERVED_PREFIX = "kvswap."
HEADER_PROBE = 64 << 10  # first read: header and, for small blobs, everything
STREAM_MIN = 64 << 20  # data sections from this size are read and hashed chunk by chunk
STREAM_CHUNK = 32 << 20  # bytes per chunk, written into the checksum's name
PARALLEL_CHUNKS = True  # False: a chunk-tree blob is read whole, then hashed (the benchmarks' baseline)
MAX_HEADER = 100 << 20  # safetensors' own limit

_DTYPES: dict[str, tuple[str, int]] = {  # torch dtype name -> (safetensors code, itemsize)
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint64": ("U64", 8), "uint32": ("U32", 4), "uint16": ("U16", 2), "uint8": ("U8", 1),
    "bool": ("BOOL", 1), "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
}
_CODES = {code: (name, size) for name, (code, size) in _DTYPES.items()}
ITEMSIZE = {name: size for name, (_, size) in _DTYPES.items()}  # torch dtype name -> bytes per element
DTYPE_NAMES = {code: name for code, (name, _) in _CODES.items()}  # safetensors code -> torch dtype name


def checksum(data: Any) -> str:
    """The checksum string kvswap stores for ``data``: ``xxh3_128:<hex>``."""
    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies in the data section."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _CODES[self.dtype][0])


@dataclasses.dataclass(frozen=True)
class BlobHeader:
    """A parsed blob header. ``data_offset`` is where the data section starts."""

    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]  # the caller's fields, without kvswap.*
    checksum: str | None  # "xxh3_128:<hex>", None for plain safetensors files
    data_offset: int
    data_size: int

    @property
    def total_size(self) -> int:
        return self.data_offset + self.data_size


@dataclasses.dataclass(frozen=True)
class Blob:
    header: BlobHeader
    tensors: dict[str, torch.Tensor]  # views of ``buffer``
    buffer: torch.Tensor  # flat uint8 data section


def pack(tensors: Mapping[str, torch.Tensor],
         metadata: Mapping[str, str] | None = None) -> tuple[BlobHeader, list[Any]]:
    """Header and the byte views to write, in order; the tensors are not copied.

    Tensors must be on the CPU (stage device tensors into host buffers first); a
    non-contiguous tensor is made contiguous (a copy).
    """
    import torch

    metadata = dict(metadata or {})
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("blob metadata must map str to str")
        if name.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata names starting with {RESERVED_PREFIX!r} are reserved: {name!r}")
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())  # stable: aligned views
    specs: dict[str, TensorSpec] = {}
    views: list[Any] = []
    position = 0
    for name in order:
        tensor = tensors[name]
        if name == "__metadata__" or not isinstance(name, str) or not name:
            raise ValueError(f"invalid tensor name {name!r}")
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; stage it to host memory first")
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if dtype_name not in _DTYPES:
            raise TypeError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        view = raw.data.cast("B") if raw.size else memoryview(b"")
        specs[name] = TensorSpec(name, _DTYPES[dtype_name][0], tuple(tensor.shape), position, position + view.nbytes)
        position += view.nbytes
        views.append(view)
    checksum = _checksum_of(views, position)
    header_json: dict[str, Any] = {"__metadata__": {**metadata, "kvswap.format": FORMAT_VERSION,
                                                    "kvswap.checksum": checksum}}
    for spec in specs.values():
        header_json[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                  "data_offsets": [spec.start, spec.end]}
    encoded = json.dumps(header_json, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    header = BlobHeader(specs, metadata, checksum, len(prefix), position)
    return header, [prefix, *views]


def write_blob(connector: Connector, key: str, tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str] | None = None, *, mode: PutMode = "overwrite") -> BlobHeader:
    """Store ``tensors`` under ``key`` as one blob; returns its header."""
    header, parts = pack(tensors, metadata)
    connector.put(key, parts, mode=mode)
    return header


def parse_header(data: bytes | memoryview, key: str, blob_size: int | None = None) -> BlobHeader:
    """Parse a header from the blob's first bytes (which must hold all of it)."""
    view = memoryview(data)
    if len(view) < 8:
        raise IntegrityError(f"{key!r} is not a kvswap blob: {len(view)} bytes, too short for a header")
    (length,) = struct.unpack_from("<Q", view)
    if length > MAX_HEADER or (blob_size is not None and 8 + length > blob_size):
        raise IntegrityError(f"{key!r} is not a kvswap blob: header length {length} is impossible")
    if len(view) < 8 + length:
        raise IntegrityError(f"{key!r} is truncated: {len(view)} bytes cannot hold its {8 + length}-byte header")
    try:
        raw = json.loads(bytes(view[8:8 + length]))
        if not isinstance(raw, dict):
            raise ValueError("header is not an object")
        meta = raw.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map str to str")
        specs = {name: TensorSpec(name, str(t["dtype"]), tuple(int(d) for d in t["shape"]),
                                  int(t["data_offsets"][0]), int(t["data_offsets"][1]))
                 for name, t in raw.items()}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise IntegrityError(f"{key!r} has a malformed blob header: {exc}") from None
    data_size = _check_layout(specs, key)
    if blob_size is not None and 8 + length + data_size != blob_size:
        raise IntegrityError(f"{key!r} holds {blob_size} bytes but its header describes {8 + length + data_size}")
    version = meta.get("kvswap.format")
    if version is not None and version != FORMAT_VERSION:
        raise UnsupportedFormatError(f"{key!r} has blob format {version}; this kvswap reads {FORMAT_VERSION}")
    reserved = {k for k in meta if k.startswith(RESERVED_PREFIX)}
    if reserved and reserved != {"kvswap.format", "kvswap.checksum"}:  # a kvswap blob names exactly these
        raise IntegrityError(f"{key!r} has a damaged kvswap header: reserved fields {sorted(reserved)}")
    user = {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX)}
    return BlobHeader(specs, user, meta.get("kvswap.checksum"), 8 + length, data_size)


def _check_layout(specs: Mapping[str, TensorSpec], key: str) -> int:
    """Validate dtypes, sizes and that ranges tile the data section; return its size."""
    position = 0
    for spec in sorted(specs.values(), key=lambda s: (s.start, s.end)):
        if spec.dtype not in _CODES:
            raise IntegrityError(f"{key!r}: tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
        expected = math.prod(spec.shape) * _CODES[spec.dtype][1]
        if spec.start != position or spec.end - spec.start != expected or min(spec.shape, default=0) < 0:
            raise IntegrityError(f"{key!r}: tensor {spec.name!r} has an inconsistent byte range")
        position = spec.end
    return position


def read_header(connector: Connector, key: str) -> BlobHeader:
    header, _ = _read_header(connector, key)
    return header


def _read_header(connector: Connector, key: str) -> tuple[BlobHeader, memoryview]:
    """The header and the bytes of the first read (header, perhaps some data).

    Any blob that cannot hold a whole header (truncated, or a damaged length) is an
    :class:`IntegrityError`, never another exception.
    """
    probe = memoryview(connector.get(key, offset=0, length=HEADER_PROBE))
    if len(probe) >= 8:
        (length,) = struct.unpack_from("<Q", probe)
        if 8 + length > len(probe) and length <= MAX_HEADER and len(probe) >= HEADER_PROBE:
            rest = _ranged(connector, key, len(probe), 8 + length - len(probe))
            probe = memoryview(bytes(probe) + bytes(rest))
        if 8 + length > len(probe) and length <= MAX_HEADER:
            raise IntegrityError(f"{key!r} is truncated: {len(probe)} bytes cannot hold its {8 + length}-byte header")
    blob_size = None if len(probe) >= HEADER_PROBE else len(probe)
    header = parse_header(probe, key, blob_size)
    return header, probe


def _ranged(connector: Connector, key: str, offset: int, length: int) -> Any:
    try:
        return connector.get(key, offset=offset, length=length)
    except ValueError as exc:  # the offset lies past the end: the value shrank under us
        raise IntegrityError(f"{key!r} is truncated: {exc}") from None


def read_blob(connector: Connector, key: str, *, out: torch.Tensor | None = None,
              require_checksum: bool = True, expected_size: int | None = None,
              check: Callable[[BlobHeader], None] | None = None,
              allocate: Callable[[int], torch.Tensor] | None = None) -> Blob:
    """Read a blob; its data lands in ``out`` (a flat uint8 CPU tensor, e.g. pinned).

    ``out`` must hold at least ``header.data_size`` bytes; without it a buffer is
    allocated by ``allocate(nbytes)`` (pinned or lent, e.g.), else by ``torch.empty``. Before any
    data is read or any buffer allocated, the header must parse, its total size must equal ``expected_size`` (when
    given: what the caller's records say the blob holds) and ``check(header)`` must pass
    (the caller's own expectations; it raises IntegrityError). The checksum is verified
    before any tensor is returned. A blob that is damaged in any way (a malformed or
    truncated header, a truncated or extended value, a checksum mismatch, a size other
    than expected) raises :class:`IntegrityError`, never wrong tensors.
    """
    import torch

    header, probe = _checked_header(connector, key, expected_size, check)
    size = header.data_size
    if out is None:
        # One spare byte: a value longer than its header says fills it (an extended blob).
        out = allocate(size + 1) if allocate is not None else torch.empty(size + 1, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu" or out.numel() < size:
        raise ValueError(f"out must be a flat uint8 CPU tensor of at least {size} bytes")
    buffer = out[:size]
    target = out.numpy().data
    have = min(max(len(probe) - header.data_offset, 0), size)
    target[:have] = probe[header.data_offset:header.data_offset + have]
    chunk = _tree_chunk(header, key, require_checksum)
    if chunk and len(probe) >= HEADER_PROBE and PARALLEL_CHUNKS:  # chunks read and hashed on several threads
        got, digests = _read_tree(connector, key, target, have, size, header.data_offset, chunk)
        _check_length(header, key, have + got, size)
        _compare_tree(header, digests, key)
        return _blob(header, buffer)
    digest = None if chunk else _digest(header, key, require_checksum)
    streamed = len(probe) >= HEADER_PROBE and size - have >= STREAM_MIN and digest is not None
    if len(probe) < HEADER_PROBE:  # the probe held the whole value (parse_header checked its size)
        got = 0
    elif streamed:
        assert digest is not None
        got = _read_hashing(connector, key, target, have, size, header.data_offset, digest)
    else:
        try:
            got = connector.get_into(key, target[have:], offset=header.data_offset + have)
        except ValueError as exc:
            raise IntegrityError(f"{key!r} is truncated: {exc}") from None
    _check_length(header, key, have + got, size)
    if chunk:
        verify(header, target[:size], key)
    elif digest is not None:
        if not streamed:
            digest.update(target[:size])
        _compare(header, digest, key)
    return _blob(header, buffer)


def _checked_header(connector: Connector, key: str, expected_size: int | None,
                    check: Callable[[BlobHeader], None] | None) -> tuple[BlobHeader, memoryview]:
    """The header and first bytes, checked against the recorded size (or, without one, the
    stored size, so the allocation is bounded by what is stored) and the caller's ``check``."""
    header, probe = _read_header(connector, key)
    if expected_size is not None and header.total_size != expected_size:
        raise IntegrityError(f"{key!r} holds a {header.total_size}-byte blob where {expected_size} bytes were recorded")
    if expected_size is None and len(probe) >= HEADER_PROBE:
        stored = connector.size(key)
        if stored != header.total_size:
            raise IntegrityError(f"{key!r} holds {stored} bytes but its header describes {header.total_size}")
    if check is not None:
        check(header)
    return header, probe


def _check_length(header: BlobHeader, key: str, got: int, size: int) -> None:
    if got < size:
        raise IntegrityError(f"{key!r} is truncated: {header.data_offset + got} of {header.total_size} bytes")
    if got > size:
        raise IntegrityError(f"{key!r} holds more bytes than its header describes ({header.total_size})")


def _blob(header: BlobHeader, buffer: torch.Tensor) -> Blob:
    tensors = {name: buffer[s.start:s.end].view(s.torch_dtype).reshape(s.shape) for name, s in header.tensors.items()}
    return Blob(header, tensors, buffer)


def verify(header: BlobHeader, data: Any, key: str, require_checksum: bool = True) -> None:
    """Check ``data`` (the data section) against the header's checksum."""
    chunk = _tree_chunk(header, key, require_checksum)
    if chunk:
        view = memoryview(data).cast("B")
        _compare_tree(header, [xxhash.xxh3_128_digest(view[i:i + chunk]) for i in range(0, len(view), chunk)], key)
        return
    digest = _digest(header, key, require_checksum)
    if digest is not None:
        digest.update(data)
        _compare(header, digest, key)


def _checksum_of(views: list[Any], size: int) -> str:
    """The checksum a new blob records for its data section (``views`` back to back, ``size``
    bytes): one xxh3-128 below STREAM_MIN bytes, else the chunk tree (chunks hashed in parallel)."""
    if size < STREAM_MIN:
        digest = xxhash.xxh3_128()
        for view in views:
            digest.update(view)
        return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"
    chunk = STREAM_CHUNK
    pieces: list[list[Any]] = [[] for _ in range(-(-size // chunk))]
    position = 0
    for view in views:  # each chunk's pieces, cut across the views
        offset = 0
        while offset < len(view):
            index, within = divmod(position, chunk)
            take = min(len(view) - offset, chunk - within)
            pieces[index].append(view[offset:offset + take])
            offset += take
            position += take
    digests = list(_chunk_pool().map(_digest_pieces, pieces))
    return f"{TREE_ALGORITHM}{chunk}:{xxhash.xxh3_128_hexdigest(b''.join(digests))}"


def _digest_pieces(pieces: list[Any]) -> bytes:
    digest = xxhash.xxh3_128()
    for piece in pieces:
        digest.update(piece)
    return digest.digest()


def _tree_chunk(header: BlobHeader, key: str, require_checksum: bool) -> int:
    """The chunk size of the header's tree checksum; 0 for a single hash or no checksum."""
    algorithm = (header.checksum or "").partition(":")[0]
    if not algorithm.startswith(TREE_ALGORITHM):
        _digest(header, key, require_checksum)  # raises for a missing or unknown one
        return 0
    size = algorithm[len(TREE_ALGORITHM):]
    if not size.isdigit() or int(size) < MIN_TREE_CHUNK or int(size) & (int(size) - 1):
        raise IntegrityError(f"{key!r} names an impossible checksum chunk size: {algorithm!r}")
    return int(size)


def _digest(header: BlobHeader, key: str, require_checksum: bool) -> Any:
    """A fresh hasher for the header's single-hash checksum; None for a blob without one (if
    allowed)."""
    if header.checksum is None:
        if require_checksum:
            raise IntegrityError(f"{key!r} carries no kvswap checksum (a plain safetensors file?)")
        return None
    algorithm = header.checksum.partition(":")[0]
    if algorithm != CHECKSUM_ALGORITHM:
        raise UnsupportedFormatError(f"{key!r} uses unknown checksum algorithm {algorithm!r}")
    return xxhash.xxh3_128()


def _compare(header: BlobHeader, digest: Any, key: str) -> None:
    _compare_hex(header, digest.hexdigest(), key)


def _compare_tree(header: BlobHeader, chunk_digests: list[bytes], key: str) -> None:
    _compare_hex(header, xxhash.xxh3_128_hexdigest(b"".join(chunk_digests)), key)


def _compare_hex(header: BlobHeader, actual: str, key: str) -> None:
    expected = (header.checksum or "").partition(":")[2]
    if actual != expected:
        raise IntegrityError(f"checksum mismatch for {key!r}: stored {expected}, computed {actual}")


_chunk_readers: concurrent.futures.ThreadPoolExecutor | None = None
_chunk_readers_lock = threading.Lock()


def _chunk_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that read and hash chunks of large blobs (shared, made once)."""
    global _chunk_readers
    with _chunk_readers_lock:
        if _chunk_readers is None:
            _chunk_readers = concurrent.futures.ThreadPoolExecutor(max(8, min(32, os.cpu_count() or 8)),
                                                                   thread_name_prefix="kvswap-chunk")
        return _chunk_readers


def _read_hashing(connector: Connector, key: str, target: Any, start: int, size: int, data_offset: int,
                  digest: Any) -> int:
    """Read the data section from byte ``start`` (the bytes before it are in ``target``
    already) in chunks of STREAM_CHUNK, feeding ``digest`` each chunk while the next is read.
    ``target`` holds ``size`` bytes and one spare (a longer value fills it). Returns the bytes
    read; the digest covers at most ``size`` bytes."""
    digest.update(target[:start])
    position, hashed = start, start
    pool = _chunk_pool()
    while True:
        stop = position + STREAM_CHUNK
        if stop >= size:
            stop = size + 1  # the last chunk takes the spare byte along
        read = pool.submit(connector.get_into, key, target[position:stop], offset=data_offset + position)
        if hashed < position:  # the previous chunk, hashed while this one is read
            digest.update(target[hashed:position])
            hashed = position
        try:
            got = read.result()
        except ValueError as exc:  # the offset lies past the end: truncated
            raise IntegrityError(f"{key!r} is truncated: {exc}") from None
        asked, position = stop - position, position + got
        if got < asked or position > size:  # the value's end, or past the header's (extended)
            break
    digest.update(target[hashed:min(position, size)])
    return position - start


def _read_tree(connector: Connector, key: str, target: Any, start: int, size: int, data_offset: int,
               chunk: int) -> tuple[int, list[bytes]]:
    """Read the data section from byte ``start`` (the bytes before it are in ``target``
    already), every ``chunk``-byte chunk on its own thread, hashed by that thread as soon as
    it is read. ``target`` holds ``size`` bytes and one spare (the last chunk reads it along:
    a longer value fills it). Returns the bytes read and each chunk's digest; every read has
    ended when this returns, failed or not."""

    def read_chunk(low: int) -> tuple[int, bytes]:
        high = min(low + chunk, size)
        begin, stop = max(low, start), (high if high < size else size + 1)
        try:
            got = connector.get_into(key, target[begin:stop], offset=data_offset + begin) if begin < stop else 0
        except ValueError as exc:  # the offset lies past the end: truncated
            raise IntegrityError(f"{key!r} is truncated: {exc}") from None
        if high < size and got < stop - begin:
            raise IntegrityError(f"{key!r} is truncated: chunk at {low} read {got} of {stop - begin} bytes")
        return got, xxhash.xxh3_128_digest(target[low:min(begin + got, high)])

    futures = [_chunk_pool().submit(read_chunk, low) for low in range(0, max(size, 1), chunk)]
    try:
        results = [future.result() for future in futures]
    finally:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
    return sum(got for got, _ in results), [digest for _, digest in results]
