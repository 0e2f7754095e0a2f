"""The SQL meta store: ``sqlite:///abs/path.db``, ``postgresql://...``, ``mysql://...``.

The schema is made with SQLAlchemy Core (:mod:`.schema`); every call after that runs the
database's prebuilt driver SQL (:mod:`.dialects`) on a DBAPI connection from SQLAlchemy's
pool, because SQLAlchemy's Connection costs more than a statement (SQLite: 40 us against
5). Every statement has bound parameters. PostgreSQL and MySQL connections are pooled; each
thread keeps its own SQLite connection.

Tables of kvswap's names without its schema record, or with another schema version, are a
:class:`ConfigError`, never touched. Every change other than an append (see
:mod:`.dialects`) runs in one transaction that first locks the session's row (``SELECT ...
FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``), checks the rules in :mod:`kvswap.meta.base`,
then writes. Reads run on autocommit connections. SQLite runs in WAL mode: a committed change
survives a killed process (``synchronous=normal``) or also power loss (``?synchronous=full``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa

from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    KVSwapError,
    VersionConflictError,
    translate_errors,
    translated,
)
from kvswap.meta import rules
from kvswap.meta.base import MetaStore
from kvswap.meta.records import Entry, EntrySpec, LeaseError, Session, SessionPage
from kvswap.meta.sql.dialects import DIALECTS
from kvswap.meta.sql.schema import SCHEMA_VERSION, tables
from kvswap.uri import URI, Option, parse_positive_int, parse_seconds

_T = TypeVar("_T")
_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,30}$")


_ERRORS: dict[type[BaseException], type[KVSwapError]] = {
    sa.exc.ProgrammingError: ConfigError,  # permissions, a schema that is not ours
    sa.exc.OperationalError: BackendUnavailableError,  # down, timed out, locked
    sa.exc.InterfaceError: BackendUnavailableError,
    sa.exc.TimeoutError: BackendUnavailableError,  # no pooled connection in time
    sa.exc.DBAPIError: BackendUnavailableError,
    OSError: BackendUnavailableError,
}
_TRANSIENT = ("deadlock", "lock wait timeout", "could not serialize", "database is locked")


class SQLMetaStore(MetaStore):
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "timeout": Option(parse_seconds, 10.0, "seconds a statement (or SQLite lock wait) may take"),
        "connect_timeout": Option(parse_seconds, 5.0, "seconds to wait for a connection"),
        "pool_size": Option(parse_positive_int, 8, "pooled connections (PostgreSQL, MySQL)"),
        "table_prefix": Option(str, "kvswap_", "prefix of kvswap's table names"),
        "synchronous": Option(str, "normal", "SQLite: normal (survives a killed process) or full (power loss)"),
    }

    def __init__(self, uri: URI, **options: Any) -> None:
        super().__init__(uri, **options)
        opts = self.options
        if not _PREFIX_RE.match(opts["table_prefix"]):
            raise ConfigError("table_prefix must be 1-31 of [a-z0-9_], starting with a letter or _")
        self._sql = DIALECTS[uri.scheme](opts["table_prefix"], opts)
        self._md, self._session_table, self._entry_table, self._schema = tables(opts["table_prefix"])
        self._engine = self._sql.engine(uri)
        # Reads run on autocommit connections: no BEGIN/ROLLBACK round trips around a SELECT.
        self._reader = self._engine if self._sql.reads_on_writer else self._sql.engine(uri, autocommit=True)
        dbapi: Any = self._engine.dialect.dbapi
        self._dbapi = dbapi
        self._error_table: dict[type[BaseException], type[KVSwapError]] = {
            dbapi.ProgrammingError: ConfigError, dbapi.Error: BackendUnavailableError, **_ERRORS}
        self._local = threading.local()  # SQLite: each thread keeps its own connection (module doc)
        self._detached: list[Any] = []
        try:
            self._ensure_schema()
        except BaseException:
            self.close()
            raise

    # ---- engine and schema ------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        """Create the tables on first use; refuse tables that are not kvswap's (module doc).

        The schema table and its record come first, so a concurrent first open (MySQL's DDL is
        not transactional) sees either nothing, or kvswap's record, never bare tables."""
        ours = [self._session_table, self._entry_table]
        for attempt in range(20):
            with self._errors("opening the schema"):
                try:
                    names = set(sa.inspect(self._engine).get_table_names())
                    if self._schema.name not in names:
                        foreign = [t.name for t in ours if t.name in names]
                        if foreign:
                            raise ConfigError(
                                f"table(s) {foreign} in {self.uri} are not kvswap's (no {self._schema.name} "
                                "record); use another database or ?table_prefix=...")
                        with self._write_transaction() as conn:
                            self._schema.create(conn)
                            conn.execute(sa.insert(self._schema).values(name="meta", version=SCHEMA_VERSION))
                    with self._engine.connect() as conn:
                        found = conn.execute(sa.select(self._schema.c.version)
                                             .where(self._schema.c.name == "meta")).scalar()
                    if found is None:  # its creator has not inserted the record yet
                        time.sleep(0.05)
                        continue
                    if found != SCHEMA_VERSION:
                        raise ConfigError(f"{self.uri} holds kvswap meta schema version {found}; this kvswap "
                                          f"uses {SCHEMA_VERSION}")
                    if any(t.name not in names for t in ours):
                        with self._write_transaction() as conn:
                            for table in ours:
                                table.create(conn, checkfirst=True)
                    return
                except sa.exc.DBAPIError as exc:
                    cause = str(exc.orig).lower()
                    # A concurrent first open created it, or holds the lock (switching a new SQLite
                    # file to WAL answers "database is locked" without waiting): look again.
                    racing = (isinstance(exc, sa.exc.IntegrityError) or "already exists" in cause
                              or any(t in cause for t in _TRANSIENT))
                    if not racing or attempt == 19:
                        raise
                    time.sleep(0.05)
        raise ConfigError(f"{self._schema.name} in {self.uri} has no kvswap record")

    # ---- plumbing ---------------------------------------------------------------------------

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self._error_table, f"{what} on {self.uri}")

    def _failure(self, exc: BaseException, what: str, subject: str | None) -> KVSwapError | None:
        """The kvswap error for a driver exception (None: a bug, not a condition)."""
        label = what if subject is None else f"{what} {subject!r}"
        return translated(self._error_table, f"{label} on {self.uri}", exc)

    # Every call runs on a DBAPI connection with prebuilt SQL: SQLAlchemy's Connection costs
    # ~40 us a statement, the driver ~5 (SQLite). Messages are built only on failure.

    def _driver_read(self, what: str, subject: str | None, work: Callable[[Any], _T]) -> _T:
        """``work(cursor)`` on a pooled reader connection (autocommit); once more if it was dead."""
        return self._run(what, subject, work, write=False)

    def _driver_write(self, what: str, subject: str | None, work: Callable[[Any], _T]) -> _T:
        """``work(cursor)`` in one transaction on a pooled writer connection (SQLite: BEGIN
        IMMEDIATE), committed; rolled back on any error; again after a deadlock or busy database."""
        return self._run(what, subject, work, write=True)

    def _run(self, what: str, subject: str | None, work: Callable[[Any], _T], *, write: bool) -> _T:
        attempts = 5 if write else 2
        for attempt in range(attempts):
            proxy = None
            try:
                proxy = self._checkout(self._engine if write else self._reader)
                cursor = proxy.cursor()
                try:
                    return self._transaction(proxy, cursor, work) if write else work(cursor)
                finally:
                    cursor.close()
            except KVSwapError:
                raise
            except BaseException as exc:
                error = self._failure(exc, what, subject)
                if error is None:
                    raise
                dead = self._dead(proxy, exc)
                again = any(t in str(exc).lower() for t in _TRANSIENT) if write else dead
                if attempt == attempts - 1 or not again:
                    raise error from exc
                if write:
                    time.sleep(0.02 * 2**attempt)
            finally:
                self._checkin(proxy)
        raise AssertionError("unreachable")

    def _transaction(self, proxy: Any, cursor: Any, work: Callable[[Any], _T]) -> _T:
        try:
            self._sql.begin(cursor)
            result = work(cursor)
            self._sql.commit(proxy, cursor)
            return result
        except BaseException:
            self._sql.rollback(proxy, cursor)
            raise

    def _checkout(self, engine: sa.Engine) -> Any:
        """A DBAPI connection: from the pool, or (SQLite) this thread's own, taken from the
        pool once and detached (a pool round trip costs more than a SQLite statement)."""
        if not self._sql.thread_connections:
            return engine.raw_connection()
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = engine.raw_connection()
            proxy.detach()
            self._local.proxy = proxy
            self._detached.append(proxy)
        return proxy

    def _checkin(self, proxy: Any) -> None:
        if proxy is not None and not self._sql.thread_connections:
            proxy.close()

    def _dead(self, proxy: Any, cause: BaseException) -> bool:
        """Whether the driver exception ``cause`` means the pooled connection is gone; if so,
        it leaves the pool."""
        if proxy is None or not isinstance(cause, self._dbapi.Error):
            return bool(getattr(cause, "connection_invalidated", False))
        if self._engine.dialect.is_disconnect(cause, proxy.dbapi_connection, None):
            proxy.invalidate()
            return True
        return False

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sa.Connection]:
        """A writer connection in a transaction (SQLite: holding the write lock from BEGIN)."""
        with self._engine.connect() as conn, conn.execution_options(kvswap_write=True).begin():
            yield conn

    def _locked(self, cursor: Any, session_id: str) -> tuple[Session, int]:
        """The session's row, locked until the transaction ends, and its entry count."""
        now = self.now()
        row = _one(cursor, self._sql.locked, (now, now, session_id.encode()))
        if row is None:
            raise rules.not_found(session_id)
        return Session._make(row[:-1]), row[-1]

    def _write(self, cursor: Any, session: Session, entry_count: int) -> None:
        cursor.execute(self._sql.write, (session.fingerprint, session.version, session.total_tokens, entry_count,
                                         session.last_access, session.ttl, _expiry(session), session.attrs_json,
                                         session.id.encode()))

    def _entries_of(self, cursor: Any, session_id: str) -> list[Entry]:
        cursor.execute(self._sql.entries, (session_id.encode(),))
        return [Entry(*row) for row in cursor.fetchall()]

    # ---- the contract -----------------------------------------------------------------------

    def _get(self, session_id: str) -> Session:
        sid, now = session_id.encode(), self.now()
        row = self._driver_read("reading session", session_id,
                                lambda cursor: _one(cursor, self._sql.get, (now, now, sid)))
        if row is None:
            raise rules.not_found(session_id)
        return Session._make(row)

    def _create(self, session: Session) -> Session:
        session_id = session.id

        def work(cursor: Any) -> None:
            try:
                cursor.execute(self._sql.insert_session, (session_id.encode(), session.fingerprint, session.created,
                                                          session.last_access, session.ttl, _expiry(session),
                                                          session.attrs_json))
            except self._dbapi.IntegrityError:
                raise AlreadyExistsError(f"session {session_id!r} already exists") from None

        self._driver_write("creating session", session_id, work)
        return session

    def _update(self, session_id: str, expected_version: int, fingerprint: str, ttl: float | None,
                attrs: Mapping[str, Any]) -> Session:
        def work(cursor: Any) -> Session:
            session, count = self._locked(cursor, session_id)
            new = self._updated(session, expected_version, fingerprint, ttl, attrs)
            self._write(cursor, new, count)
            return new

        return self._driver_write("updating session", session_id, work)

    def _append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        """A guarded write: it changes the session only if its version and token count are
        as expected, then adds the entry (PostgreSQL: one statement; MySQL: one round trip;
        SQLite: one transaction). Nothing changed: a fresh read says why."""
        sid = session_id.encode()
        for _ in range(3):
            now = self.now()
            guard = (spec.token_length, now, now, sid, expected_version, spec.token_offset)
            values = (*spec.spec_values(), now)
            work = functools.partial(self._sql.guarded_append, sid=sid, guard=guard, values=values, now=now)
            row = self._run("appending to session", session_id, work, write=self._sql.append_in_transaction)
            if row is not None:
                return Session._make(row[:-1]), Entry.of(spec, session_id, row[-1], now)
            rules.check_append(self.get(session_id), expected_version, spec)  # raises, unless it changed back
        raise VersionConflictError(f"session {session_id!r} kept changing under an append")

    def _read(self, session_id: str) -> tuple[Session, list[Entry]]:
        sid, now = session_id.encode(), self.now()

        def work(cursor: Any) -> tuple[Session, list[Entry]]:  # one connection, two statements
            row = _one(cursor, self._sql.get, (now, now, sid))
            if row is None:
                raise rules.not_found(session_id)
            return Session._make(row), self._entries_of(cursor, session_id)

        return self._driver_read("reading session", session_id, work)

    def _entries(self, session_id: str) -> list[Entry]:
        sid = session_id.encode()

        def work(cursor: Any) -> list[Entry]:
            entries = self._entries_of(cursor, session_id)
            if not entries and _one(cursor, self._sql.exists, (sid,)) is None:
                raise rules.not_found(session_id)
            return entries

        return self._driver_read("listing entries of", session_id, work)

    def _truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        def work(cursor: Any) -> tuple[Session, list[Entry]]:
            session, _ = self._locked(cursor, session_id)
            new, kept, removed = self._truncated(session, expected_version, token_offset,
                                                 self._entries_of(cursor, session_id))
            if removed:
                cursor.execute(self._sql.delete_entries_from, (session_id.encode(), len(kept)))
            self._write(cursor, new, len(kept))
            return new, removed

        return self._driver_write("truncating session", session_id, work)

    def _delete(self, session_id: str, expected_version: int | None) -> list[Entry]:
        def work(cursor: Any) -> list[Entry]:
            session, _ = self._locked(cursor, session_id)
            if expected_version is not None:
                rules.check_version(session, expected_version)
            entries = self._entries_of(cursor, session_id)
            cursor.execute(self._sql.delete_entries_from, (session_id.encode(), 0))
            cursor.execute(self._sql.delete_session, (session_id.encode(),))
            return entries

        return self._driver_write("deleting session", session_id, work)

    def _list_sessions(self, after: str | None, wanted: rules.SessionFilter, limit: int) -> SessionPage:
        owner, now = wanted.owner, self.now()
        conditions: list[str] = []
        params: list[Any] = [now, now]
        for condition, value in (("id > ?", None if after is None else after.encode()),
                                 ("owner = ? AND lease_expires > ?", owner and (owner, now)),
                                 ("last_access <= ?", wanted.idle_since), ("fingerprint = ?", wanted.fingerprint)):
            if value is not None:
                conditions.append(condition)
                params.extend(value if isinstance(value, tuple) else (value,))
        params.append(limit + 1)
        sql = self._sql.list_sessions(conditions)

        def work(cursor: Any) -> list[tuple]:
            cursor.execute(sql, params)
            return cursor.fetchall()

        rows = self._driver_read("listing sessions", None, work)
        sessions = list(map(Session._make, rows[:limit]))
        return SessionPage(sessions, rules.encode_cursor(sessions[-1].id) if len(rows) > limit else None)

    def _expired(self, limit: int) -> list[Session]:
        now = self.now()

        def work(cursor: Any) -> list[tuple]:
            cursor.execute(self._sql.expired, (now, now, now, limit))
            return cursor.fetchall()

        return list(map(Session._make, self._driver_read("finding expired sessions", None, work)))

    # ---- leases -------------------------------------------------------------------------------

    def _lease_update(self, what: str, session_id: str, owner: str, sql: str, params: tuple) -> Session | LeaseError:
        """One conditional UPDATE of the lease columns (``sql``, ``params``): the session after
        it, or the LeaseError for the caller to raise or not when the condition failed
        (NotFoundError if there is no session)."""

        def work(cursor: Any) -> tuple[bool, Session]:
            cursor.execute(sql, params)
            changed = cursor.rowcount
            now = self.now()
            row = _one(cursor, self._sql.get, (now, now, session_id.encode()))
            if row is None:
                raise rules.not_found(session_id)
            return bool(changed), Session._make(row)

        changed, session = self._driver_write(f"{what} the lease of", session_id, work)
        return session if changed else LeaseError(
            f"{owner!r} cannot {what.split()[0]} the lease of session {session_id!r}: held by {session.owner!r}",
            session.owner, session.lease_expires)

    def _acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        sid, now = session_id.encode(), self.now()
        return _raise_lease(self._lease_update("acquiring", session_id, owner, self._sql.acquire,
                                               (owner, now + ttl, sid, owner, now)))

    def _renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        sid, now = session_id.encode(), self.now()
        return _raise_lease(self._lease_update("renewing", session_id, owner, self._sql.renew,
                                               (now + ttl, sid, owner, now)))

    def _release_lease(self, session_id: str, owner: str) -> bool:
        sid = session_id.encode()
        result = self._lease_update("releasing", session_id, owner, self._sql.release, (sid, owner, self.now()))
        return isinstance(result, Session)

    def close(self) -> None:
        for proxy in self._detached:
            with contextlib.suppress(Exception):
                proxy.dbapi_connection.close()
        self._detached.clear()
        self._engine.dispose()
        if self._reader is not self._engine:
            self._reader.dispose()


def _one(cursor: Any, sql: str, params: tuple[Any, ...]) -> Any:
    cursor.execute(sql, params)
    return cursor.fetchone()


def _expiry(session: Session) -> float | None:
    return None if session.ttl is None else session.last_access + session.ttl


def _raise_lease(result: Session | LeaseError) -> Session:
    if isinstance(result, LeaseError):
        raise result
    return result
