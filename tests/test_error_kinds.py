"""Every error kvswap raises on purpose has a kind the service maps to an HTTP status: a new
error class that is not one of the tree's kinds would answer 500."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import kvswap
from kvswap.errors import KVSwapError

pytest.importorskip("fastapi")


def all_error_classes() -> set[type[KVSwapError]]:
    for module in pkgutil.walk_packages(kvswap.__path__, "kvswap."):
        if ".integrations.vllm" in module.name or module.name.startswith("kvswap.testing"):
            continue  # vLLM is not installed beside every test run; testing holds no error classes
        importlib.import_module(module.name)
    found: set[type[KVSwapError]] = set()
    pending: list[type[KVSwapError]] = [KVSwapError]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                pending.append(sub)
    return found


def test_every_error_class_has_a_status() -> None:
    from kvswap.service.errors import status_of

    classes = all_error_classes()
    assert len(classes) >= 15
    client_side = {"ServiceError"}  # the HTTP client's error: it carries the remote service's own status
    unmapped = sorted(c.__qualname__ for c in classes
                      if c.__qualname__ not in client_side and status_of(c.__new__(c)) == 500)
    assert unmapped == []


@pytest.mark.parametrize(("name", "status"), [
    ("kvswap.errors:SessionBusyError", 409), ("kvswap.weights.seed:SeedBusyError", 409),
    ("kvswap.meta.records:LeaseError", 409), ("kvswap.errors:VersionConflictError", 409),
    ("kvswap.errors:AlreadyExistsError", 409), ("kvswap.meta.records:InvalidEntryError", 400),
    ("kvswap.service.instance:RequestError", 400), ("kvswap.session_cache.base:OutOfBlocksError", 503),
    ("kvswap.session_cache.base:SwapError", 503), ("kvswap.errors:IntegrityError", 502),
    ("kvswap.errors:StorageFullError", 507), ("kvswap.errors:NotFoundError", 404),
])
def test_statuses_of_the_kinds(name: str, status: int) -> None:
    from kvswap.service.errors import status_of

    module, _, cls_name = name.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    assert status_of(cls.__new__(cls)) == status
