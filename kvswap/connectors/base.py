"""The connector contract: immutable blobs of bytes under string keys.

A connector stores whole values; it knows nothing of tensors (the blob format above it
does). Every backend implements six small methods (``_put``, ``_read_into``, ``_size``,
``_delete``, ``_list``, ``close``); the public methods here validate keys and arguments
once for all of them. ``_get`` and the batch forms have loop defaults that backends
override when they can do better.

Guarantees every backend gives:

* **Atomic publish.** A reader sees either no value or a whole value, never a partial
  one, also when the writer or the server dies in the middle of a put.
* **Overwrite** replaces the value atomically; ``mode="create"`` fails with
  :class:`AlreadyExistsError` if the key exists.
* **Misses raise.** ``get``/``size``/``get_into`` of a missing key raise
  :class:`NotFoundError`, never return None. ``delete`` of a missing key is a no-op.
* **Keys are portable.** The same key rules everywhere (:func:`validate_key`), so a key
  written to one backend can be written to any other; a key can never address anything
  outside the connector's root or namespace.
* **Errors are kvswap kinds.** Unreachable or timed-out servers raise
  :class:`BackendUnavailableError` within the configured timeout.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    IntegrityError,
    InvalidKeyError,
    NotFoundError,
)
from kvswap.uri import URI, Option

PutMode = Literal["overwrite", "create"]
PUT_MODES: tuple[str, ...] = ("overwrite", "create")
# One buffer, or several written back to back (a gather write: header + tensors).
Data = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]
Buffer = bytes | bytearray | memoryview

MAX_KEY_BYTES = 1024
RESERVED_SEGMENT_PREFIX = ".kvswap"


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid key, else raise :class:`InvalidKeyError`.

    A key is 1 to 1024 UTF-8 bytes of '/'-separated segments; no segment is empty,
    ``.``, ``..`` or starts with ``.kvswap`` (reserved for internal files); no control
    characters (NUL included) and no backslash.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"a key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("a key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key is longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    _check_characters(key)
    if key.startswith("/"):
        raise InvalidKeyError(f"a key must not start with '/': {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"a key must not contain empty, '.' or '..' segments: {key!r}")
        if segment.startswith(RESERVED_SEGMENT_PREFIX):
            raise InvalidKeyError(f"key segments starting with {RESERVED_SEGMENT_PREFIX!r} are reserved: {key!r}")
    return key


def validate_prefix(prefix: object) -> str:
    """A list prefix: '' or a key start (it may end in '/' or mid-segment)."""
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"a prefix must be a str, not {type(prefix).__name__}")
    if prefix:
        _check_characters(prefix)
        if prefix.startswith("/") or any(s in (".", "..") for s in prefix.split("/")[:-1]) \
                or "//" in prefix:
            raise InvalidKeyError(f"malformed prefix {prefix!r}")
    return prefix


def _check_characters(text: str) -> None:
    for ch in text:
        if ch < " " or ch == "\x7f" or ch == "\\":
            raise InvalidKeyError(f"keys must not contain control characters or backslash: {text[:80]!r}")
        if "\ud800" <= ch <= "\udfff":
            raise InvalidKeyError(f"keys must be valid unicode (lone surrogate): {text[:80]!r}")


def as_parts(data: Data) -> list[memoryview]:
    """Normalise put data to a list of flat byte views, without copying."""
    items = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    parts = []
    for item in items:
        try:
            view = memoryview(item)
        except TypeError:
            raise TypeError(f"put data must be bytes-like or a sequence of them, got {type(item).__name__}") from None
        if not view.c_contiguous:
            raise ValueError("put data must be C-contiguous")
        parts.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
    return parts


class Connector(abc.ABC):
    """A store of immutable byte values under string keys, opened from a URI."""

    #: Typed query parameters this backend accepts (see :meth:`URI.options`).
    OPTIONS: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, uri: URI, **options: Any) -> None:
        self.uri = uri
        self.options = uri.options(self.OPTIONS, options)
        self._closed = False

    # ---- what a backend implements ----------------------------------------------

    @abc.abstractmethod
    def _put(self, key: str, parts: list[memoryview], size: int, mode: PutMode) -> None:
        """Publish the concatenation of ``parts`` (``size`` bytes) atomically."""

    @abc.abstractmethod
    def _read_into(self, key: str, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from byte ``offset`` (0 <= offset <= size); return bytes read.

        Reads ``min(len(buffer), size - offset)`` bytes. Missing key: NotFoundError.
        """

    @abc.abstractmethod
    def _size(self, key: str) -> int:
        """Size in bytes of the value; NotFoundError if missing."""

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove the value if present; no error if missing."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[str]:
        """Yield every key starting with ``prefix``, in no particular order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and threads; later calls fail. Idempotent."""

    def _get(self, key: str, offset: int, length: int | None) -> Buffer:
        size = self._size(key)
        check_range(key, offset, size)
        want = size - offset if length is None else min(length, size - offset)
        buffer = bytearray(want)
        got = self._read_into(key, memoryview(buffer), offset)
        if got != want:
            raise IntegrityError(f"{key!r} changed size while being read ({got} of {want} bytes)")
        return buffer

    # ---- the public contract -----------------------------------------------------

    def put(self, key: str, data: Data, *, mode: PutMode = "overwrite") -> None:
        """Store ``data`` (bytes-like, or a sequence written back to back) under ``key``.

        Visible to readers only once complete. ``mode="create"`` raises
        :class:`AlreadyExistsError` when the key exists (the first of racing creators wins).
        """
        self._check_open()
        validate_key(key)
        if mode not in PUT_MODES:
            raise ValueError(f"mode must be one of {PUT_MODES}, not {mode!r}")
        parts = as_parts(data)
        self._put(key, parts, sum(p.nbytes for p in parts), mode)

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> Buffer:
        """The value's bytes, or ``length`` bytes from ``offset`` (fewer at the end).

        Returns a bytes-like object (bytes, bytearray or memoryview). ``offset`` past the
        end raises ValueError; a missing key raises :class:`NotFoundError`.
        """
        self._check_open()
        validate_key(key)
        _check_offset_length(offset, length)
        return self._get(key, offset, length)

    def get_into(self, key: str, buffer: Any, *, offset: int = 0) -> int:
        """Read into the caller's writable buffer from byte ``offset``; return bytes read.

        Reads ``min(len(buffer), size - offset)`` bytes with no intermediate value where
        the backend allows (pinned host memory, a preallocated bytearray, numpy array).
        """
        self._check_open()
        validate_key(key)
        _check_offset_length(offset, None)
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("get_into needs a writable buffer")
        if not view.c_contiguous:
            raise ValueError("get_into needs a C-contiguous buffer")
        return self._read_into(key, view.cast("B") if view.format != "B" or view.ndim != 1 else view, offset)

    def size(self, key: str) -> int:
        """Size in bytes of the value under ``key``; :class:`NotFoundError` if missing."""
        self._check_open()
        return self._size(validate_key(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        self._check_open()
        self._delete(validate_key(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys that start with ``prefix`` (plain string prefix), unordered."""
        self._check_open()
        return self._list(validate_prefix(prefix))

    def collect_garbage(self, older_than: float = 600.0) -> int:
        """Delete what interrupted writes left behind where no reader can reach it (a killed
        writer's temporary file, chunks that no manifest names), if older than ``older_than``
        seconds; return how many items were deleted. Values themselves are never touched.
        Backends whose writes cannot leave such leftovers keep this default (nothing)."""
        self._check_open()
        return 0

    # ---- batch forms: loops here, backends override when they can do better --------

    def put_many(self, items: Mapping[str, Data] | Iterable[tuple[str, Data]], *, mode: PutMode = "overwrite") -> None:
        """Store several values; each is atomic on its own, the batch is not. With
        ``mode="create"`` every value is tried, then :class:`AlreadyExistsError` names the
        first key that existed (the others were stored); any other error stops the batch.
        Every key (and the mode) is checked before the first value is written."""
        self._raise_existing(self._put_each(self._checked_batch(items, mode), mode))

    def _checked_batch(self, items: Mapping[str, Data] | Iterable[tuple[str, Data]],
                       mode: PutMode) -> builtins.list[tuple[str, Data]]:
        """A put_many's (key, data) pairs once the connector is open, the mode known and every key valid."""
        self._check_open()
        if mode not in PUT_MODES:
            raise ValueError(f"mode must be one of {PUT_MODES}, not {mode!r}")
        return [(validate_key(key), data) for key, data in (items.items() if isinstance(items, Mapping) else items)]

    def _put_each(self, pairs: Iterable[tuple[str, Data]], mode: PutMode) -> builtins.list[str]:
        """Put each value in turn; the keys that existed (``mode="create"``), in order."""
        existing: builtins.list[str] = []
        for key, data in pairs:
            try:
                self.put(key, data, mode=mode)
            except AlreadyExistsError:
                existing.append(key)
        return existing

    def _raise_existing(self, keys: builtins.list[str]) -> None:
        """What a create-mode batch raises when ``keys`` existed (nothing if none did)."""
        if keys:
            raise AlreadyExistsError(f"{keys[0]!r} already exists on {self.uri}"
                                     + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))

    def get_many(self, keys: Iterable[str]) -> builtins.list[Buffer]:
        """Values of ``keys`` in order; any missing key raises :class:`NotFoundError`."""
        return [self.get(key) for key in keys]

    def delete_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.delete(key)

    # ---- plumbing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError(f"{self!r} is closed")

    def __enter__(self) -> Connector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri.render()!r})"


def _check_offset_length(offset: int, length: int | None) -> None:
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, not {offset!r}")
    if length is not None and (not isinstance(length, int) or length < 0):
        raise ValueError(f"length must be a non-negative int or None, not {length!r}")


def check_range(key: str, offset: int, size: int) -> None:
    """ValueError if ``offset`` lies past the end of a ``size``-byte value."""
    if offset > size:
        raise ValueError(f"offset {offset} is past the end of {key!r} ({size} bytes)")
