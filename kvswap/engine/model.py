"""Llama models with random weights, built straight on their device, for tests, demo and benchmarks.

Weights are drawn from a seeded generator in parameter-name order, so two processes that
build the same config and seed on the same kind of device get the same model, and the
same KV. The fingerprint names the config and seed; a real checkpoint would name its
repository and revision instead.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from kvswap.session_cache.base import KVLayout

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: CPU tests and the demo.
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=65536),
    # ~20M parameters: the demo, where recomputing a history costs noticeably more than loading it.
    "small": dict(vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536),
    # Llama-3-8B's shapes.
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                     rope_theta=500000.0),
}


def build_model(name: str = "tiny", *, dtype: str = "float32", device: str | torch.device = "cpu",
                seed: int = 0, std: float = 0.5, **overrides: Any) -> tuple[torch.nn.Module, KVLayout]:
    """A ``LlamaForCausalLM`` of config ``name`` (plus ``overrides``), random weights
    N(0, std / sqrt(fan_in)) from ``seed``, in eval mode on ``device``; and its KV layout."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}")
    settings = {**MODEL_CONFIGS[name], **overrides}
    config = LlamaConfig(**settings, tie_word_embeddings=False, attn_implementation="sdpa")
    torch_dtype = getattr(torch, dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch_dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0)  # norms
            else:
                param.normal_(0.0, std / param.shape[-1] ** 0.5, generator=generator)
    with device:
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # to_empty left its buffer empty
    model.eval()
    identity = json.dumps({"config": settings, "seed": seed, "std": std}, sort_keys=True)
    layout = KVLayout(model=f"llama-random:{name}:{hashlib.sha256(identity.encode()).hexdigest()[:16]}",
                      num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                      head_dim=config.head_dim, dtype=dtype)
    return model, layout
