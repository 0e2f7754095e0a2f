"""One error tree for every part of kvswap.

Every failure a caller can act on is a :class:`KVSwapError` of one of a few kinds.
Backend exceptions (driver, socket, OS) are translated in one place per backend with
:func:`translate_errors`, always chained (``raise ... from exc``) so the original stays
visible in tracebacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping


class KVSwapError(Exception):
    """Root of every error kvswap raises on purpose."""


class NotFoundError(KVSwapError, KeyError):
    """The key, session or entry does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class ConflictError(KVSwapError):
    """A write that contradicts what is stored (a kind: its subclasses say how)."""


class AlreadyExistsError(ConflictError):
    """A create-only write found the target already present."""


class VersionConflictError(ConflictError):
    """A compare-and-swap lost: the stored version is not the expected one.

    ``current`` carries the version found, when the backend knows it.
    """

    def __init__(self, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.current = current


class BackendUnavailableError(KVSwapError, ConnectionError):
    """The backend could not be reached or did not answer in time."""


class IntegrityError(KVSwapError):
    """Stored bytes fail verification (checksum, length, header, format)."""


class UnsupportedFormatError(IntegrityError):
    """Stored bytes in a format or checksum this kvswap does not know (written by a newer one?).

    Refused like damage (never read as tensors), but not damage: the session store leaves
    such data and its meta in place (a miss here), so an instance that has not been upgraded
    yet does not delete what upgraded instances wrote."""


class InvalidInputError(KVSwapError, ValueError):
    """What the caller passed is not acceptable (a kind: its subclasses say what)."""


class ConfigError(InvalidInputError):
    """A URI, option or setting is malformed, unknown or contradictory."""


class InvalidKeyError(InvalidInputError):
    """A key is not acceptable (empty, too long, NUL, ``..``, absolute, reserved)."""


class StorageFullError(KVSwapError):
    """A bounded store has no room for the value."""


class BusyError(KVSwapError):
    """What was asked for is held by another request, operation or owner: retry later (a kind)."""


class SessionBusyError(BusyError):
    """The session is in use: pinned by a request on this instance, or leased by another."""


class OverloadedError(KVSwapError):
    """No capacity right now (memory, blocks): retry later (a kind)."""


ExceptionTable = Mapping[type[BaseException], type[KVSwapError]]


@contextlib.contextmanager
def translate_errors(table: ExceptionTable, what: str) -> Iterator[None]:
    """Translate backend exceptions into kvswap's kinds, the one point per backend.

    ``table`` maps backend exception classes to kvswap kinds; the first matching entry
    (in insertion order, so put subclasses first) wins. ``what`` names the operation and
    target for the message (it must not contain secrets). KVSwapErrors pass through.
    Exceptions not in the table propagate unchanged: they are bugs, not conditions.
    """
    try:
        yield
    except KVSwapError:
        raise
    except BaseException as exc:
        error = translated(table, what, exc)
        if error is None:
            raise
        raise error from exc


def translated(table: ExceptionTable, what: str, exc: BaseException) -> KVSwapError | None:
    """The kvswap error that :func:`translate_errors` raises for ``exc`` (None: not in
    ``table``), for hot paths that catch themselves rather than enter a context manager."""
    if isinstance(exc, KVSwapError):
        return exc
    for backend_type, kind in table.items():
        if isinstance(exc, backend_type):
            return kind(f"{what}: {type(exc).__name__}: {_first_line(exc)}")
    return None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The head of a driver's message (some append pages of debug dumps)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[:limit] + "..."
