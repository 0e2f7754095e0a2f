"""Llama models with random weights, built straight on their device, for tests, demo and benchmarks.

Weights come from a counter-based generator (:func:`random_weights`) that gives the same
bits on every device, so two processes that build the same config and seed get the same
model, and the same KV, whether on a CPU or a GPU. The fingerprint names the config, seed
and generator; a real checkpoint is named by its content digest or its repository instead.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from kvswap.device import resolve_device
from kvswap.errors import ConfigError
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
                seed: int = 0, std: float = 0.5, **overrides: Any) -> tuple[Any, KVLayout]:
    """A ``LlamaForCausalLM`` of config ``name`` (plus ``overrides``), random weights of mean 0
    and standard deviation ``std / sqrt(fan_in)`` from ``seed``, in eval mode on ``device``;
    and its KV layout.

    The weights are bit for bit the same on every device (:func:`random_weights`), so the
    fingerprint, which names the config, seed and generator, names the weights in use: a
    model built on a GPU and one built on a CPU share KV, and only then.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}")
    settings = {**MODEL_CONFIGS[name], **overrides}
    config: Any = LlamaConfig(**settings, tie_word_embeddings=False, attn_implementation="sdpa")  # type: ignore[call-arg]
    torch_dtype = _dtype(dtype)
    device = resolve_device(device)
    with torch.device("meta"):
        model: Any = LlamaForCausalLM(config).to(torch_dtype)  # type: ignore[arg-type]
    model.to_empty(device=device)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0)  # norms
            else:
                random_weights(param, _stream_key(seed, pname), std / param.shape[-1] ** 0.5)
    with device:
        model.model.rotary_emb = LlamaRotaryEmbedding(config)  # to_empty left its buffer empty
    model.eval()
    identity = json.dumps({"config": settings, "seed": seed, "std": std, "generator": GENERATOR}, sort_keys=True)
    layout = KVLayout(model=f"llama-random:{name}:{hashlib.sha256(identity.encode()).hexdigest()[:16]}",
                      num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                      head_dim=config.head_dim, dtype=dtype)
    return model, layout


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{name!r} is not a floating-point dtype (float32, bfloat16, float16)")
    return dtype


GENERATOR = "splitmix64-uniform-v1"  # named in fingerprints: change it and old KV is a miss
_CHUNK = 1 << 24  # elements drawn at a time (bounds the int64 and float64 temporaries)
_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _stream_key(seed: int, name: str) -> int:
    return _signed(int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little"))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def random_weights(param: torch.Tensor, key: int, std: float) -> None:
    """Fill ``param`` with uniform values of standard deviation ``std``, the same bits on any
    device: splitmix64 of (key, element index) in wrapping int64 arithmetic, the top 24 bits
    as a float in [0, 1), scaled in float64, rounded once to the parameter's dtype. No
    device random generator is involved (CPU and CUDA generators draw different numbers)."""
    flat = param.view(-1)
    scale = std * 3 ** 0.5  # U(-a, a) has standard deviation a / sqrt(3)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        z = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=param.device) * _GOLDEN + key
        z = (z ^ _shift_right(z, 30)) * _MIX1
        z = (z ^ _shift_right(z, 27)) * _MIX2
        z = z ^ _shift_right(z, 31)
        unit = _shift_right(z, 40).to(torch.float64) * 2.0 ** -24
        flat[start:stop] = ((unit * 2.0 - 1.0) * scale).to(param.dtype)
