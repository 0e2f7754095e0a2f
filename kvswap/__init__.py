"""kvswap: KV-cache swapping for LLM chat sessions and fast weight loading, over one storage layer."""

from kvswap.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    InvalidKeyError,
    KVSwapError,
    NotFoundError,
    StorageFullError,
    UnsupportedFormatError,
    VersionConflictError,
)
from kvswap.uri import URI

__version__ = "0.1.0"

__all__ = [
    "URI",
    "AlreadyExistsError",
    "BackendUnavailableError",
    "ConfigError",
    "IntegrityError",
    "InvalidKeyError",
    "KVSwapError",
    "NotFoundError",
    "StorageFullError",
    "UnsupportedFormatError",
    "VersionConflictError",
]
