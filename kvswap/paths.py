"""Where kvswap keeps its local files (prepared models, remembered digests)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$KVSWAP_CACHE``, default ``~/.cache/kvswap``."""
    return Path(os.environ.get("KVSWAP_CACHE") or Path.home() / ".cache" / "kvswap")
