"""``mem://[name]?capacity=1GiB``: in-process values, bounded by a byte capacity.

``mem://`` alone is a private store; ``mem://name`` is shared by every connector opened
with that name in this process (tests, and the host-memory tier). A put that would pass
the capacity raises :class:`StorageFullError`; nothing is evicted behind the caller's
back (the session cache decides what to drop).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from kvswap.connectors.base import Connector, PutMode, check_range
from kvswap.errors import AlreadyExistsError, ConfigError, NotFoundError, StorageFullError
from kvswap.uri import URI, Option, parse_size


class _Space:
    """The values of one named store, shared by its connectors."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.values: dict[str, bytes] = {}
        self.used = 0
        self.lock = threading.Lock()


_NAMED: dict[str, _Space] = {}
_NAMED_LOCK = threading.Lock()


class MemConnector(Connector):
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "capacity": Option(parse_size, None, "byte capacity; unbounded if absent")}

    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        if uri.path not in ("", "/") or uri.port or uri.username or uri.password:
            raise ConfigError(f"mem:// takes only a name and ?capacity=, got {uri}")
        capacity = self.options["capacity"]
        if not uri.host:
            self._space = _Space(capacity)
            return
        with _NAMED_LOCK:
            space = _NAMED.setdefault(uri.host, _Space(capacity))
        if capacity is not None and space.capacity != capacity:
            raise ConfigError(f"mem://{uri.host} is open with capacity {space.capacity}, not {capacity}")
        self._space = space

    @property
    def used_bytes(self) -> int:
        return self._space.used

    def _put(self, key: str, parts: list[memoryview], size: int, mode: PutMode) -> None:
        value = b"".join(parts)  # the one copy: the store must not alias the caller's memory
        space = self._space
        with space.lock:
            old = space.values.get(key)
            if old is not None and mode == "create":
                raise AlreadyExistsError(f"{key!r} already exists in {self.uri}")
            used = space.used - (len(old) if old is not None else 0) + size
            if space.capacity is not None and used > space.capacity:
                raise StorageFullError(
                    f"{self.uri}: storing {size} bytes under {key!r} needs {used} of {space.capacity} bytes"
                )
            space.values[key] = value
            space.used = used

    def _value(self, key: str) -> bytes:
        try:
            return self._space.values[key]
        except KeyError:
            raise NotFoundError(f"{key!r} not found in {self.uri}") from None

    def _get(self, key: str, offset: int, length: int | None) -> memoryview:
        value = self._value(key)
        check_range(key, offset, len(value))
        end = len(value) if length is None else min(len(value), offset + length)
        return memoryview(value)[offset:end]

    def _read_into(self, key: str, buffer: memoryview, offset: int) -> int:
        value = self._value(key)
        check_range(key, offset, len(value))
        count = min(len(buffer), len(value) - offset)
        buffer[:count] = memoryview(value)[offset:offset + count]
        return count

    def _size(self, key: str) -> int:
        return len(self._value(key))

    def _delete(self, key: str) -> None:
        space = self._space
        with space.lock:
            old = space.values.pop(key, None)
            if old is not None:
                space.used -= len(old)

    def _list(self, prefix: str) -> Iterator[str]:
        with self._space.lock:
            keys = [k for k in self._space.values if k.startswith(prefix)]
        return iter(keys)

    def close(self) -> None:
        self._closed = True
