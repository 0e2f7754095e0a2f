"""Seed instances: a process holding loaded weights sends them to a booting one.

Protocol (``instance://seed-host:port``), every call with ``Authorization: Bearer <token>``:

1. ``GET /weights/manifest`` -> names, shapes, dtypes in send order, total bytes, the
   seed's device. The client refuses any difference from its model before anything moves.
2. ``POST /init_weights_send_group_for_remote_instance`` (``{"backend", "timeout_s"}``) ->
   ``{"transfer_id", "master_address", "master_port", "backend", "bucket_bytes"}``: the
   seed reserves itself (one transfer at a time: a second client gets 409 with the holder's
   start time), opens a ``TCPStore`` on a free port and, in a background thread, joins a
   two-rank process group (rank 0) with the client (rank 1): NCCL when both sides are on
   GPUs, gloo otherwise.
3. ``POST /send_weights_to_remote_instance`` (``{"transfer_id"}``) -> 202: the seed
   broadcasts the tensors in manifest order, small ones packed into buckets of
   ``bucket_bytes``, large ones straight from their storage.
4. ``GET /weights/transfers/{id}`` -> the transfer's state (``joining``, ``sending``,
   ``done``, ``failed: ...``).

Every step has a timeout (HTTP calls, the rendezvous, each collective). A failure on
either side ends the transfer on both: the peer's next collective fails (connection lost)
or times out, the group is torn down, and the seed goes back to idle, still serving. A
process that loaded its weights from a seed holds them like any other and can serve as a
seed itself, so a fleet boots as a tree.
"""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kvswap.device import resolve_device
from kvswap.errors import BackendUnavailableError, BusyError, ConfigError, KVSwapError
from kvswap.uri import URI
from kvswap.weights.sources import TensorInfo
from kvswap.weights.targets import LoadResult, LoadStats, bind_targets, device_of, named_tensors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 32 << 20
INIT_ROUTE = "/init_weights_send_group_for_remote_instance"
SEND_ROUTE = "/send_weights_to_remote_instance"
MANIFEST_ROUTE = "/weights/manifest"


class SeedBusyError(BusyError):
    """The seed is sending to another client; try later."""


def buckets(sizes: list[tuple[str, int]], bucket_bytes: int) -> list[list[tuple[str, int]]]:
    """Group tensors (name, nbytes), in order, into broadcasts: consecutive small tensors
    share a bucket of at most ``bucket_bytes``; a tensor at least that large goes alone
    (broadcast in place). Both sides compute the same grouping from the manifest."""
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    filled = 0
    for name, nbytes in sizes:
        if nbytes >= bucket_bytes:
            if current:
                groups.append(current)
                current, filled = [], 0
            groups.append([(name, nbytes)])
            continue
        if filled + nbytes > bucket_bytes:
            groups.append(current)
            current, filled = [], 0
        current.append((name, nbytes))
        filled += nbytes
    if current:
        groups.append(current)
    return groups


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8)


_NCCL_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
_NCCL_ENV_LOCK = threading.Lock()


def _group(backend: str, store: Any, rank: int, timeout: float, address: str) -> Any:
    import torch.distributed as dist

    delta = datetime.timedelta(seconds=timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = delta
        # Read when the group is built: each wait blocks and raises on timeout, and a timed-out
        # communicator is aborted without killing the process (NCCL's default tears it down),
        # so a dead peer ends the transfer, not the seed.
        with _NCCL_ENV_LOCK:
            saved = {k: os.environ.get(k) for k in _NCCL_ENV}
            os.environ.update(_NCCL_ENV)
            try:
                return dist.ProcessGroupNCCL(store, rank, 2, options)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = delta
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
    return dist.ProcessGroupGloo(store, rank, 2, options)


def _broadcast_all(group: Any, tensors: Mapping[str, torch.Tensor], order: list[tuple[str, int]],
                   bucket_bytes: int, comm_device: torch.device, sending: bool,
                   on_bucket: Callable[[int], None] | None = None) -> None:
    """Run every broadcast of a transfer (rank 0 sends, rank 1 receives into ``tensors``)."""
    import torch
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    scratch = torch.empty(bucket_bytes, dtype=torch.uint8, device=comm_device)
    for group_items in buckets(order, bucket_bytes):
        total = sum(n for _, n in group_items)
        direct = len(group_items) == 1 and total >= bucket_bytes and tensors[group_items[0][0]].device == comm_device
        if direct:
            buffer = _flat(tensors[group_items[0][0]])
        else:
            buffer = scratch[:total] if total <= bucket_bytes else torch.empty(total, dtype=torch.uint8,
                                                                                  device=comm_device)
            if sending:
                at = 0
                for name, nbytes in group_items:
                    buffer[at:at + nbytes].copy_(_flat(tensors[name]))
                    at += nbytes
        group.broadcast([buffer], options).wait()
        if not direct and not sending:
            at = 0
            for name, nbytes in group_items:
                _flat(tensors[name]).copy_(buffer[at:at + nbytes])
                at += nbytes
        if on_bucket is not None:
            on_bucket(total)
    if comm_device.type == "cuda":
        torch.cuda.synchronize(comm_device)


@dataclasses.dataclass
class _Transfer:
    id: str
    backend: str
    timeout: float
    started: float
    secret: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))
    state: str = "joining"
    send: threading.Event = dataclasses.field(default_factory=threading.Event)


