"""``redis://``, ``rediss://``, ``valkey://``, ``valkeys://``: one store, compare-and-swap in Lua.

``scheme://[user:password@]host[:port][/db]?prefix=kvswap:meta:``. Keys under ``prefix``:

* ``s:{id}`` a hash: fingerprint, version, total_tokens, created, last_access, ttl, attrs;
* ``e:{id}`` a list of entries, each a JSON array (:func:`kvswap.meta.base.entry_value`;
  the list index is the entry's ``seq``);
* ``l:{id}`` the lease holder's name, expiring with the lease (Redis expires it, in ms);
* ``idx`` a sorted set of every id at score 0, paged in byte order with ZRANGEBYLEX;
* ``ttl`` a sorted set of ids by ``last_access + ttl``, for :meth:`expired`.

Every change is one Lua script that checks the version and writes, atomically on the server;
reads of many sessions (a page) are one script call too.
Scripts are never retried after a lost connection (a retried append could land twice).
**Cluster** (``?cluster=true``, any node; ``nodes=host:port,...`` more seeds): every key above
takes the hash tag of its session's bucket, ``{b<NN>}`` after the prefix (a CRC-32 of the id,
modulo ``buckets``, default 64), and ``idx`` and ``ttl`` exist once per bucket. A session's
keys and its bucket's indexes share one slot, so each change stays one atomic script on one
primary; the buckets spread the sessions over the primaries. Listing merges the buckets'
indexes in byte order (the order of every backend), :meth:`expired` merges them by expiry.
A single primary without ``cluster`` keeps the untagged layout above; a cluster node opened
without it is refused with a ConfigError.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, NoReturn

from kvswap.errors import AlreadyExistsError, ConfigError, VersionConflictError, translate_errors, translated
from kvswap.meta import rules
from kvswap.meta.base import MetaStore
from kvswap.meta.codec import entries_from_values, entry_value
from kvswap.meta.records import UNSET, Entry, EntrySpec, InvalidEntryError, LeaseError, Session, SessionPage
from kvswap.redis_client import CLIENT_OPTIONS, RedisClient
from kvswap.uri import URI, Option, parse_bool, parse_positive_int

# A session as scripts return it: its hash fields (_FIELDS, in order), lease holder, lease PTTL.
_FIELDS = ("fingerprint", "version", "total_tokens", "created", "last_access", "ttl", "attrs")
_LUA_READ = """
local function read(skey, lkey)
  local r = redis.call('HMGET', skey, %s)
  r[8] = redis.call('GET', lkey)
  r[9] = redis.call('PTTL', lkey)
  return r
end
""".replace("%s", ", ".join(f"'{f}'" for f in _FIELDS))

# KEYS: session hash, entries list, lease: the session as _READ returns it, then its entries.
_READ_WITH_ENTRIES = _LUA_READ + """
local r = read(KEYS[1], KEYS[3])
r[10] = redis.call('LRANGE', KEYS[2], 0, -1)
return r
"""

# KEYS: session hash and lease of each session, in pairs.
_READ = _LUA_READ + """
local out = {}
for i = 1, #KEYS, 2 do out[#out + 1] = read(KEYS[i], KEYS[i + 1]) end
return out
"""

# KEYS: session hash, entries list, lease, idx, ttl index. ARGV[1]: session id.
_INDEX_TTL = _LUA_READ + """
local function index_ttl(now)
  local ttl = redis.call('HGET', KEYS[1], 'ttl')
  if ttl and ttl ~= '' then
    redis.call('ZADD', KEYS[5], tonumber(now) + tonumber(ttl), ARGV[1])
  else
    redis.call('ZREM', KEYS[5], ARGV[1])
  end
end
local function state()
  return {'ok', read(KEYS[1], KEYS[3])}
end
local function guard(expected)
  local v = redis.call('HGET', KEYS[1], 'version')
  if not v then return {'missing'} end
  if expected ~= '' and v ~= expected then return {'conflict', v} end
  return nil
