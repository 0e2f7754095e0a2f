"""The storage stack a process opens, from one settings object: ``kvswap serve``, the vLLM
connector's two halves, ``kvswap demo`` and the benchmarks all go through
:meth:`StackSettings.open`, and the :class:`~kvswap.session_cache.store.SessionStore` it returns
owns what it opened (its ``close()`` closes the meta store and the connectors).

>>> settings = StackSettings.resolve(None, None, "/tmp/kvswap-demo")  # $KVSWAP_META / $KVSWAP_STORE, else files
>>> store = settings.open(layout)                                     # meta + connectors, owned
>>> store.close()                                                     # closes them
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from kvswap.connectors import Connector, open_connector
from kvswap.errors import ConfigError
from kvswap.meta import MetaStore, open_meta_store
from kvswap.paths import stack_uris
from kvswap.session_cache.base import DEFAULT_ENTRY_BYTES, KVLayout, entry_tokens_within
from kvswap.session_cache.store import SessionStore
from kvswap.uri import URI


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """Where sessions' KV and meta live, and how entries are cut (one object per process).

    ``meta``: a meta store URI; ``stores``: connector URIs (new KV goes to the first);
    ``entry_bytes``: the most bytes of one stored entry (a span is cut into entries, written and
    read in parallel by ``io_threads``); ``session_ttl``: given to sessions created;
    ``span_cache_bytes``: recent spans kept in host memory by a store that moves data only
    (the vLLM worker's host tier; ``kvswap serve``'s host tier keeps whole sessions, in its
    :class:`~kvswap.session_cache.SessionCache`).
    """

    meta: str
    stores: tuple[str, ...]
    entry_bytes: int = DEFAULT_ENTRY_BYTES
    io_threads: int = 8
    session_ttl: float | None = None
    span_cache_bytes: int = 0

    @classmethod
    def resolve(cls, meta: str | None, stores: str | Sequence[str] | None, directory: str,
                **settings: object) -> StackSettings:
        """Settings from a flag's or a setting's URIs, else ``$KVSWAP_META`` / ``$KVSWAP_STORE``,
        else SQLite and a file store under ``directory`` (created when used). Every URI is
        parsed now: a malformed one fails the start, in one line."""
        meta_uri, store_uris = stack_uris(meta, None if stores is None else
                                          (stores if isinstance(stores, str) else list(stores)), directory)
        if not store_uris or not all(store_uris):
            raise ConfigError("store must be a URI or a non-empty list of URIs")
        for uri in (meta_uri, *store_uris):
            URI.parse(uri)
        if any(directory in uri for uri in (meta_uri, *store_uris)):
            os.makedirs(directory, exist_ok=True)
        return cls(meta_uri, tuple(store_uris), **settings)  # type: ignore[arg-type]

    def __repr__(self) -> str:  # URIs without their passwords
        return (f"StackSettings(meta={_shown(self.meta)!r}, stores={[_shown(s) for s in self.stores]!r}, "
                f"entry_bytes={self.entry_bytes}, span_cache_bytes={self.span_cache_bytes})")

    def entry_tokens(self, layout: KVLayout, minimum: int = 1) -> int:
        """Tokens of one entry of ``layout`` (at least ``minimum``: a block)."""
        return entry_tokens_within(self.entry_bytes, layout, minimum)

    def open(self, layout: KVLayout | None, *, with_meta: bool = True, minimum_entry_tokens: int = 1,
             check: bool = False) -> SessionStore:
        """Open the meta store (unless ``with_meta`` is False: a store that moves data only)
        and the connectors; the returned store owns them. With ``check``, one round trip to
        each (:meth:`SessionStore.check`): a server that is down fails here, in one line. On
        any failure what was opened is closed and the error raised."""
        opened: list[MetaStore | Connector] = []
        try:
            meta = open_meta_store(self.meta) if with_meta else None
            if meta is not None:
                opened.append(meta)
            for uri in self.stores:
                opened.append(open_connector(uri))
        except BaseException:
            for backend in opened:
                backend.close()
            raise
        connectors = [backend for backend in opened if isinstance(backend, Connector)]
        entry_tokens = self.entry_tokens(layout, minimum_entry_tokens) if layout is not None else None
        store = SessionStore(meta, connectors, layout, io_threads=self.io_threads, entry_tokens=entry_tokens,
                             session_ttl=self.session_ttl, span_cache_bytes=self.span_cache_bytes, owns_backends=True)
        if check:
            try:
                store.check()
            except BaseException:
                store.close()
                raise
        return store


def _shown(uri: str) -> str:
    try:
        return URI.parse(uri).render()
    except ConfigError:
        return "<unparsable URI>"
