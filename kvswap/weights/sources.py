"""Where weights come from, and the reads that bring one rank's tensors in.

Two kinds of source sit behind a connector URI:

* a **kvswap save** (a ``manifest.json`` at the root, see :mod:`kvswap.weights.manifest`):
  a rank's reads are its chunks, each verified against the manifest's checksum;
* a plain **Hugging Face checkpoint** (``config.json`` plus ``*.safetensors``) on ``file://``
  or ``s3://``: a rank's reads are byte ranges of the safetensors files, sliced per rank
  on the fly (a shard split on dim 0 is a contiguous range; one split on the last dim is
  read whole and narrowed in host memory). safetensors files carry no checksum, so these
  reads are checked for size only.

A plan is a list of :class:`Read`; each copies its bytes into slices of named tensors
(:class:`Piece`). :func:`rank_plan` builds it; :mod:`kvswap.weights.load` executes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from kvswap.blob import DTYPE_NAMES, read_header
from kvswap.connectors import Connector, as_connector
from kvswap.errors import ConfigError, NotFoundError
from kvswap.uri import URI
from kvswap.weights.manifest import (
    ITEMSIZE,
    MANIFEST_KEY,
    Manifest,
    TensorEntry,
    read_manifest,
)
from kvswap.weights.tp import Split, check_divisible, pipeline_stage, split_for, tp_plan_for

# Weight formats that are not safetensors are never read (pickle) nor carried along.
SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
SKIPPED_FILES = ("model.safetensors.index.json",)
MERGE_GAP = 1 << 20  # ranges closer than this are fetched in one read


@dataclasses.dataclass(frozen=True)
class Piece:
    """``nbytes`` from ``src_offset`` of a read go to byte ``dst_offset`` of tensor ``name``."""

    name: str
    dst_offset: int
    src_offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Narrow:
    """A read holding a whole source tensor of which this rank takes a strided slice."""

    dtype: str
    shape: tuple[int, ...]
    split: Split
    tp: int
    tp_rank: int


@dataclasses.dataclass(frozen=True)
class Read:
    key: str
    offset: int
    length: int
    checksum: str | None
    pieces: tuple[Piece, ...]
    narrow: Narrow | None = None

    def describe(self) -> str:
        names = sorted({p.name for p in self.pieces})
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{self.key!r} (bytes {self.offset}..{self.offset + self.length}, holding {shown})"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str  # torch dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = ITEMSIZE[self.dtype]
        for dim in self.shape:
            size *= dim
        return size


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """What one rank loads: its tensors (rank-local shapes) and the reads that fill them."""

    source: str
    tensors: dict[str, TensorInfo]
    reads: tuple[Read, ...]
    tp: int
    pp: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def split_plan(plan: RankPlan, batch_bytes: int) -> list[RankPlan]:
    """``plan`` cut into plans of consecutive reads of about ``batch_bytes`` each; a batch's
    ``tensors`` are those its reads touch, so a tensor that spans a cut is in both."""
    batches: list[RankPlan] = []
    reads: list[Read] = []
    size = 0
    for read in plan.reads:
        reads.append(read)
        size += read.length
        if size >= batch_bytes:
            batches.append(_batch(plan, reads))
            reads, size = [], 0
    if reads:
        batches.append(_batch(plan, reads))
    return batches


def _batch(plan: RankPlan, reads: list[Read]) -> RankPlan:
    names = {p.name: plan.tensors[p.name] for r in reads for p in r.pieces if p.name in plan.tensors}
    return dataclasses.replace(plan, tensors=names, reads=tuple(reads))


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    key: str  # the safetensors file
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte range in the file
    end: int


class Checkpoint:
    """A Hugging Face checkpoint directory behind a connector: config and safetensors headers."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        keys = sorted(k for k in connector.list("") if "/" not in k)
        self.weight_files = [k for k in keys if k.endswith(".safetensors")]
        if not self.weight_files:
            raise NotFoundError(f"no *.safetensors files at {connector.uri.render()}: not a Hugging Face checkpoint")
        self.other_files = [k for k in keys if not k.endswith(SKIPPED_SUFFIXES) and k not in SKIPPED_FILES]
        try:
            self.config: dict[str, Any] = json.loads(bytes(connector.get("config.json")))
        except NotFoundError:
            self.config = {}
        self.tensors: dict[str, SourceTensor] = {}
        fingerprint = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for key in self.weight_files:
            header = read_header(connector, key)
            for name, spec in sorted(header.tensors.items(), key=lambda item: item[1].start):
                if name in self.tensors:
                    raise ConfigError(f"tensor {name!r} appears in both {self.tensors[name].key!r} and {key!r}")
                self.tensors[name] = SourceTensor(key, DTYPE_NAMES[spec.dtype], spec.shape,
                                                  header.data_offset + spec.start, header.data_offset + spec.end)
                fingerprint.update(f"{name}|{spec.dtype}|{spec.shape}|{spec.end - spec.start};".encode())
        self.fingerprint = f"sha256:{fingerprint.hexdigest()}"

    def layout(self, tp: int, pp: int, plan: dict[str, str] | None = None) -> dict[int, list[tuple[str, Split]]]:
        """Global rank -> its tensors (source order) and how each is split; checks divisibility."""
        if plan is None:  # with one TP rank every tensor is whole: no need for transformers' plan
            plan = tp_plan_for(self.config) if tp > 1 else {}
        num_layers = self.config.get("num_hidden_layers")
        if pp > 1 and not isinstance(num_layers, int):
            raise ConfigError("pp > 1 needs num_hidden_layers in config.json")
        ranks: dict[int, list[tuple[str, Split]]] = {r: [] for r in range(tp * pp)}
        for name, tensor in self.tensors.items():
            split = split_for(name, tensor.shape, plan)
            check_divisible(name, tensor.shape, split, tp, self.config)
            stage = pipeline_stage(name, num_layers, pp)
            for tp_rank in range(tp):
                ranks[stage * tp + tp_rank].append((name, split))
        return ranks


