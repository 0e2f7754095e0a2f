"""The connector's settings (``kv_connector_extra_config``) and the identity of the KV it moves.

Both sides of the connector (the scheduler process and each worker) build the same
:class:`ConnectorConfig` and :class:`~kvswap.session_cache.KVLayout` from vLLM's config, so
they name the same fingerprint without talking to each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from kvswap.errors import ConfigError
from kvswap.integrations.vllm.identity import checkpoint_digest, source_identity
from kvswap.session_cache.base import KVLayout
from kvswap.uri import URI, parse_size

log = logging.getLogger("vllm.kvswap")  # under vLLM's logger: its handlers show our lines

DEFAULT_DIRECTORY = "/tmp/kvswap-vllm"


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` keys (all optional; the defaults run on one machine):

    * ``meta``: session meta store URI (default: ``$KVSWAP_META``, else
      ``sqlite:///<directory>/meta.db``);
    * ``store``: a KV store URI, or a list of them (new KV goes to the first; default:
      ``$KVSWAP_STORE`` (comma separated), else ``file://<directory>/kv``). vLLM prints its
      settings in its start-up log: give URIs that hold a password through the environment;
    * ``directory``: where the defaults live (``/tmp/kvswap-vllm``);
    * ``host_bytes``: a host-memory tier in front of the stores, e.g. ``"8GiB"`` (default 0);
    * ``model_id``: names the weights in the fingerprint (default: their content digest, or
      ``hf:<name>@<revision>`` for a hub name);
    * ``entry_bytes`` (``16MiB``: entries are read in parallel and each is scattered into
      vLLM's blocks as it arrives), ``io_threads`` (8), ``session_ttl`` (seconds, none);
    * ``probe_partial`` (true): when a request leaves the stored history inside an entry,
      read that entry's token ids to reuse up to the first changed token (one small read in
      the scheduler) rather than only whole entries.
    """

    meta: str
    stores: tuple[str, ...]
    host_bytes: int = 0
    model_id: str | None = None
    entry_bytes: int = 16 << 20  # small entries: read in parallel, each scattered as it arrives
    io_threads: int = 8
    session_ttl: float | None = None
    probe_partial: bool = True

    KEYS = ("meta", "store", "directory", "host_bytes", "model_id", "entry_bytes", "io_threads", "session_ttl",
            "probe_partial")

    def __repr__(self) -> str:  # URIs without their passwords
        def shown(uri: str) -> str:
            try:
                return URI.parse(uri).render()
            except ConfigError:
                return "<unparsable URI>"

        return (f"ConnectorConfig(meta={shown(self.meta)!r}, stores={[shown(s) for s in self.stores]!r}, "
                f"host_bytes={self.host_bytes}, model_id={self.model_id!r})")

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"unknown kvswap connector settings {unknown}; known: {list(cls.KEYS)}")
        directory = str(extra.get("directory") or DEFAULT_DIRECTORY)
        stores = extra.get("store") or os.environ.get("KVSWAP_STORE") or f"file://{directory}/kv"
        stores = tuple(s.strip() for s in stores.split(",")) if isinstance(stores, str) else tuple(stores)
        if not stores or not all(isinstance(s, str) and s for s in stores):
            raise ConfigError("store must be a URI or a non-empty list of URIs")
        meta = str(extra.get("meta") or os.environ.get("KVSWAP_META") or f"sqlite:///{directory}/meta.db")
        if meta.startswith("sqlite:") or any(s.startswith("file:") for s in stores):
            os.makedirs(directory, exist_ok=True)
        try:
            ttl = extra.get("session_ttl")
            return cls(meta=meta, stores=stores, host_bytes=_size(extra.get("host_bytes", 0)),
                       model_id=extra.get("model_id") or None,
                       entry_bytes=_size(extra.get("entry_bytes", 16 << 20)),
                       io_threads=int(extra.get("io_threads", 8)),
                       session_ttl=float(ttl) if ttl is not None else None,
                       probe_partial=bool(extra.get("probe_partial", True)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a kvswap connector setting is malformed: {exc}") from None


def _size(value: Any) -> int:
    return value if isinstance(value, int) else parse_size(str(value))


def kv_layout(vllm_config: Any, config: ConnectorConfig, kv_format: str) -> KVLayout:
    """The fingerprint's fields for this engine (this TP rank's share of the heads)."""
    import torch

    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if parallel.pipeline_parallel_size != 1:
        raise ConfigError("kvswap's vLLM connector does not support pipeline parallelism yet")
    if cache.cache_dtype not in ("auto", None):
        raise ConfigError(f"kvswap stores KV as the model's dtype; kv_cache_dtype={cache.cache_dtype!r} is not "
                          "supported")
    dtype = model.dtype if isinstance(model.dtype, torch.dtype) else getattr(torch, str(model.dtype))
    return KVLayout(model=weights_identity(vllm_config, config),
                    num_layers=model.get_num_layers(parallel), num_kv_heads=model.get_num_kv_heads(parallel),
                    head_dim=model.get_head_size(), dtype=str(dtype).removeprefix("torch."),
                    tp_rank=_tp_rank(parallel), tp_size=parallel.tensor_parallel_size, kv_format=kv_format)


def _tp_rank(parallel: Any) -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, ImportError, RuntimeError):  # the scheduler process has no TP group
        return int(getattr(parallel, "rank", 0)) % max(parallel.tensor_parallel_size, 1)


def weights_identity(vllm_config: Any, config: ConnectorConfig) -> str:
    """What names the weights in use: ``model_id`` if given; a kvswap save's chunk checksums
    (``--load-format kvswap``); the seed and config of dummy weights; else the content digest
    of a local checkpoint's safetensors files (cached by path, size and mtime), or the hub
    name and revision."""
    if config.model_id:
        return config.model_id
    model, load = vllm_config.model_config, vllm_config.load_config
    load_format = str(getattr(load, "load_format", "auto"))
    if load_format == "kvswap":
        return source_identity(load.model_loader_extra_config or {})
    if load_format == "dummy":
        described = json.dumps({"model": str(model.model), "seed": model.seed,
                                "config": model.hf_config.to_dict()}, sort_keys=True, default=str)
        return f"dummy:{hashlib.sha256(described.encode()).hexdigest()[:16]}"
    path = Path(str(model.model))
    if path.is_dir():
        return f"weights:{checkpoint_digest(path)}"
    return f"hf:{model.model}@{model.revision or 'main'}"


