"""The model a service instance runs: a named random-weight config, or weights from any source.

``load_model("tiny")`` builds one of :data:`kvswap.engine.MODEL_CONFIGS` (random weights from a
fixed seed: every instance gets the same model). Anything else is a weights location: a
directory, a kvswap save or checkpoint URI (``file://``, ``s3://``, ``redis://``,
``valkey://``) or a running instance (``instance://host:port``). The transformers config
comes from the source (a save's ``config.json``, a checkpoint's, or a seed's manifest),
the model is built on the meta device and :func:`kvswap.weights.load` fills it.

The KV fingerprint names the weights by content (``LoadStats.digest``, or the seed's own
fingerprint), so KV computed with other weights is never reused; ``model_id`` (a repository
and revision) replaces it when instances load the same weights from different sources.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from kvswap.engine import ByteTokenizer, build_model
from kvswap.engine.model import MODEL_CONFIGS
from kvswap.errors import ConfigError, NotFoundError
from kvswap.session_cache import KVLayout
from kvswap.uri import URI


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class JSONTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library, no hub access)."""

    def __init__(self, text: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_str(text)
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)


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


def load_model(spec: str, *, device: str = "cpu", dtype: str | None = None, model_id: str | None = None,
               seed_token: str | None = None, progress: bool | None = False) -> LoadedModel:
    """The model named by ``spec`` (see the module docstring) on ``device``."""
    if spec in MODEL_CONFIGS:
        model, layout = build_model(spec, dtype=dtype or "float32", device=device)
        if model_id:
            layout = dataclasses.replace(layout, model=model_id)
        config = model.config
        return LoadedModel(model, layout, ByteTokenizer(), config.to_dict(), config.vocab_size,
                           config.max_position_embeddings, f"random:{spec}")
    return _load_weights(spec, device=device, dtype=dtype, model_id=model_id, seed_token=seed_token,
                         progress=progress)


def _load_weights(spec: str, *, device: str, dtype: str | None, model_id: str | None, seed_token: str | None,
                  progress: bool | None) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvswap.weights import load

    uri = URI.parse(spec if "://" in spec else f"file://{os.path.abspath(spec)}")
    config_dict, tokenizer_json = _source_files(uri, seed_token)
    if "model_type" not in config_dict:
        raise ConfigError(f"{uri.render()} has no usable config.json (no model_type)")
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(config_dict["model_type"], **fields)
    dtype = dtype or str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    # A given model_id names the weights: no need to hash a plain checkpoint's bytes for it.
    result = load(model, uri, device=device, token=seed_token, progress=progress, digest=model_id is None)
    model.eval()
    heads = config.num_attention_heads
    if uri.scheme == "instance":  # the seed's own name for its weights, adopted as is
        name = model_id or result.stats.digest
        if not name:
            raise ConfigError(f"seed {uri.render()} does not name its weights: pass --model-id")
    else:
        name = model_id or f"weights:{result.stats.digest}"
    layout = KVLayout(model=name, num_layers=config.num_hidden_layers,
                      num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, dtype=dtype)
    tokenizer: Tokenizer = JSONTokenizer(tokenizer_json) if tokenizer_json else ByteTokenizer()
    return LoadedModel(model, layout, tokenizer, config.to_dict(), config.vocab_size,
                       config.max_position_embeddings, uri.render(), result.stats)


def _source_files(uri: URI, seed_token: str | None) -> tuple[dict[str, Any], str | None]:
    """The transformers config and the ``tokenizer.json`` text (if any) of a weights source."""
    if uri.scheme == "instance":
        from kvswap.weights.seed import seed_manifest

        manifest = seed_manifest(uri.render(hide_password=False), token=seed_token)
        if not manifest.get("config"):
            raise ConfigError(f"seed {uri.render()} does not advertise its model config")
        return dict(manifest["config"]), manifest.get("tokenizer_json")
    from kvswap.weights.load import read_files
    from kvswap.weights.manifest import Manifest
    from kvswap.weights.save import as_connector
    from kvswap.weights.sources import open_source

    with as_connector(uri) as connector:
        source = open_source(connector)
        if isinstance(source, Manifest):
            files = read_files(uri)
            if "config.json" not in files:
                raise ConfigError(f"the save at {uri.render()} holds no config.json")
            tokenizer = files.get("tokenizer.json")
            return json.loads(files["config.json"]), tokenizer.decode() if tokenizer else None
        try:
            tokenizer = bytes(connector.get("tokenizer.json")).decode()
        except NotFoundError:
            tokenizer = None
        return source.config, tokenizer
