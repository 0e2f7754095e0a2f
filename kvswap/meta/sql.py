"""``sqlite:///abs/path.db``, ``postgresql://...``, ``mysql://...``: one SQLAlchemy 2 store.

Drivers: the standard library's sqlite3, psycopg 3 (``postgresql://``) and PyMySQL
(``mysql://``, pure Python, maintained, no client library to compile). Every statement has
bound parameters. The schema is made with SQLAlchemy Core; every call after that runs
prebuilt driver SQL (:class:`_DriverSQL`) on a DBAPI connection from SQLAlchemy's pool,
because SQLAlchemy's Connection costs more than a statement (SQLite: 40 us against 5).
PostgreSQL and MySQL connections are pooled; each thread keeps its own SQLite connection.

Schema (names start with ``table_prefix``, default ``kvswap_``): ``sessions`` (one row per
session, lease columns included), ``entries`` (primary key session id + seq) and ``schema``
(a recorded version). It is created on first use; tables of those names without kvswap's
schema record, or with another schema version, are a :class:`ConfigError`, never touched.
Session ids are stored as their UTF-8 bytes (binary columns), so every database compares and
orders them exactly, whatever its collation.

An append, the hot write, is a guarded update: it bumps the session only ``WHERE version = ?
AND total_tokens = ?`` and adds the entry only if that row changed (PostgreSQL: one
statement; MySQL: one multi-statement round trip; SQLite: one ``BEGIN IMMEDIATE``
transaction); when nothing changed, a fresh read raises the exact error. Every other change
runs in one transaction that first locks the session's row (``SELECT ... FOR UPDATE``;
SQLite: ``BEGIN IMMEDIATE``), checks the rules in :mod:`kvswap.meta.base`, then writes.
Reads select a record's fields in its order, so a row becomes a :class:`Session` or
:class:`Entry` in one step. SQLite runs in WAL mode: several processes may share the file;
a committed change survives a killed process (``synchronous=normal``) or also power loss
(``?synchronous=full``).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    KVSwapError,
    VersionConflictError,
    translate_errors,
    translated,
)
from kvswap.meta.base import (
    MAX_ID_BYTES,
    UNSET,
    Entry,
    EntrySpec,
    LeaseError,
    MetaStore,
    Session,
    SessionPage,
    check_append,
    check_expected_version,
    check_limit,
    check_version,
    decode_cursor,
    encode_cursor,
    json_loads,
    not_found,
    validate_session_id,
    validate_spec,
)
from kvswap.uri import URI, Option, parse_positive_int, parse_seconds

SCHEMA_VERSION = 1
_T = TypeVar("_T")
_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,30}$")
_DRIVERS = {"sqlite": "sqlite+pysqlite", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}
SESSION_COLUMNS = ("id", "fingerprint", "version", "total_tokens", "entry_count", "created", "last_access", "ttl",
                   "expires_at", "owner", "lease_expires", "attrs")
_SPEC_COLUMNS = ("token_offset", "token_length", "connector", "key", "size", "checksum", "prefix_hash")


class _Utf8Bytes(sa.types.TypeDecorator):
    """A string stored as its UTF-8 bytes: exact comparison and byte order everywhere."""

    impl = sa.LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(MAX_ID_BYTES))
        return dialect.type_descriptor(sa.LargeBinary())

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> bytes | None:
        return None if value is None else value.encode("utf-8")

    def process_result_value(self, value: bytes | None, dialect: sa.Dialect) -> str | None:
        return None if value is None else bytes(value).decode("utf-8")


def _exact_string(length: int) -> sa.types.TypeEngine:
    """A string compared byte for byte (MySQL's default collations ignore case)."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


def tables(prefix: str) -> tuple[sa.MetaData, sa.Table, sa.Table, sa.Table]:
    md = sa.MetaData()
    opts: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
    sessions = sa.Table(
        f"{prefix}sessions", md,
        sa.Column("id", _Utf8Bytes, primary_key=True),
        sa.Column("fingerprint", _exact_string(1024), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("total_tokens", sa.BigInteger, nullable=False),
        sa.Column("entry_count", sa.Integer, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("last_access", sa.Double, nullable=False),
        sa.Column("ttl", sa.Double, nullable=True),
        sa.Column("expires_at", sa.Double, nullable=True),
        sa.Column("owner", _exact_string(255), nullable=True),
        sa.Column("lease_expires", sa.Double, nullable=True),
        sa.Column("attrs", sa.Text, nullable=False),
        sa.Index(f"{prefix}sessions_owner", "owner"),
        # No index on last_access: every append changes it (an index write each, 40% of a
        # SQLite append at 20k sessions); an idle_since listing walks the id order anyway.
        # Partial where the database can (most sessions have no TTL: no index write per change).
        sa.Index(f"{prefix}sessions_expires_at", "expires_at", sqlite_where=sa.text("expires_at IS NOT NULL"),
                 postgresql_where=sa.text("expires_at IS NOT NULL")),
        **opts,
    )
    entries = sa.Table(
        f"{prefix}entries", md,
        sa.Column("session_id", _Utf8Bytes, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("token_offset", sa.BigInteger, nullable=False),
        sa.Column("token_length", sa.BigInteger, nullable=False),
        sa.Column("connector", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("checksum", sa.String(255), nullable=False),
        sa.Column("prefix_hash", sa.String(255), nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        **opts,
    )
    schema = sa.Table(
        f"{prefix}schema", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        **opts,
    )
    return md, sessions, entries, schema


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
        self._dialect = uri.scheme
        self._md, self._sessions, self._entries, self._schema = tables(opts["table_prefix"])
        self._engine = self._make_engine(uri, opts)
        # Reads run on autocommit connections: no BEGIN/ROLLBACK round trips around a SELECT.
        self._reader = self._engine if self._dialect == "sqlite" else self._make_engine(uri, opts, autocommit=True)
        dbapi: Any = self._engine.dialect.dbapi
        self._dbapi = dbapi
        self._error_table: dict[type[BaseException], type[KVSwapError]] = {
            dbapi.ProgrammingError: ConfigError, dbapi.Error: BackendUnavailableError, **_ERRORS}
        self._local = threading.local()  # SQLite: each thread keeps its own connection (module doc)
        self._detached: list[Any] = []
        self._sql = _DriverSQL(self._dialect, opts["table_prefix"], self._engine.dialect.identifier_preparer.quote)
        try:
            self._ensure_schema()
        except BaseException:
            self.close()
            raise

    # ---- engine and schema ------------------------------------------------------------------

    def _make_engine(self, uri: URI, opts: dict[str, Any], autocommit: bool = False) -> sa.Engine:
        timeout = opts["timeout"]
        if self._dialect == "sqlite":
            if uri.host or not uri.path.startswith("/") or uri.path.endswith("/"):
                raise ConfigError("sqlite URIs name an absolute file path, like sqlite:///var/kvswap/meta.db, "
                                  f"not {uri}")
            if opts["synchronous"] not in ("normal", "full"):
                raise ConfigError("synchronous must be normal or full")
            engine = sa.create_engine(
                sa.URL.create("sqlite+pysqlite", database=uri.path),
                connect_args={"timeout": timeout, "check_same_thread": False},
                pool_size=opts["pool_size"], max_overflow=opts["pool_size"])
            sa.event.listen(engine, "connect", lambda conn, _: self._sqlite_connect(conn))
            sa.event.listen(engine, "begin", _sqlite_begin)
            return engine
        if not uri.host or not uri.path.strip("/") or "/" in uri.path.strip("/"):
            raise ConfigError(f"{uri.scheme}:// needs a host and a database, like {uri.scheme}://user@host/kvswap")
        url = sa.URL.create(_DRIVERS[self._dialect], username=uri.username, password=uri.password,
                            host=uri.host, port=uri.port, database=uri.path.strip("/"))
        if self._dialect == "postgresql":
            connect_args = {"connect_timeout": max(1, round(opts["connect_timeout"])),
                            "options": f"-c statement_timeout={int(timeout * 1000)}"
                                       f" -c lock_timeout={int(timeout * 1000)}",
                            "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
        else:
            from pymysql.constants import CLIENT

            # Multi-statements: an append is one batch (one round trip); every statement is
            # still parameterized. FOUND_ROWS is what SQLAlchemy itself would set.
            connect_args = {"connect_timeout": opts["connect_timeout"], "read_timeout": timeout,
                            "write_timeout": timeout, "charset": "utf8mb4",
                            "client_flag": CLIENT.MULTI_STATEMENTS | CLIENT.FOUND_ROWS}
        # No pre-ping (a round trip per call): a read retries once on a dead pooled connection.
        return sa.create_engine(url, connect_args=connect_args, pool_size=opts["pool_size"],
                                max_overflow=opts["pool_size"], pool_timeout=timeout, pool_recycle=3600,
                                isolation_level="AUTOCOMMIT" if autocommit else "READ COMMITTED",
                                pool_reset_on_return=None)  # every use ends its own transaction

    def _sqlite_connect(self, dbapi_connection: Any) -> None:
        dbapi_connection.isolation_level = None  # we send BEGIN ourselves (see _sqlite_begin)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={self.options['synchronous'].upper()}")
        cursor.close()

    def _ensure_schema(self) -> None:
        """Create the tables on first use; refuse tables that are not kvswap's (module doc).

        The schema table and its record come first, so a concurrent first open (MySQL's DDL is
        not transactional) sees either nothing, or kvswap's record, never bare tables."""
        ours = [self._sessions, self._entries]
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
            if self._dialect == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")
            result = work(cursor)
            if self._dialect == "sqlite":
                cursor.execute("COMMIT")
            else:
                proxy.commit()
            return result
        except BaseException:
            _quietly_rollback(proxy, cursor, self._dialect)
            raise

    def _checkout(self, engine: sa.Engine) -> Any:
        """A DBAPI connection: from the pool, or (SQLite) this thread's own, taken from the
        pool once and detached (a pool round trip costs more than a SQLite statement)."""
        if self._dialect != "sqlite":
            return engine.raw_connection()
        proxy = getattr(self._local, "proxy", None)
        if proxy is None:
            proxy = engine.raw_connection()
            proxy.detach()
            self._local.proxy = proxy
            self._detached.append(proxy)
        return proxy

    def _checkin(self, proxy: Any) -> None:
        if proxy is not None and self._dialect != "sqlite":
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
            raise not_found(session_id)
        return Session._make(row[:-1]), row[-1]

    def _write(self, cursor: Any, session: Session, entry_count: int) -> None:
        cursor.execute(self._sql.write, (session.fingerprint, session.version, session.total_tokens, entry_count,
                                         session.last_access, session.ttl, _expiry(session), session.attrs_json,
                                         session.id.encode()))

    def _entries_of(self, cursor: Any, session_id: str) -> list[Entry]:
        cursor.execute(self._sql.entries, (session_id.encode(),))
        return list(map(Entry._make, cursor.fetchall()))

    # ---- the contract -----------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        sid, now = validate_session_id(session_id).encode(), self.now()
        row = self._driver_read("reading session", session_id,
                                lambda cursor: _one(cursor, self._sql.get, (now, now, sid)))
        if row is None:
            raise not_found(session_id)
        return Session._make(row)

    def create(self, session_id: str, fingerprint: str, *, ttl: float | None = None,
               attrs: Mapping[str, Any] | None = None) -> Session:
        session = self._new_session(session_id, fingerprint, ttl, attrs)

        def work(cursor: Any) -> None:
            try:
                cursor.execute(self._sql.insert_session, (session_id.encode(), fingerprint, session.created,
                                                          session.last_access, session.ttl, _expiry(session),
                                                          session.attrs_json))
            except self._dbapi.IntegrityError:
                raise AlreadyExistsError(f"session {session_id!r} already exists") from None

        self._driver_write("creating session", session_id, work)
        return session

    def update(self, session_id: str, expected_version: int, *, fingerprint: str = UNSET,
               ttl: float | None = UNSET, attrs: Mapping[str, Any] = UNSET) -> Session:
        validate_session_id(session_id)

        def work(cursor: Any) -> Session:
            session, count = self._locked(cursor, session_id)
            new = self._updated(session, expected_version, fingerprint, ttl, attrs)
            self._write(cursor, new, count)
            return new

        return self._driver_write("updating session", session_id, work)

    def append(self, session_id: str, expected_version: int, spec: EntrySpec) -> tuple[Session, Entry]:
        """A guarded write: it changes the session only if its version and token count are
        as expected, then adds the entry (PostgreSQL: one statement; MySQL: one round trip;
        SQLite: one transaction). Nothing changed: a fresh read says why."""
        sid = validate_session_id(session_id).encode()
        check_expected_version(expected_version)
        validate_spec(spec)
        for _ in range(3):
            now = self.now()
            row = self._guarded_append(session_id, sid, expected_version, spec, now)
            if row is not None:
                return Session._make(row[:-1]), Entry._make((*_spec_values(spec), session_id, row[-1], now))
            check_append(self.get(session_id), expected_version, spec)  # raises, unless it changed back
        raise VersionConflictError(f"session {session_id!r} kept changing under an append")

    def _guarded_append(self, session_id: str, sid: bytes, expected_version: int, spec: EntrySpec,
                        now: float) -> Any:
        """The session's row after the append plus the entry's seq, or None if the guard failed."""
        guard = (spec.token_length, now, now, sid, expected_version, spec.token_offset)
        values = (*_spec_values(spec), now)
        if self._dialect == "postgresql":
            return self._driver_read("appending to session", session_id,
                                     lambda cursor: _one(cursor, self._sql.append, (*guard, *values, now, now)))
        if self._dialect == "mysql":
            return self._driver_read("appending to session", session_id,
                                     lambda cursor: _mysql_batch(cursor, self._sql.append,
                                                                 (*guard, *values, sid, now, now, sid)))

        def work(cursor: Any) -> Any:  # SQLite (RETURNING costs more than a SELECT here)
            cursor.execute(self._sql.append, guard)
            if cursor.rowcount != 1:
                return None
            row = _one(cursor, self._sql.appended, (now, now, sid))
            cursor.execute(self._sql.insert_entry, (sid, row[-1], *values))
            return row

        return self._driver_write("appending to session", session_id, work)

    def entries(self, session_id: str) -> list[Entry]:
        sid = validate_session_id(session_id).encode()

        def work(cursor: Any) -> list[Entry]:
            entries = self._entries_of(cursor, session_id)
            if not entries and _one(cursor, self._sql.exists, (sid,)) is None:
                raise not_found(session_id)
            return entries

        return self._driver_read("listing entries of", session_id, work)

    def truncate(self, session_id: str, expected_version: int, token_offset: int) -> tuple[Session, list[Entry]]:
        validate_session_id(session_id)

        def work(cursor: Any) -> tuple[Session, list[Entry]]:
            session, _ = self._locked(cursor, session_id)
            new, kept, removed = self._truncated(session, expected_version, token_offset,
                                                 self._entries_of(cursor, session_id))
            if removed:
                cursor.execute(self._sql.delete_entries_from, (session_id.encode(), len(kept)))
            self._write(cursor, new, len(kept))
            return new, removed

        return self._driver_write("truncating session", session_id, work)

    def delete(self, session_id: str, expected_version: int | None = None) -> list[Entry]:
        validate_session_id(session_id)

        def work(cursor: Any) -> list[Entry]:
            session, _ = self._locked(cursor, session_id)
            if expected_version is not None:
                check_version(session, expected_version)
            entries = self._entries_of(cursor, session_id)
            cursor.execute(self._sql.delete_entries_from, (session_id.encode(), 0))
            cursor.execute(self._sql.delete_session, (session_id.encode(),))
            return entries

        return self._driver_write("deleting session", session_id, work)

    def list_sessions(self, *, owner: str | None = None, idle_since: float | None = None,
                      fingerprint: str | None = None, limit: int = 100, cursor: str | None = None) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor)
        now = self.now()
        conditions: list[str] = []
        params: list[Any] = [now, now]
        for condition, value in (("id > ?", None if after is None else after.encode()),
                                 ("owner = ? AND lease_expires > ?", owner and (owner, now)),
                                 ("last_access <= ?", idle_since), ("fingerprint = ?", fingerprint)):
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
        return SessionPage(sessions, encode_cursor(sessions[-1].id) if len(rows) > limit else None)

    def expired(self, limit: int = 1000) -> list[Session]:
        now = self.now()

        def work(cursor: Any) -> list[tuple]:
            cursor.execute(self._sql.expired, (now, now, now, limit))
            return cursor.fetchall()

        return list(map(Session._make, self._driver_read("finding expired sessions", None, work)))

    # ---- leases -------------------------------------------------------------------------------

    def _lease_update(self, what: str, session_id: str, owner: str, sql: str, params: tuple) -> Session | LeaseError:
        """One conditional UPDATE of the lease columns (``sql``, ``params``): the session after
        it, or the LeaseError for the caller to raise or not when the condition failed
        (NotFoundError if there is no session). The caller has validated ``session_id``."""

        def work(cursor: Any) -> tuple[bool, Session]:
            cursor.execute(sql, params)
            changed = cursor.rowcount
            now = self.now()
            row = _one(cursor, self._sql.get, (now, now, session_id.encode()))
            if row is None:
                raise not_found(session_id)
            return bool(changed), Session._make(row)

        changed, session = self._driver_write(f"{what} the lease of", session_id, work)
        return session if changed else LeaseError(
            f"{owner!r} cannot {what.split()[0]} the lease of session {session_id!r}: held by {session.owner!r}",
            session.owner, session.lease_expires)

    def acquire_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        ttl = self._lease_ttl(owner, ttl)
        sid, now = validate_session_id(session_id).encode(), self.now()
        return _raise_lease(self._lease_update("acquiring", session_id, owner, self._sql.acquire,
                                               (owner, now + ttl, sid, owner, now)))

    def renew_lease(self, session_id: str, owner: str, ttl: float) -> Session:
        ttl = self._lease_ttl(owner, ttl)
        sid, now = validate_session_id(session_id).encode(), self.now()
        return _raise_lease(self._lease_update("renewing", session_id, owner, self._sql.renew,
                                               (now + ttl, sid, owner, now)))

    def release_lease(self, session_id: str, owner: str) -> bool:
        sid = validate_session_id(session_id).encode()
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


class _DriverSQL:
    """Every statement after the schema, as driver SQL (``?`` or ``%s`` placeholders), built once.

    Reads select a :class:`Session`'s fields in its order (the id decoded from its bytes by
    the database, a lease that expired by the first two parameters left out) or an
    :class:`Entry`'s, so a row becomes a record in one step: ``Session._make(row)``."""

    def __init__(self, dialect: str, prefix: str, quote: Any) -> None:
        self.mark = "?" if dialect == "sqlite" else "%s"
        self.dialect = dialect
        self.sessions, self.entries_table = f"{prefix}sessions", f"{prefix}entries"
        columns = ", ".join(SESSION_COLUMNS)
        spec = ", ".join(quote(c) for c in _SPEC_COLUMNS)  # "key" is reserved in MySQL
        session = self.session_fields()
        self.session = session
        self.get = self._marks(f"SELECT {session} FROM {self.sessions} WHERE id = ?")
        self.locked = self._marks(f"SELECT {session}, entry_count FROM {self.sessions} WHERE id = ?"
                                  + ("" if dialect == "sqlite" else " FOR UPDATE"))  # SQLite: BEGIN IMMEDIATE locks
        self.exists = self._marks(f"SELECT version FROM {self.sessions} WHERE id = ?")
        self.entries = self._marks(f"SELECT {spec}, {self.text('session_id')}, seq, created FROM "
                                   f"{self.entries_table} WHERE session_id = ? ORDER BY seq")
        self.insert_entry = self._marks(f"INSERT INTO {self.entries_table} (session_id, seq, {spec}, created) "
                                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        self.insert_session = self._marks(
            f"INSERT INTO {self.sessions} ({columns}) VALUES (?, ?, 1, 0, 0, ?, ?, ?, ?, NULL, NULL, ?)")
        self.write = self._marks(f"UPDATE {self.sessions} SET fingerprint = ?, version = ?, total_tokens = ?, "
                                 "entry_count = ?, last_access = ?, ttl = ?, expires_at = ?, attrs = ? WHERE id = ?")
        self.delete_entries_from = self._marks(f"DELETE FROM {self.entries_table} WHERE session_id = ? AND seq >= ?")
        self.delete_session = self._marks(f"DELETE FROM {self.sessions} WHERE id = ?")
        self.expired = self._marks(f"SELECT {session} FROM {self.sessions} WHERE expires_at <= ? "
                                   "ORDER BY expires_at LIMIT ?")
        self.acquire = self._marks(f"UPDATE {self.sessions} SET owner = ?, lease_expires = ? WHERE id = ? AND "
                                   "(owner IS NULL OR owner = ? OR lease_expires <= ?)")
        self.renew = self._marks(f"UPDATE {self.sessions} SET lease_expires = ? WHERE id = ? AND owner = ? "
                                 "AND lease_expires > ?")
        self.release = self._marks(f"UPDATE {self.sessions} SET owner = NULL, lease_expires = NULL WHERE id = ? "
                                   "AND owner = ? AND lease_expires > ?")
        # The guarded append (parameters: token_length, now, now, id, version, token_offset).
        bump = (f"UPDATE {self.sessions} SET version = version + 1, entry_count = entry_count + 1, "
                "total_tokens = total_tokens + ?, last_access = ?, "
                "expires_at = CASE WHEN ttl IS NULL THEN NULL ELSE ? + ttl END "
                "WHERE id = ? AND version = ? AND total_tokens = ?")
        add = f"INSERT INTO {self.entries_table} (session_id, seq, {spec}, created)"
        if dialect == "postgresql":  # one statement: the update feeds the insert
            self.append = self._marks(
                f"WITH s AS ({bump} RETURNING {columns}), "
                f"e AS ({add} SELECT id, entry_count - 1, ?, ?, ?, ?, ?, ?, ?, ? FROM s RETURNING seq) "
                f"SELECT {self.session_fields('s.')}, e.seq FROM s, e")
        elif dialect == "mysql":
            # One round trip: the insert happens only if the update did. The row comes back as
            # one JSON column: PyMySQL parses each column's description in Python (~14 us a
            # column); MariaDB and MySQL print doubles in JSON exactly (shortest round trip).
            self.append = self._marks(
                f"START TRANSACTION; {bump}; "
                f"{add} SELECT id, entry_count - 1, ?, ?, ?, ?, ?, ?, ?, ? FROM {self.sessions} "
                "WHERE id = ? AND ROW_COUNT() = 1; "
                f"SELECT JSON_ARRAY({session}, entry_count - 1) FROM {self.sessions} WHERE id = ?; COMMIT")
        else:  # SQLite, in a transaction: the update, the row, the insert
            self.append = self._marks(bump)
            self.appended = self._marks(f"SELECT {session}, entry_count - 1 FROM {self.sessions} WHERE id = ?")

    def text(self, column: str) -> str:
        """A binary id column as text, decoded from UTF-8 by the database."""
        return {"sqlite": f"CAST({column} AS TEXT)", "postgresql": f"convert_from({column}, 'UTF8')"}.get(
            self.dialect, f"CONVERT({column} USING utf8mb4)")

    def session_fields(self, table: str = "") -> str:
        """A Session's fields in order; the lease only if it is active at the first two parameters."""
        t = table
        return (f"{self.text(t + 'id')}, {t}fingerprint, {t}version, {t}total_tokens, {t}created, "
                f"{t}last_access, {t}ttl, CASE WHEN {t}lease_expires > ? THEN {t}owner END, "
                f"CASE WHEN {t}lease_expires > ? THEN {t}lease_expires END, {t}attrs")

    def _marks(self, sql: str) -> str:
        return sql if self.mark == "?" else sql.replace("?", self.mark)

    def list_sessions(self, conditions: list[str]) -> str:
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return self._marks(f"SELECT {self.session} FROM {self.sessions}{where} ORDER BY id LIMIT ?")


def _mysql_batch(cursor: Any, sql: str, params: tuple[Any, ...]) -> Any:
    """Run MySQL's append batch (:class:`_DriverSQL`); the last SELECT's row (decoded from
    its JSON) if both the update and the insert changed a row, else None. A failed statement stops the batch with
    its transaction open: it is rolled back before the error propagates."""
    try:
        cursor.execute(sql, params)  # START TRANSACTION
        counts, row = [], None
        while cursor.nextset():
            counts.append(cursor.rowcount)
            if cursor.description:
                row = cursor.fetchone()
    except BaseException:
        with contextlib.suppress(Exception):
            cursor.execute("ROLLBACK")
        raise
    return json_loads(row[0]) if counts[:2] == [1, 1] and row is not None else None


def _one(cursor: Any, sql: str, params: tuple[Any, ...]) -> Any:
    cursor.execute(sql, params)
    return cursor.fetchone()


def _spec_values(spec: EntrySpec) -> tuple[Any, ...]:
    return tuple(spec[:7])  # an Entry is a spec too


def _expiry(session: Session) -> float | None:
    return None if session.ttl is None else session.last_access + session.ttl


def _quietly_rollback(proxy: Any, cursor: Any, dialect: str) -> None:
    """Undo an open transaction; a connection too broken to roll back is dropped by the caller."""
    with contextlib.suppress(Exception):
        if dialect == "sqlite":
            if proxy.dbapi_connection.in_transaction:
                cursor.execute("ROLLBACK")
        else:
            proxy.rollback()


def _raise_lease(result: Session | LeaseError) -> Session:
    if isinstance(result, LeaseError):
        raise result
    return result


def _sqlite_begin(conn: sa.Connection) -> None:
    """Writers take SQLite's write lock up front, so a read never has to upgrade (which
    fails at once with 'database is locked' instead of waiting). Reads are single statements
    in autocommit mode: no transaction to begin."""
    if conn.get_execution_options().get("kvswap_write", False):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
