"""``kvswap serve`` processes and a retrying chat client, for tests and benchmarks of the service.

:func:`start_serve` runs ``python -m kvswap.cli serve --port 0 ...`` in its own process
group, reads the JSON line it prints when listening, and waits for ``/health``.
:class:`Conversation` is what a client behind a load balancer does: it keeps the
transcript, sends it whole each turn, and retries what a dying instance or a lease held
by one answers (502/503, connection errors, 409) until a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvswap.errors import BackendUnavailableError, SessionBusyError
from kvswap.service.client import ServiceClient, ServiceError
from kvswap.testing.servers import stop_pid


@dataclasses.dataclass
class HTTPProcess:
    """A server process in its own process group, and where it answers."""

    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def kill(self) -> None:
        """SIGKILL the whole process group (no shutdown hooks run)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        stop_pid(self.proc.pid, grace=20.0)
        self.proc.wait(5)


@dataclasses.dataclass
class ServeProcess(HTTPProcess):
    instance: str = ""
    fingerprint: str = ""


def start_serve(args: Sequence[str], log: Path, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> ServeProcess:
    """Start one instance; ``args`` are ``kvswap serve`` flags (``--port 0`` is added)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    err = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "kvswap.cli", "serve", "--port", "0", "--log-level", "warning",
                             *args], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        ready = _first_line(proc, timeout)
        info = json.loads(ready)
        served = ServeProcess(proc, info["url"], log, instance=info["instance"], fingerprint=info["fingerprint"])
        with ServiceClient(served.url, timeout=5) as client:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    client.health()
                    return served
                except BackendUnavailableError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
    except BaseException:  # noqa: BLE001 - re-raised with the child's log
        stop_pid(proc.pid)
        raise RuntimeError(f"kvswap serve did not start; log {log}:\n{log.read_text()[-3000:]}") from None


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline().decode()
            if line.strip():
                return line
            if proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    raise RuntimeError("no ready line")


RETRIED = (BackendUnavailableError, SessionBusyError)


@dataclasses.dataclass
class Turn:
    tokens: list[int]  # generated
    cached: int
    computed: int
    instance: str
    prompt_tokens: int
    retries: int
    seconds: float


class Conversation:
    """One chat session as a client keeps it: the transcript, sent whole each turn."""

    def __init__(self, client: ServiceClient, session_id: str, prompt: list[int]) -> None:
        self.client = client
        self.session_id = session_id
        self.history = list(prompt)
        self.turns: list[Turn] = []

    def ask(self, max_tokens: int, deadline_s: float = 60.0) -> Turn:
        """One turn, retried through instance deaths and leases they left behind."""
        began = time.monotonic()
        retries = 0
        while True:
            try:
                reply = self.client.generate(self.session_id, tokens=self.history, max_tokens=max_tokens)
                break
            except (*RETRIED, ServiceError) as exc:
                if isinstance(exc, ServiceError) and exc.status != 409:
                    raise
                if time.monotonic() - began > deadline_s:
                    raise
                retries += 1
                time.sleep(0.25)
        turn = Turn(reply["tokens"], reply["cached_tokens"], reply["computed_tokens"], reply["instance"],
                    len(self.history), retries, time.monotonic() - began)
        self.turns.append(turn)
        return turn

    def add(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)


def chat_reference(device: str = "cpu") -> Any:
    """A function (tokens, max_new) -> tokens that recomputes with the tiny model on ``device``,
    no kvswap: what every instance's answer must equal."""
    from kvswap.engine import Engine, build_model
    from kvswap.meta import open_meta_store
    from kvswap.session_cache import PagedKVPool, SessionCache

    model, layout = build_model("tiny", device=device)
    engine = Engine(model, SessionCache(PagedKVPool(layout, 1, 16, device), open_meta_store("memkv://")))
    return lambda tokens, max_new: engine.generate_uncached(tokens, max_new).tokens
