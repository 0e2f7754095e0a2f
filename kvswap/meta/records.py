"""The meta store's records: :class:`Session`, :class:`EntrySpec`, :class:`Entry`, a page of
sessions, and the errors that only meta raises. All immutable, and built from a database row in
one step: a session is a named tuple (pages build thousands), an entry a slotted dataclass
whose fields extend its spec's (each field written once)."""

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


@dataclasses.dataclass(frozen=True, slots=True)
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

    @property
    def token_end(self) -> int:
        return self.token_offset + self.token_length

    def spec_values(self) -> tuple[Any, ...]:
        """The :class:`EntrySpec` fields' values, in order (an :class:`Entry`'s too)."""
        return tuple(getattr(self, name) for name in SPEC_FIELDS)


SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(EntrySpec))


@dataclasses.dataclass(frozen=True, slots=True)
class Entry(EntrySpec):
    """A stored entry: the :class:`EntrySpec` fields, then its session, sequence number and
    creation time, in that order (a database row of an entry builds one: ``Entry(*row)``)."""

    session_id: str = ""
    seq: int = 0
    created: float = 0.0

    @classmethod
    def of(cls, spec: EntrySpec, session_id: str, seq: int, created: float) -> Entry:
        """``spec`` stored as the ``seq``-th entry of ``session_id`` at time ``created``."""
        return cls(**dict(zip(SPEC_FIELDS, spec.spec_values(), strict=True)), session_id=session_id, seq=seq,
                   created=created)


@dataclasses.dataclass(frozen=True)
class SessionPage:
    """One page of :meth:`MetaStore.list_sessions`; ``cursor`` is None on the last page."""

    sessions: list[Session]
    cursor: str | None


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