class WeightSeed:
    """The sending side: serves ``tensors`` (a model's, or a name -> tensor mapping)."""

    def __init__(self, tensors: Any, *, token: str, advertise_host: str | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_timeout: float = 600.0,
                 fingerprint: str = "", config: Mapping[str, Any] | None = None,
                 files: Mapping[str, str] | None = None) -> None:

        if not token:
            raise ConfigError("a seed needs a token")
        self.tensors = named_tensors(tensors)
        self._token = token
        self.advertise_host = advertise_host
        self.bucket_bytes = bucket_bytes
        self.max_timeout = max_timeout
        self.fingerprint = fingerprint  # what clients adopt as their weights' identity (LoadStats.digest)
        self.config = dict(config or {})  # the model's transformers config, for clients that build the model
        # config, tokenizer, chat template, generation config: what a client needs to talk like this model
        self.files = dict(files or {})
        if self.config and "config.json" not in self.files:
            self.files["config.json"] = json.dumps(self.config)
        self._lock = threading.Lock()
        self._current: _Transfer | None = None
        self._history: dict[str, str] = {}
        devices = {t.device for t in self.tensors.values()}
        if len(devices) != 1:
            raise ConfigError("a seed's tensors must all be on one device")
        self.device: torch.device = devices.pop()

    def __repr__(self) -> str:  # the token stays out of logs
        return f"WeightSeed({len(self.tensors)} tensors on {self.device}, bucket={self.bucket_bytes})"

    def authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self._token.encode())

    def manifest(self) -> dict[str, Any]:
        return {"tensors": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for n, t in self.tensors.items()],
                "bytes": sum(t.numel() * t.element_size() for t in self.tensors.values()),
                "device": str(self.device), "device_uuid": _gpu_uuid(self.device), "bucket_bytes": self.bucket_bytes,
                "fingerprint": self.fingerprint, "config": self.config, "files": self.files}

    def begin(self, backend: str, timeout: float, host_seen: str) -> dict[str, Any]:
        """Reserve the seed and open the rendezvous; the group forms in the background."""
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"backend must be nccl or gloo, not {backend!r}")
        if backend == "nccl" and self.device.type != "cuda":
            raise ConfigError("this seed holds its weights in host memory: use gloo")
        timeout = min(max(float(timeout), 1.0), self.max_timeout)
        with self._lock:
            if self._current is not None:
                raise SeedBusyError(f"seed is sending to another client since "
                                    f"{time.time() - self._current.started:.1f} s ago; retry later")
            transfer = self._current = _Transfer(uuid.uuid4().hex, backend, timeout, time.time())
        address = self.advertise_host or host_seen
        try:
            # The rendezvous listens only where the client was told to come (not on every
            # interface), and its keys live under the transfer's secret, which only the
            # authenticated client learns: a stranger can neither join nor disturb the group.
            store = _rendezvous_store(address, timeout)
        except Exception:
            self._finish(transfer, "failed: could not open the rendezvous")
            raise
        threading.Thread(target=self._run, args=(transfer, store, address), daemon=True,
                         name=f"kvswap-seed-{transfer.id[:8]}").start()
        return {"transfer_id": transfer.id, "master_address": address, "master_port": store.port,
                "rendezvous_key": transfer.secret, "backend": backend, "bucket_bytes": self.bucket_bytes,
                "timeout_s": timeout}

    def start_sending(self, transfer_id: str) -> None:
        with self._lock:
            current = self._current
            if current is None or current.id != transfer_id:
                raise KeyError(transfer_id)
            current.send.set()

    def state(self, transfer_id: str) -> str:
        with self._lock:
            if self._current is not None and self._current.id == transfer_id:
                return self._current.state
            if transfer_id in self._history:
                return self._history[transfer_id]
        raise KeyError(transfer_id)

    def _run(self, transfer: _Transfer, store: Any, address: str) -> None:
        import torch

        group = None
        try:
            if transfer.backend == "nccl":
                torch.cuda.set_device(self.device)
            group = _group(transfer.backend, _private(store, transfer.secret), 0, transfer.timeout, address)
            if not transfer.send.wait(transfer.timeout):
                raise TimeoutError("the client did not ask for the weights in time")
            transfer.state = "sending"
            comm = self.device if transfer.backend == "nccl" else torch.device("cpu")
            order = [(n, t.numel() * t.element_size()) for n, t in self.tensors.items()]
            began = time.perf_counter()
            _broadcast_all(group, self.tensors, order, self.bucket_bytes, comm, sending=True)
            log.info("seed sent %d tensors over %s in %.2f s", len(order), transfer.backend,
                     time.perf_counter() - began)
            self._finish(transfer, "done")
        except Exception as exc:  # the client died, timed out or failed: abort, keep serving  # noqa: BLE001 - a failed transfer ends it, the seed keeps serving
            log.warning("seed transfer %s failed: %s", transfer.id[:8], exc)
            if group is not None and hasattr(group, "abort"):
                try:
                    group.abort()
                except Exception:  # noqa: BLE001, S110 - best effort teardown
                    pass
            self._finish(transfer, f"failed: {exc}")
        finally:
            del group, store  # the store closes its listening socket

    def _finish(self, transfer: _Transfer, state: str) -> None:
        with self._lock:
            transfer.state = state
            self._history[transfer.id] = state
            if len(self._history) > 100:
                self._history.pop(next(iter(self._history)))
            if self._current is transfer:
                self._current = None


