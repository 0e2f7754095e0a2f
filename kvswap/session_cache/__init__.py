"""The session cache: sessions' KV in a paged pool, swapped between HBM, host memory and stores.

>>> from kvswap.session_cache import KVLayout, PagedKVPool, SessionCache
>>> from kvswap.meta import open_meta_store
>>> from kvswap.connectors import open_connector
>>> layout = KVLayout("my-model@rev", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")
>>> pool = PagedKVPool(layout, num_blocks=64, block_size=16)
>>> cache = SessionCache(pool, open_meta_store("memkv://"), [open_connector("mem://")])
"""

from kvswap.errors import SessionBusyError
from kvswap.session_cache.base import (
    KVLayout,
    KVPool,
    OutOfBlocksError,
    Policy,
    SwapError,
    chain_hash,
    prefix_hashes,
    root_hash,
)
from kvswap.session_cache.handle import CacheStats, LocalState, SessionHandle
from kvswap.session_cache.manager import SessionCache
from kvswap.session_cache.pool import PagedKVPool
from kvswap.session_cache.stack import StackSettings
from kvswap.session_cache.store import SessionStore
from kvswap.session_cache.tiers import HostTier, Plan, Span, StoreTier, store_location
from kvswap.session_cache.transfer import KVMover

__all__ = ["CacheStats", "HostTier", "KVLayout", "KVMover", "KVPool", "LocalState", "OutOfBlocksError", "PagedKVPool",
           "Plan", "Policy", "SessionBusyError", "SessionCache", "SessionHandle", "SessionStore", "Span",
           "StackSettings", "StoreTier", "SwapError", "chain_hash", "prefix_hashes", "root_hash", "store_location"]