end
"""

_CREATE = _INDEX_TTL + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[4], 0, ARGV[1])
index_ttl(ARGV[2])
return {'ok'}
"""

# ARGV: id, expected version, now, field, value, ...
_UPDATE = _INDEX_TTL + """
local failed = guard(ARGV[2]); if failed then return failed end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'last_access', ARGV[3], unpack(ARGV, 4))
index_ttl(ARGV[3])
return state()
"""

# ARGV: id, expected version, now, token offset, token end, entry JSON (the hot write: one
# HMGET for every check; the TTL index moves only for a session with a TTL)
_APPEND = _INDEX_TTL + """
local s = redis.call('HMGET', KEYS[1], 'version', 'total_tokens', 'ttl')
if not s[1] then return {'missing'} end
if s[1] ~= ARGV[2] then return {'conflict', s[1]} end
if s[2] ~= ARGV[4] then return {'gap', s[2]} end
local seq = redis.call('RPUSH', KEYS[2], ARGV[6]) - 1
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'last_access', ARGV[3], 'total_tokens', ARGV[5])
if s[3] and s[3] ~= '' then redis.call('ZADD', KEYS[5], tonumber(ARGV[3]) + tonumber(s[3]), ARGV[1]) end
local result = state()
result[3] = seq
return result
"""

# ARGV: id, expected version, now, kept entries, new total
_TRUNCATE = _INDEX_TTL + """
local failed = guard(ARGV[2]); if failed then return failed end
if tonumber(ARGV[4]) == 0 then redis.call('DEL', KEYS[2])
else redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'last_access', ARGV[3], 'total_tokens', ARGV[5])
index_ttl(ARGV[3])
return state()
"""

# ARGV: id, expected version
_DELETE = _INDEX_TTL + """
local failed = guard(ARGV[2]); if failed then return failed end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return {'ok'}
"""

# ARGV: id, owner, ttl ms, mode ('acquire' | 'renew' | 'release')
_LEASE = _INDEX_TTL + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local holder = redis.call('GET', KEYS[3])
local mine = holder == ARGV[2]
if ARGV[4] == 'release' then
  if mine then redis.call('DEL', KEYS[3]) end
  return {'ok', mine and 1 or 0}
