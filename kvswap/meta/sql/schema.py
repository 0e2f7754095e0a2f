"""kvswap's SQL tables, made with SQLAlchemy Core: the one place their columns are named.

``sessions`` (one row per session, lease columns included), ``entries`` (primary key session
id + seq) and ``schema`` (a recorded version), each name starting with the store's
``table_prefix``. Session ids are stored as their UTF-8 bytes (binary columns), so every
database compares and orders them exactly, whatever its collation.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from kvswap.meta.records import SPEC_FIELDS
from kvswap.meta.rules import MAX_ID_BYTES

SCHEMA_VERSION = 1
SESSION_COLUMNS = ("id", "fingerprint", "version", "total_tokens", "entry_count", "created", "last_access", "ttl",
                   "expires_at", "owner", "lease_expires", "attrs")
SPEC_COLUMNS = SPEC_FIELDS  # an entry row's columns, in the record's order


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
    """The metadata and the sessions, entries and schema tables under ``prefix``."""
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
