"""The rules every meta backend applies the same way: what a session id, an entry, a TTL and
an owner may be; version and contiguity checks; cursors, limits and filtered pages."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from kvswap.errors import ConfigError, InvalidKeyError, NotFoundError, VersionConflictError
from kvswap.meta.records import EntrySpec, InvalidEntryError, Session, SessionPage
from kvswap.uri import URI

MAX_ID_CHARS = 255
MAX_ID_BYTES = 1024
MAX_PAGE = 1000
MAX_HASH_CHARS = 255  # an entry's checksum and prefix hash


# ---- validation and the shared rules every backend applies --------------------------------


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, exactly


class SessionId(str):
    """A session id that follows the id rule (module docstring; InvalidKeyError if not): checked
    once where it enters kvswap (a route, the vLLM connector's lookup, a public meta method),
    then passed on as this type, which every later check takes as checked (one type test, not
    the rule again)."""

    __slots__ = ()

    def __new__(cls, session_id: object) -> SessionId:
        if type(session_id) is cls:
            return session_id
        _check_session_id(session_id)
        return super().__new__(cls, session_id)


def validate_session_id(session_id: object) -> SessionId:
    """``session_id`` as a :class:`SessionId` (InvalidKeyError if it breaks the id rule).

    A plain ``str`` seen recently is answered from a cache (a session's every turn and meta
    call brings its id again: the rule and the copy cost about a microsecond, a cache hit a
    tenth of that); an id that breaks the rule is never cached."""
    if type(session_id) is str:
        return _checked_id(session_id)
    return SessionId(session_id)


@functools.lru_cache(maxsize=16384)
def _checked_id(session_id: str) -> SessionId:
    return SessionId(session_id)


def _check_session_id(session_id: object) -> None:
    if not isinstance(session_id, str):
        raise InvalidKeyError(f"a session id must be a string, not {type(session_id).__name__}")
    if not session_id:
        raise InvalidKeyError("a session id must not be empty")
    if len(session_id) > MAX_ID_CHARS:
        raise InvalidKeyError(f"a session id has at most {MAX_ID_CHARS} characters, got {len(session_id)}")
    if session_id.isascii() and session_id.isprintable():  # the usual id: no control character, 1 byte a char
        return
    try:
        encoded = session_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError("a session id must not contain lone surrogates") from None
    if len(encoded) > MAX_ID_BYTES:
        raise InvalidKeyError(f"a session id has at most {MAX_ID_BYTES} bytes in UTF-8, got {len(encoded)}")
    if _CONTROL.search(session_id):
        raise InvalidKeyError(f"a session id must not contain control characters: {session_id[:40]!r}")


def text_field(name: str, value: object, limit: int = 4096, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        raise InvalidEntryError(f"{name} must be a non-empty string of at most {limit} characters without NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEntryError(f"{name} must not contain lone surrogates") from None


def validate_spec(spec: EntrySpec) -> None:
    for name in ("token_offset", "token_length", "size"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 2**62:
            raise InvalidEntryError(f"{name} must be a non-negative integer, got {value!r}")
    if spec.token_length == 0:
        raise InvalidEntryError("an entry must cover at least one token")
    for name in ("connector", "key"):
        text_field(name, getattr(spec, name))
    for name in ("checksum", "prefix_hash"):  # what every backend holds (SQL columns of 255)
        text_field(name, getattr(spec, name), MAX_HASH_CHARS)
    _check_connector(spec.connector)


@functools.lru_cache(maxsize=256)
def _check_connector(text: str) -> None:
    """A connector URI fit for meta: parseable and without credentials (cached: few distinct)."""
    try:
        connector = URI.parse(text)
    except ConfigError as exc:
        raise InvalidEntryError(f"entry connector is not a URI: {exc}") from None
    if connector.password is not None:
        raise InvalidEntryError(f"entry connector URIs must not carry credentials: {connector}")


def validate_ttl(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0 or not math.isfinite(ttl):
        raise ConfigError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
    return float(ttl)


def validate_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > 255 or any(
            unicodedata.category(c) == "Cc" for c in owner):
        raise InvalidKeyError("a lease owner must be 1 to 255 characters without control characters")
    return owner


def encode_attrs(attrs: Mapping[str, Any] | None) -> str:
    """Attributes as canonical JSON (what every backend stores)."""
    try:
        return json.dumps(dict(attrs or {}), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidEntryError(f"session attrs must be JSON-serialisable: {exc}") from None


def check_expected_version(expected_version: object) -> int:
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise ConfigError(f"expected_version must be an int, got {expected_version!r}")
    return expected_version


def check_version(session: Session, expected_version: int) -> None:
    check_expected_version(expected_version)
    if session.version != expected_version:
        raise VersionConflictError(
            f"session {session.id!r} is at version {session.version}, not {expected_version}",
            current=session.version)


def check_append(session: Session, expected_version: int, spec: EntrySpec) -> None:
    """The rule every backend applies before an append (version first, then contiguity)."""
    check_version(session, expected_version)
    if spec.token_offset != session.total_tokens:
        raise InvalidEntryError(
            f"session {session.id!r} holds tokens [0, {session.total_tokens}); an entry must start at "
            f"{session.total_tokens}, not {spec.token_offset} (no gaps, no overlaps)")


def not_found(session_id: str) -> NotFoundError:
    return NotFoundError(f"session {session_id!r} not found")


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode("utf-8")).decode("ascii")


def decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        return validate_session_id(base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8"))
    except (ValueError, UnicodeError, InvalidKeyError):
        raise ConfigError(f"not a session cursor: {cursor[:60]!r}") from None


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ConfigError(f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
    return limit


@dataclasses.dataclass(frozen=True)
class SessionFilter:
    """The filters of :meth:`MetaStore.list_sessions`; ``matches`` is the one definition."""

    owner: str | None = None
    idle_since: float | None = None
    fingerprint: str | None = None

    def any(self) -> bool:
        """Whether any filter is set."""
        return self.owner is not None or self.idle_since is not None or self.fingerprint is not None

    def matches(self, session: Session) -> bool:
        return ((self.owner is None or session.owner == self.owner)
                and (self.idle_since is None or session.last_access <= self.idle_since)
                and (self.fingerprint is None or session.fingerprint == self.fingerprint))


def collect_page(batches: Iterable[tuple[list[Session], bool]], wanted: SessionFilter, limit: int) -> SessionPage:
    """A page of :meth:`MetaStore.list_sessions` from ``batches`` of sessions in id order
    (each with whether more follow): the first ``limit`` that match ``wanted``."""
    page: list[Session] = []
    for batch, more in batches:
        if not wanted.any() and len(batch) <= limit - len(page):  # no call per session
            page += batch
            if len(page) == limit:
                return SessionPage(page, encode_cursor(page[-1].id) if more else None)
            continue
        for position, session in enumerate(batch):
            if wanted.matches(session):
                page.append(session)
                if len(page) == limit:
                    rest = more or position + 1 < len(batch)
                    return SessionPage(page, encode_cursor(session.id) if rest else None)
    return SessionPage(page, None)
