"""The SQL meta store (SQLite, PostgreSQL, MySQL/MariaDB) in three parts: the tables
(:mod:`.schema`), one dialect object per database holding its statements, engine settings,
transactions and guarded append (:mod:`.dialects`), and the store that runs them
(:mod:`.store`). A new SQL database is one :class:`~kvswap.meta.sql.dialects.Dialect`
subclass, one entry in ``DIALECTS`` and one registry line in :mod:`kvswap.meta`."""

from kvswap.meta.sql.store import SQLMetaStore

__all__ = ["SQLMetaStore"]
