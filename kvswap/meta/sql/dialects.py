"""One object per database: its engine and connection settings, its statements, its
transactions and its guarded append. :class:`~kvswap.meta.sql.store.SQLMetaStore` runs them
and holds no database branch of its own.

Every statement after the schema is driver SQL (``?`` or ``%s`` placeholders) built once.
Reads select a :class:`~kvswap.meta.base.Session`'s fields in its order (the id decoded from
its bytes by the database, a lease that expired by the first two parameters left out) or an
:class:`~kvswap.meta.base.Entry`'s, so a row becomes a record in one step:
``Session._make(row)``.

An append, the hot write, is a guarded update: it bumps the session only ``WHERE version = ?
AND total_tokens = ?`` and adds the entry only if that row changed: PostgreSQL in one
statement, MySQL/MariaDB in one multi-statement round trip, SQLite in one ``BEGIN IMMEDIATE``
transaction. ``guarded_append`` returns the session's row plus the entry's seq, or None when
the guard failed.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import sqlalchemy as sa

from kvswap.errors import ConfigError
from kvswap.meta.codec import json_loads
from kvswap.meta.sql.schema import SESSION_COLUMNS, SPEC_COLUMNS
from kvswap.uri import URI

#: Parameters of the guarded append's update: token_length, now, now, id, version, token_offset.
Guard = tuple[Any, ...]


class Dialect:
    """The statements and rules of one database (subclasses below, one per database)."""

    name: ClassVar[str]
    driver: ClassVar[str]  # SQLAlchemy's dialect+driver
    mark: ClassVar[str] = "%s"  # the driver's placeholder
    quote: ClassVar[str] = '"'
    row_lock: ClassVar[str] = " FOR UPDATE"  # what locks a session's row until the transaction ends
    reads_on_writer: ClassVar[bool] = False  # reads share the writer engine (no autocommit engine)
    thread_connections: ClassVar[bool] = False  # each thread keeps one connection, out of the pool
    append_in_transaction: ClassVar[bool] = False  # guarded_append's cursor is in a transaction (else autocommit)
    append: str  # the guarded append's SQL (see guarded_append)

    def __init__(self, prefix: str, options: dict[str, Any]) -> None:
        self.options = options
        self.sessions, self.entries_table = f"{prefix}sessions", f"{prefix}entries"
        self.columns = ", ".join(SESSION_COLUMNS)
        self.spec = ", ".join(f"{self.quote}{c}{self.quote}" for c in SPEC_COLUMNS)  # "key" is reserved in MySQL
        session = self.session = self.session_fields()
        self.get = self._marks(f"SELECT {session} FROM {self.sessions} WHERE id = ?")
        self.locked = self._marks(f"SELECT {session}, entry_count FROM {self.sessions} WHERE id = ?{self.row_lock}")
        self.exists = self._marks(f"SELECT version FROM {self.sessions} WHERE id = ?")
        self.entries = self._marks(f"SELECT {self.spec}, {self.text('session_id')}, seq, created FROM "
                                   f"{self.entries_table} WHERE session_id = ? ORDER BY seq")
        self.insert_entry = self._marks(f"INSERT INTO {self.entries_table} (session_id, seq, {self.spec}, created) "
                                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        self.insert_session = self._marks(
            f"INSERT INTO {self.sessions} ({self.columns}) VALUES (?, ?, 1, 0, 0, ?, ?, ?, ?, NULL, NULL, ?)")
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
        # The guarded append's two halves (parameters of the bump: a Guard).
        self.bump = (f"UPDATE {self.sessions} SET version = version + 1, entry_count = entry_count + 1, "
                     "total_tokens = total_tokens + ?, last_access = ?, "
                     "expires_at = CASE WHEN ttl IS NULL THEN NULL ELSE ? + ttl END "
                     "WHERE id = ? AND version = ? AND total_tokens = ?")
        self.add = f"INSERT INTO {self.entries_table} (session_id, seq, {self.spec}, created)"

    # ---- statements ---------------------------------------------------------------------------

    def text(self, column: str) -> str:
        """A binary id column as text, decoded from UTF-8 by the database."""
        raise NotImplementedError

    def session_fields(self, table: str = "") -> str:
        """A Session's fields in order; the lease only if it is active at the first two parameters."""
        t = table
        return (f"{self.text(t + 'id')}, {t}fingerprint, {t}version, {t}total_tokens, {t}created, "
                f"{t}last_access, {t}ttl, CASE WHEN {t}lease_expires > ? THEN {t}owner END, "
                f"CASE WHEN {t}lease_expires > ? THEN {t}lease_expires END, {t}attrs")

    def list_sessions(self, conditions: list[str]) -> str:
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return self._marks(f"SELECT {self.session} FROM {self.sessions}{where} ORDER BY id LIMIT ?")

    def _marks(self, sql: str) -> str:
        return sql if self.mark == "?" else sql.replace("?", self.mark)

    # ---- engines ------------------------------------------------------------------------------

    def engine(self, uri: URI, *, autocommit: bool = False) -> sa.Engine:
        """A pooled engine for ``uri`` (autocommit: the one reads run on)."""
        if not uri.host or not uri.path.strip("/") or "/" in uri.path.strip("/"):
            raise ConfigError(f"{uri.scheme}:// needs a host and a database, like {uri.scheme}://user@host/kvswap")
        url = sa.URL.create(self.driver, username=uri.username, password=uri.password,
                            host=uri.host, port=uri.port, database=uri.path.strip("/"))
        opts = self.options
        # No pre-ping (a round trip per call): a read retries once on a dead pooled connection.
        return sa.create_engine(url, connect_args=self.connect_args(), pool_size=opts["pool_size"],
                                max_overflow=opts["pool_size"], pool_timeout=opts["timeout"], pool_recycle=3600,
                                isolation_level="AUTOCOMMIT" if autocommit else "READ COMMITTED",
                                pool_reset_on_return=None)  # every use ends its own transaction

    def connect_args(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- transactions -------------------------------------------------------------------------

    def begin(self, cursor: Any) -> None:
        """Start a write transaction (the drivers of servers start one implicitly)."""

    def commit(self, proxy: Any, cursor: Any) -> None:
        proxy.commit()

    def rollback(self, proxy: Any, cursor: Any) -> None:
        """Undo an open transaction; a connection too broken to roll back is dropped by the caller."""
        with contextlib.suppress(Exception):
            proxy.rollback()

    def guarded_append(self, cursor: Any, sid: bytes, guard: Guard, values: tuple[Any, ...], now: float) -> Any:
        """On ``cursor`` (in a transaction if :attr:`append_in_transaction`, else autocommit):
        the session's row after the append plus the entry's seq, or None if the guard failed."""
        raise NotImplementedError


class SQLite(Dialect):
    """The standard library's sqlite3. Each thread keeps its own connection (a pool round trip
    costs more than a SQLite statement); writers take the write lock at BEGIN IMMEDIATE, so
    a read never has to upgrade. WAL mode: several processes may share the file."""

    name, driver, mark, row_lock = "sqlite", "sqlite+pysqlite", "?", ""  # BEGIN IMMEDIATE locks
    reads_on_writer = thread_connections = append_in_transaction = True

    def __init__(self, prefix: str, options: dict[str, Any]) -> None:
        super().__init__(prefix, options)
        self.append = self._marks(self.bump)
        self.appended = self._marks(f"SELECT {self.session}, entry_count - 1 FROM {self.sessions} WHERE id = ?")

    def text(self, column: str) -> str:
        return f"CAST({column} AS TEXT)"

    def engine(self, uri: URI, *, autocommit: bool = False) -> sa.Engine:
        opts = self.options
        if uri.host or not uri.path.startswith("/") or uri.path.endswith("/"):
            raise ConfigError(f"sqlite URIs name an absolute file path, like sqlite:///var/kvswap/meta.db, not {uri}")
        if opts["synchronous"] not in ("normal", "full"):
            raise ConfigError("synchronous must be normal or full")
        engine = sa.create_engine(sa.URL.create(self.driver, database=uri.path),
                                  connect_args={"timeout": opts["timeout"], "check_same_thread": False},
                                  pool_size=opts["pool_size"], max_overflow=opts["pool_size"])
        sa.event.listen(engine, "connect", lambda conn, _: self._connected(conn))
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine

    def _connected(self, dbapi_connection: Any) -> None:
        dbapi_connection.isolation_level = None  # we send BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={self.options['synchronous'].upper()}")
        cursor.close()

    def begin(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")

    def commit(self, proxy: Any, cursor: Any) -> None:
        cursor.execute("COMMIT")

    def rollback(self, proxy: Any, cursor: Any) -> None:
        with contextlib.suppress(Exception):
            if proxy.dbapi_connection.in_transaction:
                cursor.execute("ROLLBACK")

    def guarded_append(self, cursor: Any, sid: bytes, guard: Guard, values: tuple[Any, ...], now: float) -> Any:
        # The update, the row, the insert (RETURNING costs more than a SELECT), in one transaction.
        cursor.execute(self.append, guard)
        if cursor.rowcount != 1:
            return None
        row = _one(cursor, self.appended, (now, now, sid))
        cursor.execute(self.insert_entry, (sid, row[-1], *values))
        return row


class PostgreSQL(Dialect):
    """psycopg 3. An append is one statement: the update feeds the insert."""

    name, driver = "postgresql", "postgresql+psycopg"

    def __init__(self, prefix: str, options: dict[str, Any]) -> None:
        super().__init__(prefix, options)
        self.append = self._marks(
            f"WITH s AS ({self.bump} RETURNING {self.columns}), "
            f"e AS ({self.add} SELECT id, entry_count - 1, ?, ?, ?, ?, ?, ?, ?, ? FROM s RETURNING seq) "
            f"SELECT {self.session_fields('s.')}, e.seq FROM s, e")

    def text(self, column: str) -> str:
        return f"convert_from({column}, 'UTF8')"

    def connect_args(self) -> dict[str, Any]:
        timeout_ms = int(self.options["timeout"] * 1000)
        return {"connect_timeout": max(1, round(self.options["connect_timeout"])),
                "options": f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}",
                "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

    def guarded_append(self, cursor: Any, sid: bytes, guard: Guard, values: tuple[Any, ...], now: float) -> Any:
        return _one(cursor, self.append, (*guard, *values, now, now))


class MySQL(Dialect):
    """PyMySQL (pure Python, maintained, no client library to compile), for MySQL and MariaDB.

    An append is one multi-statement round trip: the insert happens only if the update did,
    and the row comes back as one JSON column (PyMySQL parses each column's description in
    Python, ~14 us a column; MariaDB and MySQL print doubles in JSON exactly)."""

    name, driver, quote = "mysql", "mysql+pymysql", "`"

    def __init__(self, prefix: str, options: dict[str, Any]) -> None:
        super().__init__(prefix, options)
        self.append = self._marks(
            f"START TRANSACTION; {self.bump}; "
            f"{self.add} SELECT id, entry_count - 1, ?, ?, ?, ?, ?, ?, ?, ? FROM {self.sessions} "
            "WHERE id = ? AND ROW_COUNT() = 1; "
            f"SELECT JSON_ARRAY({self.session}, entry_count - 1) FROM {self.sessions} WHERE id = ?; COMMIT")

    def text(self, column: str) -> str:
        return f"CONVERT({column} USING utf8mb4)"

    def connect_args(self) -> dict[str, Any]:
        from pymysql.constants import CLIENT

        # Multi-statements: an append is one batch (one round trip); every statement is still
        # parameterized. FOUND_ROWS is what SQLAlchemy itself would set.
        timeout = self.options["timeout"]
        return {"connect_timeout": self.options["connect_timeout"], "read_timeout": timeout,
                "write_timeout": timeout, "charset": "utf8mb4",
                "client_flag": CLIENT.MULTI_STATEMENTS | CLIENT.FOUND_ROWS}

    def guarded_append(self, cursor: Any, sid: bytes, guard: Guard, values: tuple[Any, ...], now: float) -> Any:
        return _batch(cursor, self.append, (*guard, *values, sid, now, now, sid))


DIALECTS: dict[str, type[Dialect]] = {d.name: d for d in (SQLite, PostgreSQL, MySQL)}


def _batch(cursor: Any, sql: str, params: tuple[Any, ...]) -> Any:
    """Run MySQL's append batch; the last SELECT's row (decoded from its JSON) if both the
    update and the insert changed a row, else None. A failed statement stops the batch with
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


def _sqlite_begin(conn: sa.Connection) -> None:
    """SQLAlchemy connections that write (schema creation) take SQLite's write lock up front.
    Reads are single statements in autocommit mode: no transaction to begin."""
    if conn.get_execution_options().get("kvswap_write", False):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
