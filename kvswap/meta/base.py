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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from kvswap.errors import (
    ConfigError,
    InvalidKeyError,
    KVSwapError,
    NotFoundError,
    VersionConflictError,
)
from kvswap.uri import URI, Option

MAX_ID_CHARS = 255
MAX_ID_BYTES = 1024
MAX_PAGE = 1000


class InvalidEntryError(KVSwapError, ValueError):
    """An entry that would leave a gap or an overlap, or whose fields are not valid."""


class LeaseError(KVSwapError):
    """The lease is held by another owner (or, on renew, no longer held by the caller).

    ``owner`` and ``expires`` describe the holder found, when there is one.
    """

    def __init__(self, message: str, owner: str | None = None, expires: float | None = None) -> None:
        super().__init__(message)
        self.owner = owner
        self.expires = expires


@dataclasses.dataclass(frozen=True)
class Session:
    """One session's record. ``owner``/``lease_expires`` describe a lease that was active
    when the record was read (both None when nobody held it)."""

    id: str
    fingerprint: str
    version: int
    total_tokens: int
    created: float
    last_access: float
    ttl: float | None = None
    owner: str | None = None
    lease_expires: float | None = None
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def is_expired(self, now: float) -> bool:
        return self.ttl is not None and self.last_access + self.ttl <= now


@dataclasses.dataclass(frozen=True)
class EntrySpec:
    """What a caller appends: one stored span of a session.

    ``connector`` is the URI of the store holding the bytes, without credentials (a URI
    with a password is refused: meta must never hold secrets). ``prefix_hash`` is the
    chained hash of the token ids ``[0, token_offset + token_length)``; ``checksum`` is the
    payload's checksum. The store checks shapes, not meanings.
    """

    token_offset: int
    token_length: int
    connector: str
    key: str
    size: int
    checksum: str
    prefix_hash: str


@dataclasses.dataclass(frozen=True)
class Entry(EntrySpec):
    """A stored entry: the spec plus its session, sequence number and creation time."""

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


def check_version(session: Session, expected_version: int) -> None:
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise ConfigError(f"expected_version must be an int, got {expected_version!r}")
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

    def matches(self, session: Session) -> bool:
        return ((self.owner is None or session.owner == self.owner)
                and (self.idle_since is None or session.last_access <= self.idle_since)
                and (self.fingerprint is None or session.fingerprint == self.fingerprint))


class MetaStore(abc.ABC):
    """Sessions and their stored spans (see the module docstring for the guarantees).

    Backends are opened by URI with :func:`kvswap.meta.open_meta_store`; each declares its
    query options in ``OPTIONS``.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {}

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
        return Session(id=session_id, fingerprint=fingerprint, version=1, total_tokens=0, created=now,
                       last_access=now, ttl=validate_ttl(ttl), attrs=json.loads(encode_attrs(attrs)))

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
            changes["attrs"] = json.loads(encode_attrs(attrs))
        return dataclasses.replace(session, **changes)

    def _appended(self, session: Session, expected_version: int, spec: EntrySpec, seq: int) -> tuple[Session, Entry]:
        validate_spec(spec)
        check_append(session, expected_version, spec)
        now = self.now()
        entry = Entry(spec.token_offset, spec.token_length, spec.connector, spec.key, spec.size, spec.checksum,
                      spec.prefix_hash, session_id=session.id, seq=seq, created=now)
        # Built directly: dataclasses.replace costs more than the rest of an in-memory append.
        return Session(session.id, session.fingerprint, session.version + 1, entry.token_end, session.created, now,
                       session.ttl, session.owner, session.lease_expires, session.attrs), entry

    def _truncated(self, session: Session, expected_version: int, token_offset: int,
                   entries: Sequence[Entry]) -> tuple[Session, list[Entry], list[Entry]]:
        """(new session, kept entries, removed entries) for :meth:`truncate`."""
        check_version(session, expected_version)
        if isinstance(token_offset, bool) or not isinstance(token_offset, int) or token_offset < 0:
            raise InvalidEntryError(f"token_offset must be a non-negative integer, got {token_offset!r}")
        kept = [e for e in entries if e.token_end <= token_offset]
        removed = [e for e in entries if e.token_end > token_offset]
        total = kept[-1].token_end if kept else 0
        return (dataclasses.replace(session, version=session.version + 1, last_access=self.now(),
                                    total_tokens=total), kept, removed)

    def _lease_ttl(self, owner: str, ttl: float) -> float:
        validate_owner(owner)
        if validate_ttl(ttl) is None:
            raise ConfigError("a lease needs a ttl")
        return float(ttl)


ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(Entry))


def entry_fields(entry: Entry) -> dict[str, Any]:
    """An entry's fields as a flat dict (cheaper than dataclasses.asdict)."""
    return {name: getattr(entry, name) for name in ENTRY_FIELDS}


def entry_to_json(entry: Entry) -> str:
    """An entry as canonical JSON (etcd and Redis values)."""
    return json.dumps(entry_fields(entry), sort_keys=True, separators=(",", ":"))


def entry_from_json(text: str | bytes) -> Entry:
    return Entry(**json.loads(text))


def session_from_fields(fields: Mapping[str, Any], now: float | None = None) -> Session:
    """A Session from stored fields (numbers may come back as strings or Decimals). With
    ``now``, a lease that expired by then is left out."""
    ttl = fields.get("ttl")
    lease = fields.get("lease_expires")
    lease = None if lease in (None, "", b"") else float(lease)
    owner = fields.get("owner") or None
    if lease is not None and now is not None and lease <= now:
        owner = lease = None
    attrs = fields.get("attrs") or "{}"
    return Session(
        fields["id"], fields["fingerprint"], int(fields["version"]), int(fields["total_tokens"]),
        float(fields["created"]), float(fields["last_access"]), None if ttl in (None, "", b"") else float(ttl),
        owner, lease,
        {} if attrs == "{}" else json.loads(attrs) if isinstance(attrs, str | bytes) else dict(attrs),
    )
