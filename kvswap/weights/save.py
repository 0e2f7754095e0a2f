"""Save a Hugging Face checkpoint through a connector, split per tensor-parallel rank.

``save(src, dest, tp=2)`` reads the checkpoint at ``src`` (a directory or any connector
URI holding ``config.json`` and ``*.safetensors``), and writes under ``dest``:

1. the non-weight files (config, tokenizer, generation config...; binary ones too) as is;
2. each global rank's chunks (:mod:`kvswap.weights.manifest`), several in parallel; a
   chunk's bytes come straight from the source file ranges of its tensors (a shard split
   on the last dim is read whole once and narrowed in memory);
3. the manifest, last.

An existing manifest at ``dest`` is deleted first, so a save that dies midway leaves no
manifest: loaders refuse it as unfinished instead of reading a mix. After the new manifest
is published, every chunk and file it does not name is deleted: those of the save it
replaced and those that earlier saves killed midway left (:func:`collect_garbage`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any

from kvswap.blob import checksum
from kvswap.connectors import Connector, as_connector
from kvswap.errors import ConfigError, IntegrityError, KVSwapError
from kvswap.uri import URI
from kvswap.weights.manifest import (
    MANIFEST_KEY,
    ChunkEntry,
    FileEntry,
    Manifest,
    RankEntry,
    TensorEntry,
    chunk_key,
    file_key,
    read_manifest,
)
from kvswap.weights.sources import Checkpoint, Split
from kvswap.weights.tp import shard

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 << 20


@dataclasses.dataclass
class _Segment:
    """Bytes [start, end) of a tensor's shard, placed at ``at`` in a chunk."""

    name: str
    split: Split
    start: int
    end: int
    at: int