def _rendezvous_store(address: str, timeout: float) -> Any:
    """A master TCPStore listening on ``address`` (any free port) that owns its socket.

    TCPStore closes the descriptor it is given when it goes; the Python socket lets go of it
    here, or closing it too would close whatever the process opened under that number
    meanwhile (an HTTP connection of the seed's own server, cut without a response)."""
    import torch.distributed as dist

    listener = _listen(address)
    try:
        store = dist.TCPStore(address, listener.getsockname()[1], 2, True, datetime.timedelta(seconds=timeout),
                              wait_for_workers=False, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()
    return store


def _listen(address: str) -> socket.socket:
    """A listening TCP socket on ``address`` (a name or an IP), any free port."""
    family, _, _, _, sockaddr = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr[:2])
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


def _private(store: Any, secret: str) -> Any:
    """The transfer's namespace of the rendezvous store, named by its secret."""
    import torch.distributed as dist

    return dist.PrefixStore(f"kvswap-seed/{secret}/", store)


def _gpu_uuid(device: Any) -> str | None:
    """A GPU's identity across processes (device indexes depend on CUDA_VISIBLE_DEVICES)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


def _local_address_towards(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (what the seed can reach us at)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def load_from_seed(target: Any, uri: str | URI, *, device: Any = None, token: str | None = None, timeout: float = 120.0,
                   strict: bool = True, progress: bool | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> Any:
    """The client side of ``instance://host:port``: see the module docstring."""
    import torch
    from tqdm.auto import tqdm


    began = time.perf_counter()
    parsed = uri if isinstance(uri, URI) else URI.parse(uri)
    with _seed_http(parsed, token, timeout) as http:
        base = str(http.base_url).rstrip("/")
        manifest = _call(http, "GET", MANIFEST_ROUTE)
        plan = {t["name"]: TensorInfo(t["dtype"], tuple(t["shape"])) for t in manifest["tensors"]}
        device = resolve_device(device) if device is not None else device_of(target)
        try:
            tensors = bind_targets(target, plan, device, strict=strict)
        except ConfigError as exc:
            raise ConfigError(f"refusing the weights of seed {base}: {exc}") from None
        # NCCL needs two GPUs: a client on the seed's own GPU goes through host memory (gloo).
        backend = "nccl" if (device.type == "cuda" and manifest["device"].startswith("cuda")
                             and manifest.get("device_uuid") != _gpu_uuid(device)) else "gloo"
        offer = _call(http, "POST", INIT_ROUTE, json={"backend": backend, "timeout_s": timeout})
        stats = LoadStats(parsed.render(), 0, len(plan), int(manifest["bytes"]), threads=1,
                          plan_seconds=time.perf_counter() - began)
        store = group = None
        try:
            store = torch.distributed.TCPStore(offer["master_address"], int(offer["master_port"]), 2, False,
                                               datetime.timedelta(seconds=timeout))
            group = _group(backend, _private(store, str(offer["rendezvous_key"])), 1, timeout,
                           _local_address_towards(parsed.host or "127.0.0.1", parsed.port or 0))
            _call(http, "POST", SEND_ROUTE, json={"transfer_id": offer["transfer_id"]})
            comm = device if backend == "nccl" else torch.device("cpu")
            if comm.type == "cuda":
                torch.cuda.set_device(comm)
            order = [(n, plan[n].nbytes) for n in plan]
            bar = tqdm(total=stats.bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="load from seed",
                       disable=None if progress is None else not progress)
            done = 0

            def landed(nbytes: int) -> None:
                nonlocal done
                done += nbytes
                bar.update(nbytes)
                if on_progress is not None:
                    on_progress(done, stats.bytes)

            with bar:
                _broadcast_all(group, _complete(tensors, plan, comm), order, int(offer["bucket_bytes"]), comm,
                               sending=False, on_bucket=landed)
        except KVSwapError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transfer failure is the seed being unavailable
            raise BackendUnavailableError(f"weights transfer from seed {base} failed: {exc}") from None
        finally:
            del group, store
    stats.read_bytes = stats.bytes
    stats.digest = manifest.get("fingerprint") or ""
    stats.seconds = time.perf_counter() - began
    return LoadResult(tensors, stats)


