"""Spans of a tensor-parallel engine: one meta entry per span, one blob per rank.

Each rank of a tensor-parallel engine holds the KV of its own heads, so a span of a session is
one blob per rank, all written by the same save. Meta holds one entry per span (token range,
prefix hash, the rank blobs' size) whose ``key`` is rank 0's blob and whose ``checksum`` is
:func:`combined_checksum` of the ranks' blob checksums in rank order, ``tp<n>:xxh3_128:<hex>``
(the rank count first: whoever deletes the entry finds every rank's blob from it). Rank ``r``
reads ``rank_key(key, r)``; each blob is verified on its rank (its own checksum, fingerprint,
span, prefix hash and shapes), and the ranks' checksums together against the entry where the
ranks' reports meet (vLLM's scheduler) before any of it is used. With one rank, an entry is
exactly its blob's (key and checksum), as kvswap's own engine writes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import xxhash

from kvswap.meta import Entry, EntrySpec
from kvswap.session_cache.base import UNWRITTEN

#: A rank's view of an entry holds this in place of a checksum: the rank's blob is checked by
#: its own checksum, and the ranks' checksums against the entry's where they meet.
RANKS_CHECKSUM = "ranks"
_SUFFIX = re.compile(r"\.r(\d+)$")
_COMBINED = re.compile(r"^tp(\d+):")


def rank_key(key: str, rank: int) -> str:
    """The key of rank ``rank``'s blob of the span whose entry key is ``key`` (rank 0's)."""
    return key if rank == 0 else f"{key}.r{rank}"


def entry_key(key: str) -> str:
    """The entry key a rank's blob key belongs to (a key without a rank suffix is its own)."""
    return _SUFFIX.sub("", key)


def rank_count(entry: EntrySpec | Entry) -> int:
    """How many rank blobs the entry's span has (1 for an entry of a one-rank engine)."""
    found = _COMBINED.match(entry.checksum)
    return int(found.group(1)) if found else 1


def blob_keys(entry: EntrySpec | Entry) -> list[str]:
    """Every blob key of the entry's span."""
    return [rank_key(entry.key, rank) for rank in range(rank_count(entry))]


def combined_checksum(checksums: Sequence[str]) -> str:
    """The entry checksum of a span whose rank blobs have ``checksums`` (rank order)."""
    return f"tp{len(checksums)}:xxh3_128:{xxhash.xxh3_128_hexdigest(chr(10).join(checksums).encode())}"


def rank_view(entry: Entry, rank: int, ranks: int) -> Entry:
    """What rank ``rank`` of ``ranks`` reads for ``entry``: its own blob, checked by the blob's
    own checksum (:data:`RANKS_CHECKSUM`); the entry itself when there is one rank."""
    if ranks == 1:
        return entry
    return entry._replace(key=rank_key(entry.key, rank),
                          checksum=UNWRITTEN if entry.checksum == UNWRITTEN else RANKS_CHECKSUM)


def joined(per_rank: Sequence[Sequence[EntrySpec]]) -> list[EntrySpec]:
    """The entries to commit for a span written by every rank (``per_rank[r]``: rank ``r``'s
    blobs, in token order). ValueError when the ranks did not write the same spans."""
    if len(per_rank) == 1:
        return list(per_rank[0])
    first = per_rank[0]
    specs = []
    for position, spec in enumerate(first):
        blobs = [rank[position] if position < len(rank) else None for rank in per_rank]
        for rank, blob in enumerate(blobs):
            if (blob is None or blob.key != rank_key(spec.key, rank) or blob.size != spec.size
                    or (blob.token_offset, blob.token_length, blob.prefix_hash)
                    != (spec.token_offset, spec.token_length, spec.prefix_hash)):
                raise ValueError(f"rank {rank} did not write the span of {spec.key!r} as rank 0 did")
        specs.append(spec._replace(checksum=combined_checksum([rank[position].checksum for rank in per_rank])))
    if any(len(rank) != len(first) for rank in per_rank):
        raise ValueError("the ranks wrote different numbers of spans")
    return specs