def save(src: str | URI | Connector, dest: str | URI | Connector, *, tp: int = 1, pp: int = 1,
         chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int = 8, tp_plan: dict[str, str] | None = None,
         progress: bool | None = None) -> Manifest:
    """Save the checkpoint at ``src`` under ``dest`` for ``tp`` x ``pp`` ranks; returns the manifest.

    ``tp_plan`` overrides the plan transformers declares for the model (module pattern ->
    ``colwise`` / ``rowwise`` / other = replicated). ``progress`` None shows a bar on a tty.
    """
    from tqdm.auto import tqdm

    if tp < 1 or pp < 1 or chunk_bytes < 1:
        raise ValueError("tp, pp and chunk_bytes must be positive")
    source, target = as_connector(src, reading=True), as_connector(dest)
    checkpoint = Checkpoint(source)
    layout = checkpoint.layout(tp, pp, tp_plan)
    target.delete(MANIFEST_KEY)  # from here on, loaders see no save until the new one is whole
    save_id = uuid.uuid4().hex[:12]

    files = [_copy_file(source, target, name) for name in checkpoint.other_files]
    ranks_plan = []
    for rank, owned in layout.items():
        entries, offset = [], 0
        for name, split in owned:
            tensor = checkpoint.tensors[name]
            shape = split.shard_shape(tensor.shape, tp)
            entry = TensorEntry(name, tensor.dtype, shape, offset, split.style, split.dim)
            entries.append(entry)
            offset += entry.nbytes
        ranks_plan.append((rank, entries, offset))
    total = sum(size for _, _, size in ranks_plan)
    narrowed = _NarrowedShards(checkpoint, tp)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"save tp={tp} pp={pp}",
               disable=None if progress is None else not progress)
    ranks: list[RankEntry] = []
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kvswap-save") as pool, bar:
        for rank, entries, size in ranks_plan:
            splits = dict(layout[rank])
            chunk_segments = []
            for start in range(0, size, chunk_bytes):
                end = min(start + chunk_bytes, size)
                segments = [_Segment(e.name, splits[e.name], max(e.offset, start) - e.offset,
                                     min(e.offset + e.nbytes, end) - e.offset, max(e.offset, start) - start)
                            for e in entries if e.offset < end and e.offset + e.nbytes > start]
                narrowed.need(segments, rank % tp)
                chunk_segments.append((end - start, segments))
            jobs = [pool.submit(_write_chunk, checkpoint, target, chunk_key(rank, save_id, index), length, segments,
                                rank % tp, narrowed, bar)
                    for index, (length, segments) in enumerate(chunk_segments)]
            chunks = tuple(job.result() for job in jobs)
            ranks.append(RankEntry(rank, rank % tp, rank // tp, tuple(entries), chunks))
    manifest = Manifest(tp, pp, chunk_bytes, save_id, checkpoint.fingerprint, tuple(ranks), tuple(files),
                        time.time())
    target.put(MANIFEST_KEY, manifest.to_json())
    log.info("saved %d bytes for tp=%d pp=%d to %s in %.1f s", total, tp, pp, target.uri.render(),
             time.perf_counter() - began)
    removed = collect_garbage(target, manifest)
    if removed:
        log.info("deleted %d chunks and files of earlier or unfinished saves at %s", removed, target.uri.render())
    return manifest


def collect_garbage(target: str | URI | Connector, manifest: Manifest | None = None) -> int:
    """Delete the chunks and files under a save's location that its manifest does not name
    (those of the save it replaced, and of saves killed midway, which never wrote a
    manifest); return how many. Without a manifest there is no save to keep: nothing is
    deleted (a save may be in progress), and ConfigError says so."""
    connector = as_connector(target)
    try:
        if manifest is None:
            try:
                manifest = read_manifest(connector)
            except KVSwapError as exc:
                raise ConfigError(f"no whole save at {connector.uri.render()} ({exc}); nothing is collected "
                                  "while a save may be in progress: save again (it cleans up) or delete the "
                                  "location") from None
        named = {c.key for r in manifest.ranks for c in r.chunks} | {f.key for f in manifest.files}
        stale = [key for prefix in ("ranks/", "files/") for key in connector.list(prefix) if key not in named]
        connector.delete_many(stale)
        return len(stale)
    finally:
        if connector is not target:
            connector.close()


def _copy_file(source: Connector, target: Connector, name: str) -> FileEntry:
    data = bytes(source.get(name))
    target.put(file_key(name), data)
    return FileEntry(name, file_key(name), len(data), checksum(data))


class _NarrowedShards:
    """Shards split on the last dim, read whole once and kept while chunks still need them."""

    def __init__(self, checkpoint: Checkpoint, tp: int) -> None:
        self.checkpoint, self.tp = checkpoint, tp
        self._lock = threading.Lock()
        self._users: dict[tuple[str, int], int] = {}
        self._shards: dict[tuple[str, int], concurrent.futures.Future] = {}

    def need(self, segments: list[_Segment], tp_rank: int) -> None:
        """Count the chunks that will ask for each strided shard (before any asks)."""
        with self._lock:
            for segment in segments:
                if _strided(segment.split, self.tp):
                    key = (segment.name, tp_rank)
                    self._users[key] = self._users.get(key, 0) + 1

    def get(self, name: str, split: Split, tp_rank: int) -> Any:
        """The shard as a contiguous uint8 tensor; the first caller reads it, others wait."""
        import torch

        with self._lock:
            found = self._shards.get((name, tp_rank))
            owner = found is None
            future = self._shards.setdefault((name, tp_rank), concurrent.futures.Future()) if owner else found
            assert future is not None
        if owner:
            try:
                tensor = self.checkpoint.tensors[name]
                raw = torch.empty(tensor.end - tensor.start, dtype=torch.uint8)
                got = self.checkpoint.connector.get_into(tensor.key, raw.numpy(), offset=tensor.start)
                if got != raw.numel():
                    raise IntegrityError(f"{tensor.key!r} is truncated inside tensor {name!r}")
                full = raw.view(getattr(torch, tensor.dtype)).reshape(tensor.shape)
                future.set_result(shard(full, split, self.tp, tp_rank).contiguous().reshape(-1).view(torch.uint8))
            except BaseException as exc:  # noqa: BLE001 - handed to the future's waiters
                future.set_exception(exc)
        return future.result()

    def done(self, name: str, tp_rank: int) -> None:
        with self._lock:
            self._users[(name, tp_rank)] -= 1
            if self._users[(name, tp_rank)] == 0:
                self._shards.pop((name, tp_rank), None)


def _strided(split: Split, tp: int) -> bool:
    return tp > 1 and split.dim is not None and (split.dim != 0 or split.packed)


def _write_chunk(checkpoint: Checkpoint, target: Connector, key: str, size: int, segments: list[_Segment],
                 tp_rank: int, narrowed: _NarrowedShards, bar: Any) -> ChunkEntry:
    import torch

    buffer = torch.empty(size, dtype=torch.uint8)
    view = buffer.numpy()
    for segment in segments:
        length = segment.end - segment.start
        tensor = checkpoint.tensors[segment.name]
        if _strided(segment.split, narrowed.tp):
            piece = narrowed.get(segment.name, segment.split, tp_rank)
            view[segment.at:segment.at + length] = piece[segment.start:segment.end].numpy()
            narrowed.done(segment.name, tp_rank)
            continue
        base = tensor.start
        if segment.split.dim == 0 and narrowed.tp > 1:
            base += tp_rank * (tensor.end - tensor.start) // narrowed.tp
        got = checkpoint.connector.get_into(tensor.key, view[segment.at:segment.at + length],
                                            offset=base + segment.start)
        if got != length:
            raise IntegrityError(f"{tensor.key!r} is truncated inside tensor {segment.name!r}")
    digest = checksum(view.data)
    target.put(key, view.data, mode="create")
    bar.update(size)
    return ChunkEntry(key, size, digest)
