"""Load one rank's weights into a model: parallel fetches, verified, overlapped with device copies.

``load(model, uri, rank=r)`` works from a kvswap save (:mod:`kvswap.weights.save`), a plain
Hugging Face checkpoint on ``file://`` or ``s3://`` (sliced per rank on the fly) or a seed
instance (``instance://host:port``, :mod:`kvswap.weights.seed`). The model may be built on
the meta device (it is materialised on ``device`` first) or already hold tensors.

Before any byte moves, the plan's names, shapes and dtypes are checked against the
model's parameters and persistent buffers: a mismatch is a :class:`ConfigError` naming
the tensor. Then ``threads`` workers fetch reads (chunks, or coalesced file ranges) into
a ring of pinned host buffers and verify their checksums, while the caller's thread
copies each finished buffer to the device on a side CUDA stream; a buffer is reused once
its copy's event has completed. A checksum mismatch or a truncated read is an
:class:`IntegrityError` naming the tensors involved; after an error the model's contents
are undefined (load again).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from kvswap.blob import checksum
from kvswap.device import resolve_device
from kvswap.errors import IntegrityError, NotFoundError
from kvswap.uri import URI
from kvswap.weights.manifest import Manifest
from kvswap.weights.sources import Opened, RankPlan, Read, open_location, rank_plan, seed_uri, split_plan
from kvswap.weights.targets import (
    LoadResult,
    LoadStats,
    Target,
    bind_targets,
    device_of,
)
from kvswap.weights.tp import shard

if TYPE_CHECKING:
    import torch

DEFAULT_READ_BYTES = 32 << 20


def load(target: Target, uri: str | URI | Opened, *, rank: int = 0, tp: int = 0, pp: int = 0,
         device: str | torch.device | None = None, threads: int = 8, read_bytes: int = DEFAULT_READ_BYTES,
         progress: bool | None = None, strict: bool = True, token: str | None = None, timeout: float = 120.0,
         on_progress: Callable[[int, int], None] | None = None, digest: bool = True) -> LoadResult:
    """Load global ``rank``'s weights from ``uri`` into ``target``.

    ``target``: a model (parameters and persistent buffers by name; meta tensors are
    materialised on ``device``), a mapping of name -> tensor to fill, or None (tensors are
    allocated on ``device``, default CPU). ``tp``/``pp``: for a save, the layout the caller
    expects (0 = whatever was saved; a difference is an error); for a checkpoint, how to
    slice it. ``strict``: every tensor of the model must come from the source and every
    source tensor must land in the model. ``token``/``timeout`` are for ``instance://`` (a seed
    sends the tensors it holds, its own rank's: ``rank``/``tp``/``pp`` do not apply).
    ``on_progress(done_bytes, total_bytes)`` is called after each read lands. ``digest=False``
    skips hashing reads that carry no checksum (plain checkpoints: ~28% of a warm 8B load on
    an H200) and leaves ``stats.digest`` empty for them.
    """
    seed = seed_uri(uri)
    if seed is not None:
        from kvswap.weights.seed import load_from_seed

        return load_from_seed(target, seed, device=device, token=token, timeout=timeout, strict=strict,
                              progress=progress, on_progress=on_progress)

    began = time.perf_counter()
    opened = uri if isinstance(uri, Opened) else open_location(uri)
    connector, source = opened.connector, opened.source
    try:
        where = connector.uri.render()
        plan = rank_plan(source, rank, tp=tp, pp=pp, read_bytes=read_bytes, where=where)
        device = resolve_device(device) if device is not None else device_of(target)
        tensors = bind_targets(target, plan.tensors, device, strict=strict,
                               hint=_layout_hint(source, plan))
        stats = LoadStats(where, rank, len(plan.tensors), plan.nbytes, threads=threads,
                          plan_seconds=time.perf_counter() - began)
        shared = _Shared(stats, _read_total(plan, tensors), progress, on_progress)
        try:
            shared.finish(_execute(connector, plan, tensors, device, threads, shared, digest))
        finally:
            shared.bar.close()
    finally:
        if opened is not uri:  # the caller's Opened stays open
            opened.close()
    stats.seconds = time.perf_counter() - began
    return LoadResult(tensors, stats)


class TensorStream:
    """One rank's weights as ``(name, tensor)`` pairs on ``device``, in batches of about
    ``batch_bytes``: the next batch is fetched, verified and copied (on a thread of its own)
    while the caller consumes this one, so a model's own ``load_weights`` can take tensors
    straight from the GPU while the device holds at most ~3 batches beside the model.

    Iterate it once; ``stats`` is complete when the iteration ends. Closing the iterator
    early (or an error in the consumer) stops the loading thread after its current batch.
    A stream opened from a URI closes its connector at the end; an ``Opened`` stays open.
    """

    def __init__(self, uri: str | URI | Opened, *, rank: int = 0, device: str | torch.device | None = None,
                 threads: int = 8, read_bytes: int = DEFAULT_READ_BYTES, batch_bytes: int = 1 << 30,
                 progress: bool | None = None) -> None:
        self._began = time.perf_counter()
        self._owned = not isinstance(uri, Opened)
        self.opened = open_location(uri) if not isinstance(uri, Opened) else uri
        try:
            where = self.opened.connector.uri.render()
            self.plan = rank_plan(self.opened.source, rank, read_bytes=read_bytes, where=where)
            self.device = resolve_device(device)
        except BaseException:
            self.close()
            raise
        self.threads, self.batch_bytes, self.progress = threads, batch_bytes, progress
        self.stats = LoadStats(where, rank, len(self.plan.tensors), self.plan.nbytes, threads=threads,
                               plan_seconds=time.perf_counter() - self._began)

    def close(self) -> None:
        """Close the source if this stream opened it (iterating to the end does it too); once."""
        if self._owned:
            self._owned = False
            self.opened.close()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        import queue
        import threading

        import torch

        ready: queue.Queue[dict[str, torch.Tensor] | BaseException | None] = queue.Queue(maxsize=1)
        stop = threading.Event()
        shared = _Shared(self.stats, _read_total(self.plan, self.plan.tensors), self.progress, None)

        def offer(item: dict[str, torch.Tensor] | BaseException | None) -> None:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.1)
                    return

        def produce() -> None:
            try:
                left = {name: info.nbytes for name, info in self.plan.tensors.items()}
                started: dict[str, torch.Tensor] = {}  # tensors begun in an earlier batch
                with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                    for batch in split_plan(self.plan, self.batch_bytes):
                        if stop.is_set():
                            return
                        new = bind_targets(None, {n: i for n, i in batch.tensors.items() if n not in started},
                                           self.device)
                        tensors = {name: started[name] if name in started else new[name] for name in batch.tensors}
                        _execute(self.opened.connector, batch, tensors, self.device, self.threads, shared, False)
                        for read in batch.reads:
                            for piece in read.pieces:
                                left[piece.name] -= piece.nbytes
                        started = {n: t for n, t in tensors.items() if left[n] > 0}
                        offer({n: t for n, t in tensors.items() if left[n] <= 0})
                offer(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                offer(exc)

        worker = threading.Thread(target=produce, name="kvswap-load-stream", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                while item:
                    yield item.popitem()  # the batch lets go of each tensor as it is handed over
        finally:
            stop.set()
            worker.join()
            shared.bar.close()
            self.close()
            self.stats.seconds = time.perf_counter() - self._began


def _read_total(plan: RankPlan, tensors: MutableMapping[str, Any]) -> int:
    return sum(r.length for r in plan.reads if any(p.name in tensors for p in r.pieces))


def _layout_hint(source: Manifest | Any, plan: RankPlan) -> str:
    kind = "saved" if isinstance(source, Manifest) else "sliced"
    return f" (the source is {kind} for tp={plan.tp}, pp={plan.pp}: is the model built for the same layout?)"


def read_files(uri: str | URI | Opened) -> dict[str, bytes]:
    """The non-weight files of a save (config, tokenizer...), checksums verified."""
    opened = uri if isinstance(uri, Opened) else open_location(uri)
    try:
        connector, manifest = opened.connector, opened.source
        if not isinstance(manifest, Manifest):
            raise NotFoundError(f"{connector.uri.render()} holds a checkpoint, not a kvswap save: no saved files")
        files = {}
        for entry in manifest.files:
            try:
                data = bytes(connector.get(entry.key))
            except NotFoundError:
                raise IntegrityError(f"file {entry.name!r} of the save is missing ({entry.key!r})") from None
            if checksum(data) != entry.checksum:
                raise IntegrityError(f"checksum mismatch in file {entry.name!r} of the save")
            files[entry.name] = data
        return files
    finally:
        if opened is not uri:
            opened.close()


def _fetch(connector: Any, read: Read, buffer: torch.Tensor, digest: bool) -> tuple[float, float, str | None]:
    began = time.perf_counter()
    view = buffer[:read.length].numpy()
    try:
        got = connector.get_into(read.key, view, offset=read.offset)
    except NotFoundError:
        raise IntegrityError(f"{read.describe()} is missing: the source is damaged") from None
    fetched = time.perf_counter()
    if got != read.length:
        raise IntegrityError(f"{read.describe()} is truncated: {got} of {read.length} bytes")
    actual = checksum(view.data) if digest or read.checksum is not None else None
    if read.checksum is not None and actual != read.checksum:
        raise IntegrityError(f"checksum mismatch in {read.describe()}: stored {read.checksum}, read {actual}")
    return fetched - began, time.perf_counter() - fetched, actual


class _Slot:
    """A pinned staging buffer and the event of the last copy out of it."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.event: Any = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class _Shared:
    """What the ``_execute`` calls of one load share: its stats, progress bar and digest."""

    def __init__(self, stats: LoadStats, total: int, progress: bool | None,
                 on_progress: Callable[[int, int], None] | None) -> None:
        from tqdm.auto import tqdm

        self.stats, self.total, self.done, self.on_progress = stats, total, 0, on_progress
        self.digest = hashlib.sha256()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"load rank {stats.rank}",
                        disable=None if progress is None else not progress)

    def landed(self, read: Read, read_checksum: str | None) -> None:
        self.digest.update(f"{read.key}@{read.offset}:{read.length}={read_checksum};".encode())
        self.stats.read_bytes += read.length
        self.done += read.length
        self.bar.update(read.length)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def finish(self, digested: bool) -> None:
        if digested:
            self.stats.digest = f"sha256:{self.digest.hexdigest()}"


