"""The meta-store contract: what of a session is stored, where, and is it still valid.

A :class:`MetaStore` holds :class:`Session` records and, per session, the ordered
:class:`Entry` list of its stored spans. Every backend (``memkv://``, ``sqlite://``,
``postgresql://``, ``mysql://``, ``etcd://``, ``redis://``/``valkey://``) gives the same
guarantees, checked by one conformance suite (:mod:`kvswap.testing.meta_suite`):

* **Versions.** A session is created at version 1; every change to it (update, append,
  truncate) bumps the version by exactly one, atomically with the change. Writes that can
  race take ``expected_version`` and are compare-and-swaps: if the stored version differs,
  nothing changes and :class:`VersionConflictError` is raised with ``.current`` set. Lease
  calls are the one exception: they never bump the version, so an owner renewing its lease
  does not break its own pending compare-and-swaps.
* **Contiguity.** A session's entries cover tokens ``[0, total_tokens)`` with no gap and no
  overlap, in sequence order (``seq`` 0, 1, 2, ...). An append must start exactly at
  ``total_tokens``; anything else is an :class:`InvalidEntryError` and changes nothing.
* **Data before metadata.** The store records where bytes are; callers write the bytes
  first and append the entry second, and delete the bytes only after the entry is gone
  (``truncate`` and ``delete`` return the removed entries for that purpose).
* **Leases.** At most one owner holds a session's lease at a time. A lease expires
  ``ttl`` seconds after it was acquired or last renewed; after that anyone may acquire it.
  Backends with server-side expiry use it (etcd leases, Redis key expiry, which round to
  what the server grants: etcd grants whole seconds, at least 2); SQL and memkv compare
  the clocks of the instances, which must agree to well within a lease's ttl.
* **Times** are seconds since the epoch (floats). ``last_access`` is set on create and on
  every change; ``ttl`` (optional) makes a session *expired* once ``last_access + ttl``
  has passed (:meth:`MetaStore.expired`).
* **Session ids** are 1 to 255 characters, at most 1024 bytes in UTF-8, with no control
  characters (U+0000-U+001F, U+007F-U+009F) and no lone surrogates. Quotes, slashes,
  spaces and any other Unicode round-trip exactly; anything else is an
  :class:`InvalidKeyError`. Sessions list in the byte order of their UTF-8 ids.
* **Errors** are kvswap's kinds: :class:`NotFoundError` (no such session),
  :class:`AlreadyExistsError`, :class:`VersionConflictError`, :class:`LeaseError`,
  :class:`BackendUnavailableError` (unreachable, or no answer within the store's timeout),
  :class:`ConfigError` (bad URI, or a schema that is not kvswap's).

Stores are safe to share between threads; SQLite, PostgreSQL, MySQL, etcd and Redis
stores are safe to share between processes and machines (memkv is one process's memory).
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import functools
import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

try:  # a core dependency; the standard library stands in where no wheel exists (e.g. a GPU host)
    from orjson import dumps as _json_bytes
    from orjson import loads as json_loads
except ImportError:  # pragma: no cover - exercised only where orjson is missing
    json_loads = json.loads  # type: ignore[assignment]

    def _json_bytes(value: Any) -> bytes:  # type: ignore[misc]
        return json.dumps(value, separators=(",", ":")).encode()

from kvswap.errors import (
    BusyError,
    ConfigError,
    InvalidInputError,
    InvalidKeyError,
    NotFoundError,
    VersionConflictError,
)
from kvswap.uri import URI, Option

MAX_ID_CHARS = 255
MAX_ID_BYTES = 1024
MAX_PAGE = 1000


class InvalidEntryError(InvalidInputError):
    """An entry that would leave a gap or an overlap, or whose fields are not valid."""


class LeaseError(BusyError):
    """The lease is held by another owner (or, on renew, no longer held by the caller).

    ``owner`` and ``expires`` describe the holder found, when there is one.
    """

    def __init__(self, message: str, owner: str | None = None, expires: float | None = None) -> None:
        super().__init__(message)
        self.owner = owner
        self.expires = expires


class _SessionFields(NamedTuple):
    id: str
    fingerprint: str
    version: int
    total_tokens: int
    created: float
    last_access: float
    ttl: float | None = None
    owner: str | None = None
    lease_expires: float | None = None
    attrs_json: str = "{}"


class Session(_SessionFields):
    """One session's record. ``owner``/``lease_expires`` describe a lease that was active
    when the record was read (both None when nobody held it).

    Records are named tuples: immutable, and built from a database row in one step (a page
    of 1000 sessions builds 1000 of them; a frozen dataclass costs 7x more each). Change one
    with ``session._replace(...)``. Attributes are kept as their canonical JSON
    (``attrs_json``, what every backend stores); ``attrs`` decodes a fresh dict."""

    __slots__ = ()

    @property
    def attrs(self) -> dict[str, Any]:
        return {} if self.attrs_json == "{}" else json.loads(self.attrs_json)

    def is_expired(self, now: float) -> bool:
        return self.ttl is not None and self.last_access + self.ttl <= now


class EntrySpec(NamedTuple):
    """What a caller appends: one stored span of a session.

    ``connector`` is the URI of the store holding the bytes, without credentials (a URI
    with a password is refused: meta must never hold secrets). ``prefix_hash`` is the
    chained hash of the token ids ``[0, token_offset + token_length)``; ``checksum`` is the
    payload's checksum. The store checks shapes, not meanings. A named tuple, like
    :class:`Session` and :class:`Entry`.
    """

    token_offset: int
    token_length: int
    connector: str
    key: str
    size: int
    checksum: str
    prefix_hash: str


class Entry(NamedTuple):
    """A stored entry: the :class:`EntrySpec` fields, then its session, sequence number and
    creation time (a named tuple, like :class:`Session`; anything reading an EntrySpec's
    fields by name reads an Entry too)."""

    token_offset: int
    token_length: int
    connector: str
    key: str
    size: int
    checksum: str
    prefix_hash: str
    session_id: str = ""
    seq: int = 0
    created: float = 0.0

    @property
    def token_end(self) -> int:
        return self.token_offset + self.token_length


@dataclasses.dataclass(frozen=True)
class SessionPage:
    """One page of :meth:`MetaStore.list_sessions`; ``cursor`` is None on the last page."""

    sessions: list[Session]
    cursor: str | None


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


# ---- validation and the shared rules every backend applies --------------------------------


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, exactly


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it follows the id rule (module docstring), else raise."""
    if not isinstance(session_id, str):
        raise InvalidKeyError(f"a session id must be a string, not {type(session_id).__name__}")
    if not session_id:
        raise InvalidKeyError("a session id must not be empty")
    if len(session_id) > MAX_ID_CHARS:
        raise InvalidKeyError(f"a session id has at most {MAX_ID_CHARS} characters, got {len(session_id)}")
    try:
        encoded = session_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError("a session id must not contain lone surrogates") from None
    if len(encoded) > MAX_ID_BYTES:
        raise InvalidKeyError(f"a session id has at most {MAX_ID_BYTES} bytes in UTF-8, got {len(encoded)}")
    if _CONTROL.search(session_id):
        raise InvalidKeyError(f"a session id must not contain control characters: {session_id[:40]!r}")
    return session_id


