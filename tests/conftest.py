from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from kvswap.testing.servers import free_port


@pytest.fixture
def unique() -> str:
    """A fresh namespace name per test, so tests never see each other's keys."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (a server that is down)."""
    return free_port()
