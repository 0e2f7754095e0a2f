"""Processes, ports and waits: what every server's start and stop is made of."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str | None:
    """A binary from this interpreter's environment first, then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None) -> None:
    """Poll ``check`` until true; on failure stop ``proc`` (never leave it behind) and raise."""
    try:
        _poll(check, timeout, what, proc)
    except BaseException:
        if proc is not None:
            stop_pid(proc.pid)
        raise


def _poll(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001, S110 - not ready yet, whatever the reason
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout}s")


@dataclasses.dataclass
class Started:
    name: str
    pid: int
    env: dict[str, str]
    stop_command: list[str] | None = None


@contextlib.contextmanager
def _stopped_on_failure(started: list[Started]) -> Iterator[None]:
    """Stop every server in ``started`` (a group being formed) if the block fails."""
    try:
        yield
    except BaseException:
        for server in started:
            stop_pid(server.pid)
        raise


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.Popen:
    """Start a server in a session of its own (``stop_pid`` stops its group), output to ``log``."""
    out = open(log, "ab")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})}, user=user)


def _owned_dir(path: Path, user: str | None) -> Path:
    """``path`` created and, when running as root, given to ``user`` (servers that refuse root)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    if user and os.geteuid() == 0:
        shutil.chown(path, user, user)
    return path


def _service_user(name: str) -> str | None:
    """The account a database server runs as: its own when we are root, else ourselves."""
    return name if os.geteuid() == 0 else None


def port_open(port: int) -> bool:
    """True if a server accepts on ``port`` of loopback (raises OSError if none does)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def _run_setup(argv: list[str], user: str | None = None) -> None:
    """Run a server's setup command; on failure raise with what it printed."""
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, user=user, check=False)
    if done.returncode:
        tail = done.stdout.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}); the state directory and its parents "
                           f"must be readable by {user or 'this user'}:\n{tail}")


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
