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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from kvswap.errors import ConfigError
from kvswap.meta.records import UNSET, Entry, EntrySpec, InvalidEntryError, Session, SessionPage
from kvswap.meta.rules import (
    SessionFilter,
    check_append,
    check_expected_version,
    check_limit,
    check_version,
    decode_cursor,
    encode_attrs,
    text_field,
    validate_owner,
    validate_session_id,
    validate_spec,
    validate_ttl,
)
from kvswap.uri import URI, Option


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
    # Public methods check their arguments (the rules of :mod:`kvswap.meta.rules`, once, for
    # every backend) and call the backend's ``_`` hook, which may take them as valid.

    def get(self, session_id: str) -> Session:
        """The session as stored now. NotFoundError if there is none."""
        return self._get(validate_session_id(session_id))

    def create(self, session_id: str, fingerprint: str, *, ttl: float | None = None,
               attrs: Mapping[str, Any] | None = None) -> Session:
        """Create a session at version 1 with no entries. AlreadyExistsError if the id is taken
        (whatever its fingerprint); of racing creators exactly one succeeds."""
        return self._create(self._new_session(session_id, fingerprint, ttl, attrs))

    def update(self, session_id: str, expected_version: int, *, fingerprint: str = UNSET,
               ttl: float | None = UNSET, attrs: Mapping[str, Any] = UNSET) -> Session:
        """Compare-and-swap: change the given fields (``ttl=None`` clears the TTL), set
        ``last_access`` to now and bump the version. With no field given it only touches the
        session. VersionConflictError (with ``current``) if the version moved on."""
        session_id = validate_session_id(session_id)
        check_expected_version(expected_version)
        return self._update(session_id, expected_version, fingerprint, ttl, attrs)

    def append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        """Compare-and-swap: add one entry at ``total_tokens`` and bump the version, atomically.

        Returns the new session and the stored entry (with its ``seq``). Raises
        VersionConflictError if the version moved on, InvalidEntryError if the entry does not
        start at ``total_tokens`` or is malformed; in both cases nothing changes."""
        session_id = validate_session_id(session_id)
        check_expected_version(expected_version)
        validate_spec(spec)
        return self._append(session_id, expected_version, spec)

    def entries(self, session_id: str) -> list[Entry]:
        """The session's entries in token order. NotFoundError if the session does not exist."""
        return self._entries(validate_session_id(session_id))

    def read(self, session_id: str) -> tuple[Session, list[Entry]]:
        """The session and its entries as one consistent snapshot, in one round trip where the
        backend allows (the lookup of every request reads this). NotFoundError if there is none."""
        return self._read(validate_session_id(session_id))

    def truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        """Compare-and-swap: remove every entry that ends after ``token_offset`` (an entry is
        kept whole or removed whole), bump the version, and return the new session and the
        removed entries (whose blobs the caller may now delete). ``total_tokens`` becomes the
        end of the last kept entry, which may be below ``token_offset``."""
        session_id = validate_session_id(session_id)
        check_expected_version(expected_version)
        if isinstance(token_offset, bool) or not isinstance(token_offset, int) or token_offset < 0:
            raise InvalidEntryError(f"token_offset must be a non-negative integer, got {token_offset!r}")
        return self._truncate(session_id, expected_version, token_offset)

    def delete(self, session_id: str, expected_version: int | None = None) -> list[Entry]:
        """Delete the session, its entries and its lease; return the entries. With
        ``expected_version``, a compare-and-swap. NotFoundError if there is none."""
        session_id = validate_session_id(session_id)
        if expected_version is not None:
            check_expected_version(expected_version)
        return self._delete(session_id, expected_version)

    def list_sessions(self, *, owner: str | None = None, idle_since: float | None = None,
                      fingerprint: str | None = None, limit: int = 100, cursor: str | None = None) -> SessionPage:
        """Sessions in UTF-8 byte order of their ids, at most ``limit`` (1..1000) per page,
        filtered by lease owner, ``last_access <= idle_since`` and fingerprint. Pass the
        returned cursor to get the next page; sessions created or deleted meanwhile may or
        may not appear, but no session present throughout is skipped or repeated."""
        check_limit(limit)
        return self._list_sessions(decode_cursor(cursor), SessionFilter(owner, idle_since, fingerprint), limit)

    def expired(self, limit: int = 1000) -> list[Session]:
        """Up to ``limit`` sessions whose TTL has passed (for garbage collection)."""
        return self._expired(limit)

    # ---- leases ---------------------------------------------------------------------------

    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        """Take the session's lease for ``ttl`` seconds if nobody holds it, it expired, or
        ``owner`` already holds it (then it is renewed). LeaseError if another owner holds
        it; of racing owners exactly one wins. Does not bump the version."""
        ttl = self._lease_ttl(owner, ttl)
        return self._acquire_lease(validate_session_id(session_id), owner, ttl)

    def renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        """Extend ``owner``'s lease to ``ttl`` seconds from now. LeaseError if ``owner`` does
        not hold an unexpired lease (it expired, or another owner took it)."""
        ttl = self._lease_ttl(owner, ttl)
        return self._renew_lease(validate_session_id(session_id), owner, ttl)

    def release_lease(self, session_id: str, owner: str) -> bool:
        """Give the lease up if ``owner`` holds it; True if it did. Another owner's lease is
        never touched."""
        return self._release_lease(validate_session_id(session_id), owner)

    # ---- what a backend implements (arguments already checked) ----------------------------

    @abc.abstractmethod
    def _get(self, session_id: str) -> Session: ...

    @abc.abstractmethod
    def _create(self, session: Session) -> Session:
        """Store ``session`` (built and checked by :meth:`create`) unless its id is taken."""

    @abc.abstractmethod
    def _update(self, session_id: str, expected_version: int, fingerprint: str, ttl: float | None,
                attrs: Mapping[str, Any]) -> Session:
        """The stored session through :meth:`_updated` (fields may be UNSET), written if its
        version is still ``expected_version``."""

    @abc.abstractmethod
    def _append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]: ...

    @abc.abstractmethod
    def _entries(self, session_id: str) -> list[Entry]: ...

    def _read(self, session_id: str) -> tuple[Session, list[Entry]]:
        """Two round trips unless the backend reads both at once."""
        return self._get(session_id), self._entries(session_id)

    @abc.abstractmethod
    def _truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]: ...

    @abc.abstractmethod
    def _delete(self, session_id: str, expected_version: int | None) -> list[Entry]: ...

    @abc.abstractmethod
    def _list_sessions(self, after: str | None, wanted: SessionFilter, limit: int) -> SessionPage:
        """A page of sessions with ids after ``after`` (None: from the first) matching ``wanted``."""

    @abc.abstractmethod
    def _expired(self, limit: int) -> list[Session]: ...

    @abc.abstractmethod
    def _acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session: ...

    @abc.abstractmethod
    def _renew_lease(self, session_id: str, owner: str, ttl: float) -> Session: ...

    @abc.abstractmethod
    def _release_lease(self, session_id: str, owner: str) -> bool: ...

    def close(self) -> None:  # noqa: B027 - optional for in-memory stores
        """Release connections. The store must not be used afterwards."""

    # ---- helpers for backends -------------------------------------------------------------

    def _new_session(self, session_id: str, fingerprint: str, ttl: float | None,
                     attrs: Mapping[str, Any] | None) -> Session:
        session_id = validate_session_id(session_id)
        text_field("fingerprint", fingerprint, 1024)
        now = self.now()
        return Session(session_id, fingerprint, 1, 0, now, now, validate_ttl(ttl), attrs_json=encode_attrs(attrs))

    def _updated(self, session: Session, expected_version: int, fingerprint: str, ttl: float | None,
                 attrs: Mapping[str, Any]) -> Session:
        """The session after :meth:`update` (checks the version and every field)."""
        check_version(session, expected_version)
        changes: dict[str, Any] = {"version": session.version + 1, "last_access": self.now()}
        if fingerprint is not UNSET:
            text_field("fingerprint", fingerprint, 1024)
            changes["fingerprint"] = fingerprint
        if ttl is not UNSET:
            changes["ttl"] = validate_ttl(ttl)
        if attrs is not UNSET:
            changes["attrs_json"] = encode_attrs(attrs)
        return session._replace(**changes)

    def _appended(self, session: Session, expected_version: int, spec: EntrySpec, seq: int) -> tuple[Session, Entry]:
        check_append(session, expected_version, spec)
        now = self.now()
        entry = Entry.of(spec, session.id, seq, now)
        # Built directly: _replace costs more than the rest of an in-memory append.
        return Session(session.id, session.fingerprint, session.version + 1, entry.token_end, session.created, now,
                       session.ttl, session.owner, session.lease_expires, session.attrs_json), entry

    def _truncated(self, session: Session, expected_version: int, token_offset: int,
                   entries: Sequence[Entry]) -> tuple[Session, list[Entry], list[Entry]]:
        """(new session, kept entries, removed entries) for :meth:`truncate`."""
        check_version(session, expected_version)
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
