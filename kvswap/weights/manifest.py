"""The manifest of a saved model: what each rank holds, where, and its checksums.

A saved model under a connector has these keys::

    manifest.json                 written last: its presence means the save is whole
    ranks/{rank:05d}/{save}-{i:06d}   rank's chunks: its tensors' bytes back to back
    files/{name}                  config, tokenizer and other non-weight files, as is

Each rank's tensors are laid end to end in manifest order (a byte stream) and the stream
is cut into chunks of at most ``chunk_bytes``; a tensor may span chunks and a chunk may
hold many tensors. Every chunk and file carries an ``xxh3_128`` checksum. ``save`` is a
fresh id per save, so a new save never mixes with an old one's chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from kvswap.blob import ITEMSIZE
from kvswap.errors import ConfigError, IntegrityError, NotFoundError

MANIFEST_KEY = "manifest.json"
FORMAT = "kvswap-weights/1"



def chunk_key(rank: int, save_id: str, index: int) -> str:
    return f"ranks/{rank:05d}/{save_id}-{index:06d}"


def file_key(name: str) -> str:
    return f"files/{name}"


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a rank: ``offset`` is where its bytes start in the rank's stream."""

    name: str
    dtype: str  # torch dtype name: "bfloat16", ...
    shape: tuple[int, ...]
    offset: int
    split: str = "replicated"  # the TP plan's style
    split_dim: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclasses.dataclass(frozen=True)
class ChunkEntry:
    key: str
    size: int
    checksum: str  # "xxh3_128:<hex>"


@dataclasses.dataclass(frozen=True)
class RankEntry:
    rank: int
    tp_rank: int
    pp_rank: int
    tensors: tuple[TensorEntry, ...]
    chunks: tuple[ChunkEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.size for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    name: str
    key: str
    size: int
    checksum: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a loader needs to know before it reads a byte of weights."""

    tp: int
    pp: int
    chunk_bytes: int
    save_id: str
    source_fingerprint: str
    ranks: tuple[RankEntry, ...]
    files: tuple[FileEntry, ...]
    created: float = 0.0
    format: str = FORMAT

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, rank: int) -> RankEntry:
        if not 0 <= rank < len(self.ranks):
            raise ConfigError(f"rank {rank} is outside this save's world of {len(self.ranks)} "
                              f"(tp={self.tp}, pp={self.pp})")
        return self.ranks[rank]

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = MANIFEST_KEY) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise IntegrityError(f"{where}: format {raw.get('format')!r}; this kvswap reads {FORMAT!r}")
            ranks = tuple(RankEntry(r["rank"], r["tp_rank"], r["pp_rank"],
                                    tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"],
                                                      t["split"], t["split_dim"]) for t in r["tensors"]),
                                    tuple(ChunkEntry(**c) for c in r["chunks"]))
                          for r in raw["ranks"])
            files = tuple(FileEntry(**f) for f in raw["files"])
            manifest = cls(raw["tp"], raw["pp"], raw["chunk_bytes"], raw["save_id"], raw["source_fingerprint"],
                           ranks, files, raw.get("created", 0.0))
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"{where} is not a valid kvswap weights manifest: {exc}") from None
        for rank in manifest.ranks:
            stream = sum(t.nbytes for t in rank.tensors)
            if stream != rank.nbytes or any(t.dtype not in ITEMSIZE for t in rank.tensors):
                raise IntegrityError(f"{where}: rank {rank.rank}'s tensors ({stream} bytes) do not match "
                                     f"its chunks ({rank.nbytes} bytes)")
        return manifest


def read_manifest(connector: Any) -> Manifest:
    """The manifest under ``connector``; :class:`NotFoundError` says the save is missing or
    unfinished (the manifest is written last)."""
    try:
        data = bytes(connector.get(MANIFEST_KEY))
    except NotFoundError:
        raise NotFoundError(f"no kvswap weights manifest at {connector.uri.render()}: nothing saved there, "
                            "or a save that did not finish (the manifest is written last)") from None
    return Manifest.from_json(data, f"{connector.uri.render()}/{MANIFEST_KEY}")