def _text_field(name: str, value: object, limit: int = 4096, *, optional: bool = False) -> None:
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
    for name in ("connector", "key", "checksum", "prefix_hash"):
        _text_field(name, getattr(spec, name))
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


class MetaStore(abc.ABC):
    """Sessions and their stored spans (see the module docstring for the guarantees).

    Backends are opened by URI with :func:`kvswap.meta.open_meta_store`; each declares its
    query options in ``OPTIONS``.
    """

    OPTIONS: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, uri: URI, *, clock: Callable[[], float] = time.time, **options: Any) -> None:
        self.uri = uri
        self.options = uri.options(self.OPTIONS, options)
        self._clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri.render()!r})"

    def __enter__(self) -> MetaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        return self._clock()

    # ---- sessions -------------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, session_id: str) -> Session:
        """The session as stored now. NotFoundError if there is none."""

    @abc.abstractmethod
    def create(self, session_id: str, fingerprint: str, *, ttl: float | None = None,
               attrs: Mapping[str, Any] | None = None) -> Session:
        """Create a session at version 1 with no entries. AlreadyExistsError if the id is taken
        (whatever its fingerprint); of racing creators exactly one succeeds."""

    @abc.abstractmethod
    def update(self, session_id: str, expected_version: int, *, fingerprint: str = UNSET,
               ttl: float | None = UNSET, attrs: Mapping[str, Any] = UNSET) -> Session:
        """Compare-and-swap: change the given fields (``ttl=None`` clears the TTL), set
        ``last_access`` to now and bump the version. With no field given it only touches the
        session. VersionConflictError (with ``current``) if the version moved on."""

    @abc.abstractmethod
    def append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        """Compare-and-swap: add one entry at ``total_tokens`` and bump the version, atomically.

        Returns the new session and the stored entry (with its ``seq``). Raises
        VersionConflictError if the version moved on, InvalidEntryError if the entry does not
        start at ``total_tokens`` or is malformed; in both cases nothing changes."""

    @abc.abstractmethod
    def entries(self, session_id: str) -> list[Entry]:
        """The session's entries in token order. NotFoundError if the session does not exist."""

    @abc.abstractmethod
    def truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        """Compare-and-swap: remove every entry that ends after ``token_offset`` (an entry is
        kept whole or removed whole), bump the version, and return the new session and the
        removed entries (whose blobs the caller may now delete). ``total_tokens`` becomes the
        end of the last kept entry, which may be below ``token_offset``."""

    @abc.abstractmethod
    def delete(self, session_id: str, expected_version: int | None = None) -> list[Entry]:
        """Delete the session, its entries and its lease; return the entries. With
        ``expected_version``, a compare-and-swap. NotFoundError if there is none."""

    @abc.abstractmethod
    def list_sessions(self, *, owner: str | None = None, idle_since: float | None = None,
                      fingerprint: str | None = None, limit: int = 100, cursor: str | None = None) -> SessionPage:
        """Sessions in UTF-8 byte order of their ids, at most ``limit`` (1..1000) per page,
        filtered by lease owner, ``last_access <= idle_since`` and fingerprint. Pass the
        returned cursor to get the next page; sessions created or deleted meanwhile may or
        may not appear, but no session present throughout is skipped or repeated."""

    @abc.abstractmethod
    def expired(self, limit: int = 1000) -> list[Session]:
        """Up to ``limit`` sessions whose TTL has passed (for garbage collection)."""

    # ---- leases ---------------------------------------------------------------------------

    @abc.abstractmethod
    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        """Take the session's lease for ``ttl`` seconds if nobody holds it, it expired, or
        ``owner`` already holds it (then it is renewed). LeaseError if another owner holds
        it; of racing owners exactly one wins. Does not bump the version."""

    @abc.abstractmethod
    def renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        """Extend ``owner``'s lease to ``ttl`` seconds from now. LeaseError if ``owner`` does
        not hold an unexpired lease (it expired, or another owner took it)."""

    @abc.abstractmethod
    def release_lease(self, session_id: str, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it; True if it did. Another owner's lease is
        never touched."""

    def close(self) -> None:  # noqa: B027 - optional for in-memory stores
        """Release connections. The store must not be used afterwards."""

    # ---- helpers for backends -------------------------------------------------------------

    def _new_session(self, session_id: str, fingerprint: str, ttl: float | None,
                     attrs: Mapping[str, Any] | None) -> Session:
        validate_session_id(session_id)
        _text_field("fingerprint", fingerprint, 1024)
        now = self.now()
        return Session(session_id, fingerprint, 1, 0, now, now, validate_ttl(ttl), attrs_json=encode_attrs(attrs))

    def _updated(self, session: Session, expected_version: int, fingerprint: str, ttl: float | None,
                 attrs: Mapping[str, Any]) -> Session:
        """The session after :meth:`update` (checks the version and every field)."""
        check_version(session, expected_version)
        changes: dict[str, Any] = {"version": session.version + 1, "last_access": self.now()}
        if fingerprint is not UNSET:
            _text_field("fingerprint", fingerprint, 1024)
            changes["fingerprint"] = fingerprint
        if ttl is not UNSET:
            changes["ttl"] = validate_ttl(ttl)
        if attrs is not UNSET:
            changes["attrs_json"] = encode_attrs(attrs)
        return session._replace(**changes)

    def _appended(self, session: Session, expected_version: int, spec: EntrySpec, seq: int) -> tuple[Session, Entry]:
        validate_spec(spec)
        check_append(session, expected_version, spec)
        now = self.now()
        entry = Entry(*spec[:7], session.id, seq, now)
        # Built directly: _replace costs more than the rest of an in-memory append.
        return Session(session.id, session.fingerprint, session.version + 1, entry.token_end, session.created, now,
                       session.ttl, session.owner, session.lease_expires, session.attrs_json), entry

    def _truncated(self, session: Session, expected_version: int, token_offset: int,
                   entries: Sequence[Entry]) -> tuple[Session, list[Entry], list[Entry]]:
        """(new session, kept entries, removed entries) for :meth:`truncate`."""
        check_version(session, expected_version)
        if isinstance(token_offset, bool) or not isinstance(token_offset, int) or token_offset < 0:
            raise InvalidEntryError(f"token_offset must be a non-negative integer, got {token_offset!r}")
        kept: list[Entry] = []
        for entry in entries:  # the leading run of sound, contiguous entries ending by token_offset
            offset, length = entry.token_offset, entry.token_length
            if (type(offset) is not int or type(length) is not int or length <= 0
                    or offset != (kept[-1].token_end if kept else 0) or offset + length > token_offset):
                break
            kept.append(entry)
        removed = list(entries[len(kept):])
        total = kept[-1].token_end if kept else 0
        return (session._replace(version=session.version + 1, last_access=self.now(), total_tokens=total),
                kept, removed)

    def _lease_ttl(self, owner: str, ttl: float) -> float:
        validate_owner(owner)
        if validate_ttl(ttl) is None:
            raise ConfigError("a lease needs a ttl")
        return float(ttl)


def entry_value(entry: Entry) -> bytes:
    """An entry as etcd and Redis store it: a JSON array of its EntrySpec fields and its
    creation time (the session id and seq are the key's, or the list position's)."""
    return _json_bytes([*entry[:7], entry.created])


def entries_from_values(session_id: str, values: Sequence[bytes], first_seq: int = 0) -> list[Entry]:
    """The entries stored as ``values`` (:func:`entry_value`), ``seq`` counted from
    ``first_seq``, with one JSON parse for all of them (orjson: 3x the standard library's)."""
    if not values:
        return []
    rows = json_loads(b"[" + b",".join(values) + b"]")
    for seq, row in enumerate(rows, first_seq):
        row[7:7] = (session_id, seq)  # Entry's field order
    return list(map(Entry._make, rows))