end
if (holder and not mine) or (ARGV[4] == 'renew' and not mine) then
  return {'held', holder or '', redis.call('PTTL', KEYS[3])}
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return state()
"""


class RedisMetaStore(MetaStore):
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        **CLIENT_OPTIONS,
        "prefix": Option(str, "kvswap:meta:", "namespace of every key this store writes"),
        "cluster": Option(parse_bool, False, "the host is a node of a Redis/Valkey Cluster"),
        "nodes": Option(str, None, "more cluster nodes to start from: host:port,host:port"),
        "buckets": Option(parse_positive_int, 64, "on a cluster: slots the sessions are spread over"),
    }

    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        if not self.options["prefix"]:
            raise ConfigError("prefix must not be empty")
        self._redis = RedisClient(uri, self.options, retries=0, large_values=False,
                                  cluster=self.options["cluster"], nodes=self.options["nodes"])
        self._client = self._redis.client
        self._prefix = self.options["prefix"]
        buckets = self.options["buckets"] if self.options["cluster"] else 0
        self._tags = [f"{{b{i:02x}}}" for i in range(buckets)] or [""]
        register = self._client.register_script
        self._scripts = {name: register(body) for name, body in (
            ("create", _CREATE), ("update", _UPDATE), ("append", _APPEND), ("truncate", _TRUNCATE),
            ("delete", _DELETE), ("lease", _LEASE), ("read", _READ), ("read_with_entries", _READ_WITH_ENTRIES))}

    # ---- plumbing -----------------------------------------------------------------------------

    def _errors(self, what: str) -> Any:
        return translate_errors(self._redis.errors, f"{what} on {self.uri}")

    def _reraise(self, exc: Exception, what: str) -> NoReturn:
        """Raise ``exc`` as kvswap's kind (hot paths catch themselves: cheaper than _errors)."""
        if "CROSSSLOT" in str(exc) or str(exc).startswith("MOVED "):
            raise ConfigError(f"{self.uri} is a node of a Redis/Valkey Cluster: open it with cluster=true") from None
        error = translated(self._redis.errors, f"{what} on {self.uri}", exc)
        if error is None or error is exc:
            raise exc
        raise error from exc

    def _tag(self, session_id: str) -> str:
        """The hash tag of the session's bucket ("" on a single primary)."""
        if len(self._tags) == 1:
            return self._tags[0]
        return self._tags[zlib.crc32(session_id.encode("utf-8")) % len(self._tags)]

    def _keys(self, session_id: str) -> list[str]:
        p, t = self._prefix, self._tag(session_id)
        return [f"{p}{t}s:{session_id}", f"{p}{t}e:{session_id}", f"{p}{t}l:{session_id}", f"{p}{t}idx",
                f"{p}{t}ttl"]

    def _run(self, name: str, what: str, session_id: str, *args: Any) -> list[Any]:
        try:
            reply = self._scripts[name](keys=self._keys(session_id), args=[session_id, *args])
        except Exception as exc:  # noqa: BLE001 - _reraise maps driver errors, re-raises the rest
            self._reraise(exc, f"{what} session {session_id!r}")
        status = _text(reply[0])
        if status == "missing":
            raise rules.not_found(session_id)
        if status == "conflict":
            current = int(reply[1])
            raise VersionConflictError(f"session {session_id!r} is at version {current}, not {args[0]}",
                                       current=current)
        return reply

    def _state(self, session_id: str, state: list[Any]) -> Session | None:
        """A Session from what the scripts' ``read`` returns (None: no such session)."""
        fingerprint, version, total, created, last_access, ttl, attrs, holder, pttl = state
        if version is None:
            return None
        owner = lease = None
        if holder and pttl > 0:
            owner, lease = holder.decode("utf-8"), self.now() + pttl / 1000
        return Session(session_id, fingerprint.decode("utf-8"), int(version), int(total), float(created),
                       float(last_access), float(ttl) if ttl else None, owner, lease,
                       attrs.decode("utf-8") if attrs else "{}")

    def _existing(self, session_id: str, state: list[Any]) -> Session:
        session = self._state(session_id, state)
        if session is None:
            raise rules.not_found(session_id)
        return session

    def _read_many(self, session_ids: list[str]) -> list[Session | None]:
        """Sessions by id (None for ids that do not exist): one script call per bucket, all
        pipelined (a call that meets a node without the script runs again, loading it)."""
        by_tag: dict[str, list[str]] = {}
        for session_id in session_ids:
            by_tag.setdefault(self._tag(session_id), []).append(session_id)
        keys = [[key for session_id in ids for key in self._keys(session_id)[0:3:2]] for ids in by_tag.values()]
        script = self._scripts["read"]
        try:
            if len(keys) == 1:
                replies = [script(keys=keys[0])]
            else:
                pipe = self._client.pipeline(transaction=False)
                for group in keys:
                    pipe.execute_command("EVALSHA", script.sha, len(group), *group)  # evalsha() is barred there
                replies = [script(keys=group) if isinstance(reply, self._redis.no_script) else reply
                           for group, reply in zip(keys, pipe.execute(raise_on_error=False))]
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
        except Exception as exc:  # noqa: BLE001 - _reraise maps driver errors, re-raises the rest
            self._reraise(exc, "reading sessions")
        found: dict[str, Session | None] = {}
        for ids, states in zip(by_tag.values(), replies):
            found.update((i, self._state(i, state)) for i, state in zip(ids, states))
        return [found[i] for i in session_ids]

    def _read(self, session_id: str) -> tuple[Session, list[Entry]]:
        try:  # one script: a consistent snapshot
            reply = self._scripts["read_with_entries"](keys=self._keys(session_id)[:3])
        except Exception as exc:  # noqa: BLE001 - _reraise maps driver errors, re-raises the rest
            self._reraise(exc, f"reading session {session_id!r}")
        return self._existing(session_id, reply[:9]), entries_from_values(session_id, reply[9])

    # ---- the contract -----------------------------------------------------------------------

    def _get(self, session_id: str) -> Session:
        session = self._read_many([session_id])[0]
        if session is None:
            raise rules.not_found(session_id)
        return session

    def _create(self, session: Session) -> Session:
        session_id = session.id
        fields = _fields(session)
        fields.update(version=1, total_tokens=0, created=repr(session.created))
        reply = self._run("create", "creating", session_id, repr(session.last_access), *_flat(fields))
        if _text(reply[0]) == "exists":
            raise AlreadyExistsError(f"session {session_id!r} already exists")
        return session

    def _update(self, session_id: str, expected_version: int, fingerprint: str, ttl: float | None,
                attrs: Mapping[str, Any]) -> Session:
        # Validate every field the way every backend does, on the caller's view of the session.
        probe = Session(session_id, "-", expected_version, 0, 0.0, 0.0)
        changed = self._updated(probe, expected_version, fingerprint, ttl, attrs)
        fields = {name: value for name, value in _fields(changed).items()
                  if {"fingerprint": fingerprint, "ttl": ttl, "attrs": attrs}.get(name, UNSET) is not UNSET}
        reply = self._run("update", "updating", session_id, str(expected_version), repr(changed.last_access),
                          *_flat(fields))
        return self._existing(session_id, reply[1])

    def _append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        probe = Session(session_id, "-", expected_version, spec.token_offset, 0.0, 0.0)
        _, entry = self._appended(probe, expected_version, spec, 0)  # the entry as stored
        reply = self._run("append", "appending to", session_id, str(expected_version), repr(entry.created),
                          str(spec.token_offset), str(entry.token_end), entry_value(entry))
        if _text(reply[0]) == "gap":
            total = int(reply[1])
            raise InvalidEntryError(
                f"session {session_id!r} holds tokens [0, {total}); an entry must start at {total}, "
                f"not {spec.token_offset} (no gaps, no overlaps)")
        return self._existing(session_id, reply[1]), entry._replace(seq=int(reply[2]))

    def _entries(self, session_id: str) -> list[Entry]:
        try:
            keys = self._keys(session_id)
            raw = self._client.lrange(keys[1], 0, -1)
            if not raw and not self._client.exists(keys[0]):
                raise rules.not_found(session_id)
        except Exception as exc:  # noqa: BLE001 - _reraise maps driver errors, re-raises the rest
            self._reraise(exc, f"listing entries of {session_id!r}")
        return entries_from_values(session_id, raw)

    def _truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        session, entries = self._read(session_id)
        new, kept, removed = self._truncated(session, expected_version, token_offset, entries)
        # The script re-checks the version: the entries read above are still the stored ones.
        reply = self._run("truncate", "truncating", session_id, str(expected_version), repr(new.last_access),
                          str(len(kept)), str(new.total_tokens))
        return self._existing(session_id, reply[1]), removed

    def _delete(self, session_id: str, expected_version: int | None) -> list[Entry]:
        while True:
            session, entries = self._read(session_id)
            if expected_version is not None:
                rules.check_version(session, expected_version)
            try:
                self._run("delete", "deleting", session_id, str(session.version))
                return entries
            except VersionConflictError:
                if expected_version is not None:
                    raise  # else the session changed between our read and delete: read again

    def _list_sessions(self, after: str | None, wanted: rules.SessionFilter, limit: int) -> SessionPage:
        batches = (([s for s in self._read_many(ids) if s is not None], more)
                   for ids, more in self._id_batches(after, max(limit, 100)))
        return rules.collect_page(batches, wanted, limit)

    def _asked(self, wanted: int) -> int:
        """How many items to ask each bucket for when ``wanted`` of all are wanted: a share
        with room (ids spread evenly over buckets), not ``wanted`` from every bucket."""
        return wanted if len(self._tags) == 1 else 2 * wanted // len(self._tags) + 8

    @staticmethod
    def _merge_buckets(replies: list[list[Any]], asked: int, key: Callable[[Any], Any]) -> tuple[list[Any], bool]:
        """The buckets' sorted replies (each asked for ``asked`` items) merged, cut where they
        are surely the first of all: at the smallest last item of a bucket that filled its
        reply, since that bucket may hold more items after it; and whether any bucket may."""
        merged = sorted((item for reply in replies for item in reply), key=key)
        ends = [key(reply[-1]) for reply in replies if len(reply) >= asked]
        if not ends:
            return merged, False
        bound = min(ends)
        return [item for item in merged if key(item) <= bound], True

    def _id_batches(self, after: str | None, size: int) -> Iterator[tuple[list[str], bool]]:
        """Ids after ``after`` in byte order, up to ``size`` at a time, with whether more follow."""
        start = b"-" if after is None else b"(" + after.encode("utf-8")
        asked = self._asked(size + 1)
        while True:
            with self._errors("listing sessions"):
                pipe = self._client.pipeline(transaction=False)
                for tag in self._tags:
                    pipe.zrangebylex(f"{self._prefix}{tag}idx", start, b"+", start=0, num=asked)
                sure, more = self._merge_buckets(pipe.execute(), asked, _same)  # bytes: byte order
            ids = [_text(i) for i in sure[:size]]
            more = more or len(sure) > size
            if ids:
                yield ids, more
            if not more:
                return
            start = b"(" + ids[-1].encode("utf-8")

    def _expired(self, limit: int) -> list[Session]:
        asked = self._asked(limit)
        with self._errors("finding expired sessions"):
            pipe = self._client.pipeline(transaction=False)
            for tag in self._tags:
                pipe.zrangebyscore(f"{self._prefix}{tag}ttl", "-inf", repr(self.now()), start=0, num=asked,
                                   withscores=True)
            due, _ = self._merge_buckets(pipe.execute(), asked, lambda pair: pair[1])
        return [s for s in self._read_many([_text(i) for i, _ in due[:limit]]) if s is not None]

    # ---- leases -------------------------------------------------------------------------------

    def _lease(self, session_id: str, owner: str, ttl: float, mode: str) -> list[Any]:
        reply = self._run("lease", f"{mode} the lease of", session_id, owner, str(max(1, round(ttl * 1000))), mode)
        if _text(reply[0]) == "held":
            holder = _text(reply[1]) or None
            expires = self.now() + int(reply[2]) / 1000 if holder else None
            raise LeaseError(f"{owner!r} cannot {mode} the lease of session {session_id!r}: held by {holder!r}",
                             holder, expires)
        return reply

    def _acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        reply = self._lease(session_id, owner, ttl, "acquire")
        return self._existing(session_id, reply[1])

    def _renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        reply = self._lease(session_id, owner, ttl, "renew")
        return self._existing(session_id, reply[1])

    def _release_lease(self, session_id: str, owner: str) -> bool:
        return bool(int(self._lease(session_id, owner, 1.0, "release")[1]))

    def close(self) -> None:
        self._redis.close()


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _fields(session: Session) -> dict[str, Any]:
    """The hash fields a change may set (floats as repr, so they round-trip exactly)."""
    return {"fingerprint": session.fingerprint, "ttl": "" if session.ttl is None else repr(session.ttl),
            "attrs": session.attrs_json, "last_access": repr(session.last_access)}


def _flat(fields: Mapping[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]


def _same(value: Any) -> Any:
    return value
