"""``etcd://host:2379/prefix``: transactions for compare-and-swap, etcd leases for ownership.

Client: etcd's v3 gRPC API through ``grpcio`` with the generated stubs that the maintained
``aetcd`` package ships (``aetcd.rpc``), called synchronously. The ``etcd3`` package does not
import with today's protobuf (notes/SERVICES.md); aetcd's own client is asyncio-only and
lacks range limits, which paging needs; its stubs work with protobuf 7 as installed.

Several members: ``etcd://host:2379/prefix?endpoints=host2:2379,host3:2379``. The gRPC channel
holds every member's address (resolved to IPv4 when the store opens) and uses the first it
can reach; when that member dies, calls in flight fail with BackendUnavailableError and
the next ones go to another member (any member serves reads and forwards writes to the
leader; two of three keep the quorum).

The key layout (sessions, entries, leases, the expiry index): :mod:`kvswap.meta.etcd_layout`.

Every change is one transaction guarded by the session key's ``mod_revision`` as read,
which also moves the session's index key; a store remembers the revision of each session
it last wrote, so an append that follows its own previous write is a single round trip.
Stores written before the index existed (kvswap before CHANGELOG's stop 15) are indexed once, by the
first ``expired`` call that finds no ``x-ready`` key under the prefix.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    KVSwapError,
)
from kvswap.meta import rules
from kvswap.meta.base import MetaStore
from kvswap.meta.codec import entries_from_values, entry_value, json_loads
from kvswap.meta.etcd_layout import Holder, Keys, grpc_target, prefix_end
from kvswap.meta.records import Entry, EntrySpec, Session, SessionPage
from kvswap.uri import URI, Option, parse_seconds

_CACHE_LIMIT = 10_000


class _Read(NamedTuple):
    """A session as read, with what a guarded write needs."""

    session: Session
    revision: int  # mod_revision of the session key
    entry_count: int


class EtcdMetaStore(MetaStore):
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "timeout": Option(parse_seconds, 10.0, "seconds any etcd call may take"),
        "endpoints": Option(str, None, "more members of the etcd cluster: host:port,host:port"),
    }

    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        import grpc
        from aetcd import rpc

        self._grpc, self._rpc = grpc, rpc
        if not uri.host:
            raise ConfigError(f"etcd:// needs a host, like etcd://127.0.0.1:2379/kvswap, not {uri}")
        name = uri.path.strip("/")
        if not name or "\x00" in name:
            raise ConfigError(f"etcd:// needs a key prefix as its path, like etcd://127.0.0.1:2379/kvswap, not {uri}")
        self._keys = Keys(name.encode("utf-8") + b"/")
        self._timeout = self.options["timeout"]
        self._channel = grpc.insecure_channel(grpc_target(uri.host, uri.port or 2379, self.options["endpoints"]))
        self._kv = rpc.KVStub(self._channel)
        self._leases = rpc.LeaseStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._cache: dict[str, _Read] = {}
        self._cache_lock = threading.Lock()
        self._indexed = self._unindexed = False
        if uri.username is not None:
            with self._errors("authenticating"):
                reply = rpc.AuthStub(self._channel).Authenticate(
                    rpc.AuthenticateRequest(name=uri.username, password=uri.password or ""), timeout=self._timeout)
            self._metadata = (("token", reply.token),)

    # ---- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except KVSwapError:
            raise
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            kind: type[KVSwapError] = BackendUnavailableError
            if code in (self._grpc.StatusCode.UNAUTHENTICATED, self._grpc.StatusCode.PERMISSION_DENIED,
                        self._grpc.StatusCode.INVALID_ARGUMENT):
                kind = ConfigError
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise kind(f"{what} on {self.uri}: {code.name if code else 'RpcError'}: {detail}") from exc

    def _index_ops(self, before: Session | None, after: Session | None) -> list[Any]:
        """Moves a session's expiry index key from its state ``before`` a change to ``after``."""
        old, new = self._keys.deadline(before), self._keys.deadline(after)
        if old == new:
            return []
        return ([self._delete_range(old)] if old else []) + ([self._put(new, b"")] if new else [])

    def _call(self, method: Any, request: Any, what: str) -> Any:
        with self._errors(what):
            return method(request, timeout=self._timeout, metadata=self._metadata)

    def _range(self, key: bytes, end: bytes | None = None, limit: int = 0) -> Any:
        return self._rpc.RangeRequest(key=key, range_end=end or b"", limit=limit)

    def _txn(self, what: str, compare: list[Any], success: list[Any], failure: Sequence[Any] = ()) -> Any:
        ops = [self._op(op) for op in success]
        fail_ops = [self._op(op) for op in failure]
        return self._call(self._kv.Txn, self._rpc.TxnRequest(compare=compare, success=ops, failure=fail_ops), what)

    def _op(self, request: Any) -> Any:
        rpc = self._rpc
        if isinstance(request, rpc.RangeRequest):
            return rpc.RequestOp(request_range=request)
        if isinstance(request, rpc.PutRequest):
            return rpc.RequestOp(request_put=request)
        return rpc.RequestOp(request_delete_range=request)

    def _compare(self, key: bytes, target: str, value: int, result: str = "EQUAL") -> Any:
        rpc = self._rpc
        field = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version"}[target]
        return rpc.Compare(key=key, target=getattr(rpc.Compare, target), result=getattr(rpc.Compare, result),
                           **{field: value})

    def _put(self, key: bytes, value: str | bytes, lease: int = 0) -> Any:
        return self._rpc.PutRequest(key=key, value=value.encode() if isinstance(value, str) else value, lease=lease)

    def _delete_range(self, key: bytes, end: bytes | None = None) -> Any:
        return self._rpc.DeleteRangeRequest(key=key, range_end=end or b"")

    # ---- reading --------------------------------------------------------------------------------

    def _decode(self, session_ids: list[str], values: list[bytes],
                lease_kvs: Mapping[str, Any]) -> tuple[list[Session], list[int]]:
        """Sessions and their entry counts from their keys' values (one JSON parse for all),
        with the active leases among ``lease_kvs`` (lease keys by id)."""
        rows = json_loads(b"[" + b",".join(values) + b"]")
        counts = []
        for session_id, row in zip(session_ids, rows):  # -> Session's field order
            counts.append(row.pop())
            row[6:7] = (None, None, row[6])  # owner, lease_expires before attrs_json
            row.insert(0, session_id)
        sessions = list(map(Session._make, rows))
        if lease_kvs:
            position = {session_id: i for i, session_id in enumerate(session_ids)}
            for session_id, lease_kv in lease_kvs.items():
                if session_id in position:
                    i = position[session_id]
                    sessions[i] = self._with_lease(sessions[i], lease_kv)
        return sessions, counts

    def _with_lease(self, session: Session, lease_kv: Any | None) -> Session:
        """``session`` with the owner and expiry of its lease key, if that lease is active."""
        holder = Holder.parse(lease_kv)
        if holder.active(self.now()):
            return session._replace(owner=holder.owner, lease_expires=holder.expires)
        return session._replace(owner=None, lease_expires=None)

    def _snapshot(self, session_id: str, with_entries: bool = False) -> tuple[_Read, list[Entry]]:
        """Session (and entries) in one consistent transaction; NotFoundError if missing."""
        ops = [self._range(self._keys.session(session_id)), self._range(self._keys.lease(session_id))]
        if with_entries:
            prefix = self._keys.entries(session_id)
            ops.append(self._range(prefix, prefix_end(prefix)))
        reply = self._txn(f"reading session {session_id!r}", [], ops)
        ranges = [r.response_range.kvs for r in reply.responses]
        if not ranges[0]:
            self._forget(session_id)
            raise rules.not_found(session_id)
        kv = ranges[0][0]
        sessions, counts = self._decode([session_id], [kv.value], {session_id: ranges[1][0]} if ranges[1] else {})
        read = _Read(sessions[0], kv.mod_revision, counts[0])
        entries = entries_from_values(session_id, [kv.value for kv in ranges[2]]) if with_entries else []
        return read, entries

    def _remember(self, read: _Read) -> None:
        with self._cache_lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[read.session.id] = read

    def _forget(self, session_id: str) -> None:
        with self._cache_lock:
            self._cache.pop(session_id, None)

    def _guarded(self, session_id: str, expected_version: int | None, plan: Any, with_entries: bool = False,
                 use_cache: bool = False) -> tuple[Any, Any]:
        """Read (or reuse a remembered read), ``plan(read, entries) -> (ops, after, extra)``, and
        commit ``ops`` if the session key did not change since; on a lost race read again.

        ``after`` is the session's new state (None when deleted) with its entry count. Returns
        ``(session after, with its current lease; extra)``."""
        lease_key = self._keys.lease(session_id)
        while True:
            with self._cache_lock:
                cached = self._cache.get(session_id) if use_cache else None
            if cached is not None and cached.session.version == expected_version:
                read, entries = cached, list[Entry]()
            else:
                read, entries = self._snapshot(session_id, with_entries)
            if expected_version is not None:
                rules.check_version(read.session, expected_version)
            ops, after, extra = plan(read, entries)
            ops += self._index_ops(read.session, after.session if after else None)
            key = self._keys.session(session_id)
            reply = self._txn(f"writing session {session_id!r}", [self._compare(key, "MOD", read.revision)],
                              [*ops, self._range(lease_key)])
            if not reply.succeeded:
                self._forget(session_id)  # someone else wrote: look again (a version conflict, usually)
                continue
            if after is None:
                self._forget(session_id)
                return None, extra
            self._remember(after._replace(revision=reply.header.revision))
            lease = reply.responses[-1].response_range.kvs
            return self._with_lease(after.session, lease[0] if lease else None), extra

    @staticmethod
    def _session_value(session: Session, entry_count: int) -> str:
        """What ``s/{id}`` holds (its lease is the lease key's)."""
        return json.dumps([session.fingerprint, session.version, session.total_tokens, session.created,
                           session.last_access, session.ttl, session.attrs_json, entry_count],
                          separators=(",", ":"))

    # ---- the contract -----------------------------------------------------------------------

    def _get(self, session_id: str) -> Session:
        return self._snapshot(session_id)[0].session

    def _create(self, session: Session) -> Session:
        session_id = session.id
        self._index_state(backfill=False)
        key = self._keys.session(session_id)
        prefix = self._keys.entries(session_id)
        reply = self._txn(f"creating session {session_id!r}", [self._compare(key, "CREATE", 0)],
                          [self._put(key, self._session_value(session, 0)),
                           self._delete_range(prefix, prefix_end(prefix)), *self._index_ops(None, session)])
        if not reply.succeeded:
            raise AlreadyExistsError(f"session {session_id!r} already exists")
        self._remember(_Read(session, reply.header.revision, 0))
        return session

    def _update(self, session_id: str, expected_version: int, fingerprint: str, ttl: float | None,
                attrs: Mapping[str, Any]) -> Session:
        def plan(read: _Read, _: list[Entry]) -> tuple[list[Any], _Read, None]:
            new = self._updated(read.session, expected_version, fingerprint, ttl, attrs)
            ops = [self._put(self._keys.session(session_id), self._session_value(new, read.entry_count))]
            return ops, read._replace(session=new), None

        return self._guarded(session_id, expected_version, plan, use_cache=True)[0]

    def _append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        def plan(read: _Read, _: list[Entry]) -> tuple[list[Any], _Read, Entry]:
            new, entry = self._appended(read.session, expected_version, spec, read.entry_count)
            ops = [self._put(self._keys.entry(session_id, entry.seq), entry_value(entry)),
                   self._put(self._keys.session(session_id), self._session_value(new, read.entry_count + 1))]
            return ops, _Read(new, 0, read.entry_count + 1), entry

        return self._guarded(session_id, expected_version, plan, use_cache=True)

    def _read(self, session_id: str) -> tuple[Session, list[Entry]]:
        read, entries = self._snapshot(session_id, with_entries=True)
        return read.session, entries

    def _entries(self, session_id: str) -> list[Entry]:
        return self._snapshot(session_id, with_entries=True)[1]

    def _truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        def plan(read: _Read, entries: list[Entry]) -> tuple[list[Any], _Read, list[Entry]]:
            new, kept, removed = self._truncated(read.session, expected_version, token_offset, entries)
            ops = [self._put(self._keys.session(session_id), self._session_value(new, len(kept)))]
            if removed:
                ops.append(self._delete_range(self._keys.entry(session_id, len(kept)),
                                              prefix_end(self._keys.entries(session_id))))
            return ops, _Read(new, 0, len(kept)), removed

        return self._guarded(session_id, expected_version, plan, with_entries=True)

    def _delete(self, session_id: str, expected_version: int | None) -> list[Entry]:
        def plan(read: _Read, entries: list[Entry]) -> tuple[list[Any], None, list[Entry]]:
            prefix = self._keys.entries(session_id)
            ops = [self._delete_range(self._keys.session(session_id)), self._delete_range(prefix, prefix_end(prefix)),
                   self._delete_range(self._keys.lease(session_id))]
            return ops, None, entries

        return self._guarded(session_id, expected_version, plan, with_entries=True)[1]

    def _list_sessions(self, after: str | None, wanted: rules.SessionFilter, limit: int) -> SessionPage:
        return rules.collect_page(self._session_batches(after, max(limit, 100)), wanted, limit)

    def _session_batches(self, after: str | None, size: int) -> Iterator[tuple[list[Session], bool]]:
        """Sessions after ``after`` in byte order, ``size`` at a time, with their leases: one
        transaction reads a batch and the lease keys from its first id on (there are at most as
        many lease keys as sessions up to the batch's last id; later ones are not used)."""
        base, lease_base = self._keys.sessions, self._keys.leases
        start = base if after is None else self._keys.session(after) + b"\x00"
        while True:
            reply = self._txn("listing sessions", [], [
                self._range(start, prefix_end(base), size),
                self._range(lease_base + start[len(base):], prefix_end(lease_base), size)])
            sessions, leases = (response.response_range for response in reply.responses)
            records = [(kv.key, kv.value) for kv in sessions.kvs]
            if not records:
                return
            ids = [key[len(base):].decode("utf-8") for key, _ in records]
            lease_kvs = {kv.key[len(lease_base):].decode("utf-8"): kv for kv in leases.kvs}
            yield self._decode(ids, [value for _, value in records], lease_kvs)[0], sessions.more
            if not sessions.more:
                return
            start = records[-1][0] + b"\x00"

    def _expired(self, limit: int) -> list[Session]:
        """Due sessions from the expiry index, earliest deadline first, each read again and
        checked (an index key that no longer matches its session is removed, not returned)."""
        self._index_state(backfill=True)
        now, found = self.now(), list[Session]()
        base = self._keys.index
        start, end = base, base + b"%015d" % (math.floor(now * 1000) + 1)
        while len(found) < limit:
            reply = self._call(self._kv.Range, self._range(start, end, limit), "finding expired sessions")
            keys = [kv.key for kv in reply.kvs]
            ids = [key.partition(b"\x00")[2].decode("utf-8") for key in keys]
            for key, session_id, (session, revision) in zip(keys, ids, self._sessions_by_id(ids)):
                if session is not None and self._keys.deadline(session) == key:
                    if session.is_expired(now):
                        found.append(session)
                else:  # left by a writer without the index: drop it unless the session changed since
                    skey = self._keys.session(session_id)
                    guard = self._compare(skey, "MOD", revision) if session else self._compare(skey, "CREATE", 0)
                    self._txn("removing a stale expiry index key", [guard], [self._delete_range(key)])
            if not reply.more:
                break
            start = keys[-1] + b"\x00"
        return found[:limit]

    def _sessions_by_id(self, session_ids: list[str]) -> list[tuple[Session | None, int]]:
        """Each session (None if gone) with its key's mod_revision, with its lease; 64 per transaction."""
        out: list[tuple[Session | None, int]] = []
        for first in range(0, len(session_ids), 64):
            ids = session_ids[first:first + 64]
            reply = self._txn("reading sessions", [], [
                op for i in ids for op in (self._range(self._keys.session(i)), self._range(self._keys.lease(i)))])
            ranges = [r.response_range.kvs for r in reply.responses]
            present = [(i, ranges[2 * n][0]) for n, i in enumerate(ids) if ranges[2 * n]]
            leases = {i: ranges[2 * n + 1][0] for n, i in enumerate(ids) if ranges[2 * n + 1]}
            sessions, _ = self._decode([i for i, _ in present], [kv.value for _, kv in present], leases)
            read = {i: (session, kv.mod_revision) for (i, kv), session in zip(present, sessions)}
            out += [read.get(i, (None, 0)) for i in ids]
        return out

    def _index_state(self, backfill: bool) -> None:
        """Whether every session with a ttl is in the expiry index, settled once per store: a
        store with the ``x-ready`` marker is; an empty one is marked now; one written before
        the index existed is indexed first (only when ``backfill``: ``expired`` does it)."""
        if self._indexed or (self._unindexed and not backfill):  # creates ask once (a range counts its keys)
            return
        marker, base = self._keys.marker, self._keys.sessions
        if self._call(self._kv.Range, self._range(marker), "reading the expiry index marker").kvs:
            self._indexed = True
            return
        empty = not self._call(self._kv.Range, self._range(base, prefix_end(base), 1), "reading sessions").kvs
        if not empty and not backfill:
            self._unindexed = True
            return
        start = base
        while not empty:  # 1000 a range: etcd (before 3.7) walks the whole rest of a range to count it
            reply = self._call(self._kv.Range, self._range(start, prefix_end(base), 1000), "indexing sessions")
            ids = [kv.key[len(base):].decode("utf-8") for kv in reply.kvs]
            sessions, _ = self._decode(ids, [kv.value for kv in reply.kvs], {})
            # each put only if its session is still as read: a later change wrote its own key
            due = [([self._compare(kv.key, "MOD", kv.mod_revision)], [self._put(key, b"")])
                   for kv, key in zip(reply.kvs, map(self._keys.deadline, sessions)) if key]
            for first in range(0, len(due), 64):  # etcd takes at most 128 operations a transaction
                group = due[first:first + 64]
                whole = ([guard for guards, _ in group for guard in guards], [put for _, puts in group for put in puts])
                if not self._txn("indexing sessions", *whole).succeeded:
                    for guards, puts in group:
                        self._txn("indexing a session", guards, puts)
            if not reply.more:
                break
            start = reply.kvs[-1].key + b"\x00"
        self._call(self._kv.Put, self._put(marker, b"1"), "marking the expiry index")
        self._indexed = True

    # ---- leases -------------------------------------------------------------------------------

    def _holder(self, session_id: str) -> Holder:
        """The session's lease key as stored; NotFoundError if the session does not exist."""
        reply = self._txn(f"reading the lease of {session_id!r}", [],
                          [self._range(self._keys.session(session_id)), self._range(self._keys.lease(session_id))])
        session_kvs, lease_kvs = (r.response_range.kvs for r in reply.responses)
        if not session_kvs:
            raise rules.not_found(session_id)
        return Holder.parse(lease_kvs[0] if lease_kvs else None)

    def _grant(self, ttl: float) -> tuple[int, float]:
        reply = self._call(self._leases.LeaseGrant, self._rpc.LeaseGrantRequest(TTL=max(2, math.ceil(ttl))),
                           "granting a lease")
        return reply.ID, float(reply.TTL)

    def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(BackendUnavailableError, ConfigError):  # it expires anyway
            self._call(self._leases.LeaseRevoke, self._rpc.LeaseRevokeRequest(ID=lease_id), "revoking a lease")

    def _take(self, session_id: str, owner: str, ttl: float, held: Holder) -> Session:
        """Put the lease key for ``owner`` if it is still as seen (``held``) and the session
        exists. Returns the session; LeaseError on a lost race."""
        lease_id, granted = self._grant(ttl)
        key, skey = self._keys.lease(session_id), self._keys.session(session_id)
        guard = (self._compare(key, "MOD", held.revision) if held.revision
                 else self._compare(key, "CREATE", 0))
        value = json.dumps({"owner": owner, "expires": self.now() + granted, "lease": lease_id})
        reply = self._txn(f"taking the lease of {session_id!r}", [guard, self._compare(skey, "CREATE", 0, "GREATER")],
                          [self._put(key, value, lease=lease_id)])
        if not reply.succeeded:
            self._revoke(lease_id)
            raise self._holder(session_id).error(f"{owner!r} lost the race for the lease of session {session_id!r}")
        if held.revision:
            self._revoke(held.lease)
        return self.get(session_id)

    def _acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        held = self._holder(session_id)
        if held.owner != owner and held.active(self.now()):  # an expired one may linger: etcd lags
            raise held.error(f"session {session_id!r} is leased to {held.owner!r}")
        return self._take(session_id, owner, ttl, held)

    def _renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        held = self._holder(session_id)
        if held.owner != owner or not held.active(self.now()):
            raise held.error(f"{owner!r} does not hold the lease of session {session_id!r}")
        return self._take(session_id, owner, ttl, held)

    def _release_lease(self, session_id: str, owner: str) -> bool:
        held = self._holder(session_id)
        if held.owner != owner:
            return False
        key = self._keys.lease(session_id)
        reply = self._txn(f"releasing the lease of {session_id!r}", [self._compare(key, "MOD", held.revision)],
                          [self._delete_range(key)])
        if reply.succeeded:
            self._revoke(held.lease)
        return bool(reply.succeeded)

    def close(self) -> None:
        self._channel.close()
