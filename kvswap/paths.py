"""Where kvswap keeps its local files (prepared models, remembered digests)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$KVSWAP_CACHE``, default ``~/.cache/kvswap``."""
    return Path(os.environ.get("KVSWAP_CACHE") or Path.home() / ".cache" / "kvswap")


#: The environment every kvswap process reads its storage stack from, when no flag or setting names it.
META_ENV, STORE_ENV = "KVSWAP_META", "KVSWAP_STORE"


def stack_uris(meta: str | None, stores: str | list[str] | tuple[str, ...] | None,
               directory: str) -> tuple[str, list[str]]:
    """The meta URI and store URIs a process uses, by one rule for all of them (``kvswap
    serve``, the vLLM connector, the CLI): what the flag or setting gives, else ``$KVSWAP_META``
    / ``$KVSWAP_STORE`` (comma separated), else SQLite and a file store under ``directory``."""
    chosen = stores or os.environ.get(STORE_ENV) or f"file://{directory}/kv"
    store_list = [s.strip() for s in chosen.split(",")] if isinstance(chosen, str) else list(chosen)
    return meta or os.environ.get(META_ENV) or f"sqlite:///{directory}/meta.db", store_list
