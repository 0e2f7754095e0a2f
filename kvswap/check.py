"""``kvswap check URI``: exercise a connector end to end, each step timed.

Small and large values, a ranged read, a create-only put that must be refused, a tensor
blob with its checksum, listing by prefix and deletion, all under a fresh key prefix that
the last step removes. Used by the CLI; a failure is a row, not an exception.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable

from kvswap.connectors.base import Connector
from kvswap.errors import AlreadyExistsError, KVSwapError, NotFoundError


@dataclasses.dataclass(frozen=True)
class CheckRow:
    status: str  # "ok", "FAIL" or "skip"
    name: str
    detail: str


class ConnectorCheck:
    """The steps of ``kvswap check`` against ``store`` with a large value of ``size`` bytes."""

    def __init__(self, store: Connector, size: int) -> None:
        self.store = store
        self.base = f"kvswap-check-{uuid.uuid4().hex[:8]}"
        self.big = os.urandom(size)
        self.rows: list[CheckRow] = []

    @property
    def failed(self) -> bool:
        return any(row.status == "FAIL" for row in self.rows)

    def run(self) -> list[CheckRow]:
        self.step("put/get small", self.roundtrip_small)
        self.step("put large", self.put_big, len(self.big))
        self.step("get large into buffer", self.get_big, len(self.big))
        self.step("ranged get", self.ranged)
        self.step("create-only put", self.create_conflict)
        try:
            import torch  # noqa: F401
        except ImportError:
            self.rows.append(CheckRow("skip", "tensor blob", "torch not installed"))
            self.store.put(f"{self.base}/blob", b"placeholder")
        else:
            self.step("tensor blob", self.blob)
        self.step("list by prefix", self.listing)
        self.step("delete", self.cleanup)
        return self.rows

    def step(self, name: str, fn: Callable[[], str | None], nbytes: int = 0) -> None:
        start = time.perf_counter()
        try:
            detail = fn() or ""
        except (KVSwapError, AssertionError, ValueError) as exc:
            self.rows.append(CheckRow("FAIL", name, f"{type(exc).__name__}: {exc}"))
            return
        seconds = time.perf_counter() - start
        speed = f"{nbytes / seconds / 1e9:.2f} GB/s" if nbytes else f"{seconds * 1e3:.1f} ms"
        self.rows.append(CheckRow("ok", name, f"{speed}  {detail}".rstrip()))

    def roundtrip_small(self) -> None:
        self.store.put(f"{self.base}/small", b"hello kvswap")
        assert bytes(self.store.get(f"{self.base}/small")) == b"hello kvswap", "read back differs"

    def put_big(self) -> None:
        self.store.put(f"{self.base}/big", self.big)

    def get_big(self) -> None:
        buffer = bytearray(len(self.big))
        got = self.store.get_into(f"{self.base}/big", buffer)
        assert got == len(self.big) and buffer == self.big, "read back differs"

    def ranged(self) -> None:
        middle = len(self.big) // 2
        got = bytes(self.store.get(f"{self.base}/big", offset=middle, length=4096))
        assert got == self.big[middle:middle + 4096], "ranged read differs"

    def create_conflict(self) -> str:
        try:
            self.store.put(f"{self.base}/small", b"other", mode="create")
        except AlreadyExistsError:
            return "second create refused"
        raise AssertionError("create-mode put overwrote an existing value")

    def blob(self) -> str:
        import torch

        from kvswap.blob import read_blob, write_blob

        tensors = {"k": torch.randn(2, 128, 64), "v": torch.randn(2, 128, 64)}
        write_blob(self.store, f"{self.base}/blob", tensors, {"check": "1"})
        loaded = read_blob(self.store, f"{self.base}/blob")
        assert all(torch.equal(loaded.tensors[n], t) for n, t in tensors.items()), "tensors differ"
        return "checksum verified"

    def listing(self) -> str:
        keys = sorted(self.store.list(f"{self.base}/"))
        assert keys == [f"{self.base}/{k}" for k in ("big", "blob", "small")], keys
        return f"{len(keys)} keys"

    def cleanup(self) -> None:
        self.store.delete_many([f"{self.base}/{k}" for k in ("small", "big", "blob")])
        try:
            self.store.get(f"{self.base}/small")
        except NotFoundError:
            return
        raise AssertionError("deleted value still readable")
