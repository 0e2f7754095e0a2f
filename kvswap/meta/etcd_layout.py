"""Where the etcd meta store keeps things, and how it reaches the members.

Keys under the store's prefix (``etcd://host:2379/{prefix}``):

* ``s/{id}``: the session (a JSON array: its fields, then its entry count);
* ``e/{id}\\x00{seq:010d}``: one entry each (:func:`kvswap.meta.codec.entry_value`); ids
  cannot contain NUL, so one session's range never reaches another's;
* ``l/{id}``: the lease holder (:class:`Holder`), attached to an etcd lease so the server
  deletes it when the lease expires (etcd grants whole seconds, at least 2);
* ``x/{deadline ms:015d}\\x00{id}``: the expiry index, one key per session with a ttl, in
  deadline order; ``x-ready`` marks a store whose every such session is indexed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from typing import Any

from kvswap.errors import ConfigError
from kvswap.meta.records import LeaseError, Session


@dataclasses.dataclass(frozen=True)
class Keys:
    """The key layout under one prefix (``root`` ends with ``/``)."""

    root: bytes

    def _under(self, kind: bytes, session_id: str) -> bytes:
        return self.root + kind + b"/" + session_id.encode("utf-8")

    def session(self, session_id: str) -> bytes:
        return self._under(b"s", session_id)

    def lease(self, session_id: str) -> bytes:
        return self._under(b"l", session_id)

    def entries(self, session_id: str) -> bytes:
        """The prefix of every entry key of the session."""
        return self._under(b"e", session_id) + b"\x00"

    def entry(self, session_id: str, seq: int) -> bytes:
        return self.entries(session_id) + b"%010d" % seq

    def deadline(self, session: Session | None) -> bytes | None:
        """The session's key in the expiry index (None: it never expires)."""
        if session is None or session.ttl is None:
            return None
        due = math.floor((session.last_access + session.ttl) * 1000)
        return self.index + b"%015d\x00" % due + session.id.encode("utf-8")

    @property
    def sessions(self) -> bytes:
        return self.root + b"s/"

    @property
    def leases(self) -> bytes:
        return self.root + b"l/"

    @property
    def index(self) -> bytes:
        return self.root + b"x/"

    @property
    def marker(self) -> bytes:
        return self.root + b"x-ready"


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range_end idiom)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclasses.dataclass(frozen=True)
class Holder:
    """The lease key as stored: who holds it, until when (client clock), which etcd lease."""

    owner: str | None = None
    expires: float | None = None
    lease: int = 0
    revision: int = 0  # mod_revision of the lease key (0: absent)

    @classmethod
    def parse(cls, kv: Any | None) -> Holder:
        if kv is None:
            return cls()
        fields = json.loads(kv.value)
        return cls(fields["owner"], fields["expires"], fields["lease"], kv.mod_revision)

    def active(self, now: float) -> bool:
        return self.owner is not None and self.expires is not None and self.expires > now

    def error(self, message: str) -> LeaseError:
        return LeaseError(message, self.owner, self.expires)


def grpc_target(host: str, port: int, endpoints: str | None) -> str:
    """The gRPC target for the URI's member and ``endpoints`` (``host:port,...``): one address,
    or an ``ipv4:`` list of all of them (names resolved now) that the channel fails over within."""
    if not endpoints:
        return f"{host}:{port}"
    members = [(host, port)]
    for member in endpoints.split(","):
        name, _, number = member.strip().rpartition(":")
        if not name or not number.isdigit():
            raise ConfigError(f"etcd endpoints are host:port, not {member!r}")
        members.append((name, int(number)))
    addresses = []
    for member_host, member_port in members:
        try:
            found = socket.getaddrinfo(member_host, member_port, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"etcd member {member_host}:{member_port} does not resolve: {exc}") from None
        addresses.append(f"{found[0][4][0]}:{member_port}")
    return "ipv4:" + ",".join(dict.fromkeys(addresses))
