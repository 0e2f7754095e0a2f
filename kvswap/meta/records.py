"""The meta store's records: :class:`Session`, :class:`EntrySpec`, :class:`Entry`, a page of
sessions, and the errors that only meta raises. Named tuples: immutable, and built from a
database row in one step."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

from kvswap.errors import BusyError, InvalidInputError


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