def open_source(connector: Connector) -> Manifest | Checkpoint:
    """The saved model's manifest, else the checkpoint directory, at ``connector``."""
    if connector.exists(MANIFEST_KEY):
        return read_manifest(connector)
    try:
        return Checkpoint(connector)
    except NotFoundError:
        raise NotFoundError(f"nothing to load at {connector.uri.render()}: no {MANIFEST_KEY} (a kvswap save, "
                            "or one that did not finish: the manifest is written last) and no *.safetensors") from None


@dataclasses.dataclass
class Opened:
    """A weights location opened once: its connector and what it holds (a save's manifest or
    a checkpoint's headers). :func:`~kvswap.weights.load.load`, ``read_files`` and
    ``model_files`` take one, so a boot that needs the files, a check and the weights reads
    the manifest (or the checkpoint's headers) once, all from the same save."""

    connector: Connector
    source: Manifest | Checkpoint

    @property
    def world_size(self) -> int:
        """How many ranks the source is split into (a checkpoint is sliced on the fly: 1)."""
        return self.source.world_size if isinstance(self.source, Manifest) else 1

    def close(self) -> None:
        self.connector.close()

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SEED_SCHEME = "instance"


def seed_uri(where: object) -> URI | None:
    """``where`` as a URI if it names a seed instance (``instance://host:port``), else None.

    The third kind of source, beside a save and a checkpoint: a running instance sends the
    tensors it holds (:mod:`kvswap.weights.seed`); nothing is opened here."""
    if isinstance(where, URI):
        return where if where.scheme == SEED_SCHEME else None
    if isinstance(where, str) and where[:len(SEED_SCHEME) + 3].lower() == f"{SEED_SCHEME}://":
        return URI.parse(where)
    return None


def open_location(where: str | URI | Connector) -> Opened:
    """Open ``where`` (a URI, a plain path, or a connector) and what it holds (a save's manifest
    or a checkpoint's headers). A seed (:func:`seed_uri`) is not opened: load reads it."""
    seed = seed_uri(where)
    if seed is not None:
        raise ConfigError(f"{seed}: a seed instance is read by kvswap.weights.load, not opened as a location")
    try:
        connector = as_connector(where, reading=True)
    except NotFoundError as exc:  # a file:// root that does not exist
        raise NotFoundError(f"nothing to load: {exc}") from None
    try:
        return Opened(connector, open_source(connector))
    except BaseException:
        if connector is not where:
            connector.close()
        raise