def _execute(connector: Any, plan: RankPlan, tensors: MutableMapping[str, torch.Tensor], device: torch.device,
             threads: int, shared: _Shared, want_digest: bool = True) -> bool:
    """Fetch ``plan``'s reads into ``tensors``; True when every read was digested. On a GPU
    the tensors are complete (their copies synchronized) when this returns."""
    import torch

    cuda = device.type == "cuda"
    flat = {name: t.reshape(-1).view(torch.uint8) for name, t in tensors.items()}
    reads = [r for r in plan.reads if any(p.name in flat for p in r.pieces)]
    regular = [r.length for r in reads if r.narrow is None]
    slot_bytes = max(regular, default=0)
    slots = collections.deque(_Slot(torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=cuda))
                              for _ in range(min(len(reads), threads + 4) if regular else 0))
    lander = _Lander(tensors, flat, torch.cuda.Stream(device) if cuda else None, shared)
    in_flight: collections.deque[tuple[Read, _Slot, concurrent.futures.Future, bool]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kvswap-load") as pool:
        try:
            for read in reads:
                own = read.narrow is not None or read.length > slot_bytes
                if own:
                    slot = _Slot(torch.empty(read.length, dtype=torch.uint8, pin_memory=cuda))
                else:
                    while not slots:  # land the oldest read; its buffer is free once its copy is
                        done, done_slot, future, done_own = in_flight.popleft()
                        lander.land(done, done_slot, future)
                        if not done_own:
                            slots.append(done_slot)
                    slot = slots.popleft()
                    slot.wait()
                in_flight.append((read, slot, pool.submit(_fetch, connector, read, slot.buffer, want_digest), own))
            while in_flight:
                lander.land(*in_flight.popleft()[:3])
            lander.finish()
        except BaseException:
            for _, _, future, _ in in_flight:
                future.cancel()
            concurrent.futures.wait([f for _, _, f, _ in in_flight])
            lander.synchronize()
            raise
    return want_digest or all(r.checksum is not None for r in reads)


class _Lander:
    """Copies fetched reads into their tensors (on a side stream on a GPU)."""

    def __init__(self, tensors: MutableMapping[str, torch.Tensor], flat: dict[str, torch.Tensor], stream: Any,
                 shared: _Shared) -> None:
        self.tensors, self.flat, self.stream, self.shared = tensors, flat, stream, shared
        self.timings: list[tuple[Any, Any]] = []

    def land(self, read: Read, slot: _Slot, future: concurrent.futures.Future) -> None:
        import torch

        fetch_s, verify_s, read_checksum = future.result()
        stats = self.shared.stats
        stats.fetch_seconds += fetch_s
        stats.verify_seconds += verify_s
        began = time.perf_counter()
        cuda = self.stream is not None
        with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
            start = torch.cuda.Event(enable_timing=True) if cuda else None
            if start is not None:
                start.record(self.stream)
            self._copy(read, slot.buffer, cuda)
            if cuda:
                slot.event = torch.cuda.Event(enable_timing=True)
                slot.event.record(self.stream)
                self.timings.append((start, slot.event))
        if not cuda:
            stats.copy_seconds += time.perf_counter() - began
        self.shared.landed(read, read_checksum)

    def _copy(self, read: Read, buffer: torch.Tensor, non_blocking: bool) -> None:
        import torch

        if read.narrow is not None:  # a checkpoint's full tensor, sliced for this rank
            n = read.narrow
            full = buffer[:read.length].view(getattr(torch, n.dtype)).reshape(n.shape)
            self.tensors[read.pieces[0].name].copy_(shard(full, n.split, n.tp, n.tp_rank).contiguous())
            return
        for piece in read.pieces:
            if piece.name in self.flat:
                self.flat[piece.name][piece.dst_offset:piece.dst_offset + piece.nbytes].copy_(
                    buffer[piece.src_offset:piece.src_offset + piece.nbytes], non_blocking=non_blocking)

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            self.shared.stats.copy_seconds += sum(a.elapsed_time(b) for a, b in self.timings) / 1e3

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
