"""The meta store's records: :class:`Session`, :class:`EntrySpec`, :class:`Entry`, a page of
sessions, and the errors that only meta raises. All immutable, and built from a database row in
one step: sessions and entries are named tuples (pages build thousands)."""

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


class _SpecFields(NamedTuple):
    token_offset: int
    token_length: int
    connector: str
    key: str
    size: int
    checksum: str
    prefix_hash: str


class EntrySpec(_SpecFields):
    """What a caller appends: one stored span of a session.

    ``connector`` is the URI of the store holding the bytes, without credentials (a URI
    with a password is refused: meta must never hold secrets). ``prefix_hash`` is the
    chained hash of the token ids ``[0, token_offset + token_length)``; ``checksum`` is the
    payload's checksum. The store checks shapes, not meanings. A named tuple, as
    :class:`Session` is; change one with ``spec._replace(...)``.
    """

    __slots__ = ()

    @property
    def token_end(self) -> int:
        return self.token_offset + self.token_length

    def spec_values(self) -> tuple[Any, ...]:
        """The :class:`EntrySpec` fields' values, in order (an :class:`Entry`'s too)."""
        return tuple(self)


SPEC_FIELDS: tuple[str, ...] = _SpecFields._fields


class _EntryFields(NamedTuple):
    # EntrySpec's fields, in its order (checked below: a named tuple cannot extend another's fields)
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


class Entry(_EntryFields):
    """A stored entry: the :class:`EntrySpec` fields, then its session, sequence number and
    creation time, in that order (a database row of an entry builds one: ``Entry(*row)``).

    A named tuple (a list of 100 entries builds in a tenth of what frozen dataclasses took:
    the scheduler's lookup of a long session builds hundreds); change one with
    ``entry._replace(...)``. :attr:`token_end` and :meth:`spec_values` are the spec's."""

    __slots__ = ()

    @classmethod
    def of(cls, spec: EntrySpec, session_id: str, seq: int, created: float) -> Entry:
        """``spec`` stored as the ``seq``-th entry of ``session_id`` at time ``created``."""
        return cls(*spec, session_id, seq, created)

    @property
    def token_end(self) -> int:
        return self.token_offset + self.token_length

    def spec_values(self) -> tuple[Any, ...]:
        """The :class:`EntrySpec` fields' values, in order."""
        return self[:_SPEC_LENGTH]


_SPEC_LENGTH = len(SPEC_FIELDS)
if _EntryFields._fields[:_SPEC_LENGTH] != SPEC_FIELDS:  # pragma: no cover - a field added to one and not the other
    raise TypeError("Entry's first fields must be EntrySpec's, in order")


@dataclasses.dataclass(frozen=True)
class SessionPage:
    """One page of :meth:`MetaStore.list_sessions`; ``cursor`` is None on the last page."""

    sessions: list[Session]
    cursor: str | None


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