def rank_plan(source: Manifest | Checkpoint, rank: int, *, tp: int = 1, pp: int = 1,
              read_bytes: int = 32 << 20, where: str = "") -> RankPlan:
    """The reads that bring global ``rank``'s tensors in.

    For a save, ``tp``/``pp`` are checked against the manifest's (0 = take the saved ones);
    for a checkpoint they choose the slicing.
    """
    if isinstance(source, Manifest):
        for label, asked, saved in (("tp", tp, source.tp), ("pp", pp, source.pp)):
            if asked and asked != saved:
                raise ConfigError(f"{where or 'this save'} was saved for {label}={saved}; "
                                  f"asked to load {label}={asked}")
        entry = source.rank(rank)
        stored = {t.name: TensorInfo(t.dtype, t.shape) for t in entry.tensors}
        chunk_reads, start = [], 0
        for chunk in entry.chunks:
            pieces = _pieces(_stream_ranges(entry.tensors), start, start + chunk.size)
            chunk_reads.append(Read(chunk.key, 0, chunk.size, chunk.checksum, tuple(pieces)))
            start += chunk.size
        return RankPlan(where, stored, tuple(chunk_reads), source.tp, source.pp)
    tp, pp = tp or 1, pp or 1
    if not 0 <= rank < tp * pp:
        raise ConfigError(f"rank {rank} is outside tp={tp} x pp={pp}")
    tp_rank = rank % tp
    owned = source.layout(tp, pp)[rank]
    tensors: dict[str, TensorInfo] = {}
    contiguous: dict[str, list[tuple[str, int, int, int]]] = {}  # file -> (name, dst, src, nbytes)
    reads: list[Read] = []
    for name, split in owned:
        src = source.tensors[name]
        shard_shape = split.shard_shape(src.shape, tp)
        tensors[name] = TensorInfo(src.dtype, shard_shape)
        nbytes = tensors[name].nbytes
        if split.dim is None or tp == 1:
            contiguous.setdefault(src.key, []).append((name, 0, src.start, nbytes))
        elif split.dim == 0 and not split.packed:
            contiguous.setdefault(src.key, []).append((name, 0, src.start + tp_rank * nbytes, nbytes))
        elif split.dim == 0:  # packed halves: this rank's slice of each half
            half = (src.end - src.start) // 2
            for h in range(2):
                contiguous.setdefault(src.key, []).append(
                    (name, h * nbytes // 2, src.start + h * half + tp_rank * nbytes // 2, nbytes // 2))
        else:
            reads.append(Read(src.key, src.start, src.end - src.start, None, (Piece(name, 0, 0, nbytes),),
                              Narrow(src.dtype, src.shape, split, tp, tp_rank)))
    for key, ranges in contiguous.items():
        reads.extend(_coalesce(key, sorted(ranges, key=lambda r: r[2]), read_bytes))
    return RankPlan(where, tensors, tuple(reads), tp, pp)


def _stream_ranges(tensors: Sequence[TensorEntry]) -> list[tuple[str, int, int, int]]:
    return [(t.name, 0, t.offset, t.nbytes) for t in tensors]


def _pieces(ranges: Iterable[tuple[str, int, int, int]], start: int, end: int) -> list[Piece]:
    """The parts of ``ranges`` (name, dst, src, nbytes) that fall in [start, end), relative to start."""
    pieces = []
    for name, dst, src, nbytes in ranges:
        lo, hi = max(src, start), min(src + nbytes, end)
        if lo < hi:
            pieces.append(Piece(name, dst + lo - src, lo - start, hi - lo))
    return pieces


def _coalesce(key: str, ranges: list[tuple[str, int, int, int]], read_bytes: int) -> list[Read]:
    """Reads of at most ``read_bytes`` covering sorted ``ranges`` of one file."""
    reads: list[Read] = []
    group: list[tuple[str, int, int, int]] = []
    lo = hi = 0

    def flush() -> None:
        if group:
            reads.append(Read(key, lo, hi - lo, None, tuple(_pieces(group, lo, hi))))

    for item in ranges:
        _, _, src, nbytes = item
        if group and (src - hi > MERGE_GAP or src + nbytes - lo > read_bytes):
            flush()
            group = []
        if not group:
            lo = src
        group.append(item)
        hi = src + nbytes
        while hi - lo > read_bytes:  # a range longer than a read: cut it
            reads.append(Read(key, lo, read_bytes, None, tuple(_pieces(group, lo, lo + read_bytes))))
            lo += read_bytes
        # what is left of the group now lies in [lo, hi)
    flush()
    return reads

