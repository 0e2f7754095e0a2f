"""The model a service instance runs: a named random-weight config, or weights from any source.

``load_model("tiny")`` builds one of :data:`kvswap.engine.MODEL_CONFIGS` (random weights from a
fixed seed: every instance gets the same model); ``load_model("smollm2")`` a real small model
(:mod:`kvswap.engine.pretrained`, prepared once into a local directory). Anything else is a weights location: a
directory, a kvswap save or checkpoint URI (``file://``, ``s3://``, ``redis://``,
``valkey://``) or a running instance (``instance://host:port``). The transformers config,
tokenizer and chat template come from the source (:func:`kvswap.weights.files.model_files`:
a save's files, a checkpoint's, or a seed's manifest), the model is built on the meta device
and :func:`kvswap.weights.load` fills it. A save split for tensor parallelism is refused
with a line that says what to do: one serve process runs one whole model.

The KV fingerprint names the weights by content (``LoadStats.digest``, or the seed's own
fingerprint), so KV computed with other weights is never reused; ``model_id`` (a repository
and revision) replaces it when instances load the same weights from different sources.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from kvswap.engine import ByteTokenizer, build_model
from kvswap.engine.model import MODEL_CONFIGS
from kvswap.engine.pretrained import PRETRAINED, prepare
from kvswap.engine.tokenizer import HFTokenizer, Tokenizer
from kvswap.errors import ConfigError
from kvswap.session_cache import KVLayout
from kvswap.uri import URI
from kvswap.weights.files import model_config, model_files

if TYPE_CHECKING:
    from kvswap.weights.sources import Opened


@dataclasses.dataclass
class LoadedModel:
    model: Any  # torch.nn.Module, in eval mode on its device
    layout: KVLayout
    tokenizer: Tokenizer
    config: dict[str, Any]  # the transformers config, for instances that boot from this one
    vocab_size: int
    max_positions: int
    source: str  # where the weights came from (no secrets)
    load_stats: Any = None  # kvswap.weights.LoadStats, None for random weights
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # config, tokenizer, generation files


def load_model(spec: str, *, device: str = "cpu", dtype: str | None = None, model_id: str | None = None,
               seed_token: str | None = None, progress: bool | None = False) -> LoadedModel:
    """The model named by ``spec`` (see the module docstring) on ``device``."""
    if spec in MODEL_CONFIGS:
        model, layout = build_model(spec, dtype=dtype or "float32", device=device)
        if model_id:
            layout = dataclasses.replace(layout, model=model_id)
        config = model.config
        return LoadedModel(model, layout, ByteTokenizer(), config.to_dict(), config.vocab_size,
                           config.max_position_embeddings, f"random:{spec}",
                           files={"config.json": config.to_json_string()})
    if spec in PRETRAINED:
        spec = str(prepare(spec, progress=progress))
    return _load_weights(spec, device=device, dtype=dtype, model_id=model_id, seed_token=seed_token,
                         progress=progress)


def _load_weights(spec: str, *, device: str, dtype: str | None, model_id: str | None, seed_token: str | None,
                  progress: bool | None) -> LoadedModel:
    from kvswap.weights.sources import SEED_SCHEME, open_location

    uri = URI.parse(spec if "://" in spec else f"file://{os.path.abspath(spec)}")
    # Opened once: the files, the shard check and the load all read one manifest (one save).
    opened = None if uri.scheme == SEED_SCHEME else open_location(uri)
    try:
        return _build_and_load(uri, opened, device=device, dtype=dtype, model_id=model_id, seed_token=seed_token,
                               progress=progress)
    finally:
        if opened is not None:
            opened.close()


def _build_and_load(uri: URI, opened: Opened | None, *, device: str, dtype: str | None, model_id: str | None,
                    seed_token: str | None, progress: bool | None) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvswap.weights import load

    files = model_files(uri, token=seed_token, opened=opened)
    config_dict = model_config(files, uri.render())
    if opened is not None:
        _refuse_sharded(uri, opened.source)
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(config_dict["model_type"], **fields)
    dtype = dtype or str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    # A given model_id names the weights: no need to hash a plain checkpoint's bytes for it.
    result = load(model, opened or uri, device=device, token=seed_token, progress=progress, digest=model_id is None)
    model.eval()
    heads = config.num_attention_heads
    if opened is None:  # a seed (never opened as a location): its own name for its weights, adopted as is
        name = model_id or result.stats.digest
        if not name:
            raise ConfigError(f"seed {uri.render()} does not name its weights: pass --model-id")
    else:
        name = model_id or f"weights:{result.stats.digest}"
    layout = KVLayout(model=name, num_layers=config.num_hidden_layers,
                      num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, dtype=dtype)
    tokenizer: Tokenizer = HFTokenizer(files) if "tokenizer.json" in files else ByteTokenizer()
    return LoadedModel(model, layout, tokenizer, config.to_dict(), config.vocab_size,
                       config.max_position_embeddings, uri.render(), result.stats, files)


def _refuse_sharded(uri: URI, source: Any) -> None:
    """ConfigError for a kvswap save of several ranks: one serve process is one whole model."""
    from kvswap.weights.manifest import Manifest

    if isinstance(source, Manifest) and source.world_size > 1:
        raise ConfigError(
            f"the save at {uri.render()} is split for tp={source.tp} pp={source.pp}; kvswap serve runs the "
            "whole model in one process and does not shard it. Save it again with --tp 1 to serve it "
            "(or load one rank per process with `kvswap weights load --rank N`, or in vLLM with "
            "--load-format kvswap)")
