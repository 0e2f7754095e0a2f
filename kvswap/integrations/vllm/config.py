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
from pathlib import Path
from typing import Any

from kvswap.errors import ConfigError
from kvswap.integrations.vllm.identity import checkpoint_digest, source_identity
from kvswap.session_cache.base import KVLayout
from kvswap.session_cache.stack import StackSettings
from kvswap.uri import parse_bool, parse_size

log = logging.getLogger("vllm.kvswap")  # under vLLM's logger: its handlers show our lines

DEFAULT_DIRECTORY = "/tmp/kvswap-vllm"
#: vLLM's entries are small: read in parallel, each scattered into the blocks as it arrives.
ENTRY_BYTES = 16 << 20
#: vLLM's fp8 cache dtypes -> the values' dtype (vLLM keeps them as bytes; "fp8" is e4m3).
FP8_CACHES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


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
    * ``timeout`` (seconds, 5): the deadline of every storage step: a lookup (meta) must answer
      within it, or the request is served as a miss; a fetch or a save gets it plus a second
      per 256 MiB it moves, or it is dropped (a fetch: recomputed; a save: nothing in meta
      points at it). A store or meta that failed is not asked again for ``timeout`` seconds
      (requests meanwhile are misses and saves are skipped, at full speed), then tried again;
    * ``probe_partial`` (true): when a request leaves the stored history inside an entry,
      reuse it up to the first changed token (the entry's token ids are compared when it is
      fetched) rather than only whole entries;
    * ``recompute_when_faster`` (true): a fetch predicted to take longer than recomputing its
      tokens (from the prefill speed measured while serving and each store's bandwidth,
      measured at start with 64 MiB written, read back and deleted, then while serving) is
      not made;
    * ``whole_blocks`` (false): store and reuse whole blocks only, as vLLM's own prefix cache
      does (up to ``block_size - 1`` tokens more are computed each turn), so that a turn
      computes exactly what it would after a prefix-cache hit: the same tokens as vLLM with
      its prefix cache, bit for bit;
    * ``trim_answers`` (true): when the model's chat template rewrites earlier answers (reasoning
      models drop their thinking), store each answer only as far as the next turn sends it
      again (:mod:`.answers`); the rest is counted as not stored.
    """

    stack: StackSettings  # meta, store, host_bytes (its span cache), entry_bytes, io_threads, session_ttl
    model_id: str | None = None
    timeout: float = 5.0
    probe_partial: bool = True
    recompute_when_faster: bool = True
    whole_blocks: bool = False
    trim_answers: bool = True

    KEYS = ("meta", "store", "directory", "host_bytes", "model_id", "entry_bytes", "io_threads", "session_ttl",
            "timeout", "probe_partial", "recompute_when_faster", "whole_blocks", "trim_answers")

    def __repr__(self) -> str:  # URIs without their passwords
        return f"ConnectorConfig({self.stack!r}, model_id={self.model_id!r}, timeout={self.timeout})"

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"unknown kvswap connector settings {unknown}; known: {list(cls.KEYS)}")
        directory = str(extra.get("directory") or DEFAULT_DIRECTORY)
        store = extra.get("store")
        if store is not None and not (isinstance(store, str) or
                                      (isinstance(store, list) and all(isinstance(s, str) for s in store))):
            raise ConfigError("store must be a URI or a list of URIs")
        try:
            ttl = extra.get("session_ttl")
            stack = StackSettings.resolve(extra.get("meta"), store, directory,
                                          span_cache_bytes=_size(extra.get("host_bytes", 0)),
                                          entry_bytes=_size(extra.get("entry_bytes", ENTRY_BYTES)),
                                          io_threads=int(extra.get("io_threads", 8)),
                                          session_ttl=float(ttl) if ttl is not None else None)
            config = cls(stack, model_id=extra.get("model_id") or None, timeout=float(extra.get("timeout", 5.0)),
                         probe_partial=_flag(extra.get("probe_partial", True)),
                         recompute_when_faster=_flag(extra.get("recompute_when_faster", True)),
                         whole_blocks=_flag(extra.get("whole_blocks", False)),
                         trim_answers=_flag(extra.get("trim_answers", True)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a kvswap connector setting is malformed: {exc}") from None
        if not config.timeout > 0 or config.stack.io_threads < 1:
            raise ConfigError("timeout must be positive and io_threads at least 1")
        return config


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else parse_bool(str(value))


def _size(value: Any) -> int:
    return value if isinstance(value, int) else parse_size(str(value))


def kv_layout(vllm_config: Any, config: ConnectorConfig) -> KVLayout:
    """The fingerprint's fields for this engine (this TP rank's share of the heads).

    Stored KV is token-major and every engine moves it through what its own attention kernel
    writes (:mod:`.kv_cache`), so the fingerprint names what the KV values depend on (the
    weights, dtype, shapes and tensor-parallel split), not vLLM's version, platform or memory
    layout: a session stored by one vLLM continues in another, in kvswap's own engine, and back.
    """
    import torch

    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if parallel.pipeline_parallel_size != 1:
        raise ConfigError("kvswap's vLLM connector does not support pipeline parallelism yet")
    if cache.cache_dtype in ("auto", None):
        dtype = model.dtype if isinstance(model.dtype, torch.dtype) else getattr(torch, str(model.dtype))
    elif cache.cache_dtype in FP8_CACHES:
        if getattr(cache, "calculate_kv_scales", False):
            raise ConfigError("kvswap stores fp8 KV with the scales it was written with; scales calculated at run "
                              "time (calculate_kv_scales) differ between engines: not supported")
        dtype = getattr(torch, FP8_CACHES[cache.cache_dtype])
    else:
        raise ConfigError(f"kvswap stores KV in the model's dtype or fp8; kv_cache_dtype={cache.cache_dtype!r} is "
                          "not supported")
    return KVLayout(model=weights_identity(vllm_config, config),
                    num_layers=model.get_num_layers(parallel), num_kv_heads=model.get_num_kv_heads(parallel),
                    head_dim=model.get_head_size(), dtype=str(dtype).removeprefix("torch."),
                    tp_rank=kv_share(vllm_config)[0], tp_size=parallel.tensor_parallel_size)


def kv_share(vllm_config: Any) -> tuple[int, int, bool]:
    """This process's share of the KV heads, how many shares there are, and whether it writes
    its share. Each tensor-parallel rank holds its own KV heads; with fewer KV heads than ranks,
    each head is held by several ranks alike: the share is the head, written once, by the
    first rank holding it, and read by all of them."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    ranks = max(int(parallel.tensor_parallel_size), 1)
    shares = min(ranks, int(model.get_total_num_kv_heads()))
    rank = tp_rank(parallel)
    share = rank * shares // ranks
    return share, shares, rank == -(-share * ranks // shares)


def value_dtype(vllm_config: Any) -> Any:
    """The dtype of the K and V values the model computes (before an fp8 cache stores them)."""
    import torch

    dtype = vllm_config.model_config.dtype
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


def kv_scales(vllm_config: Any, kv_caches: Any) -> str:
    """A digest of the per-layer K and V scales an fp8 cache was written with (in the blobs'
    fingerprint: KV written with other scales is rejected, never dequantized wrongly)."""
    context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    scales = [[name, float(getattr(context.get(name), "_k_scale_float", 1.0)),
               float(getattr(context.get(name), "_v_scale_float", 1.0))] for name in sorted(kv_caches)]
    return hashlib.sha256(json.dumps(scales).encode()).hexdigest()[:16]


def tp_rank(parallel: Any) -> int:
    """This process's tensor-parallel rank (the scheduler process, which has none: 0)."""
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


def check_kv_cache(kv_cache_config: Any) -> None:
    """Refuse, at start, KV that kvswap does not store yet: anything but one group of full
    attention. A hybrid model with vLLM's hybrid allocator off (as it is with a connector that
    is not ``SupportsHMA``) has its sliding-window layers promoted to full attention: one group,
    stored whole. A model of sliding-window layers only, MLA or state-space layers is refused
    (vLLM frees blocks outside the window; their KV is not what kvswap would store)."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    kinds = sorted({type(group.kv_cache_spec).__name__ for group in groups})
    if len(groups) > 1 or set(kinds) - {"FullAttentionSpec"}:
        raise ConfigError(f"kvswap's vLLM connector stores one group of full-attention KV; this model's KV cache has "
                          f"{len(groups)} groups of {kinds} (sliding-window-only, MLA and hybrid state-space "
                          "models are not supported yet)")