def seed_manifest(uri: str | URI, *, token: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """What the seed at ``instance://host:port`` holds: tensors, bytes, device, fingerprint, config."""
    with _seed_http(uri if isinstance(uri, URI) else URI.parse(uri), token, timeout) as http:
        return _call(http, "GET", MANIFEST_ROUTE)


def _seed_http(parsed: URI, token: str | None, timeout: float) -> Any:
    """An HTTP client for the seed at ``parsed`` with its bearer token (argument, URI password
    or KVSWAP_SEED_TOKEN)."""
    import httpx

    if not parsed.host or not parsed.port:
        raise ConfigError(f"instance:// needs host and port, like instance://seed-host:8000; got {parsed.render()}")
    token = token or parsed.password or os.environ.get("KVSWAP_SEED_TOKEN")
    if not token:
        raise ConfigError("loading from a seed needs its token (token=..., or KVSWAP_SEED_TOKEN)")
    return httpx.Client(base_url=f"http://{parsed.host}:{parsed.port}", headers={"Authorization": f"Bearer {token}"},
                        timeout=min(timeout, 30.0))


def _complete(tensors: dict[str, torch.Tensor], plan: dict[str, TensorInfo], device: torch.device) -> dict:
    """Receive buffers for every tensor the seed sends, the caller's where it has one."""
    import torch

    return {name: tensors[name] if name in tensors else torch.empty(info.shape, dtype=getattr(torch, info.dtype),
                                                                    device=device)
            for name, info in plan.items()}


def _call(http: Any, method: str, route: str, **kwargs: Any) -> dict[str, Any]:
    import httpx

    try:
        response = http.request(method, route, **kwargs)
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(f"seed {http.base_url} unreachable on {route}: {exc}") from None
    if response.status_code == 409:  # the service's error body (older seeds: FastAPI's "detail")
        try:
            body = response.json()
        except ValueError:
            body = {}
        found = body.get("message") or body.get("detail") if isinstance(body, dict) else None
        raise SeedBusyError(str(found or "seed busy"))
    if response.status_code in (401, 403):
        raise ConfigError(f"seed {http.base_url} refused the token ({response.status_code})")
    if response.status_code >= 400:
        raise BackendUnavailableError(f"seed {http.base_url} answered {response.status_code} on {route}: "
                                      f"{response.text[:300]}")
    return response.json()
